"""Checkpoints in and out: Hugging Face / timm ViT weights <-> our ViT and I-ViT.

    model, cfg = load_hf_vit("path/to/vit-base-patch16-224")            # a ViT
    model, cfg = load_hf_vit(path, interaction=True, num_classes=200)  # an I-ViT from it
    model, cfg = load_timm_vit("vit_small.safetensors", image_size=384)
    save_hf(model, "out_dir")           # config.json + model.safetensors, HF names
    sd = to_hf_state_dict(model)        # {HF name: np.ndarray}
    model = build_model(config, mcfg, seed=0)   # a run's start: fresh or from config.init

Modules: `names` (our parameter paths <-> Hub names and layouts), `io` (reading and writing
files; torch only for pickles, with weights_only=True), `weights` (checking tensors against an
architecture, `ivit_from_vit`), `hf` and `timm` (the two formats), `build` (`build_model`).

Any mismatch between a checkpoint and the architecture its config describes is reported in
one `CheckpointError` that names the file and lists every missing, unexpected and mis-shaped
tensor.
"""

from lfi_jax.models.convert.build import build_model
from lfi_jax.models.convert.hf import (
    CONFIG_KEY,
    hf_config_dict,
    hf_model_config,
    is_ivit_checkpoint,
    load_hf_vit,
    save_hf,
)
from lfi_jax.models.convert.io import CheckpointError, read_state_dict
from lfi_jax.models.convert.names import flat_to_hf, hf_name, normalize_hf_names, to_hf_state_dict
from lfi_jax.models.convert.timm import load_timm_vit, save_timm, timm_to_hf_names, to_timm_state_dict
from lfi_jax.models.convert.weights import ivit_from_vit

__all__ = [
    "CONFIG_KEY",
    "CheckpointError",
    "build_model",
    "flat_to_hf",
    "hf_config_dict",
    "hf_model_config",
    "hf_name",
    "is_ivit_checkpoint",
    "ivit_from_vit",
    "load_hf_vit",
    "load_timm_vit",
    "normalize_hf_names",
    "read_state_dict",
    "save_hf",
    "save_timm",
    "timm_to_hf_names",
    "to_hf_state_dict",
    "to_timm_state_dict",
]
