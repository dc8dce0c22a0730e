"""Conditional-DETR checkpoints in and out: transformers' `ConditionalDetrForObjectDetection`
directories <-> our `ConditionalDetr`.

    model, cfg = load_hf_conditional_detr("path/to/conditional-detr-resnet-50")
    model, cfg = load_hf_conditional_detr(path, interaction=True)   # an I-Conditional-DETR from it
    save_hf_conditional_detr(model, "out_dir")   # config.json + model.safetensors

Names are DETR's rules (`lfi_jax.models.convert.detr.hf_name`: our path joined by dots under
`model.`, the heads top-level, the backbone under `model.backbone.conv_encoder.model.`); the
decoder layers keep the names `save_pretrained` writes: `sa_{qcontent,qpos,kcontent,kpos,v}_proj`,
`self_attn.out_proj`, `ca_{qcontent,qpos,kcontent,kpos,v,qpos_sine}_proj` (`ca_qpos_proj` in
the first layer only), `encoder_attn.out_proj`, `fc1`, `fc2`, and `decoder.{layernorm,
query_scale, ref_point_head}`. Reading also accepts transformers 5's in-memory names
(`self_attn.q_content_proj`, `encoder_attn.q_pos_sine_proj`, `o_proj`, `mlp.fc1`, ...) and the
timm-backbone layout of the released checkpoints (DETR's reader). An I-Conditional-DETR's
extra tensors (`...encoder_attn.interaction_query.*`, `...gate.*`) and its switches
(config.json's `lfi_interaction`) are written beside; transformers ignores both.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import numpy as np

from lfi_jax.models.conditional_detr import (
    PRIOR_PROB,
    ConditionalDetr,
    ConditionalDetrConfig,
    iconditional_detr_config,
)
from lfi_jax.models.convert.detr import (
    ARCHITECTURE_FIELDS,
    from_hf_array,
    hf_detr_config,
    hf_detr_config_dict,
    hf_name,
    normalize_hf_detr_names,
    to_hf_array,
)
from lfi_jax.models.convert.detr_common import (
    check_architecture,
    check_tensors,
    checkpoint_tensors,
    fill_model,
    interaction_start,
    model_param_shapes,
    with_interaction,
)
from lfi_jax.models.convert.io import CheckpointError, read_json, read_state_dict, write_checkpoint
from lfi_jax.models.convert.names import flat_params

Path = tuple
DEFAULT_NUM_QUERIES = 300
# transformers 5's in-memory decoder names -> the checkpoint names
_V5_DECODER = {
    "self_attn.q_content_proj": "sa_qcontent_proj",
    "self_attn.q_pos_proj": "sa_qpos_proj",
    "self_attn.k_content_proj": "sa_kcontent_proj",
    "self_attn.k_pos_proj": "sa_kpos_proj",
    "self_attn.v_proj": "sa_v_proj",
    "encoder_attn.q_content_proj": "ca_qcontent_proj",
    "encoder_attn.q_pos_proj": "ca_qpos_proj",
    "encoder_attn.k_content_proj": "ca_kcontent_proj",
    "encoder_attn.k_pos_proj": "ca_kpos_proj",
    "encoder_attn.v_proj": "ca_v_proj",
    "encoder_attn.q_pos_sine_proj": "ca_qpos_sine_proj",
}
_V5_RE = re.compile(r"(decoder\.layers\.\d+\.)(" + "|".join(re.escape(k) for k in _V5_DECODER) + r")\.")


def normalize_hf_conditional_detr_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Any supported spelling of a Conditional-DETR state dict -> the names `hf_name` produces."""
    renamed = {_V5_RE.sub(lambda m: m.group(1) + _V5_DECODER[m.group(2)] + ".", k): v for k, v in sd.items()}
    return normalize_hf_detr_names(renamed)


def fill_conditional_detr(cfg: ConditionalDetrConfig, values: Mapping[Path, Any], *, seed: int = 0) -> ConditionalDetr:
    """A ConditionalDetr of `cfg` whose parameters are `values` ({path: array}, our layout); only
    the gates and the class head may be missing (freshly initialised, seeded by `seed`; the
    class bias at the focal prior)."""
    return fill_model(ConditionalDetr, cfg, values, seed=seed, num_logits=cfg.num_classes,
                      head_bias=-np.log((1 - PRIOR_PROB) / PRIOR_PROB), what="Conditional-DETR")


def params_of(model: ConditionalDetr) -> dict[Path, Any]:
    """{our path: value} of every parameter (`lfi_jax.models.convert.names.flat_params`)."""
    return flat_params(model)


def _interaction_source(path: Path) -> Path:
    """Where an interaction query starts from: the content projection of the query it replaces."""
    if path[0] == "decoder":  # decoder/layers/i/encoder_attn/interaction_query/x
        return path[:3] + ("ca_qcontent_proj",) + path[5:]
    return tuple("q_proj" if p == "interaction_query" else p for p in path)  # encoder self-attention


