"""Conditional-DETR and I-Conditional-DETR in Flax NNX, the math of transformers'
`ConditionalDetrForObjectDetection` (Meng et al. 2021).

What is DETR's (`lfi_jax.models.detr`, imported, not copied): the ResNet backbone with
frozen BatchNorm, the 1x1 input projection, the sine embedding of the valid cells, the
encoder, the dropout rule, the box head and the gates. What differs:

- Reference points: s = sigmoid(ref_point_head(object query)) [B, Q, 2] (normalised x, y),
  one per object query, shared by every decoder layer; their sine embedding (d/2 features
  per coordinate, [pos_y, pos_x]) times the transformation T = query_scale(decoder state)
  (T = 1 in the first layer) is the spatial query p_q.
- Decoder self-attention: q = sa_qcontent(x) + sa_qpos(o), k = sa_kcontent(x) + sa_kpos(o),
  v = sa_v(x) (o: the object query).
- Decoder cross-attention, the conditional spatial query: per head, the query is the
  concatenation [content | spatial] = [ca_qcontent(x) (+ ca_qpos(o) in the first layer) |
  ca_qpos_sine(p_q)], the key [ca_kcontent(m) (+ ca_kpos(pos) in the first layer) |
  ca_kpos(pos)], the value ca_v(m); scores scaled by 1/sqrt(2 d_head). The first layer alone
  has `ca_qpos_proj` (as in transformers' checkpoints).
- Classification: `num_classes` logits for a sigmoid focal loss (no no-object class); the
  class bias starts at -log((1 - 0.01) / 0.01), the prior of the original code.
- Boxes: box_head(state) with inverse_sigmoid(s) added to (cx, cy), then sigmoid.

I-Conditional-DETR (SPEC section 7): `interaction_queries` with `interaction_in =
"decoder_cross"` adds, per decoder layer, `encoder_attn/interaction_query` (D x D + bias),
which replaces the content projection `ca_qcontent_proj` of the query: q2 = [interaction(x)
(+ ca_qpos(o) in the first layer) | ca_qpos_sine(p_q)]; the spatial half is shared with q.
`lfi_jax.ops.interaction_attention` requires v's head dimension to equal q's, so the value
goes in as [v | 0] (2 d_head wide) and the first d_head output channels are kept: exactly
the attention over v, at twice the value matmul's cost. `interaction_in = "encoder_self"`
reuses DETR's encoder with interaction (the decoder unchanged). Parameter paths are
transformers' checkpoint names (`lfi_jax.models.convert.conditional_detr`).

Auxiliary outputs follow the original Conditional-DETR: each decoder layer's output through
the final LayerNorm and the heads, the recurrence unchanged. (transformers' model, when its
config has `auxiliary_loss=True`, also feeds the normalised state to the next layer; our
comparison loads it with `auxiliary_loss=False`.)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.models.detr import (
    BoxHead,
    DetrBase,
    DetrConfig,
    DetrEncoding,
    DetrOutput,
    Gate,
    MLPHead,
    count_model_params,
    detr_output,
    dropout,
    feed_forward,
    fold_rng,
    idetr_config,
    layer_norm,
    linear,
    rows_wanted,
    run_layers,
)
from lfi_jax.ops import dot_product_attention, interaction_attention

PRIOR_PROB = 0.01  # focal-loss prior of the class bias (the original code)


@dataclasses.dataclass(frozen=True)
class ConditionalDetrConfig(DetrConfig):
    """Conditional-DETR-R50 defaults; the fields and checks are DETR's (`DetrConfig`), except
    that `num_queries` is 300 and the logits have `num_classes` entries (no no-object class)."""

    num_queries: int = 300


def iconditional_detr_config(cfg: ConditionalDetrConfig, **overrides) -> ConditionalDetrConfig:
    """The I-Conditional-DETR of an architecture: IQ + IC + GC on unless overridden (`idetr_config`)."""
    return idetr_config(cfg, **overrides)


def anchor_sine_embedding(points, num_feats: int, temperature: float = 10000.0):
    """Sine embedding of normalised (x, y) points [..., 2] -> [..., 2 * num_feats] f32
    ([embed(y), embed(x)], sin / cos interleaved), transformers' `encode_sinusoidal_position_embedding`."""
    i = np.arange(num_feats)
    dim_t = jnp.float32(temperature) ** jnp.asarray(2 * (i // 2) / num_feats, jnp.float32)

    def embed(t):
        e = t[..., None] * jnp.float32(2 * math.pi) / dim_t
        return jnp.stack([jnp.sin(e[..., 0::2]), jnp.cos(e[..., 1::2])], axis=-1).reshape(*t.shape, num_feats)

    points = points.astype(jnp.float32)
    return jnp.concatenate([embed(points[..., 1]), embed(points[..., 0])], axis=-1)


def inverse_sigmoid(x, eps: float = 1e-5):
    """log(x / (1 - x)) with both clamped at eps (transformers' / the original code's rule)."""
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


class OutProjection(nnx.Module):
    """The attention's output projection (`out_proj`) and, for the interaction cross-attention,
    the interaction query and the gate (the checkpoints' `self_attn` / `encoder_attn` modules)."""

    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs, *, interaction: bool = False):
        d = cfg.hidden_size
        self.out_proj = linear(d, d, cfg, rngs)
        self.interaction = interaction
        if interaction:
            self.interaction_query = linear(d, d, cfg, rngs)
            self.gate = Gate(cfg, cfg.decoder_heads, rngs) if cfg.gated_control else None


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs, *, first: bool, interaction: bool):
        self.cfg, self.first = cfg, first
        d = cfg.hidden_size
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj"):
            setattr(self, name, linear(d, d, cfg, rngs))
        self.self_attn = OutProjection(cfg, rngs)
        self.self_attn_layer_norm = layer_norm(cfg, rngs)
        self.ca_qcontent_proj = linear(d, d, cfg, rngs)
        self.ca_qpos_proj = linear(d, d, cfg, rngs) if first else None
        for name in ("ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj"):
            setattr(self, name, linear(d, d, cfg, rngs))
        self.encoder_attn = OutProjection(cfg, rngs, interaction=interaction)
        self.encoder_attn_layer_norm = layer_norm(cfg, rngs)
        self.fc1 = linear(d, cfg.decoder_ffn_dim, cfg, rngs)
        self.fc2 = linear(cfg.decoder_ffn_dim, d, cfg, rngs)
        self.final_layer_norm = layer_norm(cfg, rngs)

    def _split(self, t):
        return t.reshape(t.shape[0], t.shape[1], self.cfg.decoder_heads, -1)

    def cross_attention(self, x, query_pos, query_sine, memory, pos, key_mask, *, want_rows: bool):
        """The conditional cross-attention -> (out [B, Q, D], C rows [B, H, Q, Nk] f32 or None)."""
        cfg, split = self.cfg, self._split
        b, nq, d = x.shape
        content, key = self.ca_qcontent_proj(x), self.ca_kcontent_proj(memory)
        k_pos, v = self.ca_kpos_proj(pos), split(self.ca_v_proj(memory))
        q_pos = self.ca_qpos_proj(query_pos) if self.first else None
        if self.first:
            content, key = content + q_pos, key + k_pos
        spatial = split(self.ca_qpos_sine_proj(query_sine))
        q = jnp.concatenate([split(content), spatial], axis=-1)
        k = jnp.concatenate([split(key), split(k_pos)], axis=-1)
        att = self.encoder_attn
        if att.interaction:
            content2 = att.interaction_query(x)
            if self.first:
                content2 = content2 + q_pos
            q2 = jnp.concatenate([split(content2), spatial], axis=-1)
            gate = att.gate.params() if att.gate is not None else None
            v_wide = jnp.concatenate([v, jnp.zeros_like(v)], axis=-1)  # the op wants v as wide as q
            o, rows = interaction_attention(
                q, q2, k, v_wide, gate, impl=cfg.attn_impl, key_mask=key_mask, return_rows=want_rows
            )
            o = o[..., : v.shape[-1]]
        else:
            o, rows = dot_product_attention(q, k, v, key_mask=key_mask)
        return att.out_proj(o.reshape(b, nq, d)), (rows if want_rows else None)

    def __call__(self, x, query_pos, query_sine, memory, pos, key_mask, rng, *, want_rows: bool):
        cfg, split = self.cfg, self._split
        b, nq, d = x.shape
        q = split(self.sa_qcontent_proj(x) + self.sa_qpos_proj(query_pos))
        k = split(self.sa_kcontent_proj(x) + self.sa_kpos_proj(query_pos))
        o, _ = dot_product_attention(q, k, split(self.sa_v_proj(x)))
        a = self.self_attn.out_proj(o.reshape(b, nq, d))
        x = self.self_attn_layer_norm(x + dropout(a, cfg.dropout, rng, 0))
        a, rows = self.cross_attention(x, query_pos, query_sine, memory, pos, key_mask, want_rows=want_rows)
        x = self.encoder_attn_layer_norm(x + dropout(a, cfg.dropout, rng, 1))
        return feed_forward(self, x, rng, 2), rows


