"""DETR and I-DETR in Flax NNX, with the math of transformers' `DetrForObjectDetection`.

DETR (Carion et al. 2020): a ResNet backbone (frozen BatchNorm, `lfi_jax.models.resnet`), a
1x1 input projection to D channels, sine position embeddings of the valid (unpadded) cells,
a post-LayerNorm transformer encoder over the feature grid, a decoder of `num_queries`
learned object queries (self-attention, then cross-attention to the encoder's output), a
final LayerNorm, a class head (num_classes + 1 logits, the last one "no object") and a
3-layer box head (sigmoid, normalised cx, cy, w, h). Padding: `pixel_mask` is downsampled
to the feature grid by nearest neighbour (transformers' rule); padded cells get no
attention probability in the encoder and the cross-attention.

I-DETR (SPEC section 7): `interaction_queries` adds an interaction query projection
(`interaction_query`, D x D + bias, applied to the same input as `q_proj`) and a per-head
gate (`gate`) to the cross-attention of every decoder layer (`interaction_in =
"decoder_cross"`, the default) or to the self-attention of every encoder layer
(`"encoder_self"`); the attention is `lfi_jax.ops.interaction_attention` with the key mask.
`interaction_constraint` returns the rows of C_agt (C_vfm when interaction queries are off)
of the align layers for `lfi_jax.losses.dense_alignment_loss`.
`lfi_jax.models.convert.detr.idetr_from_detr` builds an I-DETR from a DETR with Wq' = Wq
(and `gate_bias_init`, [-4, +4] for pretrained detectors), so it starts out computing
almost exactly the DETR.

Parameter paths mirror transformers' checkpoint names: `backbone/...` is
`model.backbone.conv_encoder.model...`, `input_projection`, `query_position_embeddings`,
`encoder/layers/i/{self_attn/{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2,
final_layer_norm}`, `decoder/layers/i/{..., encoder_attn/...}`, `decoder/layernorm` are
`model.<same>`, and `class_labels_classifier`, `bbox_predictor/layers/i` are top-level
(see `lfi_jax.models.convert.detr`).

Dropout (config `dropout`, `activation_dropout`) runs only when the call is given an `rng`.
Auxiliary outputs follow the original DETR: each decoder layer's output through the final
LayerNorm and the heads, the recurrence itself unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.models.resnet import DTYPES, ResNet, ResNetConfig, feature_size
from lfi_jax.ops import GateParams, dot_product_attention, interaction_attention

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
    """The I-DETR of an architecture: IQ + IC + GC on unless overridden."""
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
    """What `Detr.__call__` returns (a pytree).

    logits [B, Q, C + 1] f32, pred_boxes [B, Q, 4] f32 (normalised cx, cy, w, h);
    aux_logits [L - 1, B, Q, C + 1], aux_boxes [L - 1, B, Q, 4]: decoder layers 1..L-1
    (None without `auxiliary_outputs`); agt_rows [B, L_align, H, Nq, Nk] f32 (padded keys 0)
    with the interaction constraint, else None; key_mask [B, Nk] bool, the valid cells of the
    feature grid (row-major); query_mask [B, Nq] bool for encoder self-attention rows (the
    image cells), None for the decoder's object queries.
    """

    logits: jax.Array
    pred_boxes: jax.Array
    aux_logits: jax.Array | None
    aux_boxes: jax.Array | None
    agt_rows: jax.Array | None
    key_mask: jax.Array
    query_mask: jax.Array | None


def feature_grid(cfg: DetrConfig, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the feature grid (the encoder's keys) of a padded height x width batch."""
    return feature_size(cfg.backbone, height, width)


