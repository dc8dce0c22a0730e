"""Mask postprocessing, RLE round trips and COCOeval segm on hand-built masks."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lfi_jax.detection.masks import (
    annotation_rle,
    check_segmentation,
    compress_rle,
    decode_masks,
    decode_rle,
    encode_masks,
    mask_detections,
    masks_from_logits,
    masks_to_original,
    polygons_to_rle,
    select_mask_logits,
    string_counts,
    to_coco_segm_results,
    to_coco_segm_results_from_logits,
)
from lfi_jax.detection.postprocess import postprocess
from lfi_jax.eval.coco_segm import SEGM_METRIC_NAMES, coco_segm_metrics


def np_runs(mask):
    """Run lengths of a binary mask in column-major order, starting with a run of zeros (COCO's RLE)."""
    flat = np.asarray(mask, np.uint8).T.ravel()
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return runs


def test_rle_round_trip_and_counts():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 13, 17)) < 0.3
    masks[1] = False  # an empty mask
    masks[2, 2:9, 4:15] = True
    rles = encode_masks(masks)
    assert [r["size"] for r in rles] == [[13, 17]] * 3
    assert all(isinstance(r["counts"], str) for r in rles)
    np.testing.assert_array_equal(decode_masks(rles, (13, 17)), masks.astype(np.uint8))
    for m, r in zip(masks, rles):
        assert string_counts(r["counts"]) == np_runs(m)
    assert encode_masks(np.zeros((0, 4, 4), bool)) == []
    # an uncompressed RLE (list counts) is compressed to the same mask
    unc = {"size": [13, 17], "counts": np_runs(masks[2])}
    np.testing.assert_array_equal(decode_rle(unc, (13, 17), "x"), masks[2].astype(np.uint8))
    assert compress_rle(unc, (13, 17), "x") == rles[2]


def test_rle_wrong_size_is_an_error():
    rle = encode_masks(np.ones((1, 10, 12), bool))[0]
    with pytest.raises(ValueError, match=r"ann\.json: image id 7: .*RLE of size 10x12 .* 10x11 image"):
        decode_rle(rle, (10, 11), "ann.json: image id 7: annotation 3")
    with pytest.raises(ValueError, match="annotation 3: uncompressed RLE counts .* summing to 10x12"):
        compress_rle({"size": [10, 12], "counts": [5, 5]}, (10, 12), "ann.json: image id 7: annotation 3")
    bad = dict(rle, counts=encode_masks(np.ones((1, 10, 11), bool))[0]["counts"])  # right size label, wrong counts
    with pytest.raises(ValueError, match="annotation 3: RLE counts cover 110 pixels, not 10x12"):
        compress_rle(bad, (10, 12), "ann.json: image id 7: annotation 3")


def test_polygons_clip_and_refuse():
    where = "instances.json: image id 5: annotation 9"
    inside = polygons_to_rle([[50, 10, 64, 10, 64, 30, 50, 30]], 40, 64, where)
    sticking_out = polygons_to_rle([[50, 10, 90, 10, 90, 30, 50, 30]], 40, 64, where)
    np.testing.assert_array_equal(decode_rle(sticking_out, (40, 64), where), decode_rle(inside, (40, 64), where))
    assert decode_rle(inside, (40, 64), where).sum() > 0
    with pytest.raises(ValueError, match=r"image id 5: annotation 9: polygon 0 .* outside the 64x40 image"):
        polygons_to_rle([[70, 10, 90, 10, 90, 30]], 40, 64, where)
    with pytest.raises(ValueError, match="annotation 9: polygon 1 has 5 coordinates"):
        polygons_to_rle([[1, 1, 5, 1, 5, 5], [1, 2, 3, 4, 5]], 40, 64, where)
    with pytest.raises(ValueError, match="annotation 9: no 'segmentation'"):
        annotation_rle({"id": 9}, 40, 64, where)


def test_masks_to_original_matches_torch_nearest():
    rng = np.random.default_rng(1)
    padded = rng.random((2, 24, 32)) < 0.5
    for image_size, orig in [((20, 30), (47, 61)), ((24, 32), (11, 9)), ((7, 5), (7, 5))]:
        crop = torch.from_numpy(padded[:, None, : image_size[0], : image_size[1]].astype(np.float32))
        want = torch.nn.functional.interpolate(crop, size=orig, mode="nearest")[:, 0].numpy() > 0.5
        np.testing.assert_array_equal(masks_to_original(padded, image_size, orig), want)


