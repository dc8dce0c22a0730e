"""Hand-built detections through postprocess -> results JSON -> COCOeval give known values."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from lfi_jax.detection.postprocess import postprocess, to_coco_results
from lfi_jax.eval.coco import coco_bbox_metrics
from lfi_jax.fileio import write_json_atomic

pytest.importorskip("pycocotools")

H, W = 100, 200  # image height, width: unequal so that swapped axes would show
CATS = [1, 3]  # COCO category ids of contiguous classes 0 and 1
GT = {
    "images": [{"id": 7, "height": H, "width": W, "file_name": "a.png"}],
    "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [50, 20, 40, 30], "area": 1200, "iscrowd": 0}],
    "categories": [{"id": 1, "name": "one"}, {"id": 3, "name": "three"}],
}
# the ground-truth box as DETR predicts it: normalised cxcywh
GT_BOX = [(50 + 20) / W, (20 + 15) / H, 40 / W, 30 / H]
FAR_BOX = [0.8, 0.2, 0.2, 0.3]  # x 140..180, y 5..35: no overlap with the object, same (medium) size
NO_OBJ = [0.0, 0.0, 6.0]  # best real class 0 with a low score


def _evaluate(tmp_path, logits, boxes):
    det = postprocess(jnp.asarray([logits], jnp.float32), jnp.asarray([boxes], jnp.float32))
    results = to_coco_results(det, [7], np.array([[H, W]]), CATS)
    path = tmp_path / "results.json"
    write_json_atomic(path, results)
    return coco_bbox_metrics(GT, str(path)), results


def test_boxes_and_ids_back_in_coco_terms(tmp_path):
    _, results = _evaluate(tmp_path, [[0, 5, 0], NO_OBJ], [GT_BOX, FAR_BOX])
    top = results[0]
    assert top["image_id"] == 7 and top["category_id"] == 3
    np.testing.assert_allclose(top["bbox"], [50, 20, 40, 30], atol=1e-4)
    np.testing.assert_allclose(top["score"], np.exp(5) / (np.exp(5) + 2), rtol=1e-6)
    assert results[1]["category_id"] == 1 and results[1]["score"] < top["score"]
    # padded rows are dropped
    det = postprocess(jnp.zeros((2, 2, 3)), jnp.full((2, 2, 4), 0.5))
    assert len(to_coco_results(det, [7, 0], np.array([[H, W], [1, 1]]), CATS, valid=np.array([1, 0]))) == 2


def test_perfect_prediction(tmp_path):
    m, _ = _evaluate(tmp_path, [[0, 5, 0], NO_OBJ], [GT_BOX, FAR_BOX])
    # One true positive at rank 1: COCOeval's precision is tp / (tp + fp + eps) = 1 / (1 + eps);
    # the low-score class-0 detection is in a category with no ground truth (ignored).
    # No small or large objects: APs = APl = -1 (COCOeval's "no ground truth").
    one = 1 / (1 + np.spacing(1))
    np.testing.assert_allclose([m.AP, m.AP50, m.AP75, m.APm], one, rtol=1e-12)
    assert m.APs == -1 and m.APl == -1
    d = m.as_dict("val")
    assert d["val/AP"] == m.AP and d["val/num_detections"] == 2 and "val/APl" in d


def test_false_positive_above_true_positive(tmp_path):
    m, _ = _evaluate(tmp_path, [[0, 4, 0], [0, 6, 0]], [GT_BOX, FAR_BOX])
    # Ranked: FP (recall 0, precision 0), then TP (recall 1, precision 1 / (2 + eps)). COCOeval
    # makes precision non-increasing from the right, so every one of the 101 recall thresholds
    # reads 1 / (2 + eps): AP = 0.5 at every IoU threshold (the TP box is exact).
    half = 1 / (2 + np.spacing(1))
    np.testing.assert_allclose([m.AP, m.AP50, m.AP75, m.APm], half, rtol=1e-12)


def test_wrong_class(tmp_path):
    m, _ = _evaluate(tmp_path, [[5, 0, 0], NO_OBJ], [GT_BOX, FAR_BOX])
    # The object (category 3) is never detected: 0; category 1 has no ground truth: -1, not averaged.
    assert m.AP == 0.0 and m.AP50 == 0.0 and m.AP75 == 0.0


def test_no_detections_and_bad_ids(tmp_path):
    m = coco_bbox_metrics(GT, [])
    assert m.AP == 0.0 and m.num_detections == 0
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_bbox_metrics(GT, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(GT))
    m = coco_bbox_metrics(str(path), [{"image_id": 7, "category_id": 3, "bbox": [50, 20, 40, 30], "score": 0.9}])
    np.testing.assert_allclose(m.AP, 1 / (1 + np.spacing(1)), rtol=1e-12)