def iconditional_detr_from_conditional_detr(
    model: ConditionalDetr, cfg: ConditionalDetrConfig, *, seed: int = 0
) -> ConditionalDetr:
    """An I-Conditional-DETR (architecture `cfg`) from a Conditional-DETR: every parameter
    copied, each interaction query a copy of the content projection it replaces (Wq' = Wq),
    the gates at `cfg.gate_bias_init` (`PRETRAINED_GATE_BIAS` for a pretrained detector)."""
    who = "iconditional_detr_from_conditional_detr"
    check_architecture(model.cfg, cfg, ARCHITECTURE_FIELDS, who)
    values = interaction_start(params_of(model), _shapes(cfg), _interaction_source, who)
    return fill_conditional_detr(cfg, values, seed=seed)


def hf_conditional_detr_config(hf: Mapping[str, Any], *, source: str) -> ConditionalDetrConfig:
    """ConditionalDetrConfig of a transformers Conditional-DETR config.json (DETR's reader)."""
    base = hf_detr_config(hf, source=source)
    kw = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    kw["num_queries"] = int(hf.get("num_queries", DEFAULT_NUM_QUERIES))
    try:
        return ConditionalDetrConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def hf_conditional_detr_config_dict(cfg: ConditionalDetrConfig, *, id2label: Mapping[int, str] | None = None) -> dict:
    """A transformers `ConditionalDetrConfig`-compatible config.json dict (ResNet backbone, no timm)."""
    d = hf_detr_config_dict(cfg, id2label=id2label)
    d.update(architectures=["ConditionalDetrForObjectDetection"], model_type="conditional_detr")
    return d


def to_hf_conditional_detr_state_dict(model: ConditionalDetr) -> dict[str, np.ndarray]:
    return {hf_name(p): to_hf_array(p, v) for p, v in params_of(model).items()}


def save_hf_conditional_detr(model: ConditionalDetr, directory: str, *,
                             id2label: Mapping[int, str] | None = None) -> None:
    """Write config.json + model.safetensors that `ConditionalDetrForObjectDetection.from_pretrained` reads."""
    write_checkpoint(directory, to_hf_conditional_detr_state_dict(model),
                     hf_conditional_detr_config_dict(model.cfg, id2label=id2label))


def _shapes(cfg: ConditionalDetrConfig) -> tuple[tuple[Path, tuple], ...]:
    """((our path, shape), ...) of an architecture (cached, from shapes only)."""
    return model_param_shapes(ConditionalDetr, cfg)


def expected_tensors(cfg: ConditionalDetrConfig) -> dict[str, tuple[Path, tuple]]:
    """{checkpoint name: (our path, checkpoint shape)} of an architecture."""
    return checkpoint_tensors(_shapes(cfg), hf_name)


def load_hf_conditional_detr(
    directory: str,
    *,
    interaction: bool | Mapping[str, Any] = False,
    num_classes: int | None = None,
    seed: int = 0,
    **overrides: Any,
) -> tuple[ConditionalDetr, ConditionalDetrConfig]:
    """The Conditional-DETR of a `save_pretrained` directory -> (model, config).

    interaction: True (or a dict of switches) makes an I-Conditional-DETR from it (Wq' = Wq,
    gate bias [-4, +4]); num_classes: a fresh class head of that size; overrides: other
    config fields that leave the parameters alone (dtype, dropout, attn_impl, ...).
    """
    hf = read_json(directory)
    if hf is None:
        raise FileNotFoundError(f"{directory} has no config.json (expected a save_pretrained directory)")
    source = os.path.join(directory, "config.json")
    if hf.get("model_type") not in (None, "conditional_detr"):
        raise CheckpointError(f"{source}: model_type={hf['model_type']!r}; expected 'conditional_detr'")
    cfg = hf_conditional_detr_config(hf, source=source)
    raw, file = read_state_dict(directory)
    sd = normalize_hf_conditional_detr_names(raw)
    expected = expected_tensors(cfg)
    check_tensors(sd, expected, file, source, "Conditional-DETR")
    params = {path: from_hf_array(path, sd[name]) for name, (path, _) in expected.items()}
    if num_classes is not None and num_classes != cfg.num_classes:
        cfg = dataclasses.replace(cfg, num_classes=int(num_classes))
        params = {p: v for p, v in params.items() if p[0] != "class_labels_classifier"}
    try:
        cfg = dataclasses.replace(cfg, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_hf_conditional_detr({directory}): {e}") from None
    model = fill_conditional_detr(cfg, params, seed=seed)
    return with_interaction(
        model, cfg, interaction, directory, "Conditional-DETR",
        lambda m, extra: iconditional_detr_from_conditional_detr(m, iconditional_detr_config(cfg, **extra), seed=seed),
    )


__all__ = [
    "expected_tensors",
    "fill_conditional_detr",
    "hf_conditional_detr_config",
    "hf_conditional_detr_config_dict",
    "iconditional_detr_from_conditional_detr",
    "load_hf_conditional_detr",
    "normalize_hf_conditional_detr_names",
    "params_of",
    "save_hf_conditional_detr",
    "to_hf_conditional_detr_state_dict",
]
