"""DetrForSegmentation checkpoints in and out: transformers' `DetrForSegmentation` directories
<-> `lfi_jax.models.detr_segm.DetrForSegmentation`.

    model, cfg = load_hf_detr_segm("path/to/detr-segm")          # save_pretrained directory
    model, cfg = load_hf_detr_segm(path, interaction=True)        # the DETR inside an I-DETR
    model = detr_segm_from_detr(detr, seed=0)                     # a box model + a fresh mask head
    save_hf_detr_segm(model, "out_dir")

Names: the DETR part is `detr.` + `lfi_jax.models.convert.detr`'s names (its reader already
accepts every spelling it knows behind the `detr.` prefix); the head is `bbox_attention.*` and
`mask_head.*` with transformers 5's names (`mask_head.conv1.conv`, `...fpn_stages.i.fpn_adapter`,
`...output_conv`). Transformers 4 / the original DETR names (`bbox_attention.q_linear`,
`mask_head.lay1`, `gn1`, `adapter1`, `out_lay`) are read too. The config is DETR's config.json;
the backbone writes every stage (`out_indices` 1..n), which the mask head's FPN reads.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.fileio import write_json_atomic
from lfi_jax.models.convert.detr import (
    from_hf_array,
    hf_detr_config,
    hf_detr_config_dict,
    hf_name,
    idetr_from_detr,
    normalize_hf_detr_names,
    to_hf_array,
)
from lfi_jax.models.convert.io import CheckpointError, read_json, read_state_dict, write_safetensors
from lfi_jax.models.detr import PRETRAINED_GATE_BIAS, Detr, DetrConfig, idetr_config
from lfi_jax.models.detr_segm import DetrForSegmentation, check_segm_config

HEAD_PARTS = ("bbox_attention", "mask_head")

# transformers 4 / original DETR names of the head -> transformers 5's
_OLD_HEAD_NAMES = (
    (r"^bbox_attention\.q_linear\.", "bbox_attention.q_proj."),
    (r"^bbox_attention\.k_linear\.", "bbox_attention.k_proj."),
    (r"^mask_head\.lay([12])\.", r"mask_head.conv\1.conv."),
    (r"^mask_head\.gn([12])\.", r"mask_head.conv\1.norm."),
    (r"^mask_head\.adapter([123])\.", lambda m: f"mask_head.fpn_stages.{int(m.group(1)) - 1}.fpn_adapter."),
    (r"^mask_head\.lay([345])\.", lambda m: f"mask_head.fpn_stages.{int(m.group(1)) - 3}.refine.conv."),
    (r"^mask_head\.gn([345])\.", lambda m: f"mask_head.fpn_stages.{int(m.group(1)) - 3}.refine.norm."),
    (r"^mask_head\.out_lay\.", "mask_head.output_conv."),
)


def segm_hf_name(path: tuple) -> str:
    """Our DetrForSegmentation parameter path -> transformers' checkpoint name."""
    if path[0] == "detr":
        return "detr." + hf_name(path[1:])
    return hf_name(path)


def normalize_hf_segm_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Any supported spelling of a DetrForSegmentation state dict -> `segm_hf_name`'s names."""
    head = {k: v for k, v in sd.items() if k.startswith(HEAD_PARTS)}
    out = {"detr." + k: v for k, v in normalize_hf_detr_names({k: v for k, v in sd.items() if k not in head}).items()}
    for name, v in head.items():
        for pattern, repl in _OLD_HEAD_NAMES:
            name = re.sub(pattern, repl, name)
        out[name] = v
    return out


def hf_segm_config_dict(cfg: DetrConfig, *, id2label: Mapping[int, str] | None = None) -> dict:
    """DETR's config.json for a DetrForSegmentation (every backbone stage an output)."""
    d = hf_detr_config_dict(cfg, id2label=id2label)
    n = len(cfg.backbone.depths)
    d["architectures"] = ["DetrForSegmentation"]
    d["backbone_config"]["out_features"] = [f"stage{i + 1}" for i in range(n)]
    d["backbone_config"]["out_indices"] = list(range(1, n + 1))
    return d


def _flat(model) -> dict[tuple, Any]:
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_hf_segm_state_dict(model: DetrForSegmentation) -> dict[str, np.ndarray]:
    return {segm_hf_name(p): to_hf_array(p, v.get_value()) for p, v in _flat(model).items()}


