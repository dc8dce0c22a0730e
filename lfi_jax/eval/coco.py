"""COCO box evaluation with pycocotools' COCOeval ("bbox"), quiet.

`coco_bbox_metrics(gt, results)` -> `CocoMetrics` (AP at IoU 0.50:0.95, AP50, AP75, and AP
of small / medium / large objects, all at 100 detections per image: COCOeval's stats[0:6]).
COCOeval's convention stays: -1.0 where a metric has no ground truth (e.g. APs on data
without small objects). No detections at all give 0.0 everywhere ground truth exists.
`CocoMetrics.as_dict(split)` gives the metrics.jsonl keys, e.g. {"val/AP": ..., "val/AP50": ...}.

`gt` is a pycocotools COCO, a path to an instances JSON, or the JSON's dict (images,
annotations, categories). COCOeval prints its progress and tables; they are captured (kept
on `CocoMetrics.log` for whoever wants them).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class CocoMetrics(NamedTuple):
    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    num_images: int
    num_detections: int
    log: str = ""

    def as_dict(self, split: str) -> dict[str, float]:
        d = {f"{split}/{k}": float(getattr(self, k)) for k in METRIC_NAMES}
        d[f"{split}/num_images"] = self.num_images
        d[f"{split}/num_detections"] = self.num_detections
        return d


def load_coco(gt: Any, *, quiet: bool = True):
    """A pycocotools COCO from a COCO object, a JSON path or an in-memory dict."""
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf) if quiet else contextlib.nullcontext():
        if isinstance(gt, (str, os.PathLike)):
            return COCO(os.fspath(gt))
        if isinstance(gt, Mapping):
            coco = COCO()
            coco.dataset = copy.deepcopy(dict(gt))
            coco.createIndex()
            return coco
    raise TypeError(f"ground truth must be a COCO, a JSON path or a dict, not {type(gt).__name__}")


def coco_bbox_metrics(
    gt: Any, results: Sequence[Mapping[str, Any]] | str | os.PathLike, *, image_ids: Sequence[int] | None = None
) -> CocoMetrics:
    """COCOeval bbox metrics of `results` (COCO result dicts, or a results JSON file) against `gt`.

    image_ids: evaluate on these images only (default: every image of `gt`); images without
    any detection count (their objects are missed).
    """
    import numpy as np
    from pycocotools.cocoeval import COCOeval

    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            results = json.load(f)
        if not isinstance(results, list):
            raise ValueError(f"{os.fspath(results)}: a COCO results file holds a JSON list of detections")
    coco_gt = load_coco(gt)
    known = set(coco_gt.getImgIds())
    ids = sorted(known) if image_ids is None else sorted({int(i) for i in image_ids})
    missing = sorted(set(ids) - known)
    if missing:
        raise ValueError(f"image ids {missing[:5]} are not in the ground truth ({len(known)} images)")
    stray = sorted({int(r["image_id"]) for r in results} - known)
    if stray:
        raise ValueError(f"results name image ids {stray[:5]} that are not in the ground truth")
    buf = io.StringIO()
    if not results:
        has_gt = len(coco_gt.getAnnIds(imgIds=ids)) > 0
        v = 0.0 if has_gt else -1.0
        return CocoMetrics(v, v, v, v, v, v, len(ids), 0, "no detections")
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, np.float64)
    return CocoMetrics(*(float(s) for s in stats[:6]), len(ids), len(results), buf.getvalue())


__all__ = ["METRIC_NAMES", "CocoMetrics", "coco_bbox_metrics", "load_coco"]
