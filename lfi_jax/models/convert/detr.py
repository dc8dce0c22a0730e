"""DETR checkpoints in and out: transformers' `DetrForObjectDetection` directories <-> our DETR.

    model, cfg = load_hf_detr("path/to/detr-resnet-50")                 # a DETR
    model, cfg = load_hf_detr(path, interaction=True)                    # an I-DETR from it
    imodel = idetr_from_detr(model, idetr_config(cfg, gate_bias_init=(-4, 4)))
    save_hf_detr(model, "out_dir")        # config.json + model.safetensors, transformers' names
    sd = to_hf_detr_state_dict(model)     # {name: np.ndarray}

Names. Our parameter paths are transformers' checkpoint names with these rules (one to one):
`backbone/...` <-> `model.backbone.conv_encoder.model....`; `input_projection`,
`query_position_embeddings`, `encoder`, `decoder` <-> `model.<same>`; the heads are
top-level; leaves `kernel` (and LayerNorm `scale`) <-> `weight`, Linear kernels transposed,
convolution kernels [kh, kw, in, out] <-> [out, in, kh, kw]. Reading accepts what
transformers 4 and 5 write (`save_pretrained` keeps the names above; 5's in-memory names
`o_proj`, `mlp.fc1`, `backbone.model` are mapped back), and the timm-backbone layout of the
released `facebook/detr-resnet-*` checkpoints (`conv1`, `bn1`, `layer1.0.conv1`,
`layer1.0.downsample.0`, ...), whose ResNet is the same network. `num_batches_tracked` is
dropped. Writing uses the names `save_pretrained` writes, with `use_timm_backbone=False`
and a `resnet` backbone_config, so `DetrForObjectDetection.from_pretrained(dir)` loads it.

An I-DETR's extra tensors (`...encoder_attn.interaction_query.*`, `...gate.{w1,b1,w2,b2}`)
are written beside the DETR ones and its switches under config.json's `lfi_interaction`;
transformers ignores both (it loads the DETR part).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from lfi_jax.models.convert.detr_common import (
    check_architecture,
    check_run_start,
    check_tensors,
    checkpoint_tensors,
    fill_model,
    interaction_start,
    model_param_shapes,
    with_interaction,
)
from lfi_jax.models.convert.io import CheckpointError, interaction_entry, read_json, read_state_dict, write_checkpoint
from lfi_jax.models.convert.names import flat_params
from lfi_jax.models.detr import Detr, DetrConfig, idetr_config
from lfi_jax.models.resnet import RESNET_DEPTHS, ResNetConfig, resnet_config

CONFIG_KEY = "lfi_interaction"
INTERACTION_FIELDS = ("interaction_in", "interaction_queries", "interaction_constraint", "gated_control",
                      "gate_hidden", "gate_bias_init", "gate_init_scale", "align_layers")
BACKBONE_PREFIX = "model.backbone.conv_encoder.model."
MODEL_PARTS = ("input_projection", "query_position_embeddings", "encoder", "decoder")
ARCHITECTURE_FIELDS = ("backbone", "hidden_size", "encoder_layers", "decoder_layers", "encoder_heads",
                       "decoder_heads", "encoder_ffn_dim", "decoder_ffn_dim", "num_queries")

Path = tuple


def fill_detr(cfg: DetrConfig, values, *, seed: int = 0) -> Detr:
    """A Detr of `cfg` whose parameters are `values` ({path tuple: array}, our layout).

    Only the gates and the class head may be missing: they are freshly initialised (seeded
    by `seed`); nothing else is drawn at random, so no full random init runs.
    """
    return fill_model(Detr, cfg, values, seed=seed, num_logits=cfg.num_classes + 1, head_bias=0.0, what="DETR")


def idetr_from_detr(detr: Detr, cfg: DetrConfig, *, seed: int = 0) -> Detr:
    """An I-DETR (architecture `cfg`) initialised from a DETR's weights.

    Every DETR parameter is copied; each interaction query starts as a copy of the query
    projection of its attention and the gates get `cfg.gate_bias_init` (use
    `PRETRAINED_GATE_BIAS` for a pretrained detector) with small random weights. A class head
    of another size stays freshly initialised.
    """
    check_architecture(detr.cfg, cfg, ARCHITECTURE_FIELDS, "idetr_from_detr", "DETR has {}, I-DETR config {}")
    values = interaction_start(flat_params(detr), param_shapes(cfg), _interaction_source, "idetr_from_detr")
    return fill_detr(cfg, values, seed=seed)


def _interaction_source(path: Path) -> Path:
    """An interaction query starts from the query projection of its attention."""
    return tuple("q_proj" if p == "interaction_query" else p for p in path)


def hf_name(path: Path) -> str:
    """Our parameter path -> transformers' checkpoint name."""
    parts = [str(p) for p in path]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    if parts[0] == "backbone":
        return BACKBONE_PREFIX + ".".join(parts[1:])
    if parts[0] in MODEL_PARTS:
        return "model." + ".".join(parts)
    return ".".join(parts)


