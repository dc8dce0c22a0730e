"""Pallas kernels: the fused interaction attention (forward and backward)."""

from lfi_jax.ops.pallas.attention import (
    BACKENDS,
    BWD_IMPLS,
    DEFAULT_BLOCKS,
    PRECISIONS,
    TILES,
    Tiles,
    default_tiles,
    generation,
    interaction_attention_pallas,
)

__all__ = [
    "BACKENDS",
    "BWD_IMPLS",
    "DEFAULT_BLOCKS",
    "PRECISIONS",
    "TILES",
    "Tiles",
    "default_tiles",
    "generation",
    "interaction_attention_pallas",
]
