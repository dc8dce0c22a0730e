"""Instance segmentation with DETR / I-DETR and DETR's mask head (Table 6, second half): the
segmentation criterion (DETR's box losses on every decoder layer + sigmoid focal and dice on
the last layer's matched queries) + the dense alignment loss of detection (SPEC section 7,
the same Eq. 12 teacher map), COCO box AP and mask AP per eval split. The trainer's `Task`
for `config.task = "segmentation"`.

The model is `lfi_jax.models.detr_segm.DetrForSegmentation` (a DETR, or an I-DETR when
`model.interaction_queries` / `interaction_constraint` say so, under `detr/`, plus
`bbox_attention/` and `mask_head/`). The model config, the data source and the train
and eval iterators are detection's (`lfi_jax.tasks.detection`), the train one with
`config.data.masks` turned on (a `coco:PATH` source also needs `data.options.masks=True`).

Config keys read here (beyond detection's, see `lfi_jax.tasks.detection`):
  model.*        `DetrConfig` fields; the mask head needs >= 4 backbone stages and the widths
                 of `check_segm_config`
  init.hf        "" = fresh; a transformers `DetrForObjectDetection` directory (the box model,
                 which DETR's recipe trains first; an I-DETR starts from it with Wq' = Wq and
                 `model.gate_bias_init`) gets a fresh mask head; a `DetrForSegmentation`
                 directory (config.json's architectures) brings its mask head along
  loss.mask_weight (1.0), loss.dice_weight (1.0), loss.focal_alpha (0.25), loss.focal_gamma (2.0)
  data.mask_stride (1)   target masks on cells of s canvas pixels (`lfi_jax.data.det_transforms`)
  eval.mask_threshold (0.5)   sigmoid threshold of the predicted masks (DETR's)

Evaluation. The eval step returns every query's detection (postprocess order) and its mask
logits at the head's resolution; the host turns them into masks at the original image size
(`lfi_jax.detection.masks.masks_from_logits`, what DETR's `PostProcessSegm` computes) and
COCOeval scores boxes ("<split>/AP", AP50, AP75, APs/m/l, as detection) and masks
("<split>/AP_mask", AP50_mask, AP75_mask, APs_mask/APm_mask/APl_mask). The mask ground truth
is the source's instances JSON when its annotations carry segmentations (`coco:PATH`); a
source without them (`shortcut_digits_det`) gets RLEs of its records' masks, binarised as the
training targets are (`MASK_THRESHOLD`), with "area" the mask's pixel count (COCO's
convention, which the segm size breakdown reads; the box metrics keep the source's JSON).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lfi_jax.data.det_transforms import MASK_THRESHOLD, batch_targets
from lfi_jax.detection.criterion import CriterionWeights
from lfi_jax.detection.masks import encode_masks, select_mask_logits, to_coco_segm_results_from_logits
from lfi_jax.detection.matcher import MatcherCosts
from lfi_jax.detection.postprocess import Detections
from lfi_jax.detection.seg_losses import MaskLossWeights, segmentation_criterion
from lfi_jax.detection.types import DetectionPredictions
from lfi_jax.eval.coco import coco_bbox_metrics
from lfi_jax.eval.coco_segm import coco_segm_metrics
from lfi_jax.models.convert.detr import detr_from_checkpoint
from lfi_jax.models.convert.detr_segm import detr_segm_from_detr, load_hf_detr_segm
from lfi_jax.models.detr import DetrConfig
from lfi_jax.models.detr_segm import DetrForSegmentation, check_segm_config
from lfi_jax.tasks import Task, detection

INTERACTION_SWITCHES = ("interaction_queries", "interaction_constraint", "gated_control", "gate_hidden",
                        "gate_bias_init", "gate_init_scale", "align_layers", "interaction_in")


def _get(cfg: Any, key: str, default: Any) -> Any:
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def model_config(config) -> DetrConfig:
    """detection's `DetrConfig` of `config.model`, checked for the mask head (errors name keys)."""
    mcfg = detection.model_config(config)
    if type(mcfg) is not DetrConfig:  # not a subclass (Conditional-DETR has no mask head here)
        raise ValueError(f"config.model.arch={config.model.get('arch')!r}: the segmentation task's mask head is "
                         "DETR's (model.arch='detr')")
    check_segm_config(mcfg)
    return mcfg


def new_model(mcfg: DetrConfig, seed: int) -> DetrForSegmentation:
    return DetrForSegmentation(mcfg, rngs=nnx.Rngs(seed))