def to_hf_array(path: Path, x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if path[-1] == "kernel":
        return np.ascontiguousarray(x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1))
    return x


def from_hf_array(path: Path, x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if path[-1] == "kernel":
        return x.T if x.ndim == 2 else x.transpose(2, 3, 1, 0)
    return x


def _timm_backbone_name(rest: str) -> str:
    """timm ResNet names (the released DETR checkpoints) -> transformers' ResNet names."""
    rest = re.sub(r"^conv1\.", "embedder.embedder.convolution.", rest)
    rest = re.sub(r"^bn1\.", "embedder.embedder.normalization.", rest)
    m = re.match(r"^layer(\d+)\.(\d+)\.(.*)$", rest)
    if m:
        stage, block, tail = int(m.group(1)) - 1, m.group(2), m.group(3)
        tail = re.sub(r"^conv(\d+)\.", lambda c: f"layer.{int(c.group(1)) - 1}.convolution.", tail)
        tail = re.sub(r"^bn(\d+)\.", lambda c: f"layer.{int(c.group(1)) - 1}.normalization.", tail)
        tail = re.sub(r"^downsample\.0\.", "shortcut.convolution.", tail)
        tail = re.sub(r"^downsample\.1\.", "shortcut.normalization.", tail)
        rest = f"encoder.stages.{stage}.layers.{block}.{tail}"
    return rest


def normalize_hf_detr_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Any supported spelling of a DETR state dict -> the names `hf_name` produces."""
    out = {}
    for name, v in sd.items():
        if name.endswith("num_batches_tracked"):
            continue
        n = name
        if n.startswith("detr."):  # DetrForSegmentation's detection part
            n = n[len("detr."):]
        n = re.sub(r"^model\.backbone\.model\.", BACKBONE_PREFIX, n)
        n = n.replace(".o_proj.", ".out_proj.")
        n = re.sub(r"layers\.(\d+)\.mlp\.fc([12])\.", r"layers.\1.fc\2.", n)
        if n.startswith(BACKBONE_PREFIX):
            rest = n[len(BACKBONE_PREFIX):]
            if not rest.startswith(("embedder.", "encoder.")):
                rest = _timm_backbone_name(rest)
            n = BACKBONE_PREFIX + rest
        out[n] = v
    return out


def _backbone_config(hf: Mapping[str, Any], source: str) -> ResNetConfig:
    bb = hf.get("backbone_config")
    timm = hf.get("use_timm_backbone")
    if timm is None:  # transformers' default is a timm ResNet-50
        timm = bb is None or (isinstance(bb, Mapping) and bb.get("model_type") == "timm_backbone")
    if timm:
        name = hf.get("backbone") or (bb or {}).get("backbone") or "resnet50"
        m = re.fullmatch(r"resnet(\d+)", str(name))
        if not m or int(m.group(1)) not in RESNET_DEPTHS:
            raise CheckpointError(f"{source}: timm backbone {name!r} is not supported (resnet18/34/50/101/152 are)")
        if hf.get("dilation"):
            raise CheckpointError(f"{source}: dilation=True (DC5) is not supported")
        return resnet_config(int(m.group(1)), num_channels=int(hf.get("num_channels", 3)))
    if not isinstance(bb, Mapping) or bb.get("model_type") != "resnet":
        kind = bb.get("model_type") if isinstance(bb, Mapping) else bb
        raise CheckpointError(f"{source}: backbone_config of type {kind!r}; only 'resnet' is supported")
    if bb.get("hidden_act", "relu") != "relu":
        raise CheckpointError(f"{source}: backbone hidden_act={bb['hidden_act']!r}; only 'relu' is supported")
    depths = tuple(bb.get("depths", (3, 4, 6, 3)))
    out = bb.get("out_indices") or [len(depths)]
    if list(out)[-1] != len(depths):
        raise CheckpointError(f"{source}: backbone out_indices={out}: DETR here uses the last stage ({len(depths)})")
    return ResNetConfig(
        embedding_size=int(bb.get("embedding_size", 64)),
        hidden_sizes=tuple(bb.get("hidden_sizes", (256, 512, 1024, 2048))),
        depths=depths,
        layer_type=bb.get("layer_type", "bottleneck"),
        downsample_in_first_stage=bool(bb.get("downsample_in_first_stage", False)),
        downsample_in_bottleneck=bool(bb.get("downsample_in_bottleneck", False)),
        num_channels=int(bb.get("num_channels", 3)),
    )


def hf_detr_config(hf: Mapping[str, Any], *, source: str) -> DetrConfig:
    """DetrConfig of a transformers DETR config.json (plus our `lfi_interaction` entry)."""
    for key, want in (("activation_function", "relu"), ("position_embedding_type", "sine")):
        if hf.get(key, want) != want:
            raise CheckpointError(f"{source}: {key}={hf[key]!r}; only {want!r} is supported")
    if hf.get("attention_dropout", 0.0):
        raise CheckpointError(f"{source}: attention_dropout={hf['attention_dropout']} is not supported (0 only)")
    if "id2label" in hf:
        num_classes = len(hf["id2label"])
    else:
        num_classes = int(hf.get("num_labels", 91))
    kw = dict(
        backbone=_backbone_config(hf, source),
        hidden_size=int(hf.get("d_model", 256)),
        encoder_layers=int(hf.get("encoder_layers", 6)),
        decoder_layers=int(hf.get("decoder_layers", 6)),
        encoder_heads=int(hf.get("encoder_attention_heads", 8)),
        decoder_heads=int(hf.get("decoder_attention_heads", 8)),
        encoder_ffn_dim=int(hf.get("encoder_ffn_dim", 2048)),
        decoder_ffn_dim=int(hf.get("decoder_ffn_dim", 2048)),
        num_queries=int(hf.get("num_queries", 100)),
        num_classes=num_classes,
        dropout=float(hf.get("dropout", 0.1)),
        activation_dropout=float(hf.get("activation_dropout", 0.0)),
    )
    lfi = dict(hf.get(CONFIG_KEY) or {})
    for f in ("gate_bias_init", "align_layers"):
        if lfi.get(f) is not None:
            lfi[f] = tuple(lfi[f])
    bad = sorted(set(lfi) - set(INTERACTION_FIELDS))
    if bad:
        raise CheckpointError(f"{source}: unknown {CONFIG_KEY} entries {bad}; known: {list(INTERACTION_FIELDS)}")
    try:
        return DetrConfig(**kw, **lfi)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def hf_detr_config_dict(cfg: DetrConfig, *, id2label: Mapping[int, str] | None = None) -> dict:
    """A transformers `DetrConfig`-compatible config.json dict (ResNet backbone, no timm)."""
    bb = cfg.backbone
    n = len(bb.depths)
    labels = dict(id2label) if id2label else {i: f"LABEL_{i}" for i in range(cfg.num_classes)}
    if len(labels) != cfg.num_classes:
        raise ValueError(f"id2label has {len(labels)} entries, the model has {cfg.num_classes} classes")
    d = dict(
        architectures=["DetrForObjectDetection"],
        model_type="detr",
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone=None,
        backbone_config=dict(
            model_type="resnet",
            num_channels=bb.num_channels,
            embedding_size=bb.embedding_size,
            hidden_sizes=list(bb.hidden_sizes),
            depths=list(bb.depths),
            layer_type=bb.layer_type,
            hidden_act="relu",
            downsample_in_first_stage=bb.downsample_in_first_stage,
            downsample_in_bottleneck=bb.downsample_in_bottleneck,
            out_features=[f"stage{n}"],
            out_indices=[n],
            stage_names=["stem"] + [f"stage{i + 1}" for i in range(n)],
        ),
        num_channels=bb.num_channels,
        d_model=cfg.hidden_size,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.encoder_heads,
        decoder_attention_heads=cfg.decoder_heads,
        encoder_ffn_dim=cfg.encoder_ffn_dim,
        decoder_ffn_dim=cfg.decoder_ffn_dim,
        num_queries=cfg.num_queries,
        activation_function="relu",
        position_embedding_type="sine",
        dropout=cfg.dropout,
        attention_dropout=0.0,
        activation_dropout=cfg.activation_dropout,
        auxiliary_loss=False,
        dilation=False,
        id2label={str(int(k)): v for k, v in labels.items()},
        label2id={v: int(k) for k, v in labels.items()},
    )
    if cfg.interaction_queries or cfg.interaction_constraint:
        d[CONFIG_KEY] = interaction_entry(cfg, INTERACTION_FIELDS)
    return d


def to_hf_detr_state_dict(model: Detr) -> dict[str, np.ndarray]:
    return {hf_name(p): to_hf_array(p, v) for p, v in flat_params(model).items()}


def save_hf_detr(model: Detr, directory: str, *, id2label: Mapping[int, str] | None = None) -> None:
    """Write config.json + model.safetensors that `DetrForObjectDetection.from_pretrained` reads."""
    write_checkpoint(directory, to_hf_detr_state_dict(model), hf_detr_config_dict(model.cfg, id2label=id2label))


def param_shapes(cfg: DetrConfig) -> tuple[tuple[Path, tuple], ...]:
    """((our path, shape), ...) of every parameter of an architecture (cached, from shapes only)."""
    return model_param_shapes(Detr, cfg)


def expected_tensors(cfg: DetrConfig) -> dict[str, tuple[Path, tuple]]:
    """{checkpoint name: (our path, checkpoint shape)} of an architecture."""
    return checkpoint_tensors(param_shapes(cfg), hf_name)


def build_detr(cfg: DetrConfig, params: Mapping[Path, np.ndarray], *, seed: int = 0) -> Detr:
    """A Detr of `cfg` with `params` (our layout); only gates and the class head may be missing."""
    return fill_detr(cfg, params, seed=seed)


def load_hf_detr(
    directory: str,
    *,
    interaction: bool | Mapping[str, Any] = False,
    num_classes: int | None = None,
    class_rows: Sequence[int] | None = None,
    seed: int = 0,
    **overrides: Any,
) -> tuple[Detr, DetrConfig]:
    """The DETR of a `save_pretrained` directory (or our `save_hf_detr`) -> (model, config).

    interaction: True (or a dict of I-DETR switches) makes an I-DETR from the DETR with
    Wq' = Wq and the pretrained gate bias [-4, +4] (`idetr_from_detr`). num_classes: a new,
    freshly initialised class head of that size. class_rows: instead, keep the pretrained head's
    rows for these classes in this order (and its no-object row last): e.g. the COCO category
    ids of a source's contiguous classes (`source.category_ids`) for the released 92-way head.
    overrides: other DetrConfig fields that do
    not change the parameters (dtype, dropout, attn_impl, auxiliary_outputs, ...).
    """
    hf = read_json(directory)
    if hf is None:
        raise FileNotFoundError(f"{directory} has no config.json (expected a save_pretrained directory)")
    source = os.path.join(directory, "config.json")
    cfg = hf_detr_config(hf, source=source)
    raw, file = read_state_dict(directory)
    sd = normalize_hf_detr_names(raw)
    expected = expected_tensors(cfg)
    check_tensors(sd, expected, file, source, "DETR")
    params = {path: from_hf_array(path, sd[name]) for name, (path, _) in expected.items()}
    if class_rows is not None:
        rows = [int(r) for r in class_rows]
        bad = [r for r in rows if not 0 <= r < cfg.num_classes]
        if bad or not rows:
            raise ValueError(f"load_hf_detr({directory}): class_rows {bad or rows} outside the checkpoint's "
                             f"{cfg.num_classes} classes")
        if num_classes is not None and num_classes != len(rows):
            raise ValueError(f"load_hf_detr: num_classes={num_classes} but {len(rows)} class_rows")
        take = np.asarray(rows + [cfg.num_classes])  # the no-object logit stays last
        head = ("class_labels_classifier",)
        params[head + ("kernel",)] = params[head + ("kernel",)][:, take]
        params[head + ("bias",)] = params[head + ("bias",)][take]
        cfg = dataclasses.replace(cfg, num_classes=len(rows))
    elif num_classes is not None and num_classes != cfg.num_classes:
        cfg = dataclasses.replace(cfg, num_classes=int(num_classes))
        params = {p: v for p, v in params.items() if p[0] != "class_labels_classifier"}
    try:
        cfg = dataclasses.replace(cfg, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_hf_detr({directory}): {e}") from None
    model = build_detr(cfg, params, seed=seed)
    return with_interaction(model, cfg, interaction, directory, "DETR",
                            lambda m, extra: idetr_from_detr(m, idetr_config(cfg, **extra), seed=seed))


def detr_from_checkpoint(directory: str, mcfg: DetrConfig, *, seed: int = 0,
                         class_rows: Sequence[int] | None = None) -> Detr:
    """The model of architecture `mcfg` initialised from a DETR checkpoint directory (a run's
    `init`): every DETR tensor copied (a class head of another size fresh), and for an I-DETR
    `mcfg` the interaction queries Wq' = Wq and the gates at `mcfg.gate_bias_init`. class_rows:
    keep those rows of the pretrained class head (see `load_hf_detr`)."""
    detr, cfg = load_hf_detr(directory, num_classes=mcfg.num_classes, class_rows=class_rows, seed=seed)
    check_run_start(directory, cfg, mcfg, ARCHITECTURE_FIELDS, "DETR")
    if mcfg.interaction_queries:
        return idetr_from_detr(detr, mcfg, seed=seed)
    return fill_detr(mcfg, flat_params(detr), seed=seed)


__all__ = [
    "ARCHITECTURE_FIELDS",
    "CONFIG_KEY",
    "build_detr",
    "detr_from_checkpoint",
    "expected_tensors",
    "fill_detr",
    "from_hf_array",
    "hf_detr_config",
    "hf_detr_config_dict",
    "hf_name",
    "idetr_from_detr",
    "load_hf_detr",
    "normalize_hf_detr_names",
    "param_shapes",
    "save_hf_detr",
    "to_hf_array",
    "to_hf_detr_state_dict",
]
