"""Attention ops. `interaction_attention` is the contract of SPEC sections 1 and 7.

The math lives in `lfi_jax.ops.reference` (gate, checks, the jnp implementations), the fused
kernel in `lfi_jax.ops.pallas`, and `lfi_jax.ops.interaction_attention` picks between them.
"""

from lfi_jax.ops.interaction_attention import (
    IMPLS,
    default_impl,
    dot_product_attention_with_cls,
    interaction_attention,
)
from lfi_jax.ops.reference import GateParams, apply_gate, as_gate, default_block_q, dot_product_attention

__all__ = [
    "IMPLS",
    "GateParams",
    "apply_gate",
    "as_gate",
    "default_block_q",
    "default_impl",
    "dot_product_attention",
    "dot_product_attention_with_cls",
    "interaction_attention",
]
