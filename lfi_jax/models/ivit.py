"""Older import path of the I-ViT pieces, kept for existing importers.

The attention layer and the gate are in `lfi_jax.models.layers`, `ivit_config` and
`PRETRAINED_GATE_BIAS` in `lfi_jax.models.config`, `ivit_from_vit` in
`lfi_jax.models.convert.weights`; `lfi_jax.models` exports them all.
"""

from lfi_jax.models.config import PRETRAINED_GATE_BIAS, ivit_config
from lfi_jax.models.convert.weights import ivit_from_vit
from lfi_jax.models.layers import Attention, AttentionOutput, Gate

__all__ = ["PRETRAINED_GATE_BIAS", "Attention", "AttentionOutput", "Gate", "ivit_config", "ivit_from_vit"]