def test_mask_detections_follow_postprocess_order():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 4)).astype(np.float32)
    boxes = rng.random((2, 5, 4)).astype(np.float32) * 0.5 + 0.25
    mlog = rng.normal(0, 2, (2, 5, 3, 4)).astype(np.float32)
    det, masks = mask_detections(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(mlog), (12, 16), top_k=3)
    ref = postprocess(jnp.asarray(logits), jnp.asarray(boxes), top_k=3)
    np.testing.assert_allclose(np.asarray(det.scores), np.asarray(ref.scores))
    prob = torch.softmax(torch.from_numpy(logits).double(), -1)[..., :-1].max(-1).values.numpy()
    order = np.argsort(-prob, axis=1, kind="stable")[:, :3]
    up = torch.nn.functional.interpolate(torch.from_numpy(mlog), size=(12, 16), mode="bilinear", align_corners=False)
    want = torch.sigmoid(up).numpy() > 0.5
    for b in range(2):
        np.testing.assert_array_equal(np.asarray(masks[b]), want[b, order[b]])


def _gt(masks_per_image, sizes):
    images, anns = [], []
    for iid, (ms, (h, w)) in enumerate(zip(masks_per_image, sizes), start=1):
        images.append({"id": iid, "height": h, "width": w, "file_name": f"{iid}.png"})
        for m in ms:
            ys, xs = np.nonzero(m)
            rle = encode_masks(m[None])[0]
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": 1, "segmentation": rle,
                         "area": float(m.sum()), "iscrowd": 0,
                         "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


def _res(iid, m, score=0.9):
    return {"image_id": iid, "category_id": 1, "score": score, "segmentation": encode_masks(m[None])[0]}


def test_cocoeval_segm_perfect_masks():
    small = np.zeros((64, 64), bool)
    small[10:20, 30:40] = True  # 100 px: small
    large = np.zeros((200, 200), bool)
    large[50:150, 20:120] = True  # 10,000 px > 96^2: large
    gt = _gt([[small], [large]], [(64, 64), (200, 200)])
    m = coco_segm_metrics(gt, [_res(1, small), _res(2, large)])
    assert m.AP_mask == pytest.approx(1.0) and m.AP50_mask == pytest.approx(1.0) and m.AP75_mask == pytest.approx(1.0)
    assert m.APs_mask == pytest.approx(1.0) and m.APl_mask == pytest.approx(1.0) and m.APm_mask == -1.0
    d = m.as_dict("val")
    assert set(f"val/{k}" for k in SEGM_METRIC_NAMES) <= set(d) and d["val/AP_mask"] == pytest.approx(1.0)
    assert coco_segm_metrics(gt, []).AP_mask == 0.0


def test_cocoeval_segm_iou_06_counts_at_ap50_not_ap75():
    gt_mask = np.zeros((64, 64), bool)
    gt_mask[10:20, 30:40] = True  # 100 px
    dt_mask = np.zeros((64, 64), bool)
    dt_mask[10:16, 30:40] = True  # 60 px, all inside the ground truth
    inter, union = (gt_mask & dt_mask).sum(), (gt_mask | dt_mask).sum()
    assert (inter, union) == (60, 100)  # IoU exactly 0.6 by pixel counts
    m = coco_segm_metrics(_gt([[gt_mask]], [(64, 64)]), [_res(1, dt_mask)])
    assert m.AP50_mask == pytest.approx(1.0)
    assert m.AP75_mask == pytest.approx(0.0)
    assert 0.0 < m.AP_mask < 0.5  # matched at 0.50, 0.55 (and 0.60) of the ten thresholds


def test_cocoeval_segm_bad_rles_name_file_and_ids(tmp_path):
    m = np.zeros((30, 40), bool)
    m[3:9, 4:12] = True
    gt = _gt([[m]], [(30, 40)])
    wrong = encode_masks(np.zeros((1, 40, 30), bool))[0]
    bad_gt = {**gt, "annotations": [dict(gt["annotations"][0], segmentation=wrong)]}
    with pytest.raises(ValueError, match=r"inst\.json: image id 1: annotation 1: RLE of size 40x30"):
        coco_segm_metrics(bad_gt, [_res(1, m)], where="inst.json")
    with pytest.raises(ValueError, match=r"results: result 0 \(image id 1\): RLE of size 40x30"):
        coco_segm_metrics(gt, [{"image_id": 1, "category_id": 1, "score": 1.0, "segmentation": wrong}])
    outside = {**gt, "annotations": [dict(gt["annotations"][0], segmentation=[[50, 1, 60, 1, 60, 9]])]}
    with pytest.raises(ValueError, match=r"inst\.json: image id 1: annotation 1: polygon 0 .* outside"):
        coco_segm_metrics(outside, [_res(1, m)], where="inst.json")


