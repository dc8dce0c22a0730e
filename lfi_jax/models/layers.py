"""The layers of the ViT / I-ViT: dense and LayerNorm helpers, the gate, and the attention.

One `Attention` module serves both models (SPEC section 1):
  IQ off:  plain multi-head self-attention (the ViT), optionally returning the CLS row of
           C_vfm (ablation "IQ off + IC on": the teacher supervises the original queries).
  IQ on:   an extra query projection `interaction_query` (Wq', D x D + bias) and a per-head
           `Gate`; the attention is `lfi_jax.ops.interaction_attention`, which returns the CLS
           row of C_agt for the alignment loss. GC off averages C_agt and C_vfm.

Parameter names follow transformers' ViT (`query`, `key`, `value`, `output.dense`), so
checkpoints map one to one (`lfi_jax.models.convert`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lfi_jax.models.config import DTYPES, ModelConfig
from lfi_jax.ops import dot_product_attention, dot_product_attention_with_cls, interaction_attention
from lfi_jax.ops.reference import GateParams


def dense(din: int, dout: int, cfg: ModelConfig, rngs: nnx.Rngs, *, bias: bool = True, std: float = 0.02):
    """A Linear in the compute dtype of `cfg` with float32 parameters (truncated-normal init)."""
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=DTYPES[cfg.dtype],
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.truncated_normal(std),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def layer_norm(cfg: ModelConfig, rngs: nnx.Rngs):
    """LayerNorm over the hidden size with `cfg.layer_norm_eps`, float32 parameters."""
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=DTYPES[cfg.dtype], param_dtype=jnp.float32, rngs=rngs
    )


class Gate(nnx.Module):
    """Per-head Gated Control Network parameters (Eq. 5); the op applies them.

    The kind comes from the config: `cfg.gate_hidden = G > 0` gives the hidden gate
    (w1 [H, 2, G], b1 [H, G], w2 [H, G, 2], b2 [H, 2]), G = 0 the linear gate (w2 [H, 2, 2],
    b2 [H, 2]). b2 starts at `cfg.gate_bias(pretrained=False)` ((0, 0) unless configured);
    `ivit_from_vit` sets the pretrained default.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, g, s = cfg.num_heads, cfg.gate_hidden, cfg.gate_init_scale
        self.hidden = g
        init = nnx.initializers.normal(s)
        if g > 0:
            self.w1 = nnx.Param(init(rngs.params(), (h, 2, g), jnp.float32))
            self.b1 = nnx.Param(jnp.zeros((h, g), jnp.float32))
            self.w2 = nnx.Param(init(rngs.params(), (h, g, 2), jnp.float32))
        else:
            self.w2 = nnx.Param(init(rngs.params(), (h, 2, 2), jnp.float32))
        bias = jnp.asarray(cfg.gate_bias(pretrained=False), jnp.float32)
        self.b2 = nnx.Param(jnp.tile(bias[None], (h, 1)))

    def params(self) -> GateParams:
        if self.hidden > 0:
            return GateParams(self.w1[...], self.b1[...], self.w2[...], self.b2[...])
        return GateParams(None, None, self.w2[...], self.b2[...])


class AttentionOutput(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, cfg, rngs)

    def __call__(self, x):
        return self.dense(x)


class Attention(nnx.Module):
    """Self-attention of one layer: plain (IQ off) or interaction attention (IQ on).

    `attention(x, want_cls=...)` -> (output [B, N, D], CLS rows [B, H, N] float32 or None).
    `attention(x, want_rows=True)` -> (output, head-mean rows [B, N, N] float32 of C_agt, or of
    C_vfm with IQ off): every query's map, for losses on more rows than the CLS one.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.query = dense(d, d, cfg, rngs, bias=cfg.qkv_bias)
        self.key = dense(d, d, cfg, rngs, bias=cfg.qkv_bias)
        self.value = dense(d, d, cfg, rngs, bias=cfg.qkv_bias)
        self.output = AttentionOutput(cfg, rngs)
        if cfg.interaction_queries:
            self.interaction_query = dense(d, d, cfg, rngs, bias=cfg.qkv_bias)
            self.gate = Gate(cfg, rngs) if cfg.gated_control else None

    def __call__(self, x: jax.Array, *, want_cls: bool = False, want_rows: bool = False):
        cfg = self.cfg
        b, n, _ = x.shape

        def split(t):
            return t.reshape(b, n, cfg.num_heads, cfg.head_dim)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if cfg.interaction_queries:
            q2 = split(self.interaction_query(x))
            gate = self.gate.params() if self.gate is not None else None
            o, cls_row = interaction_attention(q, q2, k, v, gate, impl=cfg.attn_impl, return_rows=want_rows)
        elif want_rows:
            o, cls_row = dot_product_attention(q, k, v)
        else:
            o, cls_row = dot_product_attention_with_cls(q, k, v)
        o = self.output(o.reshape(b, n, cfg.hidden_size))
        if want_rows:
            return o, jnp.mean(cls_row, axis=1)  # [B, H, N, N] -> [B, N, N]
        return o, (cls_row if want_cls else None)


__all__ = ["Attention", "AttentionOutput", "Gate", "dense", "layer_norm"]
