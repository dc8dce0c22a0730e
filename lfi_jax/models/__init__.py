"""ViT and Interaction ViT (I-ViT) in Flax NNX.

`config` (ModelConfig, variants, the config boundary), `layers` (dense, LayerNorm, the gate,
the attention: where the I-ViT differs from the ViT), `vit` (the model), `convert/`
(checkpoints in and out, `ivit_from_vit`, `build_model`), `flops` (parameter and MAC counts).
"""

from lfi_jax.models.config import (
    PRETRAINED_GATE_BIAS,
    VARIANTS,
    ModelConfig,
    ivit_config,
    model_config,
    model_fields,
    variant,
)
from lfi_jax.models.convert.build import build_model
from lfi_jax.models.convert.weights import ivit_from_vit
from lfi_jax.models.vit import ViT, count_params, interpolate_pos_embed

__all__ = [
    "PRETRAINED_GATE_BIAS",
    "VARIANTS",
    "ModelConfig",
    "ViT",
    "build_model",
    "count_params",
    "interpolate_pos_embed",
    "ivit_config",
    "ivit_from_vit",
    "model_config",
    "model_fields",
    "variant",
]
