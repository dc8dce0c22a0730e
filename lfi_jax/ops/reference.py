"""The math of interaction attention (SPEC sections 1 and 7) in plain jnp.

Shared by the dispatcher (`lfi_jax.ops.interaction_attention`) and the Pallas kernel
(`lfi_jax.ops.pallas`): the gate parameters (`GateParams`), the gate itself (`apply_gate`),
the input checks (`check_inputs`) and the two jnp implementations (`xla_attention`,
`chunked_attention`).

Shapes: q, q2 [B, Nq, H, d] (original and interaction queries), k [B, Nk, H, d], v
[B, Nk, H, dv] (self-attention: Nq == Nk; dv is usually d). key_mask: optional [B, Nk]
bool, True = a valid key; padded keys get zero probability in C_vfm and C_agt (and so in
C_f), and the gate's inputs are scaled by the number of valid keys of each example (SPEC
section 7), z = [n C_agt, n C_vfm].
Softmaxes and the gate run in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
# Finite: exp(MASK_VALUE - max) == 0 exactly, and a fully masked row gives no NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class GateParams(NamedTuple):
    """Per-head Gated Control Network (SPEC section 1, Eq. 5), a pytree.

    hidden gate (G > 0): w1 [H, 2, G], b1 [H, G], w2 [H, G, 2], b2 [H, 2]
    linear gate (G = 0): w1 = b1 = None, w2 [H, 2, 2], b2 [H, 2]
    The gate's absence (ablation "GC off") is `None` in place of a GateParams.
    """

    w1: Any
    b1: Any
    w2: Any
    b2: Any

    @property
    def hidden(self) -> int:
        """G, the hidden width (0 for the linear gate)."""
        return 0 if self.w1 is None else int(self.w1.shape[-1])

    @property
    def heads(self) -> int:
        return int(self.w2.shape[0])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateParams:
        """From the SPEC dict form {"w1", "b1", "w2", "b2"} (hidden) or {"w2", "b2"} (linear)."""
        keys = set(d)
        if keys == {"w1", "b1", "w2", "b2"}:
            return cls(d["w1"], d["b1"], d["w2"], d["b2"])
        if keys == {"w2", "b2"}:
            return cls(None, None, d["w2"], d["b2"])
        raise ValueError(
            f"gate: expected keys {{'w1', 'b1', 'w2', 'b2'}} (hidden) or {{'w2', 'b2'}} (linear), got {sorted(keys)}"
        )

    def to_dict(self) -> dict:
        """The SPEC dict form (only the fields that are set)."""
        return {k: v for k, v in self._asdict().items() if v is not None}


Gate = GateParams | Mapping[str, Any] | None


def as_gate(gate: Gate) -> GateParams | None:
    """GateParams, SPEC dict or None -> GateParams or None (the op's boundary)."""
    if gate is None or isinstance(gate, GateParams):
        return gate
    if isinstance(gate, Mapping):
        return GateParams.from_dict(gate)
    raise TypeError(f"gate: expected GateParams, a dict or None, got {type(gate).__name__}")


def check_inputs(q, q2, k, v, gate: GateParams | None, key_mask=None, *, name: str = "interaction_attention"):
    """Shape checks with messages naming the argument and both shapes."""
    if q.ndim != 4:
        raise ValueError(f"{name}: q must be [B, Nq, H, d], got shape {q.shape}")
    if q2.shape != q.shape:
        raise ValueError(f"{name}: q2 has shape {q2.shape}, q has {q.shape}; they must be equal")
    if k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"{name}: k has shape {k.shape}, incompatible with q {q.shape}")
    if v.ndim != 4 or v.shape[0] != q.shape[0] or v.shape[2] != q.shape[2]:
        raise ValueError(f"{name}: v has shape {v.shape}, incompatible with q {q.shape} (v may differ in d only)")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{name}: k has {k.shape[1]} keys, v has {v.shape[1]}")
    if key_mask is not None and tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
        raise ValueError(f"{name}: key_mask must be [B, Nk] = {(k.shape[0], k.shape[1])}, got {tuple(key_mask.shape)}")
    if gate is not None:
        heads = q.shape[2]
        fields = ("w1", "b1", "w2", "b2") if gate.w1 is not None else ("w2", "b2")
        if gate.w1 is None and gate.b1 is not None:
            raise ValueError(f"{name}: gate has b1 but no w1")
        for key in fields:
            val = getattr(gate, key)
            if val is None:
                raise ValueError(f"{name}: gate is missing {key!r}")
            if val.shape[0] != heads:
                raise ValueError(f"{name}: gate.{key} has {val.shape[0]} heads, q has {heads}")


