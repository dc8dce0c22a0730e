"""Attention ops. `interaction_attention` is the contract of SPEC section 5."""

from lfi_jax.ops.interaction_attention import (
    IMPLS,
    apply_gate,
    dot_product_attention_with_cls,
    gate_hidden_size,
    interaction_attention,
)

__all__ = [
    "IMPLS",
    "apply_gate",
    "dot_product_attention_with_cls",
    "gate_hidden_size",
    "interaction_attention",
]
