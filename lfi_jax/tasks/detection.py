"""Object detection with DETR / I-DETR and Conditional-DETR / I-Conditional-DETR: the set
criterion + the dense alignment loss (SPEC section 7), COCO box AP per eval split. The
trainer's `Task` for `config.task = "detection"`.

Config keys read here (beyond the trainer's own):
  model.arch   "detr" (default) | "conditional_detr" (Conditional-DETR, Meng et al. 2021:
               sigmoid focal classification without a no-object logit, 300 queries by default)
  model.*      `DetrConfig` / `ConditionalDetrConfig` fields (the same fields); `model.backbone` a
               ResNet depth (18/34/50/101/152) or a dict of `ResNetConfig` fields;
               `model.gate_bias_init` unset (None) = [-4, +4] when `init.hf` names a detector
               (the I-model starts out as it), else [0, 0] (README deviation 4)
  init.hf      a transformers `DetrForObjectDetection` / `ConditionalDetrForObjectDetection`
               directory ("" = fresh): every tensor of the architecture copied (the checkpoint's
               architecture fields must equal config.model's; the other fields, gate_bias_init,
               dropout, dtype, ..., are config.model's); with interaction queries the I-model
               starts from it (Wq' = Wq). The class head: kept when the checkpoint's id2label
               names the train source's category ids with the source's class names (the released
               COCO heads for `coco:`, rows `source.category_ids`), else fresh;
               `init.class_head = "fresh"` always starts it fresh
  init.backbone  (when init.hf is "") a ResNet checkpoint for the backbone alone, the rest fresh:
               a transformers ResNetModel / ResNetForImageClassification / ResNetBackbone
               directory or a timm / torchvision ResNet weights file (e.g. ImageNet ResNet-50)
  loss.align_weight (1.0), loss.dense_align ("query_mean" | "matched_mean"),
  loss.ce_weight / bbox_weight / giou_weight (DETR 1 / 5 / 2, Conditional-DETR 2 / 5 / 2),
  loss.match_class / match_bbox / match_giou (DETR 1 / 5 / 2, Conditional-DETR 2 / 5 / 2),
  loss.eos_coef (DETR: 0.1), loss.focal_alpha / focal_gamma (Conditional-DETR: 0.25 / 2),
  loss.matcher ("scipy" | "optax")
  data.*       see `lfi_jax.data.det_pipeline`; `data.data_ratio` (1.0) keeps a seeded subset of
               the TRAIN split (`lfi_jax.data.sources.subset_indices`, seed
               `data.options.subset_seed`, default 0; evaluation sees whole splits)
Evaluation: DETR's postprocess (softmax, each query's best class) or Conditional-DETR's (sigmoid,
the 100 best of all queries x classes), then COCOeval.
Dropout: the Task protocol passes no rng to the loss, so dropout is off in training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.data.det_pipeline import make_det_eval_iterator, make_det_train_iterator
from lfi_jax.data.det_transforms import batch_targets
from lfi_jax.data.sources import get_source
from lfi_jax.detection.cond_criterion import FocalWeights, focal_set_criterion
from lfi_jax.detection.criterion import CriterionWeights, set_criterion
from lfi_jax.detection.matcher import MatcherCosts
from lfi_jax.detection.postprocess import Detections, postprocess, postprocess_sigmoid, to_coco_results
from lfi_jax.detection.types import DetectionPredictions
from lfi_jax.eval.coco import coco_bbox_metrics
from lfi_jax.losses import dense_alignment_loss
from lfi_jax.models.conditional_detr import ConditionalDetr, ConditionalDetrConfig
from lfi_jax.models.convert.conditional_detr import (
    fill_conditional_detr,
    iconditional_detr_from_conditional_detr,
    load_hf_conditional_detr,
    params_of,
)
from lfi_jax.models.convert.detr import (
    ARCHITECTURE_FIELDS,
    BACKBONE_PREFIX,
    detr_from_checkpoint,
    from_hf_array,
    hf_name,
    normalize_hf_detr_names,
)
from lfi_jax.models.convert.io import CheckpointError, read_json, read_state_dict
from lfi_jax.models.detr import PRETRAINED_GATE_BIAS, Detr, DetrConfig
from lfi_jax.models.resnet import ResNetConfig, resnet_config
from lfi_jax.tasks import Task

EVAL_KEYS = ("image", "pixel_mask", "image_id", "orig_size", "valid")
DENSE_ALIGN = ("query_mean", "matched_mean")
ARCHS = {"detr": DetrConfig, "conditional_detr": ConditionalDetrConfig}
CLASS_HEADS = ("auto", "fresh")
TOP_K = 100  # Conditional-DETR's detections per image (COCOeval keeps at most 100)


def _get(cfg: Any, key: str, default: Any) -> Any:
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def is_conditional(mcfg: DetrConfig) -> bool:
    return isinstance(mcfg, ConditionalDetrConfig)


def model_config(config) -> DetrConfig:
    """`DetrConfig` or `ConditionalDetrConfig` (`model.arch`) from `config.model` (unknown keys are
    errors naming them)."""
    raw = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    arch = raw.pop("arch", None) or "detr"
    if arch not in ARCHS:
        raise ValueError(f"config.model.arch={arch!r}: expected one of {sorted(ARCHS)}")
    cls = ARCHS[arch]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown config keys for a {arch} model: {', '.join('model.' + k for k in unknown)}")
    bb = raw.pop("backbone", None)
    if isinstance(bb, int):
        raw["backbone"] = resnet_config(bb)
    elif isinstance(bb, dict):
        rfields = {f.name for f in dataclasses.fields(ResNetConfig)}
        bad = sorted(set(bb) - rfields - {"depth"})
        if bad:
            raise ValueError(f"unknown config keys: {', '.join('model.backbone.' + k for k in bad)}")
        bb = dict(bb)
        depth = bb.pop("depth", None)
        raw["backbone"] = resnet_config(int(depth), **bb) if depth else ResNetConfig(**bb)
    elif bb is not None:
        raise ValueError(f"config.model.backbone={bb!r}: expected a ResNet depth or a dict of ResNetConfig fields")
    if raw.get("gate_bias_init") is None:  # unset: from a pretrained detector it starts out as it
        pretrained = bool(str(_get(_get(config, "init", {}), "hf", "") or ""))
        raw["gate_bias_init"] = PRETRAINED_GATE_BIAS if pretrained else (0.0, 0.0)
    for k in ("gate_bias_init", "align_layers"):
        if raw.get(k) is not None:
            raw[k] = tuple(raw[k])
    return cls(**raw)


def new_model(mcfg: DetrConfig, seed: int) -> Detr | ConditionalDetr:
    if is_conditional(mcfg):
        return ConditionalDetr(mcfg, rngs=nnx.Rngs(seed))
    return Detr(mcfg, rngs=nnx.Rngs(seed))


def _class_rows(config, directory: str, mcfg: DetrConfig) -> list[int] | None:
    """The checkpoint's class-head rows of the train source's classes, when its id2label names
    the source's category ids with the source's class names (see the module docstring)."""
    mode = str(_get(config.init, "class_head", "auto") or "auto")
    if mode not in CLASS_HEADS:
        raise ValueError(f"config.init.class_head={mode!r}: expected one of {CLASS_HEADS}")
    hf = read_json(directory) or {}
    id2label = {str(k): str(v).strip().lower() for k, v in (hf.get("id2label") or {}).items()}
    if mode == "fresh" or not id2label:
        return None
    src = source(config, config.data.train_split)
    cats, names = list(getattr(src, "category_ids", []) or []), list(src.class_names)
    if len(cats) != mcfg.num_classes or len(cats) != len(names):
        return None
    if all(id2label.get(str(c)) == str(n).strip().lower() for c, n in zip(cats, names)):
        return [int(c) for c in cats]
    return None


def _conditional_from_checkpoint(directory: str, mcfg: ConditionalDetrConfig, *, seed: int,
                                 class_rows: list[int] | None) -> ConditionalDetr:
    """Conditional-DETR's counterpart of `detr_from_checkpoint` (same rules)."""
    model, cfg = load_hf_conditional_detr(directory, seed=seed)
    if cfg.interaction_queries:
        raise CheckpointError(f"{directory} holds an I-Conditional-DETR; start runs from a Conditional-DETR checkpoint")
    for f in ARCHITECTURE_FIELDS:
        if getattr(cfg, f) != getattr(mcfg, f):
            raise CheckpointError(f"{directory}: model.{f}={getattr(mcfg, f)} in the config, "
                                  f"{getattr(cfg, f)} in the checkpoint")
    params = params_of(model)
    head = ("class_labels_classifier",)
    if class_rows is not None and max(class_rows) < cfg.num_classes:
        take = np.asarray(class_rows)
        params[head + ("kernel",)] = np.asarray(params[head + ("kernel",)])[:, take]
        params[head + ("bias",)] = np.asarray(params[head + ("bias",)])[take]
    elif cfg.num_classes != mcfg.num_classes:
        params = {p: v for p, v in params.items() if p[0] != head[0]}
    plain = dataclasses.replace(mcfg, interaction_queries=False, interaction_constraint=False)
    base = fill_conditional_detr(plain, params, seed=seed)
    if mcfg.interaction_queries:
        return iconditional_detr_from_conditional_detr(base, mcfg, seed=seed)
    return fill_conditional_detr(mcfg, params_of(base), seed=seed)