def test_postprocessed_predictions_evaluate_perfectly():
    # one image of 32x48, network input 16x24 on a 20x24 padded canvas, mask logits at 1/4 of the canvas
    gt_mask = np.zeros((32, 48), bool)
    gt_mask[8:24, 16:40] = True
    gt = _gt([[gt_mask]], [(32, 48)])
    logits = np.full((1, 2, 2), -5.0, np.float32)
    logits[0, 0] = [6.0, -6.0]  # query 0: class 0, sure
    boxes = np.full((1, 2, 4), 0.5, np.float32)
    canvas = np.full((20, 24), -10.0, np.float32)
    canvas[4:12, 8:20] = 10.0  # the object at half resolution on the canvas
    mlog = np.stack([canvas, -canvas])[None]  # already at canvas size: the resize is the identity
    det, masks = mask_detections(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(mlog), (20, 24))
    res = to_coco_segm_results(det, np.asarray(masks), [1], np.array([[16, 24]]), np.array([[32, 48]]), [1])
    assert len(res) == 2 and res[0]["score"] > 0.99
    np.testing.assert_array_equal(decode_rle(res[0]["segmentation"], (32, 48), "r"), gt_mask.astype(np.uint8))
    assert coco_segm_metrics(gt, res).AP_mask == pytest.approx(1.0)


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_masks_from_logits_equal_torch_resize_threshold_crop_nearest(threshold):
    rng = np.random.default_rng(5)
    cases = [((5, 6), (20, 24), (17, 22), (40, 51)), ((8, 8), (32, 32), (32, 20), (25, 13)),
             ((4, 4), (4, 4), (3, 4), (3, 4))]
    cut = float(np.log(threshold / (1 - threshold)))
    for (h, w), padded, size, orig in cases:
        mlog = rng.normal(0, 3, (3, h, w)).astype(np.float32)
        up = torch.nn.functional.interpolate(torch.from_numpy(mlog)[None].double(), size=padded, mode="bilinear",
                                             align_corners=False)[0]
        crop = up[:, : size[0], : size[1]][:, None]
        value = torch.nn.functional.interpolate(crop, size=orig, mode="nearest")[:, 0].numpy()
        want = value > cut
        got = masks_from_logits(mlog, padded, size, orig, threshold=threshold)
        assert got.shape == (3, *orig) and got.dtype == bool
        clear = np.abs(value - cut) > 1e-4  # float32 vs float64 only matter on the boundary
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(got[clear], want[clear])
    with pytest.raises(ValueError, match="image size 30x4 does not fit the padded size 20x24"):
        masks_from_logits(np.zeros((1, 5, 6)), (20, 24), (30, 4), (30, 4))


def test_results_from_logits_equal_results_from_canvas_masks():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 4, 3)).astype(np.float32)
    boxes = (rng.random((2, 4, 4)) * 0.5 + 0.25).astype(np.float32)
    mlog = rng.normal(0, 3, (2, 4, 5, 6)).astype(np.float32)
    sizes, origs = np.array([[20, 24], [13, 18]]), np.array([[40, 48], [26, 41]])
    det, masks = mask_detections(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(mlog), (20, 24))
    want = to_coco_segm_results(det, np.asarray(masks), [3, 4], sizes, origs, [1, 5], valid=np.array([1, 1]))
    det2, chosen = select_mask_logits(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(mlog))
    got = to_coco_segm_results_from_logits(det2, np.asarray(chosen), [3, 4], (20, 24), sizes, origs, [1, 5],
                                           valid=np.array([1, 0]))
    assert len(got) == 4 and len(want) == 8
    for g, r in zip(got, want[:4]):
        assert g["bbox"] == r["bbox"] and g["score"] == r["score"] and g["category_id"] == r["category_id"]
        same = decode_rle(g["segmentation"], (40, 48), "g") == decode_rle(r["segmentation"], (40, 48), "r")
        assert same.mean() > 0.995  # identical but where the bilinear value sits on the threshold


def test_check_segmentation_without_rasterising():
    ann = {"segmentation": [[1, 1, 5, 1, 5, 4]]}
    check_segmentation(ann, 10, 10, "f: image id 1: annotation 2")
    with pytest.raises(ValueError, match="f: image id 1: annotation 2: polygon 0 .* outside the 3x3 image"):
        check_segmentation({"segmentation": [[4, 4, 8, 4, 8, 8]]}, 3, 3, "f: image id 1: annotation 2")
    with pytest.raises(ValueError, match="annotation 2: RLE of size 10x12"):
        check_segmentation({"segmentation": encode_masks(np.ones((1, 10, 12), bool))[0]}, 12, 10,
                           "f: image id 1: annotation 2")
    with pytest.raises(ValueError, match="annotation 2: no 'segmentation'"):
        check_segmentation({"segmentation": []}, 3, 3, "f: image id 1: annotation 2")
