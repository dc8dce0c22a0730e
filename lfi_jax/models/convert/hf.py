"""Hugging Face ViT checkpoints in and out: `load_hf_vit`, `save_hf`, and config.json.

    model, cfg = load_hf_vit("path/to/vit-base-patch16-224")            # a ViT
    model, cfg = load_hf_vit(path, interaction=True, num_classes=200)  # an I-ViT from it
    save_hf(model, "out_dir")           # config.json + model.safetensors, HF names

config.json of an I-ViT gets an `lfi_interaction` entry with the I-ViT switches, so weights
move both ways between this package and `lfi_jax.reference` (PyTorch).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from lfi_jax.fileio import write_json_atomic
from lfi_jax.models.config import ModelConfig
from lfi_jax.models.convert.io import CheckpointError, read_json, read_state_dict, write_safetensors
from lfi_jax.models.convert.names import normalize_hf_names, to_hf_state_dict
from lfi_jax.models.convert.weights import finish_load
from lfi_jax.models.vit import ViT

CONFIG_KEY = "lfi_interaction"  # config.json entry holding the I-ViT switches

# I-ViT fields stored in config.json (architecture-relevant ones first).
INTERACTION_FIELDS = (
    "interaction_queries",
    "gated_control",
    "gate_hidden",
    "interaction_constraint",
    "gate_bias_init",
    "gate_init_scale",
    "align_layers",
)

# HF defaults (transformers' ViTConfig) for keys a config.json may leave out.
HF_DEFAULTS = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    image_size=224,
    patch_size=16,
    num_channels=3,
    layer_norm_eps=1e-12,
    qkv_bias=True,
)


def hf_config_dict(cfg: ModelConfig, *, id2label: Mapping[int, str] | None = None) -> dict:
    """A transformers `ViTConfig`-compatible config.json dict for an architecture."""
    headless = cfg.num_classes == 0
    d = dict(
        architectures=["ViTModel" if headless else "ViTForImageClassification"],
        model_type="vit",
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.02,
        layer_norm_eps=cfg.layer_norm_eps,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        qkv_bias=cfg.qkv_bias,
        encoder_stride=cfg.patch_size,
    )
    if not headless:
        labels = dict(id2label) if id2label else {i: f"LABEL_{i}" for i in range(cfg.num_classes)}
        if len(labels) != cfg.num_classes:
            raise ValueError(f"id2label has {len(labels)} entries, the model has {cfg.num_classes} classes")
        d["id2label"] = {str(int(k)): v for k, v in labels.items()}
        d["label2id"] = {v: int(k) for k, v in labels.items()}
    if cfg.interaction_queries or cfg.interaction_constraint:
        lfi = {f: getattr(cfg, f) for f in INTERACTION_FIELDS}
        for f in ("gate_bias_init", "align_layers"):
            lfi[f] = None if lfi[f] is None else list(lfi[f])
        d[CONFIG_KEY] = lfi
    return d


def save_hf(model: ViT, directory: str, *, id2label: Mapping[int, str] | None = None) -> None:
    """Write `config.json` + `model.safetensors` that transformers (and `load_hf_vit`) read.

    A plain ViT loads with `ViTForImageClassification.from_pretrained(directory)`; an I-ViT
    with `lfi_jax.reference.IViTReference.from_pretrained(directory)`.
    """
    os.makedirs(directory, exist_ok=True)
    tensors = to_hf_state_dict(model)
    config = hf_config_dict(model.cfg, id2label=id2label)
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    write_json_atomic(os.path.join(directory, "config.json"), config, indent=2, sort_keys=True)


def _square(v, key: str, source: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise CheckpointError(f"{source}: {key}={v} is not square; only square images/patches are supported")
        v = v[0]
    return int(v)


def hf_model_config(hf: Mapping[str, Any], *, num_classes: int, source: str) -> ModelConfig:
    """ModelConfig of a transformers ViT config.json (plus our `lfi_interaction` entry)."""
    c = {**HF_DEFAULTS, **hf}
    if c["hidden_act"] != "gelu":
        raise CheckpointError(f"{source}: hidden_act={c['hidden_act']!r}; only 'gelu' (exact erf) is supported")
    if int(c["num_channels"]) != 3:
        raise CheckpointError(f"{source}: num_channels={c['num_channels']}; only RGB (3) is supported")
    kw = dict(
        hidden_size=int(c["hidden_size"]),
        depth=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
        mlp_dim=int(c["intermediate_size"]),
        patch_size=_square(c["patch_size"], "patch_size", source),
        image_size=_square(c["image_size"], "image_size", source),
        layer_norm_eps=float(c["layer_norm_eps"]),
        qkv_bias=bool(c["qkv_bias"]),
        num_classes=num_classes,
    )
    lfi = hf.get(CONFIG_KEY)
    if lfi:
        unknown = sorted(set(lfi) - set(INTERACTION_FIELDS))
        if unknown:
            raise CheckpointError(f"{source}: unknown keys {unknown} in config.json's {CONFIG_KEY}")
        for f in INTERACTION_FIELDS:
            if f in lfi and lfi[f] is not None:
                kw[f] = lfi[f]
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _hf_num_classes(hf: Mapping[str, Any], has_head: bool) -> int:
    if not has_head:
        return 0
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def is_ivit_checkpoint(directory: str) -> bool:
    """Whether `directory/config.json` describes an I-ViT (written by `save_hf`)."""
    hf = read_json(directory) if os.path.isdir(directory) else None
    return bool(((hf or {}).get(CONFIG_KEY) or {}).get("interaction_queries"))


def load_hf_vit(
    path: str,
    *,
    image_size: int | None = None,
    num_classes: int | None = None,
    interaction: bool | Mapping[str, Any] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    **overrides: Any,
) -> tuple[ViT, ModelConfig]:
    """Load a transformers `ViTForImageClassification` / `ViTModel` directory (or an I-ViT
    written by `save_hf`).

    path: a directory with config.json and model.safetensors (or pytorch_model.bin, or a
      sharded index).
    image_size: run at another resolution; the position embeddings are interpolated (bicubic,
      the CLS embedding kept).
    num_classes: a new head of that size (freshly initialised) when it differs from the
      checkpoint's; a `ViTModel` (no head) gives a headless model (features) unless given.
    interaction: True (or a dict of `ivit_config` overrides, e.g. {"gate_hidden": 0}) turns
      a ViT into an I-ViT with the pretrained initialisation: Wq' = Wq, gate bias [-4, +4]
      (unless the dict sets `gate_bias_init`).
    dtype: compute dtype (parameters stay float32).
    overrides: runtime fields of ModelConfig (attn_impl, remat, interaction_constraint,
      align_layers).
    Returns (model, config).
    """
    hf = read_json(path) if os.path.isdir(path) else read_json(os.path.dirname(os.path.abspath(path)))
    raw, file = read_state_dict(path)
    if hf is None:
        raise CheckpointError(f"{path}: no config.json beside the weights (needed for heads, eps, sizes)")
    sd, _ = normalize_hf_names(raw)
    has_head = any(k.startswith("classifier.") for k in sd)
    cfg = hf_model_config(hf, num_classes=_hf_num_classes(hf, has_head), source=file)
    what = "HF ViT of its config.json"
    return finish_load(cfg, sd, file, what, image_size=image_size, num_classes=num_classes,
                       interaction=interaction, dtype=dtype, seed=seed, overrides=overrides)


__all__ = ["CONFIG_KEY", "HF_DEFAULTS", "INTERACTION_FIELDS", "hf_config_dict", "hf_model_config",
           "is_ivit_checkpoint", "load_hf_vit", "save_hf"]