def valid_key_count(key_mask, n_keys: int):
    """The gate's N: the static key count, or [B, 1, 1, 1] float32 valid keys per example."""
    if key_mask is None:
        return n_keys
    return jnp.sum(key_mask.astype(F32), axis=-1)[:, None, None, None]


def apply_gate(c_agt: jax.Array, c_vfm: jax.Array, gate: Gate, n_keys) -> jax.Array:
    """Fused map C_f (Eqs. 5-6) for maps laid out [..., H, q, k] (float32).

    The gate is pointwise per head and entry: z = [N * C_agt, N * C_vfm], N = number of
    (valid) keys, so a uniform row reads 1 at any resolution. n_keys: an int or an array
    broadcastable against the maps ([B, 1, 1, 1] per example).
    """
    gate = as_gate(gate)
    if gate is None:
        return 0.5 * (c_agt + c_vfm)
    za = c_agt * n_keys
    zv = c_vfm * n_keys

    def per_head(x):  # [H] -> [H, 1, 1], broadcasts against [..., H, q, k]
        return x.astype(F32)[:, None, None]

    w2 = gate.w2.astype(F32)
    b2 = gate.b2.astype(F32)
    if gate.w1 is not None:
        w1 = gate.w1.astype(F32)  # [H, 2, G]
        b1 = gate.b1.astype(F32)  # [H, G]
        g_out0 = jnp.broadcast_to(per_head(b2[:, 0]), za.shape)
        g_out1 = jnp.broadcast_to(per_head(b2[:, 1]), za.shape)
        # Loop over the (small) hidden width so no [..., G] tensor is ever formed.
        for j in range(w1.shape[-1]):
            u = za * per_head(w1[:, 0, j]) + zv * per_head(w1[:, 1, j])
            u = jax.nn.gelu(u + per_head(b1[:, j]), approximate=False)
            g_out0 = g_out0 + u * per_head(w2[:, j, 0])
            g_out1 = g_out1 + u * per_head(w2[:, j, 1])
    else:
        # Linear gate: w2 [H, 2, 2] maps z (2) -> logits (2).
        g_out0 = za * per_head(w2[:, 0, 0]) + zv * per_head(w2[:, 1, 0]) + per_head(b2[:, 0])
        g_out1 = za * per_head(w2[:, 0, 1]) + zv * per_head(w2[:, 1, 1]) + per_head(b2[:, 1])
    return jax.nn.sigmoid(g_out0) * c_agt + jax.nn.sigmoid(g_out1) * c_vfm


def logits(qx, k, scale):
    """[B, n, H, d] x [B, Nk, H, d] -> [B, H, n, Nk] in float32."""
    return jnp.einsum("bqhd,bkhd->bhqk", qx, k, preferred_element_type=F32) * scale


def masked_softmax(s, key_mask):
    """Softmax over the last axis of [B, H, q, Nk] logits; masked keys get exactly 0."""
    if key_mask is None:
        return jax.nn.softmax(s, axis=-1)
    valid = key_mask[:, None, None, :]
    c = jax.nn.softmax(jnp.where(valid, s, MASK_VALUE), axis=-1)
    return jnp.where(valid, c, 0.0)


