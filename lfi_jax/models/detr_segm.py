"""DETR's mask head in Flax NNX, with the math of transformers' `DetrForSegmentation`.

`DetrForSegmentation(cfg)` holds a DETR / I-DETR (`detr`, `lfi_jax.models.detr.Detr`) and
DETR's segmentation head (Carion et al. 2020, `models/segmentation.py`):

- `bbox_attention` (DETR's `MHAttentionMap`, transformers' `DetrMHAttentionMap`): the
  attention map of each object query (the decoder's last normalised output) over the encoder
  memory, without the value product and without position embeddings: q_proj, k_proj (D x D +
  bias), scores q.k / sqrt(d_head) per head, padded cells excluded, and ONE softmax over all
  heads and cells of a query jointly (DETR's `softmax(weights.flatten(2))`), -> [B, Q, H, h, w].
- `mask_head` (`MaskHeadSmallConv`, transformers' `DetrMaskHeadSmallConv`): the input
  projection's feature map (D channels, repeated per query) concatenated with the query's H
  attention maps, two 3x3 conv + GroupNorm(8) + ReLU blocks (D + H -> D + H -> D / 2), then three
  FPN stages over the backbone's stage 3, 2, 1 maps (1x1 `fpn_adapter` of the stage map, plus the
  current features upsampled by nearest neighbour as torch's `interpolate`, then `refine`: 3x3
  conv + GroupNorm + ReLU, D / 2 -> D / 4 -> D / 8 -> D / 16 channels) and `output_conv` (3x3 to
  one channel): per-query mask logits at the stage-1 resolution (1/4 of the padded input).

Parameter paths are transformers' 5 names (`lfi_jax.models.convert.detr_segm`): `detr/...` is
`detr.<DETR name>`, `bbox_attention/{q_proj,k_proj}`, `mask_head/conv1/{conv,norm}`,
`mask_head/conv2/...`, `mask_head/fpn_stages/i/{fpn_adapter,refine/{conv,norm}}`,
`mask_head/output_conv`. The backbone must have at least 4 stages (the FPN reads stages 1-3).

DETR's recipe trains the box model first, then only the mask head (the DETR frozen) for 25
epochs; with interaction learning the DETR inside is an I-DETR and `DetrSegmOutput.detr`
carries its C_agt rows as for detection.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.models.detr import Detr, DetrConfig, DetrOutput, check_inputs, linear, nearest_index
from lfi_jax.models.resnet import DTYPES

GN_EPS = 1e-5  # torch.nn.GroupNorm's default


class DetrSegmOutput(NamedTuple):
    """`detr`: the DETR's outputs (logits, boxes, aux, C_agt rows, key mask); `pred_masks`
    [B, Q, H/4, W/4] f32 mask logits (1/4 of the padded input: the backbone's first stage)."""

    detr: DetrOutput
    pred_masks: jax.Array


def check_segm_config(cfg: DetrConfig) -> None:
    """The mask head's constraints on an architecture (each names the key)."""
    d, h = cfg.hidden_size, cfg.encoder_heads
    if len(cfg.backbone.depths) < 4:
        raise ValueError(f"model.backbone.depths={cfg.backbone.depths}: the mask head needs >= 4 stages")
    if (d + h) % 8:
        raise ValueError(f"model.hidden_size + model.encoder_heads = {d + h} must divide by 8 (mask head)")
    if d % 16:
        raise ValueError(f"model.hidden_size={d} must divide by 16 (mask head)")
    for c in (d + h, d // 2, d // 4, d // 8, d // 16):
        if c % min(8, c):
            raise ValueError(f"mask head width {c} is not divisible by its GroupNorm groups {min(8, c)}")


def resize_nearest(x, size: tuple[int, int]):
    """[N, h, w, C] -> [N, H, W, C], torch's `interpolate(mode="nearest")` (floor(i * in / out))."""
    _, hin, win, _ = x.shape
    return x[:, nearest_index(hin, size[0])][:, :, nearest_index(win, size[1])]


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm (two-pass variance, eps 1e-5) on NHWC; `scale` / `bias` per channel."""

    def __init__(self, channels: int, groups: int):
        self.groups = groups
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x):
        n, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(n, h, w, c)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def conv(cin: int, cout: int, kernel: int, cfg: DetrConfig, rngs: nnx.Rngs):
    """A biased conv with PyTorch's padding kernel // 2 and DETR's init (kaiming_uniform, a=1)."""
    p = kernel // 2
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(kernel, kernel),
        padding=((p, p), (p, p)),
        dtype=DTYPES[cfg.dtype],
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "uniform"),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


class ConvBlock(nnx.Module):
    """3x3 conv, GroupNorm(min(8, C)), ReLU (transformers' `DetrConvBlock`)."""

    def __init__(self, cin: int, cout: int, cfg: DetrConfig, rngs: nnx.Rngs):
        self.conv = conv(cin, cout, 3, cfg, rngs)
        self.norm = GroupNorm(cout, min(8, cout))

    def __call__(self, x):
        return jax.nn.relu(self.norm(self.conv(x)))


class FPNStage(nnx.Module):
    """fpn_adapter (1x1) of a backbone map + the nearest-upsampled features, then `refine`."""

    def __init__(self, fpn_channels: int, cin: int, cout: int, cfg: DetrConfig, rngs: nnx.Rngs):
        self.fpn_adapter = conv(fpn_channels, cin, 1, cfg, rngs)
        self.refine = ConvBlock(cin, cout, cfg, rngs)

    def __call__(self, x, fpn, num_queries: int):
        """x [B*Q, h, w, cin], fpn [B, H, W, C] (one per image) -> [B*Q, H, W, cout]."""
        f = jnp.repeat(self.fpn_adapter(fpn.astype(x.dtype)), num_queries, axis=0)
        return self.refine(f + resize_nearest(x, f.shape[1:3]))


class MaskHeadSmallConv(nnx.Module):
    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.encoder_heads
        fpn = cfg.backbone.hidden_sizes[:3][::-1]  # stage 3, 2, 1 channels
        self.conv1 = ConvBlock(d + h, d + h, cfg, rngs)
        self.conv2 = ConvBlock(d + h, d // 2, cfg, rngs)
        widths = (d // 2, d // 4, d // 8, d // 16)
        self.fpn_stages = nnx.List([FPNStage(fpn[i], widths[i], widths[i + 1], cfg, rngs) for i in range(3)])
        self.output_conv = conv(d // 16, 1, 3, cfg, rngs)

    def __call__(self, features, attention_maps, fpn_features):
        """features [B, h, w, D] (the input projection), attention_maps [B, Q, H, h, w],
        fpn_features (stage 3, 2, 1 maps, NHWC) -> mask logits [B, Q, H1, W1] f32."""
        b, q, heads, h, w = attention_maps.shape
        x = jnp.repeat(features, q, axis=0)  # [B*Q, h, w, D], query-major within an image
        maps = attention_maps.reshape(b * q, heads, h, w).transpose(0, 2, 3, 1).astype(x.dtype)
        x = self.conv2(self.conv1(jnp.concatenate([x, maps], axis=-1)))
        for stage, fpn in zip(self.fpn_stages, fpn_features):
            x = stage(x, fpn, q)
        out = self.output_conv(x)
        return out.reshape(b, q, *out.shape[1:3]).astype(jnp.float32)


class MHAttentionMap(nnx.Module):
    """The query-over-memory attention map, one softmax over heads x cells (see the module doc)."""

    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads = cfg.encoder_heads
        self.q_proj = linear(d, d, cfg, rngs)
        self.k_proj = linear(d, d, cfg, rngs)

    def __call__(self, queries, memory, key_mask, grid: tuple[int, int]):
        """queries [B, Q, D], memory [B, h*w, D], key_mask [B, h*w] bool -> [B, Q, H, h, w] f32."""
        b, nq, d = queries.shape
        dh = d // self.heads
        q = self.q_proj(queries).reshape(b, nq, self.heads, dh).astype(jnp.float32)
        k = self.k_proj(memory).reshape(b, -1, self.heads, dh).astype(jnp.float32)
        s = jnp.einsum("bqnd,bknd->bqnk", q * np.float32(dh**-0.5), k)
        s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s.reshape(b, nq, -1), axis=-1)
        return p.reshape(b, nq, self.heads, *grid)


class DetrForSegmentation(nnx.Module):
    """`model(pixel_values [B, H, W, 3], pixel_mask [B, H, W] bool, *, rng=None)` -> `DetrSegmOutput`."""

    def __init__(self, cfg: DetrConfig, *, rngs: nnx.Rngs):
        check_segm_config(cfg)
        self.cfg = cfg
        self.detr = Detr(cfg, rngs=rngs)
        self.bbox_attention = MHAttentionMap(cfg, rngs)
        self.mask_head = MaskHeadSmallConv(cfg, rngs)

    def __call__(self, pixel_values, pixel_mask=None, *, rng=None, attn_rows: bool = False) -> DetrSegmOutput:
        """The DETR's steps (`Detr.encode`, `decode`, `predict`), then the mask head on the last
        decoder output, the encoder memory, the input projection and backbone stages 3, 2, 1."""
        detr = self.detr
        pixel_mask = check_inputs(self.cfg, pixel_values, pixel_mask, "DetrForSegmentation")
        enc = detr.encode(pixel_values, pixel_mask, rng, attn_rows=attn_rows)
        states, dec_rows = detr.decode(enc, rng, attn_rows=attn_rows)
        out = detr.predict(enc, states, dec_rows, attn_rows=attn_rows)
        maps = self.bbox_attention(states[-1], enc.memory, enc.key_mask, enc.features.shape[1:3])
        masks = self.mask_head(enc.features, maps, enc.stages[2::-1])
        return DetrSegmOutput(detr=out, pred_masks=masks)


__all__ = [
    "DetrForSegmentation",
    "DetrSegmOutput",
    "GroupNorm",
    "MHAttentionMap",
    "MaskHeadSmallConv",
    "check_segm_config",
    "resize_nearest",
]
