"""voc:PATH on a hand-written VOCdevkit directory: XML parsing, records, COCOeval with difficult objects."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from lfi_jax.data.det_pipeline import make_det_eval_iterator
from lfi_jax.data.sources import get_source
from lfi_jax.data.voc import VOC_CLASSES, VocDetection, parse_annotation
from lfi_jax.detection.boxes import cxcywh_to_xyxy
from lfi_jax.detection.postprocess import Detections, to_coco_results
from lfi_jax.eval.coco import coco_bbox_metrics

XML_000005 = """<annotation>
  <folder>VOC2007</folder>
  <filename>000005.jpg</filename>
  <size><width>80</width><height>60</height><depth>3</depth></size>
  <object>
    <name>chair</name><pose>Rear</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>11</xmin><ymin>21</ymin><xmax>30</xmax><ymax>50</ymax></bndbox>
  </object>
  <object>
    <name>person</name><truncated>1</truncated><difficult>1</difficult>
    <bndbox><xmin>41</xmin><ymin>1</ymin><xmax>80</xmax><ymax>60</ymax></bndbox>
  </object>
  <object>
    <name>chair</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>5</ymin><xmax>10</xmax><ymax>24</ymax></bndbox>
  </object>
</annotation>
"""

XML_2008_000008 = """<annotation>
  <size><width>50</width><height>40</height></size>
  <object><name>dog</name>
    <bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
  <object><name>person</name><difficult>0</difficult>
    <bndbox><xmin>25</xmin><ymin>5</ymin><xmax>45</xmax><ymax>35</ymax></bndbox></object>
