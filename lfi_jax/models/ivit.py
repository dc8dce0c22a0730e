"""The interaction-attention layer and the Interaction ViT (SPEC section 1).

One `Attention` module serves both models:
  IQ off:  plain multi-head self-attention (the ViT), optionally returning the CLS row of
           C_vfm (ablation "IQ off + IC on": the teacher supervises the original queries).
  IQ on:   an extra query projection `interaction_query` (Wq', D x D + bias) and a per-head
           gate; the attention is `lfi_jax.ops.interaction_attention`, which returns the CLS
           row of C_agt for the alignment loss. GC off averages C_agt and C_vfm.

`ivit_config(vit_cfg)` switches an architecture to I-ViT; `ivit_from_vit(vit_model, cfg)`
builds an I-ViT initialised from a (pretrained) ViT: Wq' = Wq and the gate biases of
`cfg.gate_bias_init` (SPEC: [-4, +4], so it starts out computing almost exactly the ViT).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from lfi_jax.models.vit import ModelConfig, ViT, _dense
from lfi_jax.ops import dot_product_attention_with_cls, interaction_attention

PRETRAINED_GATE_BIAS = (-4.0, 4.0)


class Gate(nnx.Module):
    """Per-head Gated Control Network parameters (Eq. 5): the op applies them."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, g, s = cfg.num_heads, cfg.gate_hidden, cfg.gate_init_scale
        init = nnx.initializers.normal(s)
        if g > 0:
            self.w1 = nnx.Param(init(rngs.params(), (h, 2, g), jnp.float32))
            self.b1 = nnx.Param(jnp.zeros((h, g), jnp.float32))
            self.w2 = nnx.Param(init(rngs.params(), (h, g, 2), jnp.float32))
        else:
            self.w2 = nnx.Param(init(rngs.params(), (h, 2, 2), jnp.float32))
        self.b2 = nnx.Param(jnp.tile(jnp.asarray(cfg.gate_bias_init, jnp.float32)[None], (h, 1)))

    def params(self) -> dict:
        names = ("w1", "b1", "w2", "b2") if hasattr(self, "w1") else ("w2", "b2")
        return {n: getattr(self, n)[...] for n in names}


class AttentionOutput(nnx.Module):
    def __init__(self, cfg, rngs):
        self.dense = _dense(cfg.hidden_size, cfg.hidden_size, cfg, rngs)

    def __call__(self, x):
        return self.dense(x)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.query = _dense(d, d, cfg, rngs, bias=cfg.qkv_bias)
        self.key = _dense(d, d, cfg, rngs, bias=cfg.qkv_bias)
        self.value = _dense(d, d, cfg, rngs, bias=cfg.qkv_bias)
        self.output = AttentionOutput(cfg, rngs)
        if cfg.interaction_queries:
            self.interaction_query = _dense(d, d, cfg, rngs, bias=cfg.qkv_bias)
            self.gate = Gate(cfg, rngs) if cfg.gated_control else None

    def __call__(self, x, *, want_cls: bool = False):
        cfg = self.cfg
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, cfg.num_heads, cfg.head_dim)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if cfg.interaction_queries:
            q2 = split(self.interaction_query(x))
            gate = self.gate.params() if self.gate is not None else None
            o, cls_row = interaction_attention(q, q2, k, v, gate, impl=cfg.attn_impl)
        else:
            o, cls_row = dot_product_attention_with_cls(q, k, v)
        o = self.output(o.reshape(b, n, cfg.hidden_size))
        return o, (cls_row if want_cls else None)


def ivit_config(cfg: ModelConfig, **overrides) -> ModelConfig:
    """The I-ViT of an architecture: IQ + IC + GC on (Table 3's last row) unless overridden."""
    base = dict(interaction_queries=True, interaction_constraint=True, gated_control=True)
    base.update(overrides)
    return dataclasses.replace(cfg, **base)


def ivit_from_vit(vit: ViT, cfg: ModelConfig, *, seed: int = 0) -> ViT:
    """An I-ViT (architecture `cfg`) initialised from a ViT's weights.

    Every ViT parameter is copied; each layer's interaction query starts as a copy of its
    query projection and the gates get `cfg.gate_bias_init` (use `PRETRAINED_GATE_BIAS`
    for pretrained ViTs) with small random weights.
    """
    src = vit.cfg
    for f in ("hidden_size", "depth", "num_heads", "mlp_dim", "patch_size", "image_size"):
        if getattr(src, f) != getattr(cfg, f):
            raise ValueError(f"ivit_from_vit: model.{f} differs: ViT has {getattr(src, f)}, I-ViT config {getattr(cfg, f)}")
    model = ViT(cfg, rngs=nnx.Rngs(seed))
    src_state = nnx.to_flat_state(nnx.state(vit, nnx.Param))
    dst_state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(dst_state)
    src_map = {path: var for path, var in src_state}
    updates = {}
    for path, var in flat:
        if path in src_map:
            value = src_map[path].get_value()
            if value.shape != var.shape:
                if path[0] == "classifier":
                    continue  # a new head (other number of classes) stays freshly initialised
                raise ValueError(f"ivit_from_vit: {'.'.join(map(str, path))} has shape {value.shape} vs {var.shape}")
            updates[path] = value
        elif "interaction_query" in path:
            qpath = tuple("query" if p == "interaction_query" else p for p in path)
            updates[path] = src_map[qpath].get_value()
    for path, var in flat:
        if path in updates:
            var.set_value(jnp.asarray(updates[path], var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