def _architectures(directory: str) -> list[str]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init.hf={directory}: no config.json (expected a save_pretrained directory)")
    with open(path) as f:
        return list(json.load(f).get("architectures") or [])


def load_model(config, mcfg: DetrConfig, seed: int) -> DetrForSegmentation | None:
    """From `config.init.hf` (a box model or a whole DetrForSegmentation, see the module doc), or None."""
    directory = str(_get(config.init, "hf", "") or "")
    if not directory:
        return None
    if "DetrForSegmentation" not in _architectures(directory):
        return detr_segm_from_detr(detr_from_checkpoint(directory, mcfg, seed=seed), seed=seed)
    keep = ("dtype", "dropout", "activation_dropout", "attn_impl", "auxiliary_outputs")
    interaction = {k: getattr(mcfg, k) for k in INTERACTION_SWITCHES}
    wanted = mcfg.interaction_queries or mcfg.interaction_constraint
    model, cfg = load_hf_detr_segm(directory, interaction=interaction if wanted else False, seed=seed,
                                   **{k: getattr(mcfg, k) for k in keep})
    diffs = [f for f in ("backbone", "hidden_size", "encoder_layers", "decoder_layers", "encoder_heads",
                         "decoder_heads", "encoder_ffn_dim", "decoder_ffn_dim", "num_queries", "num_classes",
                         *(INTERACTION_SWITCHES if wanted else ())) if getattr(cfg, f) != getattr(mcfg, f)]
    if diffs:
        raise ValueError(f"init.hf={directory}: the checkpoint's model differs from config.model in "
                         + ", ".join(f"model.{k} ({getattr(cfg, k)} vs {getattr(mcfg, k)})" for k in diffs))
    return model


def loss(model: DetrForSegmentation, batch, config) -> tuple[Any, dict[str, Any]]:
    lc = _get(config, "loss", {})
    seg_out = model(batch["image"], batch["pixel_mask"])
    out = seg_out.detr
    if "masks" not in batch:
        raise ValueError("the segmentation loss needs target masks in the batch (config.data.masks)")
    preds = DetectionPredictions(out.logits, out.pred_boxes, out.aux_logits, out.aux_boxes)
    weights = CriterionWeights(
        float(_get(lc, "ce_weight", 1.0)), float(_get(lc, "bbox_weight", 5.0)),
        float(_get(lc, "giou_weight", 2.0)), float(_get(lc, "eos_coef", 0.1)),
    )
    mask_weights = MaskLossWeights(
        float(_get(lc, "mask_weight", 1.0)), float(_get(lc, "dice_weight", 1.0)),
        float(_get(lc, "focal_alpha", 0.25)), float(_get(lc, "focal_gamma", 2.0)),
    )
    costs = MatcherCosts(
        float(_get(lc, "match_class", 1.0)), float(_get(lc, "match_bbox", 5.0)), float(_get(lc, "match_giou", 2.0))
    )
    crit = segmentation_criterion(
        preds, seg_out.pred_masks, batch_targets(batch), batch["masks"], num_classes=model.cfg.num_classes,
        weights=weights, mask_weights=mask_weights, costs=costs, example_mask=batch.get("valid"),
        matcher_impl=str(_get(lc, "matcher", "scipy")),
    )
    align_weight = float(_get(lc, "align_weight", 1.0))
    align = detection.alignment_loss(out, batch, lc, crit.boxes.match) if align_weight else jnp.zeros((), jnp.float32)
    total = crit.total + align_weight * align
    f = crit.boxes.final
    return total, {
        "task_loss": crit.total, "align_loss": align, "ce_loss": f.loss_ce, "bbox_loss": f.loss_bbox,
        "giou_loss": f.loss_giou, "mask_loss": crit.masks.loss_mask, "dice_loss": crit.masks.loss_dice,
        "cardinality_error": f.cardinality_error,
    }


def eval_step(model: DetrForSegmentation, batch) -> dict[str, Any]:
    """Every query's detection (postprocess order) and its mask logits [B, Q, Hp/4, Wp/4]; the
    unpadded network input size read off the pixel mask (the image sits at the top left)."""
    pixel_mask = batch["pixel_mask"]
    seg_out = model(batch["image"], pixel_mask)
    det, mask_logits = select_mask_logits(seg_out.detr.logits, seg_out.detr.pred_boxes, seg_out.pred_masks)
    b, hp, wp = pixel_mask.shape
    size = jnp.stack([pixel_mask[:, :, 0].sum(-1), pixel_mask[:, 0, :].sum(-1)], -1).astype(jnp.int32)
    return {
        "scores": det.scores, "labels": det.labels, "boxes": det.boxes, "mask_logits": mask_logits,
        "canvas": jnp.broadcast_to(jnp.asarray([hp, wp], jnp.int32), (b, 2)), "size": size,
        "image_id": batch["image_id"], "orig_size": batch["orig_size"], "valid": batch["valid"],
    }


