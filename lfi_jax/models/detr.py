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

Attention maps for inspection: `model(pixels, mask, attn_rows=True).attn_rows` is
[B, L, Nq, Nk] float32, the head-mean rows of the attention holding the interaction in every
layer (decoder cross-attention by default: C_agt with interaction queries, C_vfm without;
padded keys 0), returned whatever `interaction_constraint` says (the rows the alignment loss
reads, `agt_rows` [B, L_align, H, Nq, Nk], still need the constraint on). `key_mask` [B, Nk]
says which keys are image cells of the `feature_grid` (row-major), e.g.
`out.attn_rows[b, l, q].reshape(feature_grid(cfg, H, W))` is query q's map over the grid.

The pipeline in steps: `enc = model.encode(pixels, mask)` (`DetrEncoding`: memory, position
embedding, key mask, encoder rows, the input projection and the backbone stages), `states,
rows = model.decode(enc)` (the normalised decoder outputs [L or 1, B, Q, D] and the
cross-attention rows), `model.predict(enc, states, rows)` (the heads -> `DetrOutput`);
`__call__` is the three (DetrForSegmentation reads the steps' intermediates). The layers
without attention, the config and the output types are in `lfi_jax.models.detr_common`
(re-exported here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lfi_jax.models.detr_common import (
    INTERACTION_IN,
    PRETRAINED_GATE_BIAS,
    BoxHead,
    DetrConfig,
    DetrEncoding,
    DetrOutput,
    Embedding,
    Gate,
    MLPHead,
    check_inputs,
    count_model_params,
    detr_config,
    detr_fields,
    detr_output,
    downsample_mask,
    dropout,
    feature_grid,
    feed_forward,
    fold_rng,
    idetr_config,
    input_projection,
    layer_norm,
    linear,
    nearest_index,
    rows_wanted,
    run_layers,
    sine_position_embedding,
)
from lfi_jax.models.resnet import DTYPES, ResNet
from lfi_jax.ops import dot_product_attention, interaction_attention


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
        qk = x + pos
        a, rows = self.self_attn(qk, qk, x, key_mask, want_rows=want_rows)
        x = self.self_attn_layer_norm(x + dropout(a, self.cfg.dropout, rng, 0))
        return feed_forward(self, x, rng, 1), rows


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
        return feed_forward(self, x, rng, 2), rows


class Encoder(nnx.Module):
    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        inter = cfg.interaction_queries and cfg.interaction_in == "encoder_self"
        self.layers = nnx.List([EncoderLayer(cfg, rngs, interaction=inter) for _ in range(cfg.encoder_layers)])

    def __call__(self, x, pos, key_mask, rng, *, attn_rows: bool = False):
        """-> (memory [B, Nk, D], {layer: C rows [B, H, Nk, Nk]} of the layers whose rows are wanted)."""
        def step(i, layer, x, r, **kw):
            return layer(x, pos, key_mask, r, **kw)

        x, rows, _ = run_layers(self.layers, x, rng, rows_wanted(self.cfg, "encoder_self", attn_rows), step)
        return x, rows


class Decoder(nnx.Module):
    def __init__(self, cfg: DetrConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        inter = cfg.interaction_queries and cfg.interaction_in == "decoder_cross"
        self.layers = nnx.List([DecoderLayer(cfg, rngs, interaction=inter) for _ in range(cfg.decoder_layers)])
        self.layernorm = layer_norm(cfg, rngs)

    def __call__(self, query_pos, memory, pos, key_mask, rng, *, attn_rows: bool = False):
        """Returns ([L or 1, B, Q, D] normalised layer outputs, {layer: C rows [B, H, Q, Nk]})."""
        cfg = self.cfg

        def step(i, layer, x, r, **kw):
            return layer(x, query_pos, memory, pos, key_mask, r, **kw)

        want = rows_wanted(cfg, "decoder_cross", attn_rows)
        _, rows, states = run_layers(self.layers, jnp.zeros_like(query_pos), rng, want, step, norm=self.layernorm,
                                     every=cfg.auxiliary_outputs)
        return states, rows


class DetrBase(nnx.Module):
    """What DETR and Conditional-DETR share: `backbone`, `input_projection`,
    `query_position_embeddings` and `encoder` (built in this order; a subclass adds its
    decoder and heads after them), `encode` and `object_queries`."""

    kind = "DETR"  # in error messages

    def __init__(self, cfg: DetrConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.backbone = ResNet(cfg.backbone, rngs=rngs)
        self.input_projection = input_projection(cfg, rngs)
        self.query_position_embeddings = Embedding(cfg.num_queries, cfg.hidden_size, rngs)
        self.encoder = Encoder(cfg, rngs)

    def encode(self, pixel_values, pixel_mask=None, rng=None, *, attn_rows: bool = False) -> DetrEncoding:
        """Backbone, input projection, position embedding of the valid cells and the encoder."""
        cfg = self.cfg
        pixel_mask = check_inputs(cfg, pixel_values, pixel_mask, self.kind)
        stages = self.backbone(pixel_values)
        b, h, w = stages[-1].shape[:3]
        mask = downsample_mask(pixel_mask, (h, w))
        dtype = DTYPES[cfg.dtype]
        pos = sine_position_embedding(mask, cfg.hidden_size // 2).astype(dtype)
        features = self.input_projection(stages[-1].astype(dtype))
        key_mask = mask.reshape(b, h * w)
        x = dropout(features.reshape(b, h * w, cfg.hidden_size), cfg.dropout, rng, 0)
        memory, rows = self.encoder(x, pos, key_mask, fold_rng(rng, 1), attn_rows=attn_rows)
        return DetrEncoding(memory, pos, key_mask, rows, features, tuple(stages))

    def object_queries(self, enc: DetrEncoding):
        """The learned query position embeddings [B, Q, D], in the memory's dtype."""
        query_pos = self.query_position_embeddings.weight[...].astype(enc.memory.dtype)
        return jnp.broadcast_to(query_pos, (enc.memory.shape[0],) + query_pos.shape)


class Detr(DetrBase):
    """DETR / I-DETR: `model(pixel_values [B, H, W, 3], pixel_mask [B, H, W] bool, *, rng=None,
    attn_rows=False)` -> `DetrOutput`. pixel_values are normalised as transformers' image
    processor does. `encode` / `decode` / `predict` are the call's steps (module doc)."""

    def __init__(self, cfg: DetrConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        d = cfg.hidden_size
        self.decoder = Decoder(cfg, rngs)
        self.class_labels_classifier = linear(d, cfg.num_classes + 1, cfg, rngs, init=nnx.initializers.lecun_normal())
        self.bbox_predictor = BoxHead(cfg, rngs)

    def decode(self, enc: DetrEncoding, rng=None, *, attn_rows: bool = False):
        """-> ([L or 1, B, Q, D] normalised decoder outputs, {layer: cross-attention rows})."""
        return self.decoder(self.object_queries(enc), enc.memory, enc.pos, enc.key_mask, fold_rng(rng, 2),
                            attn_rows=attn_rows)

    def predict(self, enc: DetrEncoding, states, dec_rows: dict, *, attn_rows: bool = False) -> DetrOutput:
        """The class and box heads on every decoder output -> DetrOutput."""
        logits = self.class_labels_classifier(states).astype(jnp.float32)
        boxes = jax.nn.sigmoid(self.bbox_predictor(states).astype(jnp.float32))
        return detr_output(self.cfg, logits, boxes, enc.rows or dec_rows, enc.key_mask, attn_rows=attn_rows)

    def __call__(self, pixel_values, pixel_mask=None, *, rng=None, attn_rows: bool = False) -> DetrOutput:
        enc = self.encode(pixel_values, pixel_mask, rng, attn_rows=attn_rows)
        states, rows = self.decode(enc, rng, attn_rows=attn_rows)
        return self.predict(enc, states, rows, attn_rows=attn_rows)


def count_params(cfg: DetrConfig, *, include_frozen_stats: bool = False) -> int:
    """Parameters from shapes only (`nnx.eval_shape`); by default without the frozen BatchNorm
    tensors (buffers in PyTorch, so not in the usual DETR counts)."""
    return count_model_params(lambda: Detr(cfg, rngs=nnx.Rngs(0)), include_frozen_stats=include_frozen_stats)


__all__ = [
    "INTERACTION_IN",
    "PRETRAINED_GATE_BIAS",
    "Attention",
    "BoxHead",
    "Decoder",
    "DecoderLayer",
    "Detr",
    "DetrBase",
    "DetrConfig",
    "DetrEncoding",
    "DetrOutput",
    "Embedding",
    "Encoder",
    "EncoderLayer",
    "Gate",
    "MLPHead",
    "check_inputs",
    "count_params",
    "detr_config",
    "detr_fields",
    "detr_output",
    "downsample_mask",
    "dropout",
    "feature_grid",
    "feed_forward",
    "fold_rng",
    "idetr_config",
    "input_projection",
    "layer_norm",
    "linear",
    "nearest_index",
    "rows_wanted",
    "run_layers",
    "sine_position_embedding",
]
