"""ViT and Interaction ViT (I-ViT) in Flax NNX."""

from lfi_jax.models.ivit import PRETRAINED_GATE_BIAS, ivit_config, ivit_from_vit
from lfi_jax.models.vit import VARIANTS, ModelConfig, ViT, count_params, interpolate_pos_embed, variant

__all__ = [
    "PRETRAINED_GATE_BIAS",
    "VARIANTS",
    "ModelConfig",
    "ViT",
    "count_params",
    "interpolate_pos_embed",
    "ivit_config",
    "ivit_from_vit",
    "variant",
]
