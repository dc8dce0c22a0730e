"""Parity of the JAX models with PyTorch from the same weights (SPEC section 5).

`python -m lfi_jax.compare MODE` (see `lfi_jax.compare.__main__`); the ViT / I-ViT checks are
in `lfi_jax.compare.vit` (`compare_vit`, `compare_ivit`), re-exported here.
"""

from lfi_jax.compare.vit import (
    SMALL,
    compare_ivit,
    compare_vit,
    differences,
    jax_side,
    make_inputs,
    randomize,
    reference_from_model,
    torch_side,
)

__all__ = [
    "SMALL",
    "compare_ivit",
    "compare_vit",
    "differences",
    "jax_side",
    "make_inputs",
    "randomize",
    "reference_from_model",
    "torch_side",
]