def attention_map(qx, k, key_mask=None):
    """softmax(qx k^T / sqrt(d)) over the valid keys: [B, H, n, Nk] float32."""
    return masked_softmax(logits(qx, k, 1.0 / math.sqrt(qx.shape[-1])), key_mask)


def _block(q, q2, k, v, gate, key_mask):
    """The whole computation for a block of queries (all keys). Returns o, C_agt (f32)."""
    c_vfm = attention_map(q, k, key_mask)
    c_agt = attention_map(q2, k, key_mask)
    c_f = apply_gate(c_agt, c_vfm, gate, valid_key_count(key_mask, k.shape[1]))
    o = jnp.einsum("bhqk,bkhd->bqhd", c_f.astype(v.dtype), v, preferred_element_type=F32)
    return o.astype(v.dtype), c_agt


def xla_attention(q, q2, k, v, gate, *, key_mask=None, return_rows: bool = False):
    """Materialises every [B, H, Nq, Nk] map. Returns (o, agt_cls [B, H, Nk]) or (o, C_agt)."""
    o, c_agt = _block(q, q2, k, v, as_gate(gate), key_mask)
    return o, (c_agt if return_rows else c_agt[:, :, 0, :])


def default_block_q(n: int) -> int:
    """Query rows per chunk: 128 up to N=2048, then halved so one block's [block_q, N] maps
    stay near 2^18 entries per head (64 at N=3137; docs/performance.md)."""
    return int(min(128, max(16, 2 ** math.floor(math.log2(262144 / n)))))


def chunked_attention(q, q2, k, v, gate, *, block_q: int | None = None, key_mask=None, return_rows: bool = False):
    """Query block by query block under `jax.checkpoint`: O(block_q * Nk) extra memory per
    head, forward and backward. Same results as `xla_attention`. With return_rows the
    [B, H, Nq, Nk] C_agt rows are an output (and so kept), as the caller asked."""
    gate = as_gate(gate)
    b, nq, h, d = q.shape
    block_q = block_q or default_block_q(k.shape[1])
    if not return_rows:
        # The CLS row only needs one query: computed on its own, it costs O(Nk).
        agt_cls = attention_map(q2[:, :1], k, key_mask)[:, :, 0, :]
    if nq <= block_q:
        o, c_agt = jax.checkpoint(_block)(q, q2, k, v, gate, key_mask)
        return o, (c_agt if return_rows else agt_cls)
    n_blocks = -(-nq // block_q)
    pad = n_blocks * block_q - nq

    def to_blocks(x):
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(b, n_blocks, block_q, h, d).swapaxes(0, 1)

    @jax.checkpoint
    def body(blocks):
        qb, q2b = blocks
        ob, c_agt = _block(qb, q2b, k, v, gate, key_mask)
        return (ob, c_agt) if return_rows else ob

    out = jax.lax.map(body, (to_blocks(q), to_blocks(q2)))  # o: [nb, B, bq, H, d]
    o = out[0] if return_rows else out
    o = o.swapaxes(0, 1).reshape(b, n_blocks * block_q, h, v.shape[3])[:, :nq]
    if not return_rows:
        return o, agt_cls
    rows = out[1].transpose(1, 2, 0, 3, 4).reshape(b, h, n_blocks * block_q, -1)[:, :, :nq]
    return o, rows


def dot_product_attention(q, k, v, *, key_mask=None):
    """Plain softmax attention over the valid keys.

    q [B, Nq, H, d], k [B, Nk, H, d], v [B, Nk, H, dv], key_mask [B, Nk] bool (True = valid)
    or None. Returns o [B, Nq, H, dv] (v.dtype) and C [B, H, Nq, Nk] float32.
    """
    c = attention_map(q, k, key_mask)
    o = jnp.einsum("bhqk,bkhd->bqhd", c.astype(v.dtype), v, preferred_element_type=F32)
    return o.astype(v.dtype), c