class Decoder(nnx.Module):
    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        inter = cfg.interaction_queries and cfg.interaction_in == "decoder_cross"
        self.layers = nnx.List(
            [DecoderLayer(cfg, rngs, first=i == 0, interaction=inter) for i in range(cfg.decoder_layers)]
        )
        self.layernorm = layer_norm(cfg, rngs)
        self.query_scale = MLPHead(cfg, (d, d, d), rngs)
        self.ref_point_head = MLPHead(cfg, (d, d, 2), rngs)

    def __call__(self, query_pos, memory, pos, key_mask, rng, *, attn_rows: bool = False):
        """-> ([L or 1, B, Q, D] normalised layer outputs, {layer: C rows [B, H, Q, Nk]},
        reference points [B, Q, 2] f32)."""
        cfg = self.cfg
        reference = jax.nn.sigmoid(self.ref_point_head(query_pos).astype(jnp.float32))
        sine = anchor_sine_embedding(reference, cfg.hidden_size // 2).astype(query_pos.dtype)

        def step(i, layer, x, r, **kw):
            query_sine = sine if i == 0 else sine * self.query_scale(x)
            return layer(x, query_pos, query_sine, memory, pos, key_mask, r, **kw)

        want = rows_wanted(cfg, "decoder_cross", attn_rows)
        _, rows, states = run_layers(self.layers, jnp.zeros_like(query_pos), rng, want, step, norm=self.layernorm,
                                     every=cfg.auxiliary_outputs)
        return states, rows, reference


class ConditionalDetr(DetrBase):
    """Conditional-DETR / I-Conditional-DETR: `model(pixel_values [B, H, W, 3], pixel_mask
    [B, H, W] bool, *, rng=None, attn_rows=False)` -> `lfi_jax.models.detr.DetrOutput`
    (logits [B, Q, C], no no-object entry; the other fields as DETR's, `attn_rows` included).
    `encode` is DETR's (`lfi_jax.models.detr.DetrBase`)."""

    kind = "Conditional-DETR"

    def __init__(self, cfg: ConditionalDetrConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        d = cfg.hidden_size
        self.decoder = Decoder(cfg, rngs)
        prior = nnx.initializers.constant(-math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        self.class_labels_classifier = linear(d, cfg.num_classes, cfg, rngs, init=nnx.initializers.lecun_normal(),
                                              bias_init=prior)
        self.bbox_predictor = BoxHead(cfg, rngs)

    def __call__(self, pixel_values, pixel_mask=None, *, rng=None, attn_rows: bool = False) -> DetrOutput:
        enc: DetrEncoding = self.encode(pixel_values, pixel_mask, rng, attn_rows=attn_rows)
        states, dec_rows, reference = self.decoder(
            self.object_queries(enc), enc.memory, enc.pos, enc.key_mask, fold_rng(rng, 2), attn_rows=attn_rows
        )
        logits = self.class_labels_classifier(states).astype(jnp.float32)
        raw = self.bbox_predictor(states).astype(jnp.float32)
        boxes = jax.nn.sigmoid(raw.at[..., :2].add(inverse_sigmoid(reference)))
        return detr_output(self.cfg, logits, boxes, enc.rows or dec_rows, enc.key_mask, attn_rows=attn_rows)


def count_params(cfg: ConditionalDetrConfig, *, include_frozen_stats: bool = False) -> int:
    """Parameters from shapes only; by default without the frozen BatchNorm tensors."""
    return count_model_params(lambda: ConditionalDetr(cfg, rngs=nnx.Rngs(0)), include_frozen_stats=include_frozen_stats)


__all__ = [
    "PRIOR_PROB",
    "ConditionalDetr",
    "ConditionalDetrConfig",
    "Decoder",
    "DecoderLayer",
    "MLPHead",
    "anchor_sine_embedding",
    "count_params",
    "iconditional_detr_config",
    "inverse_sigmoid",
]
