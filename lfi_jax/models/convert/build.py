"""The model a run starts from: fresh, or initialised from the checkpoint of `config.init`.

    model = build_model(config, mcfg, seed=0)

`config.init.hf` (a Hugging Face ViT directory) or `config.init.timm` (a timm state dict)
gives the backbone; the architecture is `mcfg` (the run's `model_config(config)`), which must
agree with the checkpoint's on every field of `ARCHITECTURE_FIELDS` (a mismatch, e.g. timm's
LayerNorm eps 1e-6 against the config's 1e-12, is an error naming both sides and the key to
set), since the run's graph is built from `mcfg`. A timm state dict does not record the number
of heads; `mcfg.num_heads` is used. An I-ViT `mcfg` gets the pretrained
initialisation (`ivit_from_vit`: Wq' = Wq, gate bias `mcfg.gate_bias_init` or, unset,
(-4, +4)).
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from lfi_jax.errors import UserError
from lfi_jax.models.config import ModelConfig
from lfi_jax.models.convert.hf import load_hf_vit
from lfi_jax.models.convert.timm import load_timm_vit
from lfi_jax.models.convert.weights import ivit_from_vit
from lfi_jax.models.vit import ViT


def build_model(config: ml_collections.ConfigDict, mcfg: ModelConfig, *, seed: int) -> ViT:
    """A fresh model, or one initialised from a Hugging Face / timm ViT checkpoint."""
    hf, timm = config.init.hf, config.init.timm
    if hf and timm:
        raise UserError(f"config.init.hf={hf!r} and config.init.timm={timm!r} are both set; set one of them")
    if not (hf or timm):
        return ViT(mcfg, rngs=nnx.Rngs(seed))
    if hf:
        key, path = "init.hf", hf
        vit, vcfg = load_hf_vit(hf, image_size=mcfg.image_size, num_classes=mcfg.num_classes)
    else:
        key, path = "init.timm", timm
        # A timm state dict does not record the number of heads: the config's is used.
        vit, vcfg = load_timm_vit(timm, num_heads=mcfg.num_heads, image_size=mcfg.image_size,
                                  num_classes=mcfg.num_classes)
    diffs = vcfg.architecture_differences(mcfg)
    if diffs:
        raise UserError(
            f"config.{key}={path}: the checkpoint's architecture differs from config.model (checkpoint vs config): "
            f"{'; '.join(diffs)}; set those config.model keys to the checkpoint's values"
        )
    return ivit_from_vit(vit, mcfg, seed=seed)  # a ViT mcfg: every tensor copied


__all__ = ["build_model"]