def save_hf_detr_segm(model: DetrForSegmentation, directory: str, *, id2label=None) -> None:
    """config.json + model.safetensors that `DetrForSegmentation.from_pretrained` reads."""
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), to_hf_segm_state_dict(model))
    write_json_atomic(os.path.join(directory, "config.json"), hf_segm_config_dict(model.cfg, id2label=id2label),
                      indent=2, sort_keys=True)


def fill_detr_segm(cfg: DetrConfig, values: Mapping[tuple, np.ndarray], *, seed: int = 0) -> DetrForSegmentation:
    """A DetrForSegmentation whose parameters are `values` (our paths); missing head or gate
    parameters keep a fresh seeded init, anything else missing is an error naming it."""
    model = DetrForSegmentation(cfg, rngs=nnx.Rngs(seed))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        path = tuple(path)
        if path not in values:
            if path[0] in HEAD_PARTS or "gate" in path:
                continue
            raise ValueError(f"DetrForSegmentation parameters: no value for {'/'.join(map(str, path))}")
        value = values[path]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"DetrForSegmentation parameters: {'/'.join(map(str, path))} has shape "
                             f"{tuple(value.shape)}, the model {tuple(var.shape)}")
        var.set_value(jnp.asarray(value, var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def detr_segm_from_detr(detr: Detr, *, seed: int = 0) -> DetrForSegmentation:
    """DETR's second phase: the trained box model (DETR or I-DETR) with a fresh mask head."""
    values = {("detr",) + p: v.get_value() for p, v in _flat(detr).items()}
    return fill_detr_segm(detr.cfg, values, seed=seed)


def load_hf_detr_segm(directory: str, *, interaction: bool | Mapping[str, Any] = False, seed: int = 0,
                      **overrides: Any) -> tuple[DetrForSegmentation, DetrConfig]:
    """The DetrForSegmentation of a `save_pretrained` directory -> (model, config).

    interaction: True (or a dict of I-DETR switches) turns the DETR inside into an I-DETR
    (Wq' = Wq, gate bias [-4, +4]; `idetr_from_detr`), the mask head kept. overrides: DetrConfig
    fields that do not change the parameters (dtype, dropout, attn_impl, auxiliary_outputs).
    """
    hf = read_json(directory)
    if hf is None:
        raise FileNotFoundError(f"{directory} has no config.json (expected a save_pretrained directory)")
    source = os.path.join(directory, "config.json")
    cfg = hf_detr_config(hf, source=source)
    try:
        cfg = dataclasses.replace(cfg, **overrides)
        check_segm_config(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    raw, file = read_state_dict(directory)
    sd = normalize_hf_segm_names(raw)
    abstract = nnx.eval_shape(lambda: DetrForSegmentation(cfg, rngs=nnx.Rngs(0)))
    expected = {}
    for p, v in _flat(abstract).items():
        shape = tuple(v.shape)
        if p[-1] == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        expected[segm_hf_name(p)] = (p, shape)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = [f"{k}: {tuple(sd[k].shape)} vs {expected[k][1]}" for k in sorted(set(sd) & set(expected))
                 if tuple(sd[k].shape) != expected[k][1]]
    if missing or unexpected or misshaped:
        lines = [f"{file}: the tensors do not match the DetrForSegmentation of {source}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                more = [f"... {len(items) - 20} more"] if len(items) > 20 else []
                lines += [f"  {title} ({len(items)}):"] + [f"    {x}" for x in items[:20] + more]
        raise CheckpointError("\n".join(lines))
    values = {p: from_hf_array(p, sd[name]) for name, (p, _) in expected.items()}
    model = fill_detr_segm(cfg, values, seed=seed)
    if interaction:
        if cfg.interaction_queries:
            raise ValueError(f"{directory} is already an I-DETR; pass its switches as overrides")
        extra = dict(interaction) if isinstance(interaction, Mapping) else {}
        extra.setdefault("gate_bias_init", PRETRAINED_GATE_BIAS)
        icfg = idetr_config(cfg, **extra)
        idetr = idetr_from_detr(model.detr, icfg, seed=seed)
        values = {("detr",) + p: v.get_value() for p, v in _flat(idetr).items()}
        values.update({p: v.get_value() for p, v in _flat(model).items() if p[0] in HEAD_PARTS})
        model, cfg = fill_detr_segm(icfg, values, seed=seed), icfg
    return model, cfg


__all__ = [
    "detr_segm_from_detr",
    "fill_detr_segm",
    "hf_segm_config_dict",
    "load_hf_detr_segm",
    "normalize_hf_segm_names",
    "save_hf_detr_segm",
    "segm_hf_name",
    "to_hf_segm_state_dict",
]