# --------------------------------------------------------------------------- evaluation

_GT_CACHE: dict[str, dict[str, Any]] = {}


def segm_ground_truth(src) -> dict[str, Any]:
    """The split's instances JSON with a segmentation on every annotation (see the module doc)."""
    gt = src.gt_dataset()
    anns = gt.get("annotations", [])
    if all("segmentation" in a for a in anns):
        return gt
    key = json.dumps([getattr(src, "name", ""), getattr(src, "split", ""), getattr(src, "options", {})],
                     sort_keys=True, default=str)
    if key in _GT_CACHE:
        return _GT_CACHE[key]
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in anns:
        by_image.setdefault(int(a["image_id"]), []).append(a)
    index_of = getattr(src, "index_of", None)
    out_anns = []
    for k, im in enumerate(gt["images"]):
        iid = int(im["id"])
        mine = by_image.get(iid, [])
        if not mine:
            continue
        rec = src[index_of(iid) if index_of else k]
        if int(rec["image_id"]) != iid or rec.get("masks") is None or len(rec["masks"]) != len(mine):
            raise ValueError(f"{getattr(src, 'name', 'source')}/{getattr(src, 'split', '?')}: image id {iid}: its "
                             f"record has no masks for its {len(mine)} annotations (segmentation ground truth)")
        binary = np.asarray(rec["masks"]) >= MASK_THRESHOLD
        for a, m, rle in zip(mine, binary, encode_masks(binary)):
            out_anns.append(dict(a, segmentation=rle, area=float(m.sum())))
    out = dict(gt, annotations=out_anns)
    _GT_CACHE[key] = out
    return out


def evaluate(config, split: str, outputs: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """COCO box AP and mask AP of one pass over `split` (module docstring)."""
    src = source(config, split)
    threshold = float(_get(_get(config, "eval", {}), "mask_threshold", 0.5))
    boxes: list[dict] = []
    masks: list[dict] = []
    for out in outputs:
        det = Detections(out["scores"], out["labels"], out["boxes"])
        valid = np.asarray(out["valid"]) > 0
        segm = to_coco_segm_results_from_logits(
            det, out["mask_logits"], np.asarray(out["image_id"]), tuple(np.asarray(out["canvas"])[0]),
            np.asarray(out["size"]), np.asarray(out["orig_size"]), src.category_ids, valid=valid,
            threshold=threshold,
        )
        masks += segm
        boxes += [{k: v for k, v in r.items() if k != "segmentation"} for r in segm]
    ids = src.image_ids()
    metrics = coco_bbox_metrics(src.gt_dataset(), boxes, image_ids=ids).as_dict(split)
    where = f"{getattr(src, 'name', 'source')}/{split}"
    metrics.update(coco_segm_metrics(segm_ground_truth(src), masks, image_ids=ids, where=where).as_dict(split))
    return metrics


# --------------------------------------------------------------------------- data


def with_masks(config) -> ml_collections.ConfigDict:
    """A copy of `config` whose data pipeline carries the instance masks (`data.masks` on)."""
    c = ml_collections.ConfigDict(config.to_dict()) if hasattr(config, "to_dict") else ml_collections.ConfigDict(
        dict(config))
    c.data.masks = True
    return c


def train_iterator(config, mcfg: DetrConfig, teacher, *, seed: int, process_index: int = 0, process_count: int = 1):
    return detection.train_iterator(with_masks(config), mcfg, teacher, seed=seed, process_index=process_index,
                                    process_count=process_count)


eval_iterator = detection.eval_iterator  # image, pixel_mask, image_id, orig_size, valid
source = detection.source

TASK = Task(
    name="segmentation",
    model_config=model_config,
    new_model=new_model,
    load_model=load_model,
    loss=loss,
    eval_step=eval_step,
    evaluate=evaluate,
    train_iterator=train_iterator,
    eval_iterator=eval_iterator,
    source=source,
    summary_keys=("AP", "AP_mask"),
)

__all__ = ["TASK", "eval_iterator", "evaluate", "loss", "model_config", "segm_ground_truth",
           "with_masks"]
