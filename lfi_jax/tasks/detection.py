"""Object detection with DETR / I-DETR: DETR's set criterion + the dense alignment loss (SPEC
section 7), COCO box AP per eval split. The trainer's `Task` for `config.task = "detection"`.

Config keys read here (beyond the trainer's own):
  model.*      `DetrConfig` fields; `model.backbone` a ResNet depth (18/34/50/101/152) or a dict of
               `ResNetConfig` fields
  init.hf      a transformers `DetrForObjectDetection` directory ("" = fresh); with
               interaction queries the I-DETR starts from it (Wq' = Wq, `model.gate_bias_init`)
  loss.align_weight (1.0), loss.dense_align ("query_mean" | "matched_mean"), loss.eos_coef (0.1),
  loss.ce_weight / bbox_weight / giou_weight (1 / 5 / 2), loss.match_class / match_bbox /
  match_giou (1 / 5 / 2), loss.matcher ("scipy" | "optax")
  data.*       see `lfi_jax.data.det_pipeline`
Dropout: the Task protocol passes no rng to the loss, so DETR's dropout is off in training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.data.det_pipeline import make_det_eval_iterator, make_det_train_iterator
from lfi_jax.data.det_transforms import batch_targets
from lfi_jax.data.sources import get_source
from lfi_jax.detection.criterion import CriterionWeights, set_criterion
from lfi_jax.detection.matcher import MatcherCosts
from lfi_jax.detection.postprocess import Detections, postprocess, to_coco_results
from lfi_jax.detection.types import DetectionPredictions
from lfi_jax.eval.coco import coco_bbox_metrics
from lfi_jax.losses import dense_alignment_loss
from lfi_jax.models.convert.detr import idetr_from_detr, load_hf_detr
from lfi_jax.models.detr import Detr, DetrConfig
from lfi_jax.models.resnet import ResNetConfig, resnet_config
from lfi_jax.tasks import Task

EVAL_KEYS = ("image", "pixel_mask", "image_id", "orig_size", "valid")
DENSE_ALIGN = ("query_mean", "matched_mean")


def _get(cfg: Any, key: str, default: Any) -> Any:
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def model_config(config) -> DetrConfig:
    """`DetrConfig` from `config.model` (unknown keys are errors naming them)."""
    raw = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    fields = {f.name for f in dataclasses.fields(DetrConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown config keys for a DETR model: {', '.join('model.' + k for k in unknown)}")
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
    for k in ("gate_bias_init", "align_layers"):
        if raw.get(k) is not None:
            raw[k] = tuple(raw[k])
    return DetrConfig(**raw)


def new_model(mcfg: DetrConfig, seed: int) -> Detr:
    return Detr(mcfg, rngs=nnx.Rngs(seed))


def load_model(config, mcfg: DetrConfig, seed: int) -> Detr | None:
    """DETR from `config.init.hf` (and I-DETR from it when `mcfg` has interaction queries), or None."""
    directory = str(_get(config.init, "hf", "") or "")
    if not directory:
        return None
    keep = ("dtype", "dropout", "activation_dropout", "attn_impl", "auxiliary_outputs")
    detr, _ = load_hf_detr(directory, num_classes=mcfg.num_classes, seed=seed, **{k: getattr(mcfg, k) for k in keep})
    if mcfg.interaction_queries or mcfg.interaction_constraint:
        return idetr_from_detr(detr, mcfg, seed=seed)
    diffs = [f.name for f in dataclasses.fields(DetrConfig) if getattr(detr.cfg, f.name) != getattr(mcfg, f.name)]
    if diffs:
        raise ValueError(
            f"init.hf={directory}: the checkpoint's DETR differs from config.model in "
            + ", ".join(f"model.{k} ({getattr(detr.cfg, k)} vs {getattr(mcfg, k)})" for k in diffs)
        )
    return detr


def loss(model: Detr, batch, config) -> tuple[Any, dict[str, Any]]:
    lc = _get(config, "loss", {})
    out = model(batch["image"], batch["pixel_mask"])
    preds = DetectionPredictions(out.logits, out.pred_boxes, out.aux_logits, out.aux_boxes)
    weights = CriterionWeights(
        float(_get(lc, "ce_weight", 1.0)), float(_get(lc, "bbox_weight", 5.0)),
        float(_get(lc, "giou_weight", 2.0)), float(_get(lc, "eos_coef", 0.1)),
    )
    costs = MatcherCosts(
        float(_get(lc, "match_class", 1.0)), float(_get(lc, "match_bbox", 5.0)), float(_get(lc, "match_giou", 2.0))
    )
    crit = set_criterion(
        preds, batch_targets(batch), num_classes=model.cfg.num_classes, weights=weights, costs=costs,
        example_mask=batch.get("valid"), matcher_impl=str(_get(lc, "matcher", "scipy")),
    )
    align_weight = float(_get(lc, "align_weight", 1.0))
    align = jnp.zeros((), jnp.float32)
    if out.agt_rows is not None and align_weight:
        mode = str(_get(lc, "dense_align", "query_mean"))
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
            qmask = None if mode == "query_mean" else crit.match.query_target >= 0
        align = dense_alignment_loss(out.agt_rows, batch["teacher"], out.key_mask, qmask,
                                     example_mask=batch["teacher_mask"])
    total = crit.total + align_weight * align
    f = crit.final
    return total, {
        "task_loss": crit.total, "align_loss": align, "ce_loss": f.loss_ce, "bbox_loss": f.loss_bbox,
        "giou_loss": f.loss_giou, "cardinality_error": f.cardinality_error,
    }


def eval_step(model: Detr, batch) -> dict[str, Any]:
    out = model(batch["image"], batch["pixel_mask"])
    det = postprocess(out.logits, out.pred_boxes)
    return {
        "scores": det.scores, "labels": det.labels, "boxes": det.boxes,
        "image_id": batch["image_id"], "orig_size": batch["orig_size"], "valid": batch["valid"],
    }


def evaluate(config, split: str, outputs: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """COCO box AP (AP, AP50, AP75, APs, APm, APl) of one pass over `split`."""
    src = source(config, split)
    results: list[dict] = []
    for out in outputs:
        det = Detections(out["scores"], out["labels"], out["boxes"])
        results += to_coco_results(det, np.asarray(out["image_id"]), np.asarray(out["orig_size"]),
                                   src.category_ids, valid=np.asarray(out["valid"]) > 0)
    return coco_bbox_metrics(src.gt_dataset(), results, image_ids=src.image_ids()).as_dict(split)


def _data_cfg(config, mcfg: DetrConfig):
    """config.data with the stride taken from the backbone (an explicit, different one is an error)."""
    data = config.data
    stride = mcfg.backbone.stride
    given = _get(data, "stride", None)
    if given is not None and int(given) != stride:
        raise ValueError(f"config.data.stride={given} differs from the backbone's stride {stride}")
    d = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    d["stride"] = stride
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
        _data_cfg(config, mcfg), teacher, global_batch_size=config.batch_size, seed=seed,
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
        _data_cfg(config, mcfg), split, global_batch_size=config.eval_batch_size,
        process_index=process_index, process_count=process_count,
    )
    return _Keys(it, EVAL_KEYS)


def source(config, split: str):
    opts = config.data.options.to_dict() if hasattr(config.data.options, "to_dict") else dict(config.data.options)
    return get_source(config.data.source, split, opts)


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