</annotation>
"""


def _write(root, vid, xml, size):
    os.makedirs(root / "Annotations", exist_ok=True)
    os.makedirs(root / "JPEGImages", exist_ok=True)
    (root / "Annotations" / f"{vid}.xml").write_text(xml)
    if size is not None:
        Image.fromarray(np.full((size[0], size[1], 3), 128, np.uint8)).save(root / "JPEGImages" / f"{vid}.jpg")


def _split(root, name, ids):
    os.makedirs(root / "ImageSets" / "Main", exist_ok=True)
    (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOC2007"
    _write(root, "000005", XML_000005, (60, 80))
    _write(root, "2008_000008", XML_2008_000008, (40, 50))
    _split(root, "trainval", ["000005", "2008_000008"])
    return root


def test_parse_annotation_zero_based_and_difficult(voc):
    ann = parse_annotation(str(voc / "Annotations" / "000005.xml"), "000005")
    assert (ann["height"], ann["width"]) == (60, 80)
    # (y0, x0, y1, x1): 0-based x0 = xmin - 1, y0 = ymin - 1; xmax/ymax become exclusive ends
    np.testing.assert_array_equal(ann["boxes"], [[20, 10, 50, 30], [0, 40, 60, 80], [4, 0, 24, 10]])
    assert ann["labels"].tolist() == [VOC_CLASSES.index("chair"), VOC_CLASSES.index("person"), 8]
    assert VOC_CLASSES.index("chair") == 8 and len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane"
    assert ann["difficult"].tolist() == [False, True, False]


def test_records_and_ground_truth(voc):
    src = get_source(f"voc:{voc}", "trainval")
    assert isinstance(src, VocDetection) and len(src) == 2
    assert src.example_id(1) == "2008_000008" and src.image_ids() == [5, 2008000008]
    assert src.class_names == list(VOC_CLASSES) and src.category_ids == list(range(1, 21))
    r = src[0]
    assert r["id"] == "000005" and r["image_id"] == 5 and r["image"].shape == (60, 80, 3)
    assert r["orig_size"] == (60, 80) and r["boxes"].dtype == np.float32 and r["labels"].dtype == np.int64
    assert r["difficult"].tolist() == [False, True, False] and len(r["boxes"]) == 3
    assert src.num_boxes().tolist() == [3, 2] and src.index_of(2008000008) == 1
    gt = src.gt_dataset()
    a = [x for x in gt["annotations"] if x["image_id"] == 5]
    assert a[0]["bbox"] == [10.0, 20.0, 20.0, 30.0] and a[0]["area"] == 600.0  # VOC width xmax - xmin + 1 = 20
    assert [x["iscrowd"] for x in a] == [0, 1, 0] and a[1]["category_id"] == VOC_CLASSES.index("person") + 1
    assert gt["images"][1] == {"id": 2008000008, "file_name": "2008_000008.jpg", "height": 40, "width": 50}

    dropped = get_source(f"voc:{voc}", "trainval", {"difficult": "drop"})
    assert dropped[0]["labels"].tolist() == [8, 8] and dropped.num_boxes().tolist() == [2, 2]
    assert len(dropped.gt_dataset()["annotations"]) == 5  # evaluation still sees (and ignores) it


def _det(iid, cat, x, y, w, h, s):
    return {"image_id": iid, "category_id": cat, "bbox": [x, y, w, h], "score": s}


def test_cocoeval_ignores_difficult_objects(voc):
    src = get_source(f"voc:{voc}", "trainval")
    gt = src.gt_dataset()
    chair, person, dog = (VOC_CLASSES.index(c) + 1 for c in ("chair", "person", "dog"))
    exact = [_det(5, chair, 10, 20, 20, 30, 0.9), _det(5, chair, 0, 4, 10, 20, 0.8),
             _det(2008000008, dog, 2, 3, 18, 27, 0.7), _det(2008000008, person, 24, 4, 21, 31, 0.6)]
    on_difficult = _det(5, person, 40, 0, 40, 60, 0.95)  # outscores the regular person's detection
    # the difficult person is neither missed (no detection) nor a false positive (a detection on it)
    assert coco_bbox_metrics(gt, exact).AP == pytest.approx(1.0)
    assert coco_bbox_metrics(gt, exact + [on_difficult]).AP == pytest.approx(1.0)
    # control: counted as a regular object, missing it costs recall, so AP drops
    plain = {**gt, "annotations": [dict(a, iscrowd=0, ignore=0) for a in gt["annotations"]]}
    assert coco_bbox_metrics(plain, exact).AP < 0.9
    # a chair false positive above both chairs: chair AP 2/3 at every threshold (precision 2/3 up to
    # recall 1 after interpolation), dog and person 1 -> AP = (2/3 + 1 + 1) / 3 = 8/9 by hand
    fp = coco_bbox_metrics(gt, exact + [on_difficult, _det(2008000008, chair, 30, 5, 10, 10, 0.99)])
    assert fp.AP == pytest.approx(8 / 9, abs=1e-6)
    assert fp.AP50 == pytest.approx(8 / 9, abs=1e-6)


def test_malformed_xml_names_file_and_id(voc):
    (voc / "Annotations" / "000005.xml").write_text("<annotation><size><width>80</width>")
    with pytest.raises(ValueError, match=r"000005\.xml: image id 000005: malformed XML"):
        get_source(f"voc:{voc}", "trainval")


def test_missing_image_names_split_file_and_id(voc):
    _split(voc, "val", ["000005", "009999"])
    _write(voc, "009999", XML_2008_000008, None)  # annotation but no JPEG
    with pytest.raises(FileNotFoundError, match=r"Main/val\.txt: image id 009999: image file not found: .*009999\.jpg"):
        get_source(f"voc:{voc}", "val")
    _split(voc, "test", ["123456"])
    with pytest.raises(FileNotFoundError, match=r"Main/test\.txt: image id 123456: annotation file not found"):
        get_source(f"voc:{voc}", "test")
    with pytest.raises(FileNotFoundError, match="split file not found"):
        get_source(f"voc:{voc}", "nosuchsplit")


def test_other_bad_input(voc):
    _write(voc, "000007", XML_2008_000008.replace("dog", "dragon"), (40, 50))
    _split(voc, "a", ["000007"])
    with pytest.raises(ValueError, match=r"000007\.xml: image id 000007: object 0: unknown class 'dragon'"):
        get_source(f"voc:{voc}", "a")
    _write(voc, "000008", XML_2008_000008, (41, 50))  # JPEG size differs from the XML's
    _split(voc, "b", ["000008"])
    with pytest.raises(ValueError, match=r"000008\.xml: image id 000008: .* is 50x41, the XML says 50x40"):
        get_source(f"voc:{voc}", "b")[0]
    with pytest.raises(ValueError, match="unknown voc options: data.options.year"):
        get_source(f"voc:{voc}", "trainval", {"year": 2007})
    _write(voc, "000009", XML_2008_000008.replace("<xmax>20</xmax>", "<xmax>70</xmax>"), (40, 50))
    _split(voc, "c", ["000009"])
    with pytest.warns(UserWarning, match="1 boxes clipped"):
        src = get_source(f"voc:{voc}", "c")
    np.testing.assert_array_equal(src[0]["boxes"][0], [3, 2, 30, 50])


def test_pipeline_boxes_round_trip_through_cocoeval(voc):
    """VOC records -> the detection eval pipeline (resize, normalised cxcywh) -> COCO results -> AP 1.0."""
    cfg = ConfigDict({"source": f"voc:{voc}", "options": {}, "eval_size": 64, "max_size": 96, "pad_hw": (96, 96),
                      "max_boxes": 8, "num_threads": 1, "prefetch": 0})
    src = get_source(f"voc:{voc}", "trainval")
    results = []
    for batch in make_det_eval_iterator(cfg, "trainval", global_batch_size=4):
        valid = np.asarray(batch["box_valid"])
        scores = np.where(valid, 0.9, 0.0).astype(np.float32)
        det = Detections(jnp.asarray(scores), jnp.asarray(batch["labels"]), cxcywh_to_xyxy(jnp.asarray(batch["boxes"])))
        res = to_coco_results(det, batch["image_id"], batch["orig_size"], src.category_ids,
                              valid=np.asarray(batch["valid"]) > 0, min_score=0.5)
        results += res
    assert len(results) == 5  # every object, the difficult one too
    m = coco_bbox_metrics(src.gt_dataset(), results, image_ids=src.image_ids())
    assert m.AP == pytest.approx(1.0) and m.num_images == 2


def test_data_ratio_subset_of_voc_keeps_ground_truth_and_difficult(tmp_path):
    root = tmp_path / "VOC2012"
    ids, classes = [], ("dog", "cat", "car", "dog", "dog", "cat", "car", "car", "person", "dog") * 3
    for k, name in enumerate(classes):
        vid = f"2012_{k:06d}"
        xml = (f"<annotation><size><width>40</width><height>30</height></size><object><name>{name}</name>"
               f"<difficult>{k % 4 == 0:d}</difficult><bndbox><xmin>{1 + k % 5}</xmin><ymin>2</ymin>"
               "<xmax>20</xmax><ymax>25</ymax></bndbox></object><object><name>person</name>"
               "<bndbox><xmin>21</xmin><ymin>3</ymin><xmax>39</xmax><ymax>29</ymax></bndbox></object></annotation>")
        _write(root, vid, xml, (30, 40))
        ids.append(vid)
    _split(root, "train", ids)
    spec = f"voc:{root}"
    a = get_source(spec, "train", {"data_ratio": 0.1})
    b = get_source(spec, "train", {"data_ratio": 0.1})
    picked = [a.example_id(i) for i in range(len(a))]
    assert picked == [b.example_id(i) for i in range(len(b))]
    # strata: each image's most frequent class; one object of `name` and one person tie -> the lower VOC id
    stratum = {vid: min(VOC_CLASSES.index(n), VOC_CLASSES.index("person")) for vid, n in zip(ids, classes)}
    per = {s: sum(1 for v in ids if stratum[v] == s) for s in set(stratum.values())}
    got = {s: sum(1 for v in picked if stratum[v] == s) for s in per}
    assert got == {s: int(np.ceil(0.1 * n)) for s, n in per.items()}
    assert a.category_ids == list(range(1, 21))
    gt = a.gt_dataset()
    assert sorted(im["file_name"] for im in gt["images"]) == sorted(f"{v}.jpg" for v in picked)
    full_gt = VocDetection(str(root), "train").gt_dataset()
    full = {(x["image_id"], tuple(x["bbox"]), x["iscrowd"]) for x in full_gt["annotations"]}
    sub = {(x["image_id"], tuple(x["bbox"]), x["iscrowd"]) for x in gt["annotations"]}
    assert len(sub) == 2 * len(picked) and sub <= full
    assert any(x[2] == 1 for x in sub) == any(ids.index(v) % 4 == 0 for v in picked)