def downsample_mask(pixel_mask, size: tuple[int, int]):
    """[B, H, W] bool -> [B, h, w] bool by nearest neighbour, exactly torch's `interpolate`
    (source index floor(i * float32(H / h)), clipped)."""
    _, hin, win = pixel_mask.shape

    def index(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    return pixel_mask[:, index(hin, size[0])][:, :, index(win, size[1])]


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


def dropout(x, rate: float, rng, site: int):
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(rng, site), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def linear(din, dout, cfg: DetrConfig, rngs, *, init=None):
    return nnx.Linear(
        din,
        dout,
        dtype=DTYPES[cfg.dtype],
        param_dtype=jnp.float32,
        kernel_init=init or nnx.initializers.xavier_uniform(),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def layer_norm(cfg: DetrConfig, rngs):
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=DTYPES[cfg.dtype], param_dtype=jnp.float32, rngs=rngs
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


class Attention(nnx.Module):
    """Multi-head attention of DETR (q_proj, k_proj, v_proj, out_proj), plain or interaction."""

    def __init__(self, cfg: DetrConfig, heads: int, rngs: nnx.Rngs, *, interaction: bool = False):
        self.cfg, self.heads = cfg, heads
        d = cfg.hidden_size
        self.k_proj = linear(d, d, cfg, rngs)
        self.v_proj = linear(d, d, cfg, rngs)
        self.q_proj = linear(d, d, cfg, rngs)
        self.out_proj = linear(d, d, cfg, rngs)
        self.interaction = interaction
        if interaction:
            self.interaction_query = linear(d, d, cfg, rngs)
            self.gate = Gate(cfg, heads, rngs) if cfg.gated_control else None

    def __call__(self, q_in, k_in, v_in, key_mask, *, want_rows: bool = False):
        """q_in [B, Nq, D], k_in, v_in [B, Nk, D], key_mask [B, Nk] bool or None.
        Returns (out [B, Nq, D], C rows [B, H, Nq, Nk] f32 when want_rows else None)."""
        b, nq, d = q_in.shape
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.q_proj(q_in)), split(self.k_proj(k_in)), split(self.v_proj(v_in))
        if self.interaction:
            q2 = split(self.interaction_query(q_in))
            gate = self.gate.params() if self.gate is not None else None
            o, rows = interaction_attention(
                q, q2, k, v, gate, impl=self.cfg.attn_impl, key_mask=key_mask, return_rows=want_rows
            )
        else:
            o, rows = dot_product_attention(q, k, v, key_mask=key_mask)
        return self.out_proj(o.reshape(b, nq, d)), (rows if want_rows else None)


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs, *, interaction: bool):
        self.cfg = cfg
        d = cfg.hidden_size
        self.self_attn = Attention(cfg, cfg.encoder_heads, rngs, interaction=interaction)
        self.self_attn_layer_norm = layer_norm(cfg, rngs)
        self.fc1 = linear(d, cfg.encoder_ffn_dim, cfg, rngs)
        self.fc2 = linear(cfg.encoder_ffn_dim, d, cfg, rngs)
        self.final_layer_norm = layer_norm(cfg, rngs)

    def __call__(self, x, pos, key_mask, rng, *, want_rows: bool):
        cfg = self.cfg
        qk = x + pos
        a, rows = self.self_attn(qk, qk, x, key_mask, want_rows=want_rows)
        x = self.self_attn_layer_norm(x + dropout(a, cfg.dropout, rng, 0))
        h = dropout(jax.nn.relu(self.fc1(x)), cfg.activation_dropout, rng, 1)
        x = self.final_layer_norm(x + dropout(self.fc2(h), cfg.dropout, rng, 2))
        return x, rows


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs, *, interaction: bool):
        self.cfg = cfg
        d = cfg.hidden_size
        self.self_attn = Attention(cfg, cfg.decoder_heads, rngs)
        self.self_attn_layer_norm = layer_norm(cfg, rngs)
        self.encoder_attn = Attention(cfg, cfg.decoder_heads, rngs, interaction=interaction)
        self.encoder_attn_layer_norm = layer_norm(cfg, rngs)
        self.fc1 = linear(d, cfg.decoder_ffn_dim, cfg, rngs)
        self.fc2 = linear(cfg.decoder_ffn_dim, d, cfg, rngs)
        self.final_layer_norm = layer_norm(cfg, rngs)

    def __call__(self, x, query_pos, memory, pos, key_mask, rng, *, want_rows: bool):
        cfg = self.cfg
        qk = x + query_pos
        a, _ = self.self_attn(qk, qk, x, None)
        x = self.self_attn_layer_norm(x + dropout(a, cfg.dropout, rng, 0))
        a, rows = self.encoder_attn(x + query_pos, memory + pos, memory, key_mask, want_rows=want_rows)
        x = self.encoder_attn_layer_norm(x + dropout(a, cfg.dropout, rng, 1))
        h = dropout(jax.nn.relu(self.fc1(x)), cfg.activation_dropout, rng, 2)
        x = self.final_layer_norm(x + dropout(self.fc2(h), cfg.dropout, rng, 3))
        return x, rows


def rows_wanted(cfg: DetrConfig, part: str) -> frozenset[int]:
    if not cfg.interaction_constraint or cfg.interaction_in != part:
        return frozenset()
    return frozenset(cfg.resolved_align_layers())


def fold_rng(rng, i):
    return None if rng is None else jax.random.fold_in(rng, i)


class Encoder(nnx.Module):
    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        inter = cfg.interaction_queries and cfg.interaction_in == "encoder_self"
        self.layers = nnx.List([EncoderLayer(cfg, rngs, interaction=inter) for _ in range(cfg.encoder_layers)])

    def __call__(self, x, pos, key_mask, rng):
        want, rows = rows_wanted(self.cfg, "encoder_self"), []
        for i, layer in enumerate(self.layers):
            x, r = layer(x, pos, key_mask, fold_rng(rng, i), want_rows=i in want)
            if r is not None:
                rows.append(r)
        return x, rows


