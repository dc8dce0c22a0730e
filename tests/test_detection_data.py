"""Detection sources: the embedded benchmark and `coco:PATH` (layout, ids, bad input)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lfi_jax.data.coco import CocoDetection
from lfi_jax.data.shortcut_digits import digit_pool
from lfi_jax.data.shortcut_digits_det import ShortcutDigitsDet, image_options, write_coco
from lfi_jax.detection.postprocess import Detections, to_coco_results
from lfi_jax.eval.coco import coco_bbox_metrics

pytest.importorskip("pycocotools")


def _tight(mask):
    rows, cols = np.flatnonzero(mask.max(1) > 0), np.flatnonzero(mask.max(0) > 0)
    return [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]


def test_shortcut_digits_det_records_and_determinism():
    a = ShortcutDigitsDet("train", {"num_train": 30})
    b = ShortcutDigitsDet("train", {"num_train": 12})  # fewer examples: the same first ones
    exact = total = 0
    for i in range(12):
        ra, rb = a[i], b[i]
        assert ra["id"] == str(i + 1) == a.example_id(i) and ra["image_id"] == i + 1
        np.testing.assert_array_equal(ra["image"], rb["image"])
        np.testing.assert_array_equal(ra["boxes"], rb["boxes"])
        assert ra["image"].shape == (96, 96, 3) and ra["image"].dtype == np.uint8
        k = len(ra["boxes"])
        assert 1 <= k <= 4 and ra["labels"].shape == (k,) and ra["masks"].shape == (k, 96, 96)
        assert ra["labels"].min() >= 0 and ra["labels"].max() < 10
        for box, mask in zip(ra["boxes"], ra["masks"]):
            side = max(box[2] - box[0], box[3] - box[1])
            assert 4 <= side <= 48  # ink inside a 12-48 px cell
            t = _tight(mask)  # the visible ink lies inside the box (occlusion may shrink it)
            assert t[0] >= box[0] and t[1] >= box[1] and t[2] <= box[2] and t[3] <= box[3]
            exact += t == box.tolist()
            total += 1
    assert exact >= 0.9 * total
    with pytest.raises(IndexError, match="out of range"):
        a[30]
    with pytest.raises(ValueError, match="data.options.nope"):
        ShortcutDigitsDet("train", {"nope": 1})
    with pytest.raises(ValueError, match="no split"):
        ShortcutDigitsDet("test")
    assert image_options("val", {})["num_val"] == 500 and "num_train" not in image_options("val", {})


def test_digit_pools_are_disjoint_and_clutter_is_not_annotated():
    tr, va = ShortcutDigitsDet("train", {"num_train": 20}), ShortcutDigitsDet("val", {"num_val": 20, "clutter": True})
    test_pool = set(digit_pool("test_iid").tolist())
    for i in range(20):
        assert all(d["digit"] not in test_pool for d in tr._layout(i)["digits"])
        lay = va._layout(i)
        assert all(d["digit"] in test_pool for d in lay["digits"])
        r = va[i]
        assert r["labels"].max() < 5  # only the digits 0-4 are categories
        objects = [d for d in lay["digits"] if d["object"]]
        distractors = [d for d in lay["digits"] if not d["object"]]
        assert all(d["class"] >= 5 for d in distractors) and len(distractors) == len(r["distractor_boxes"]) >= 1
        assert sorted(r["labels"].tolist()) == sorted(d["class"] for d in objects)
    assert va.category_ids == [1, 2, 3, 4, 5] and va.class_names == ["0", "1", "2", "3", "4"]


def test_write_coco_round_trip_and_ground_truth_scores_one(tmp_path):
    opts = {"num_val": 6, "clutter": True}
    write_coco(str(tmp_path), "val", opts)
    mem = ShortcutDigitsDet("val", opts)
    disk = CocoDetection(str(tmp_path), "val")
    assert len(disk) == 6 and disk.category_ids == mem.category_ids and disk.class_names == mem.class_names
    for i in range(6):
        a, b = mem[i], disk[i]
        assert a["id"] == b["id"] == disk.example_id(i)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    # ground truth as predictions, through the project's results path: AP = 1 / (1 + eps)
    results = []
    for i in range(6):
        r = mem[i]
        y0, x0, y1, x1 = r["boxes"].T / 96.0
        det = Detections(jnp.ones((1, len(y0))), jnp.asarray(r["labels"][None]), jnp.stack([x0, y0, x1, y1], -1)[None])
        results += to_coco_results(det, [r["image_id"]], np.array([[96, 96]]), mem.category_ids)
    m = coco_bbox_metrics(os.path.join(tmp_path, "annotations", "instances_val.json"), results)
    np.testing.assert_allclose(m.AP, 1 / (1 + np.spacing(1)), rtol=1e-12)


# ----------------------------------------------------------------------------- coco:PATH bad input


def _coco_dir(tmp_path, annotations, images=None, write=(1, 2, 3)):
    images = images or [{"id": i, "file_name": f"{i}.png", "height": 20, "width": 30} for i in (1, 2, 3)]
    os.makedirs(tmp_path / "annotations", exist_ok=True)
    os.makedirs(tmp_path / "val", exist_ok=True)
    for im in images:
        if im["id"] in write:
            pixels = np.full((im["height"], im["width"], 3), im["id"], np.uint8)
            Image.fromarray(pixels).save(tmp_path / "val" / im["file_name"])
    cats = [{"id": 7, "name": "cat"}, {"id": 2, "name": "dog"}]
    d = {"images": images, "annotations": annotations, "categories": cats}
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(d))
    return str(tmp_path)


def _ann(aid, iid, bbox, cat=7, **kw):
    return {"id": aid, "image_id": iid, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, **kw}


def test_coco_source_records_and_handled_input(tmp_path):
    anns = [
        _ann(1, 1, [2, 3, 10, 5]),  # fine: (y0, x0, y1, x1) = (3, 2, 8, 12)
        _ann(2, 1, [25, 15, 10, 10], cat=2),  # sticks out of the 30x20 image: clipped to (15, 25, 20, 30)
        _ann(3, 2, [5, 5, 0, 4]),  # zero area: dropped
        _ann(4, 2, [1, 1, 4, 4], iscrowd=1),  # crowd: not a target
        # image 3 has no annotations: kept, empty target
    ]
    with pytest.warns(UserWarning, match=r"image id 1.*clipped") as rec:
        src = CocoDetection(_coco_dir(tmp_path, anns), "val")
    assert "1 boxes clipped" in str(rec[0].message) and "1 of zero area dropped" in str(rec[0].message)
    assert any("image id 2: annotation 3" in p for p in src.problems)
    assert src.category_ids == [2, 7] and src.class_names == ["dog", "cat"]  # sorted ids -> contiguous
    r = src[0]
    assert r["id"] == "1" and r["orig_size"] == (20, 30) and r["image"].shape == (20, 30, 3)
    np.testing.assert_array_equal(r["boxes"], [[3, 2, 8, 12], [15, 25, 20, 30]])
    np.testing.assert_array_equal(r["labels"], [1, 0])
    assert src[1]["boxes"].shape == (0, 4) and src[2]["boxes"].shape == (0, 4) and len(src) == 3
    assert src.index_of(3) == 2


def test_coco_source_errors_name_file_and_image(tmp_path):
    root = _coco_dir(tmp_path / "a", [], write=(1, 2))  # 3.png missing
    with pytest.raises(FileNotFoundError, match=r"instances_val.json: image id 3: image file not found: .*3.png"):
        CocoDetection(root, "val")
    assert len(CocoDetection(root, "val", {"check_files": False})) == 3
    root = _coco_dir(tmp_path / "b", [_ann(1, 2, [1, 1, 2, 2], cat=99)])
    with pytest.raises(ValueError, match=r"instances_val.json: image id 2: annotation 1 has unknown category id 99"):
        CocoDetection(root, "val")
    root = _coco_dir(tmp_path / "c", [_ann(1, 42, [1, 1, 2, 2])])
    with pytest.raises(ValueError, match="annotation 1 names image id 42"):
        CocoDetection(root, "val")
    images = [{"id": 1, "file_name": "1.png", "height": 20, "width": 30}]
    root = _coco_dir(tmp_path / "d", [], images=images)
    (tmp_path / "d" / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": [{**images[0], "height": 21}], "annotations": [], "categories": [{"id": 1}]})
    )
    with pytest.raises(ValueError, match=r"image id 1: .*1.png is 30x20, the JSON says 30x21"):
        CocoDetection(str(tmp_path / "d"), "val")[0]
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoDetection(str(tmp_path / "d"), "train")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_instance_masks(tmp_path):
    seg = [[2, 3, 12, 3, 12, 8, 2, 8]]  # the polygon of box x 2..12, y 3..8
    root = _coco_dir(tmp_path, [_ann(1, 1, [2, 3, 10, 5], segmentation=seg)])
    r = CocoDetection(root, "val", {"masks": True})[0]
    assert r["masks"].shape == (1, 20, 30)
    assert abs(r["masks"].sum() - 50) <= 16  # pycocotools rasterises the 10 x 5 polygon to about 50 px


def test_few_shot_variant_is_seeded_and_has_shots_images_per_class():
    opts = {"classes": 4, "shots": 3, "class_seed": 5, "canvas": 48, "size_range": [12, 20], "num_val": 6}
    a, b = ShortcutDigitsDet("train", opts), ShortcutDigitsDet("train", opts)
    assert a.class_names == b.class_names and len(a.class_names) == 4 and len(a) == 12
    assert a.class_names == sorted(a.class_names) and a.category_ids == [int(n) + 1 for n in a.class_names]
    np.testing.assert_array_equal(a[7]["image"], b[7]["image"])
    kept = {tuple(ShortcutDigitsDet("train", dict(opts, class_seed=s)).class_names) for s in range(6)}
    assert len(kept) > 1  # the seed picks the classes
    for i in range(len(a)):  # image i: digits of class i % K only -> exactly `shots` images per class
        boxes, labels, _ = a.annotations(i)
        assert len(labels) >= 1 and set(labels.tolist()) == {i % 4}
    np.testing.assert_array_equal(np.bincount([a.annotations(i)[1][0] for i in range(12)]), [3, 3, 3, 3])
    val = ShortcutDigitsDet("val", opts)
    assert val.class_names == a.class_names and len(val) == 6
    assert all(0 <= lab < 4 for i in range(6) for lab in val.annotations(i)[1])
    gt = val.gt_dataset()
    assert {c["id"] for c in gt["categories"]} == set(a.category_ids)
    # the plain benchmark's identity is unchanged by the new options at their defaults
    plain = {"num_train": 5}
    assert image_options("train", plain) == image_options("train", dict(plain, classes=0, shots=0, class_seed=3))
    assert "classes" not in image_options("train", plain)
    assert image_options("train", opts)["num_train"] == 12
    bad_options = (({"classes": 11}, "classes"), ({"shots": -1}, "shots"), ({"clutter": True, "classes": 6}, "classes"))
    for bad, key in bad_options:
        with pytest.raises(ValueError, match=key):
            ShortcutDigitsDet("train", bad)
