"""COCO instance-segmentation evaluation with pycocotools' COCOeval ("segm"), quiet.

`coco_segm_metrics(gt, results)` -> `SegmMetrics`: AP_mask (IoU 0.50:0.95), AP50_mask,
AP75_mask and the size breakdown APs_mask / APm_mask / APl_mask (COCOeval's stats[0:6], 100
detections per image; sizes by the ground truth's "area", as COCO). COCOeval's conventions
stay: -1.0 where a metric has no ground truth; no detections at all give 0.0 wherever ground
truth exists. `SegmMetrics.as_dict(split)` gives the metrics.jsonl keys, e.g.
{"val/AP_mask": ..., "val/AP50_mask": ...}, beside the box metrics' "val/AP".

`gt` is what `lfi_jax.eval.coco.load_coco` takes (a COCO, an instances JSON path or its dict);
`results` COCO result dicts with "image_id", "category_id", "score" and "segmentation" (an
RLE, e.g. from `lfi_jax.detection.masks.to_coco_segm_results`) or a results JSON path.
Before COCOeval runs, every ground-truth segmentation and every result RLE is checked
against its image's size (`lfi_jax.detection.masks.annotation_rle` / `compress_rle`; a result's
compressed string by its "size" only, see `compress_rle`'s check_counts): an RLE
of the wrong size, an annotation without a segmentation or a polygon outside the image is a
ValueError naming the file (`where`, default the JSON path or "ground truth"), the image id
and the annotation id (or the result's index).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lfi_jax.detection.masks import annotation_rle, compress_rle
from lfi_jax.eval.coco import load_coco

SEGM_METRIC_NAMES = ("AP_mask", "AP50_mask", "AP75_mask", "APs_mask", "APm_mask", "APl_mask")


class SegmMetrics(NamedTuple):
    AP_mask: float
    AP50_mask: float
    AP75_mask: float
    APs_mask: float
    APm_mask: float
    APl_mask: float
    num_images: int
    num_detections: int
    log: str = ""

    def as_dict(self, split: str) -> dict[str, float]:
        d = {f"{split}/{k}": float(getattr(self, k)) for k in SEGM_METRIC_NAMES}
        d[f"{split}/num_mask_detections"] = self.num_detections
        return d


def check_segm_ground_truth(coco_gt, where: str) -> None:
    """Every annotation has a segmentation of its image's size (see the module docstring)."""
    for ann in coco_gt.dataset.get("annotations", []):
        iid = int(ann["image_id"])
        if iid not in coco_gt.imgs:
            raise ValueError(f"{where}: annotation {ann.get('id')} names image id {iid}, which is not in 'images'")
        im = coco_gt.imgs[iid]
        annotation_rle(ann, int(im["height"]), int(im["width"]), f"{where}: image id {iid}: annotation {ann.get('id')}")


def _checked_results(coco_gt, results: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    out = []
    for k, r in enumerate(results):
        iid = int(r["image_id"])
        what = f"{where}: result {k} (image id {iid})"
        if iid not in coco_gt.imgs:
            raise ValueError(f"{what}: image id not in the ground truth")
        if "segmentation" not in r or not isinstance(r["segmentation"], Mapping):
            raise ValueError(f"{what}: a segm result needs an RLE 'segmentation'")
        im = coco_gt.imgs[iid]
        rle = compress_rle(r["segmentation"], (int(im["height"]), int(im["width"])), what, check_counts=False)
        out.append({k2: v for k2, v in r.items() if k2 not in ("segmentation", "bbox", "area")} | {"segmentation": rle})
    return out


def run_cocoeval(coco_gt, results: list[dict[str, Any]], image_ids: list[int], iou_type: str) -> tuple[np.ndarray, str]:
    """COCOeval(iou_type) on `image_ids`, its output captured: (stats [12], log)."""
    from pycocotools.cocoeval import COCOeval  # the detection extra; imported when used

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, np.float64), buf.getvalue()


def coco_segm_metrics(
    gt: Any,
    results: Sequence[Mapping[str, Any]] | str | os.PathLike,
    *,
    image_ids: Sequence[int] | None = None,
    where: str | None = None,
) -> SegmMetrics:
    """COCOeval segm metrics of `results` against `gt` (see the module docstring).

    image_ids: evaluate on these images only (default: every image of `gt`); images without
    any detection count (their objects are missed).
    """
    gt_where = where or (os.fspath(gt) if isinstance(gt, (str, os.PathLike)) else "ground truth")
    res_where = "results"
    if isinstance(results, (str, os.PathLike)):
        res_where = os.fspath(results)
        with open(results) as f:
            results = json.load(f)
        if not isinstance(results, list):
            raise ValueError(f"{res_where}: a COCO results file holds a JSON list of detections")
    coco_gt = load_coco(gt)
    check_segm_ground_truth(coco_gt, gt_where)
    known = set(coco_gt.getImgIds())
    ids = sorted(known) if image_ids is None else sorted({int(i) for i in image_ids})
    missing = sorted(set(ids) - known)
    if missing:
        raise ValueError(f"{gt_where}: image ids {missing[:5]} are not in the ground truth ({len(known)} images)")
    checked = _checked_results(coco_gt, results, res_where)
    if not checked:
        v = 0.0 if coco_gt.getAnnIds(imgIds=ids) else -1.0
        return SegmMetrics(v, v, v, v, v, v, len(ids), 0, "no detections")
    stats, log = run_cocoeval(coco_gt, checked, ids, "segm")
    return SegmMetrics(*(float(s) for s in stats[:6]), len(ids), len(checked), log)


__all__ = ["SEGM_METRIC_NAMES", "SegmMetrics", "check_segm_ground_truth", "coco_segm_metrics", "run_cocoeval"]
