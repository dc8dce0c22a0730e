"""Interaction attention (SPEC sections 1 and 7): one signature, several implementations.

    o, agt_cls = interaction_attention(q, q2, k, v, gate, impl="xla")
    o, c_agt = interaction_attention(q, q2, k, v, gate, key_mask=mask, return_rows=True)

q, q2: [B, Nq, H, d] (original and interaction queries); k: [B, Nk, H, d]; v: [B, Nk, H, dv]
(Nq == Nk for self-attention, any Nk for cross-attention; dv = d usually, any dv allowed).
gate: the per-head Gated Control Network, a `GateParams` (lfi_jax.ops.reference) or the SPEC
dict form of it (converted here)
    hidden gate (gate_hidden = G > 0): w1 [H, 2, G], b1 [H, G], w2 [H, G, 2], b2 [H, 2]
    linear gate (gate_hidden = 0):     w2 [H, 2, 2], b2 [H, 2]      (w1 = b1 = None)
    None: no gated control, C_f = (C_agt + C_vfm) / 2 (ablation "GC off").
key_mask: optional [B, Nk] bool, True = valid key. Padded keys get no probability mass in
C_vfm, C_agt or C_f; the gate's inputs are scaled by each example's number of valid keys.
Returns o [B, Nq, H, dv] (dtype of v) and agt_cls [B, H, Nk] (float32): row 0 (the CLS
query) of C_agt over all keys; with return_rows=True the whole C_agt [B, H, Nq, Nk]
(float32) instead, for the dense alignment loss.

Softmaxes and gates are computed in float32 whatever the input dtype.

impl:
  "xla"     materialises C_vfm, C_agt, the gate activations and C_f ([B, H, Nq, Nk] each).
  "chunked" the same numbers, query block by query block under `jax.checkpoint`, so the
            extra memory is O(block * Nk) per head instead of O(Nq Nk), forward and backward.
  "pallas"  the fused kernel (lfi_jax.ops.pallas); under a sharded jit it runs per shard in
            a shard_map (lfi_jax.ops.pallas.sharded). With return_rows the rows come from
            one extra jnp softmax (the kernel's outputs are o and the CLS row).
  "auto"    pallas on GPU/TPU, chunked on CPU (the choice is logged once per backend).
"""

from __future__ import annotations

import logging

import jax

from lfi_jax.ops.pallas.sharded import sharded_pallas
from lfi_jax.ops.reference import (
    Gate,
    as_gate,
    attention_map,
    check_inputs,
    chunked_attention,
    dot_product_attention,
    xla_attention,
)

log = logging.getLogger(__name__)

IMPLS = ("xla", "chunked", "pallas", "auto")
_LOGGED: set[str] = set()


def default_impl(backend: str | None = None) -> str:
    """What "auto" means on a backend (default: jax.default_backend())."""
    backend = backend or jax.default_backend()
    impl = "chunked" if backend == "cpu" else "pallas"
    if backend not in _LOGGED:
        _LOGGED.add(backend)
        log.info("interaction_attention(impl='auto') on %s: %s", backend, impl)
    return impl


def interaction_attention(
    q,
    q2,
    k,
    v,
    gate: Gate,
    *,
    impl: str = "xla",
    block_q: int | None = None,
    key_mask=None,
    return_rows: bool = False,
):
    """Interaction attention, SPEC sections 1 and 7. See the module docstring."""
    gate = as_gate(gate)
    check_inputs(q, q2, k, v, gate, key_mask)
    if impl == "auto":
        impl = default_impl()
    if impl == "xla":
        return xla_attention(q, q2, k, v, gate, key_mask=key_mask, return_rows=return_rows)
    if impl == "chunked":
        return chunked_attention(q, q2, k, v, gate, block_q=block_q, key_mask=key_mask, return_rows=return_rows)
    if impl == "pallas":
        kwargs = {} if block_q is None else {"block_q": block_q}
        o, agt_cls = sharded_pallas(q, q2, k, v, gate, key_mask=key_mask, **kwargs)
        if return_rows:
            return o, attention_map(q2, k, key_mask)
        return o, agt_cls
    raise ValueError(f"interaction_attention: unknown impl {impl!r}; expected one of {IMPLS}")


def dot_product_attention_with_cls(q, k, v):
    """Plain softmax attention; returns (o [B, N, H, d], cls row of C_vfm [B, H, N] f32).

    Used where interaction queries are off (the plain ViT, ablation "IQ off").
    """
    o, c = dot_product_attention(q, k, v)
    return o, c[:, :, 0, :]