def _backbone_names(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A ResNet state dict (transformers ResNetModel / ...ForImageClassification / ResNetBackbone,
    timm, torchvision) -> `hf_name`'s backbone names; classifier tensors dropped."""
    out = {}
    for name, v in sd.items():
        n = name
        for prefix in ("resnet.", BACKBONE_PREFIX, "model.", "backbone."):
            if n.startswith(prefix):
                n = n[len(prefix):]
        if n.startswith(("classifier.", "fc.", "head.")) or n.endswith("num_batches_tracked"):
            continue
        out[BACKBONE_PREFIX + n] = v
    return normalize_hf_detr_names(out)


def load_backbone(model, path: str):
    """`model` with its backbone's parameters from the ResNet checkpoint `path` (the rest kept)."""
    raw, file = read_state_dict(path)
    sd = _backbone_names(raw)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    expected = {hf_name(tuple(p)): (tuple(p), var) for p, var in flat if p[0] == "backbone"}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        show = lambda xs: ", ".join(x[len(BACKBONE_PREFIX):] for x in xs[:5]) + (" ..." if len(xs) > 5 else "")  # noqa: E731
        raise CheckpointError(f"{file}: not the ResNet of config.model.backbone: {len(missing)} tensors missing "
                              f"({show(missing)}), {len(unexpected)} unexpected ({show(unexpected)})")
    for name, (p, var) in expected.items():
        value = from_hf_array(p, sd[name])
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointError(f"{file}: {name} has shape {tuple(np.shape(sd[name]))}; config.model.backbone "
                                  f"wants {tuple(var.shape)} ({'/'.join(map(str, p))})")
        var.set_value(jnp.asarray(value, var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def load_model(config, mcfg: DetrConfig, seed: int) -> Detr | ConditionalDetr | None:
    """The detector of `init.hf` (an I-model from it when `mcfg` has interaction queries), or a
    fresh one with the backbone of `init.backbone`, or None (see the module docstring)."""
    directory = str(_get(config.init, "hf", "") or "")
    backbone = str(_get(config.init, "backbone", "") or "")
    if directory and backbone:
        raise ValueError(f"config.init.hf={directory} and config.init.backbone={backbone}: set one "
                         "(init.hf already holds a backbone)")
    if directory:
        rows = _class_rows(config, directory, mcfg)
        if is_conditional(mcfg):
            return _conditional_from_checkpoint(directory, mcfg, seed=seed, class_rows=rows)
        return detr_from_checkpoint(directory, mcfg, seed=seed, class_rows=rows)
    if backbone:
        return load_backbone(new_model(mcfg, seed), backbone)
    return None


def _criterion(model, preds: DetectionPredictions, batch, lc):
    impl = str(_get(lc, "matcher", "scipy"))
    w = lambda key, default: float(_get(lc, key, default))  # noqa: E731
    if is_conditional(model.cfg):
        alpha, gamma = w("focal_alpha", 0.25), w("focal_gamma", 2.0)
        weights = FocalWeights(w("ce_weight", 2.0), w("bbox_weight", 5.0), w("giou_weight", 2.0), alpha, gamma)
        costs = MatcherCosts(w("match_class", 2.0), w("match_bbox", 5.0), w("match_giou", 2.0), "focal", alpha, gamma)
        return focal_set_criterion(preds, batch_targets(batch), num_classes=model.cfg.num_classes, weights=weights,
                                   costs=costs, example_mask=batch.get("valid"), matcher_impl=impl)
    weights = CriterionWeights(w("ce_weight", 1.0), w("bbox_weight", 5.0), w("giou_weight", 2.0), w("eos_coef", 0.1))
    costs = MatcherCosts(w("match_class", 1.0), w("match_bbox", 5.0), w("match_giou", 2.0))
    return set_criterion(preds, batch_targets(batch), num_classes=model.cfg.num_classes, weights=weights,
                         costs=costs, example_mask=batch.get("valid"), matcher_impl=impl)


def alignment_loss(out, batch, loss_cfg, match) -> jax.Array:
    """The dense alignment term (SPEC section 7) of a detector's output (`DetrOutput`): 0 without
    C_agt rows; `loss_cfg.dense_align` "query_mean" (every query) or "matched_mean" (the queries
    `match`, the last layer's assignment, gives a target); in the encoder the queries are the cells."""
    if out.agt_rows is None:
        return jnp.zeros((), jnp.float32)
    mode = str(_get(loss_cfg, "dense_align", "query_mean"))
    if mode not in DENSE_ALIGN:
        raise ValueError(f"config.loss.dense_align={mode!r}: expected one of {DENSE_ALIGN}")
    if tuple(out.key_mask.shape) != tuple(batch["teacher"].shape):
        raise ValueError(
            f"the model's key grid {tuple(out.key_mask.shape)} differs from the teacher's "
            f"{tuple(batch['teacher'].shape)} (config.data.stride vs the backbone's stride)"
        )
    if out.query_mask is not None:  # encoder self-attention: the queries are the image cells
        qmask = out.query_mask
    else:
        qmask = None if mode == "query_mean" else match.query_target >= 0
    return dense_alignment_loss(out.agt_rows, batch["teacher"], out.key_mask, qmask, example_mask=batch["teacher_mask"])


def loss(model: Detr | ConditionalDetr, batch, config) -> tuple[Any, dict[str, Any]]:
    lc = _get(config, "loss", {})
    out = model(batch["image"], batch["pixel_mask"])
    preds = DetectionPredictions(out.logits, out.pred_boxes, out.aux_logits, out.aux_boxes)
    crit = _criterion(model, preds, batch, lc)
    align_weight = float(_get(lc, "align_weight", 1.0))
    align = alignment_loss(out, batch, lc, crit.match) if align_weight else jnp.zeros((), jnp.float32)
    total = crit.total + align_weight * align
    f = crit.final
    return total, {
        "task_loss": crit.total, "align_loss": align, "ce_loss": f.loss_ce, "bbox_loss": f.loss_bbox,
        "giou_loss": f.loss_giou, "cardinality_error": f.cardinality_error,
    }


def eval_step(model: Detr | ConditionalDetr, batch) -> dict[str, Any]:
    out = model(batch["image"], batch["pixel_mask"])
    if is_conditional(model.cfg):
        det = postprocess_sigmoid(out.logits, out.pred_boxes, top_k=TOP_K)
    else:
        det = postprocess(out.logits, out.pred_boxes)
    return {
        "scores": det.scores, "labels": det.labels, "boxes": det.boxes,
        "image_id": batch["image_id"], "orig_size": batch["orig_size"], "valid": batch["valid"],
    }


def evaluate(config, split: str, outputs: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """COCO box AP (AP, AP50, AP75, APs, APm, APl) of one pass over `split`."""
    src = get_source(config.data.source, split, split_options(config, split, train=False))
    results: list[dict] = []
    for out in outputs:
        det = Detections(out["scores"], out["labels"], out["boxes"])
        results += to_coco_results(det, np.asarray(out["image_id"]), np.asarray(out["orig_size"]),
                                   src.category_ids, valid=np.asarray(out["valid"]) > 0)
    return coco_bbox_metrics(src.gt_dataset(), results, image_ids=src.image_ids()).as_dict(split)


def split_options(config, split: str, *, train: bool | None = None) -> dict[str, Any]:
    """The source options of `split`: `data.data_ratio` (and `data.options.subset_seed`) keep a
    seeded subset of the train split only (`train=None`: when `split` is `data.train_split`);
    evaluation (`train=False`) sees the whole split."""
    raw = _get(config.data, "options", {})
    opts = dict(raw.to_dict() if hasattr(raw, "to_dict") else raw)
    ratio = float(_get(config.data, "data_ratio", 1.0))
    given = float(opts.get("data_ratio", 1.0))
    if ratio != 1.0 and given not in (1.0, ratio):
        raise ValueError(f"config.data.data_ratio={ratio} and config.data.options.data_ratio={given} disagree")
    if train is None:
        train = split == config.data.train_split
    if not train:
        opts.pop("data_ratio", None)
        opts.pop("subset_seed", None)
    elif ratio != 1.0:
        opts["data_ratio"] = ratio
    return opts


def _data_cfg(config, mcfg: DetrConfig, split: str | None = None, *, train: bool | None = None):
    """config.data with the stride taken from the backbone (an explicit, different one is an error)
    and, for `split`, its options (`split_options`)."""
    data = config.data
    stride = mcfg.backbone.stride
    given = _get(data, "stride", None)
    if given is not None and int(given) != stride:
        raise ValueError(f"config.data.stride={given} differs from the backbone's stride {stride}")
    d = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    d["stride"] = stride
    if split is not None:
        d["options"] = split_options(config, split, train=train)
    return _Cfg(d)


class _Cfg(dict):
    """A dict read with attribute access (`data_cfg.source`), as the pipelines read config.data."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config.data.{key} is not set") from None


def train_iterator(config, mcfg: DetrConfig, teacher, *, seed: int, process_index: int = 0, process_count: int = 1):
    return make_det_train_iterator(
        _data_cfg(config, mcfg, config.data.train_split, train=True), teacher, global_batch_size=config.batch_size,
        seed=seed,
        process_index=process_index, process_count=process_count,
    )


class _Keys:
    """A re-iterable view of an eval iterable keeping only the leaves the eval step reads."""

    def __init__(self, it, keys):
        self._it, self._keys = it, keys

    def __iter__(self):
        for batch in self._it:
            yield {k: batch[k] for k in self._keys}


def eval_iterator(config, mcfg: DetrConfig, split: str, *, process_index: int = 0, process_count: int = 1):
    it = make_det_eval_iterator(
        _data_cfg(config, mcfg, split, train=False), split, global_batch_size=config.eval_batch_size,
        process_index=process_index, process_count=process_count,
    )
    return _Keys(it, EVAL_KEYS)


def source(config, split: str):
    """The source of `split` as training opens it (the train split's `data.data_ratio` subset)."""
    return get_source(config.data.source, split, split_options(config, split))


TASK = Task(
    name="detection",
    model_config=model_config,
    new_model=new_model,
    load_model=load_model,
    loss=loss,
    eval_step=eval_step,
    evaluate=evaluate,
    train_iterator=train_iterator,
    eval_iterator=eval_iterator,
    source=source,
    summary_keys=("AP", "AP50"),
)
