"""What the DETR family (`lfi_jax.models.detr`, `.conditional_detr`, `.detr_segm`) shares: the
architecture config, the output types, and the attention-free pieces (masks and position
embeddings, dropout, linear / LayerNorm / MLP heads, gates, the layer loop, the output).

`lfi_jax.models.detr` re-exports every name here, so `from lfi_jax.models.detr import
DetrConfig` (and the rest) keeps working.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.models.resnet import DTYPES, ResNetConfig, feature_size
from lfi_jax.ops import GateParams

PRETRAINED_GATE_BIAS = (-4.0, 4.0)
INTERACTION_IN = ("decoder_cross", "encoder_self")


@dataclasses.dataclass(frozen=True)
class DetrConfig:
    """Everything that fixes the DETR / I-DETR architecture (DETR-R50 defaults)."""

    backbone: ResNetConfig = ResNetConfig()
    hidden_size: int = 256  # d_model
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_heads: int = 8
    decoder_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    num_queries: int = 100
    num_classes: int = 91  # logits have num_classes + 1 entries (the last: no object)
    dropout: float = 0.1  # active only when the model is called with an rng
    activation_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    auxiliary_outputs: bool = True  # per-decoder-layer logits and boxes for the auxiliary losses
    dtype: str = "float32"  # compute dtype of the transformer; parameters are float32
    # I-DETR switches (SPEC sections 1 and 7).
    interaction_in: str = "decoder_cross"  # decoder_cross | encoder_self
    interaction_queries: bool = False  # IQ
    interaction_constraint: bool = False  # IC: return C_agt rows for the dense alignment loss
    gated_control: bool = True  # GC
    gate_hidden: int = 8
    gate_bias_init: tuple[float, float] = (0.0, 0.0)
    gate_init_scale: float = 0.02
    align_layers: tuple[int, ...] | None = None  # of the layers holding the interaction; None = all
    attn_impl: str = "xla"  # xla | chunked | pallas | auto (interaction attention)

    def __post_init__(self):
        for heads, name in ((self.encoder_heads, "encoder_heads"), (self.decoder_heads, "decoder_heads")):
            if self.hidden_size % heads:
                raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.{name}={heads}")
        if self.hidden_size % 4:
            raise ValueError(f"model.hidden_size={self.hidden_size} must divide by 4 (sine position embedding)")
        if self.interaction_in not in INTERACTION_IN:
            raise ValueError(f"model.interaction_in={self.interaction_in!r}; expected one of {INTERACTION_IN}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.gate_hidden < 0:
            raise ValueError(f"model.gate_hidden={self.gate_hidden} must be >= 0")
        if len(self.gate_bias_init) != 2:
            raise ValueError(f"model.gate_bias_init={self.gate_bias_init} must have 2 entries")
        for rate, name in ((self.dropout, "dropout"), (self.activation_dropout, "activation_dropout")):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"model.{name}={rate} must be in [0, 1)")
        for name in ("encoder_layers", "decoder_layers", "num_queries", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        n = self.interaction_layers
        for i in self.resolved_align_layers():
            if not 0 <= i < n:
                raise ValueError(f"model.align_layers has {i}, outside 0..{n - 1} ({self.interaction_in})")

    @property
    def interaction_layers(self) -> int:
        """Number of layers holding the interaction (decoder or encoder layers)."""
        return self.decoder_layers if self.interaction_in == "decoder_cross" else self.encoder_layers

    @property
    def interaction_heads(self) -> int:
        return self.decoder_heads if self.interaction_in == "decoder_cross" else self.encoder_heads

    def resolved_align_layers(self) -> tuple[int, ...]:
        n = self.interaction_layers
        if self.align_layers is None:
            return tuple(range(n))
        return tuple(i % n if i < 0 else i for i in self.align_layers)


def idetr_config(cfg: DetrConfig, **overrides) -> DetrConfig:
    """The I-DETR of an architecture (of any DetrConfig subclass): IQ + IC + GC on unless overridden."""
    base = dict(interaction_queries=True, interaction_constraint=True, gated_control=True)
    base.update(overrides)
    return dataclasses.replace(cfg, **base)


def detr_fields(**overrides) -> dict:
    """All DetrConfig fields as plain values (the backbone a nested dict), for a ConfigDict."""
    plain = lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # noqa: E731
    d = plain(dataclasses.asdict(DetrConfig(**overrides)))
    d["backbone"] = plain(d["backbone"])
    return d


def detr_config(raw, *, where: str = "model") -> DetrConfig:
    """The typed DetrConfig of a plain dict (e.g. `config.model.to_dict()`); unknown keys are
    errors naming the key (`model.x`, `model.backbone.x`), lists become tuples."""
    raw = dict(raw)
    fields = {f.name for f in dataclasses.fields(DetrConfig)}
    bb_fields = {f.name for f in dataclasses.fields(ResNetConfig)}
    bb = dict(raw.pop("backbone", None) or {})
    unknown = [f"{where}.{k}" for k in sorted(set(raw) - fields)]
    unknown += [f"{where}.backbone.{k}" for k in sorted(set(bb) - bb_fields)]
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    tup = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # noqa: E731
    return DetrConfig(backbone=ResNetConfig(**tup(bb)), **tup(raw))


class DetrOutput(NamedTuple):
    """What the detectors' `__call__` returns (a pytree).

    logits [B, Q, C + 1] f32 (Conditional-DETR: [B, Q, C]), pred_boxes [B, Q, 4] f32
    (normalised cx, cy, w, h); aux_logits [L - 1, B, Q, C + 1], aux_boxes [L - 1, B, Q, 4]:
    decoder layers 1..L-1 (None without `auxiliary_outputs`); agt_rows [B, L_align, H, Nq, Nk]
    f32 (padded keys 0) with the interaction constraint, else None; key_mask [B, Nk] bool, the
    valid cells of the feature grid (row-major); query_mask [B, Nq] bool for encoder
    self-attention rows (the image cells), None for the decoder's object queries; attn_rows
    [B, L, Nq, Nk] f32, only when called with `attn_rows=True`: the head-mean rows of every
    layer holding the interaction (C_agt, or C_vfm with IQ off), whatever IC says.
    """

    logits: jax.Array
    pred_boxes: jax.Array
    aux_logits: jax.Array | None
    aux_boxes: jax.Array | None
    agt_rows: jax.Array | None
    key_mask: jax.Array
    query_mask: jax.Array | None
    attn_rows: jax.Array | None = None


class DetrEncoding(NamedTuple):
    """What `encode` returns: memory [B, Nk, D] (the encoder's output), pos [B, Nk, D] (sine
    embedding of the valid cells), key_mask [B, Nk] bool, rows {encoder layer: C rows [B, H, Nk,
    Nk]} of the layers asked for, features [B, h, w, D] (the input projection, before dropout)
    and stages (every backbone stage's map, NHWC)."""

    memory: jax.Array
    pos: jax.Array
    key_mask: jax.Array
    rows: dict
    features: jax.Array
    stages: tuple


def feature_grid(cfg: DetrConfig, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the feature grid (the encoder's keys) of a padded height x width batch."""
    return feature_size(cfg.backbone, height, width)


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of torch's `interpolate(mode="nearest")`: floor(i * float32(n_in / n_out)), clipped."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def downsample_mask(pixel_mask, size: tuple[int, int]):
    """[B, H, W] bool -> [B, h, w] bool by nearest neighbour, exactly torch's `interpolate`."""
    _, hin, win = pixel_mask.shape
    return pixel_mask[:, nearest_index(hin, size[0])][:, :, nearest_index(win, size[1])]


def sine_position_embedding(mask, num_feats: int, temperature: float = 10000.0):
    """DETR's normalised sine embedding of the valid cells: [B, h, w] bool -> [B, h*w, 2*num_feats] f32."""
    m = mask.astype(jnp.float32)
    y, x = jnp.cumsum(m, axis=1), jnp.cumsum(m, axis=2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    i = np.arange(num_feats)
    dim_t = jnp.float32(temperature) ** jnp.asarray(2 * (i // 2) / num_feats, jnp.float32)

    def embed(t):
        t = t[..., None] / dim_t
        return jnp.stack([jnp.sin(t[..., 0::2]), jnp.cos(t[..., 1::2])], axis=4).reshape(*t.shape[:3], num_feats)

    b, h, w = mask.shape
    return jnp.concatenate([embed(y), embed(x)], axis=-1).reshape(b, h * w, 2 * num_feats)


def check_inputs(cfg: DetrConfig, pixel_values, pixel_mask, what: str):
    """The bool pixel mask of a call (all valid when None); wrong shapes are errors naming `what`."""
    c = cfg.backbone.num_channels
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != c:
        raise ValueError(f"{what} expects pixel_values [B, H, W, {c}], got {pixel_values.shape}")
    b, height, width, _ = pixel_values.shape
    if pixel_mask is None:
        return jnp.ones((b, height, width), bool)
    if pixel_mask.shape != (b, height, width):
        raise ValueError(f"{what}: pixel_mask has shape {pixel_mask.shape}, pixel_values {pixel_values.shape}")
    return pixel_mask.astype(bool)


def dropout(x, rate: float, rng, site: int):
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(rng, site), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def fold_rng(rng, i):
    return None if rng is None else jax.random.fold_in(rng, i)


def linear(din, dout, cfg: DetrConfig, rngs, *, init=None, bias_init=None):
    return nnx.Linear(
        din,
        dout,
        dtype=DTYPES[cfg.dtype],
        param_dtype=jnp.float32,
        kernel_init=init or nnx.initializers.xavier_uniform(),
        bias_init=bias_init or nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def layer_norm(cfg: DetrConfig, rngs):
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=DTYPES[cfg.dtype], param_dtype=jnp.float32, rngs=rngs
    )


def input_projection(cfg: DetrConfig, rngs):
    """The 1x1 conv from the backbone's last stage to D channels."""
    return nnx.Conv(
        cfg.backbone.out_channels,
        cfg.hidden_size,
        kernel_size=(1, 1),
        dtype=DTYPES[cfg.dtype],
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.xavier_uniform(),
        rngs=rngs,
    )


class Embedding(nnx.Module):
    """A learned table `weight` [n, D] (transformers' nn.Embedding, read whole)."""

    def __init__(self, n: int, d: int, rngs: nnx.Rngs):
        self.weight = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (n, d), jnp.float32))


class Gate(nnx.Module):
    """Per-head Gated Control Network parameters (Eq. 5); the op applies them."""

    def __init__(self, cfg: DetrConfig, heads: int, rngs: nnx.Rngs):
        g, init = cfg.gate_hidden, nnx.initializers.normal(cfg.gate_init_scale)
        if g > 0:
            self.w1 = nnx.Param(init(rngs.params(), (heads, 2, g), jnp.float32))
            self.b1 = nnx.Param(jnp.zeros((heads, g), jnp.float32))
            self.w2 = nnx.Param(init(rngs.params(), (heads, g, 2), jnp.float32))
        else:
            self.w1 = self.b1 = None
            self.w2 = nnx.Param(init(rngs.params(), (heads, 2, 2), jnp.float32))
        self.b2 = nnx.Param(jnp.tile(jnp.asarray(cfg.gate_bias_init, jnp.float32)[None], (heads, 1)))

    def params(self) -> GateParams:
        w1 = None if self.w1 is None else self.w1[...]
        b1 = None if self.b1 is None else self.b1[...]
        return GateParams(w1, b1, self.w2[...], self.b2[...])


class MLPHead(nnx.Module):
    """transformers' `*MLPPredictionHead` of any depth: linear layers (`layers/i`), ReLU between."""

    def __init__(self, cfg: DetrConfig, dims: tuple[int, ...], rngs: nnx.Rngs):
        self.layers = nnx.List([linear(a, b, cfg, rngs) for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class BoxHead(MLPHead):
    """transformers' `DetrMLPPredictionHead`: 3 linear layers (D, D, D, 4), ReLU between."""

    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        super().__init__(cfg, (d, d, d, 4), rngs)


def rows_wanted(cfg: DetrConfig, part: str, attn_rows: bool = False) -> frozenset[int]:
    """The layers of `part` ("encoder_self" | "decoder_cross") whose attention rows a call needs:
    the align layers with the interaction constraint, every layer with `attn_rows`."""
    if cfg.interaction_in != part or not (attn_rows or cfg.interaction_constraint):
        return frozenset()
    return frozenset(range(cfg.interaction_layers) if attn_rows else cfg.resolved_align_layers())


def run_layers(layers, x, rng, want, step: Callable, *, norm=None, every: bool = False):
    """x through `layers`: `step(i, layer, x, fold_rng(rng, i), want_rows=i in want)` -> (x, rows).

    -> (x, {layer: rows} of the layers in `want`, outputs): `norm(x)` of every layer (`every`)
    or of the last one, stacked [L or 1, ...]; None without `norm`."""
    rows, outs = {}, []
    for i, layer in enumerate(layers):
        x, r = step(i, layer, x, fold_rng(rng, i), want_rows=i in want)
        if r is not None:
            rows[i] = r
        if norm is not None and (every or i == len(layers) - 1):
            outs.append(norm(x))
    return x, rows, (jnp.stack(outs) if outs else None)


def feed_forward(layer, x, rng, site: int):
    """Post-LayerNorm FFN block of a layer (`fc1`, ReLU, `fc2`, `final_layer_norm`), dropout at
    `site` (activation) and `site + 1` (output)."""
    cfg = layer.cfg
    h = dropout(jax.nn.relu(layer.fc1(x)), cfg.activation_dropout, rng, site)
    return layer.final_layer_norm(x + dropout(layer.fc2(h), cfg.dropout, rng, site + 1))


def detr_output(cfg: DetrConfig, logits, boxes, rows: dict, key_mask, *, attn_rows: bool = False) -> DetrOutput:
    """The DetrOutput of the stacked per-layer head outputs ([L or 1, ...], last = final) and the
    attention rows {layer: [B, H, Nq, Nk]} of the part holding the interaction."""
    align = rows_wanted(cfg, cfg.interaction_in)
    agt = [rows[i] for i in sorted(rows) if i in align]
    return DetrOutput(
        logits=logits[-1],
        pred_boxes=boxes[-1],
        aux_logits=logits[:-1] if cfg.auxiliary_outputs else None,
        aux_boxes=boxes[:-1] if cfg.auxiliary_outputs else None,
        agt_rows=jnp.stack(agt, axis=1).astype(jnp.float32) if agt else None,
        key_mask=key_mask,
        query_mask=key_mask if (agt and cfg.interaction_in == "encoder_self") else None,
        attn_rows=jnp.stack([rows[i].astype(jnp.float32).mean(axis=1) for i in sorted(rows)], axis=1)
        if attn_rows
        else None,
    )


def count_model_params(build: Callable[[], nnx.Module], *, include_frozen_stats: bool = False) -> int:
    """Parameters of `build()` from shapes only (`nnx.eval_shape`); by default without the frozen
    BatchNorm tensors (buffers in PyTorch, so not in the usual DETR counts)."""
    flat = nnx.to_flat_state(nnx.state(nnx.eval_shape(build), nnx.Param))
    return sum(math.prod(v.shape) for path, v in flat if include_frozen_stats or "normalization" not in path)