class Decoder(nnx.Module):
    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        inter = cfg.interaction_queries and cfg.interaction_in == "decoder_cross"
        self.layers = nnx.List([DecoderLayer(cfg, rngs, interaction=inter) for _ in range(cfg.decoder_layers)])
        self.layernorm = layer_norm(cfg, rngs)

    def __call__(self, query_pos, memory, pos, key_mask, rng):
        """Returns ([L or 1, B, Q, D] normalised layer outputs, C rows of the align layers)."""
        cfg = self.cfg
        x = jnp.zeros_like(query_pos)
        want, rows, outs = rows_wanted(cfg, "decoder_cross"), [], []
        for i, layer in enumerate(self.layers):
            x, r = layer(x, query_pos, memory, pos, key_mask, fold_rng(rng, i), want_rows=i in want)
            if r is not None:
                rows.append(r)
            if cfg.auxiliary_outputs or i == len(self.layers) - 1:
                outs.append(self.layernorm(x))
        return jnp.stack(outs), rows


class BoxHead(nnx.Module):
    """transformers' `DetrMLPPredictionHead`: 3 linear layers, ReLU between."""

    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.layers = nnx.List([linear(d, d, cfg, rngs), linear(d, d, cfg, rngs), linear(d, 4, cfg, rngs)])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class Detr(nnx.Module):
    """DETR / I-DETR: `model(pixel_values [B, H, W, 3], pixel_mask [B, H, W] bool, *, rng=None)`
    -> `DetrOutput`. pixel_values are normalised as transformers' image processor does."""

    def __init__(self, cfg: DetrConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.backbone = ResNet(cfg.backbone, rngs=rngs)
        self.input_projection = nnx.Conv(
            cfg.backbone.out_channels,
            d,
            kernel_size=(1, 1),
            dtype=DTYPES[cfg.dtype],
            param_dtype=jnp.float32,
            kernel_init=nnx.initializers.xavier_uniform(),
            rngs=rngs,
        )
        self.query_position_embeddings = Embedding(cfg.num_queries, d, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)
        self.class_labels_classifier = linear(d, cfg.num_classes + 1, cfg, rngs, init=nnx.initializers.lecun_normal())
        self.bbox_predictor = BoxHead(cfg, rngs)

    def __call__(self, pixel_values, pixel_mask=None, *, rng=None) -> DetrOutput:
        cfg = self.cfg
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.backbone.num_channels:
            raise ValueError(
                f"DETR expects pixel_values [B, H, W, {cfg.backbone.num_channels}], got {pixel_values.shape}"
            )
        b, height, width, _ = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = jnp.ones((b, height, width), bool)
        elif pixel_mask.shape != (b, height, width):
            raise ValueError(f"DETR: pixel_mask has shape {pixel_mask.shape}, pixel_values {pixel_values.shape}")
        feats = self.backbone(pixel_values)[-1]
        h, w = feats.shape[1:3]
        mask = downsample_mask(pixel_mask.astype(bool), (h, w))
        dtype = DTYPES[cfg.dtype]
        pos = sine_position_embedding(mask, cfg.hidden_size // 2).astype(dtype)
        x = self.input_projection(feats.astype(dtype)).reshape(b, h * w, cfg.hidden_size)
        key_mask = mask.reshape(b, h * w)
        x = dropout(x, cfg.dropout, rng, 0)
        memory, enc_rows = self.encoder(x, pos, key_mask, fold_rng(rng, 1))
        query_pos = self.query_position_embeddings.weight[...].astype(dtype)
        query_pos = jnp.broadcast_to(query_pos, (b, cfg.num_queries, cfg.hidden_size))
        states, dec_rows = self.decoder(query_pos, memory, pos, key_mask, fold_rng(rng, 2))
        logits = self.class_labels_classifier(states).astype(jnp.float32)
        boxes = jax.nn.sigmoid(self.bbox_predictor(states).astype(jnp.float32))
        rows = enc_rows or dec_rows
        return DetrOutput(
            logits=logits[-1],
            pred_boxes=boxes[-1],
            aux_logits=logits[:-1] if cfg.auxiliary_outputs else None,
            aux_boxes=boxes[:-1] if cfg.auxiliary_outputs else None,
            agt_rows=jnp.stack(rows, axis=1).astype(jnp.float32) if rows else None,
            key_mask=key_mask,
            query_mask=key_mask if (rows and cfg.interaction_in == "encoder_self") else None,
        )


def count_params(cfg: DetrConfig, *, include_frozen_stats: bool = False) -> int:
    """Parameters from shapes only (`nnx.eval_shape`); by default without the frozen BatchNorm
    tensors (buffers in PyTorch, so not in the usual DETR counts)."""
    abstract = nnx.eval_shape(lambda: Detr(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return sum(math.prod(v.shape) for path, v in flat if include_frozen_stats or "normalization" not in path)

