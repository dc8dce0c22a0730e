"""The segmentation task: instance masks through the detection transforms, `coco:PATH` masks and
their bad input, the task's evaluation on ground-truth masks, checkpoint loading, and the
embedded benchmark's runlocal config trained and evaluated end to end."""

import json

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from test_detection_data import _ann, _coco_dir  # noqa: E402

from lfi_jax.config import load_config_file  # noqa: E402
from lfi_jax.data.coco import CocoDetection  # noqa: E402
from lfi_jax.data.det_transforms import (  # noqa: E402
    DetAugment,
    DetExample,
    View,
    collate,
    flip_example,
    transform_detection,
    view_boxes,
    view_masks,
)
from lfi_jax.data.shortcut_digits_det import ShortcutDigitsDet  # noqa: E402
from lfi_jax.detection.masks import encode_masks  # noqa: E402
from lfi_jax.tasks.registry import get_task  # noqa: E402
from lfi_jax.tasks.segmentation import TASK  # noqa: E402

H, W = 60, 80
RECTS = np.array([[10, 5, 30, 25], [40, 50, 58, 79], [0, 0, 8, 12], [52, 0, 60, 6]])  # (y0, x0, y1, x1), int


def _example():
    """Rectangle instance masks (0.7 inside its box, a 0.3 halo two pixels wide around it)."""
    masks = np.zeros((len(RECTS), H, W), np.float32)
    for m, (y0, x0, y1, x1) in zip(masks, RECTS):
        m[max(y0 - 2, 0): y1 + 2, max(x0 - 2, 0): x1 + 2] = 0.3
        m[y0:y1, x0:x1] = 0.7
    rng = np.random.default_rng(0)
    return {"id": "5", "image_id": 5, "image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
            "boxes": RECTS.astype(np.float32), "labels": np.arange(len(RECTS)), "orig_size": (H, W),
            "masks": masks}


def _chain(boxes, s1, crop, s2):
    """Float64 transcription of resize by s1 = (sy, sx), crop (top, left, h, w) with clipping,
    resize by s2: the boxes in the final image's pixels and which keep an area."""
    b = boxes.astype(np.float64) * [s1[0], s1[1], s1[0], s1[1]]
    top, left, h, w = crop
    b = np.clip(b - [top, left, top, left], 0, [h, w, h, w])
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b * [s2[0], s2[1], s2[0], s2[1]], keep


def _centres_in_boxes(boxes, grid_hw, stride):
    """bool [K, gh, gw]: cells of `stride` px whose centre lies in the box [y0, y1) x [x0, x1)."""
    cy = (np.arange(grid_hw[0]) + 0.5) * stride
    cx = (np.arange(grid_hw[1]) + 0.5) * stride
    if not len(boxes):
        return np.zeros((0, *grid_hw), bool)
    return np.stack([((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None]
                     for y0, x0, y1, x1 in boxes]).reshape(len(boxes), *grid_hw)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_masks_move_with_the_boxes_through_resize_crop_pad(flip, stride):
    ex, rects = _example(), RECTS.astype(np.float64)
    if flip:
        ex, _ = flip_example(ex, None)
        rects = np.stack([rects[:, 0], W - rects[:, 3], rects[:, 2], W - rects[:, 1]], -1)
    # resize 60x80 -> 90x120, crop rows 7..77, cols 13..108 (box 3 falls out), resize to 50x67
    view = View.identity((H, W)).resized((90, 120)).cropped(7, 13, 70, 95).resized((50, 67))
    boxes, keep = _chain(rects, (90 / H, 120 / W), (7, 13, 70, 95), (50 / 70, 67 / 95))
    assert keep.tolist() == [True, True, True, False]
    vb, vkeep = view_boxes(ex["boxes"], view)
    np.testing.assert_array_equal(vkeep, keep)
    masks = view_masks(ex["masks"], view, stride)[keep]
    y0, x0, y1, x1 = vb[keep].T
    cxcywh = np.stack([(x0 + x1) / 134, (y0 + y1) / 100, (x1 - x0) / 67, (y1 - y0) / 50], -1)
    e = DetExample(np.zeros((50, 67, 3), np.float32), cxcywh, ex["labels"][keep], view, None, 5, (H, W), masks)
    batch = collate([e], max_boxes=5, stride=8, pad_hw=(66, 96), mask_stride=stride, batch_size=2)
    got = batch["masks"]
    assert got.shape == (2, 5, 66 // stride, 96 // stride) and got.dtype == bool
    # expected: on the padded canvas, a cell is in box k's mask iff its centre is in the transformed
    # box (the 0.3 halo is below the 0.5 threshold) and on the 50 x 67 image
    want = _centres_in_boxes(boxes[keep], (66 // stride, 96 // stride), stride)
    on_image = _centres_in_boxes(np.array([[0, 0, 50, 67]]), (66 // stride, 96 // stride), stride)[0]
    np.testing.assert_array_equal(got[0, :3], want & on_image)
    assert not got[0, 3:].any() and not got[1].any()  # padded slots and the padded row


def test_transform_detection_keeps_masks_of_kept_boxes_and_checks_them():
    ex = _example()
    rng = np.random.default_rng(3)
    aug = DetAugment(scales=(40, 50), max_size=90, crop_prob=1.0, crop_pre_scales=(60,), crop_size=(30, 45))
    for _ in range(10):
        e = transform_detection(ex, None, rng=rng, augment=aug, masks=True)
        assert e.masks.shape == (len(e.boxes), *e.image.shape[:2]) and e.masks.dtype == bool
        # each kept mask is a rectangle whose centre-sampled extent is its box (normalised cxcywh)
        oh, ow = e.image.shape[:2]
        cx, cy, bw, bh = (e.boxes * [ow, oh, ow, oh]).T
        xyxy = np.stack([cy - bh / 2, cx - bw / 2, cy + bh / 2, cx + bw / 2], -1)
        np.testing.assert_array_equal(e.masks, _centres_in_boxes(xyxy, (oh, ow), 1))
    with pytest.raises(ValueError, match=r"example 5: masks of shape \(3, 60, 80\) for 4 boxes"):
        transform_detection({**ex, "masks": ex["masks"][:3]}, None, masks=True)
    no_masks = {k: v for k, v in ex.items() if k != "masks"}
    with pytest.raises(ValueError, match="example 5: instance masks asked for .* no 'masks'"):
        transform_detection(no_masks, None, masks=True)
    with pytest.raises(ValueError, match=r"image ids \[5\] carry no masks"):
        collate([transform_detection(ex, None, masks=True), transform_detection(no_masks, None)], max_boxes=5)


# ----------------------------------------------------------------------------- coco:PATH masks


def _rect_rle(h, w, y0, x0, y1, x1, compressed=True):
    m = np.zeros((1, h, w), bool)
    m[0, y0:y1, x0:x1] = True
    rle = encode_masks(m)[0]
    if compressed:
        return rle, m[0]
    flat = m[0].T.ravel().astype(np.int8)  # column-major runs starting with zeros
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [h, w], "counts": np.diff(np.concatenate([[0], edges])).tolist()}, m[0]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_masks_decode_polygons_and_rles(tmp_path):
    rle, want_rle = _rect_rle(20, 30, 2, 4, 9, 15)
    unc, want_unc = _rect_rle(20, 30, 10, 1, 18, 7, compressed=False)
    anns = [_ann(1, 1, [4, 2, 11, 7], segmentation=rle), _ann(2, 1, [1, 10, 6, 8], segmentation=unc),
            _ann(3, 2, [2, 3, 10, 5], segmentation=[[2, 3, 12, 3, 12, 8, 2, 8]])]
    r = CocoDetection(_coco_dir(tmp_path, anns), "val", {"masks": True})
    first = r[0]
    assert first["masks"].dtype == np.uint8 and first["masks"].shape == (2, 20, 30)
    np.testing.assert_array_equal(first["masks"][0], want_rle)
    np.testing.assert_array_equal(first["masks"][1], want_unc)
    poly = r[1]["masks"][0]  # pycocotools' rasterisation of the 10 x 5 rectangle polygon
    ys, xs = np.nonzero(poly)
    assert 3 <= ys.min() and ys.max() <= 8 and 2 <= xs.min() and xs.max() <= 12 and abs(poly.sum() - 50) <= 16
    assert r[2]["masks"].shape == (0, 20, 30)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_masks_bad_input_names_file_image_and_annotation(tmp_path):
    wrong, _ = _rect_rle(30, 20, 2, 4, 9, 15)  # 30x20: the image is 20x30
    cases = {
        "rle": ([_ann(11, 1, [4, 2, 11, 7], segmentation=wrong)], r"image id 1: annotation 11: RLE of size 30x20"),
        "poly": ([_ann(12, 2, [1, 1, 3, 3], segmentation=[[40, 1, 50, 1, 50, 9]])],
                 r"image id 2: annotation 12: polygon 0 .* outside the 30x20 image"),
        "none": ([_ann(13, 3, [1, 1, 3, 3])], r"image id 3: annotation 13: no 'segmentation'"),
        "odd": ([_ann(14, 1, [1, 1, 3, 3], segmentation=[[1, 1, 5, 1, 5]])],
                r"image id 1: annotation 14: polygon 0 has 5 coord"),
    }
    for name, (anns, pattern) in cases.items():
        root = _coco_dir(tmp_path / name, anns)
        with pytest.raises(ValueError, match=r"instances_val\.json: " + pattern):
            CocoDetection(root, "val", {"masks": True})
        assert len(CocoDetection(root, "val")) == 3  # without masks the segmentation is not read
    # a compressed RLE of the right size whose runs do not cover the image: found when decoded
    short = {"size": [20, 30], "counts": encode_masks(np.ones((1, 10, 30), bool))[0]["counts"]}
    root = _coco_dir(tmp_path / "short", [_ann(15, 1, [1, 1, 3, 3], segmentation=short)])
    src = CocoDetection(root, "val", {"masks": True})
    with pytest.raises(ValueError, match=r"instances_val\.json: image id 1: annotation 15: RLE counts cover 300"):
        src[0]


# ----------------------------------------------------------------------------- the task

OPTIONS = {"num_train": 4, "num_val": 3, "canvas": 64, "size_range": [16, 32]}


def test_registry_and_model_config_checks():
    c = load_config_file("segmentation_demo", "idetr,runlocal")
    assert get_task(c) is TASK and c.task == "segmentation"
    mcfg = TASK.model_config(c)
    assert mcfg.interaction_queries and mcfg.interaction_constraint and len(mcfg.backbone.depths) == 4
    assert not TASK.model_config(load_config_file("segmentation_demo", "detr,runlocal")).interaction_queries
    c.model.backbone.depths, c.model.backbone.hidden_sizes = (1, 1), (8, 16)
    with pytest.raises(ValueError, match=r"model\.backbone\.depths=\(1, 1\): the mask head needs >= 4 stages"):
        TASK.model_config(c)
    for arg in ("idetr", "detr,runlocal", "idetr,shuffled"):
        full = load_config_file("segmentation_demo", arg)
        TASK.model_config(full)
    seg = load_config_file("coco_detr_seg", "idetr")
    assert seg.task == "segmentation" and seg.data.options.masks and seg.data.pad_hw[0] % seg.data.mask_stride == 0
    TASK.model_config(seg)
    TASK.model_config(load_config_file("coco_detr_seg", "detr,runlocal"))


def _eval_config():
    c = load_config_file("segmentation_demo", "idetr,runlocal")
    c.data.options = OPTIONS
    c.eval_batch_size = 2
    return c


def test_evaluate_scores_ground_truth_masks_one():
    """Mask logits +-10 at the canvas resolution drawn from the records' ink (>= 0.5) and the
    records' boxes: box AP and mask AP 1; masks shifted by 8 px lose AP75_mask."""
    c = _eval_config()
    mcfg = TASK.model_config(c)
    batches = list(TASK.eval_iterator(c, mcfg, "val"))
    assert len(batches) == 2 and batches[1]["valid"].tolist() == [1.0, 0.0]
    src = ShortcutDigitsDet("val", OPTIONS)

    def outputs(shift):
        outs = []
        for b in batches:
            q = 6
            scores, labels = np.zeros((2, q)), np.zeros((2, q), np.int32)
            boxes, logits = np.tile([0.0, 0.0, 0.01, 0.01], (2, q, 1)), np.full((2, q, 64, 64), -10.0, np.float32)
            for r in range(2):
                if b["valid"][r]:
                    rec = src[int(b["image_id"][r]) - 1]
                    k = len(rec["boxes"])
                    y0, x0, y1, x1 = (rec["boxes"] / 64.0).T
                    scores[r, :k], labels[r, :k] = 1.0 - 0.01 * np.arange(k), rec["labels"]
                    boxes[r, :k] = np.stack([x0, y0, x1, y1], -1)
                    ink = np.roll(rec["masks"] >= 0.5, shift, axis=2)
                    logits[r, :k] = np.where(ink, 10.0, -10.0)
            size = np.stack([b["pixel_mask"][:, :, 0].sum(-1), b["pixel_mask"][:, 0, :].sum(-1)], -1)
            outs.append({"scores": scores, "labels": labels, "boxes": boxes, "mask_logits": logits,
                         "canvas": np.tile([64, 64], (2, 1)), "size": size, "image_id": b["image_id"],
                         "orig_size": b["orig_size"], "valid": b["valid"]})
        return outs

    m = TASK.evaluate(c, "val", outputs(0))
    assert m["val/AP"] == pytest.approx(1.0, abs=1e-9) and m["val/AP_mask"] == pytest.approx(1.0, abs=1e-9)
    assert {"val/AP50_mask", "val/AP75_mask", "val/APs_mask", "val/APm_mask", "val/APl_mask"} <= set(m)
    shifted = TASK.evaluate(c, "val", outputs(8))
    assert shifted["val/AP"] == pytest.approx(1.0, abs=1e-9) and shifted["val/AP_mask"] < 0.5


def test_load_model_puts_a_fresh_mask_head_on_a_box_model(tmp_path):
    from flax import nnx

    from lfi_jax.models.convert.detr import save_hf_detr
    from lfi_jax.models.convert.detr_segm import save_hf_detr_segm
    from lfi_jax.models.detr import Detr

    c = load_config_file("segmentation_demo", "detr,runlocal")
    mcfg = TASK.model_config(c)
    box = Detr(mcfg, rngs=nnx.Rngs(7))
    save_hf_detr(box, str(tmp_path / "box"))
    c.init.hf = str(tmp_path / "box")
    model = TASK.load_model(c, mcfg, 0)
    flat = lambda m: {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa: E731
    want, got = flat(box), flat(model)
    assert set(got) == set(flat(nnx.eval_shape(lambda: TASK.new_model(mcfg, 0))))
    for p, v in want.items():
        np.testing.assert_array_equal(got[("detr",) + p], v)
    # a whole DetrForSegmentation directory brings its mask head
    save_hf_detr_segm(model, str(tmp_path / "seg"))
    c.init.hf = str(tmp_path / "seg")
    again = flat(TASK.load_model(c, mcfg, 1))
    for p, v in got.items():
        np.testing.assert_array_equal(again[p], v)


def test_runlocal_trains_and_writes_box_and_mask_metrics(tmp_path):
    pytest.importorskip("array_record")
    from lfi_jax.data.sources import get_source
    from lfi_jax.teacher.export import export_store
    from lfi_jax.train import train_and_evaluate

    c = load_config_file("segmentation_demo", "idetr,runlocal")
    c.total_steps, c.checkpoint_every, c.async_checkpointing = 2, 0, False
    src = get_source(c.data.source, c.data.train_split, c.data.options.to_dict())
    export_store(src, str(tmp_path / "teacher"), "oracle_dense", data_spec=c.data.source, progress=False,
                 grid=c.teacher.grid)
    c.teacher.store = str(tmp_path / "teacher")
    out = train_and_evaluate(c, str(tmp_path / "run"))
    assert out["step"] == 2 and np.isfinite(out["loss"])
    assert out["align_loss"] > 0 and out["mask_loss"] > 0 and out["dice_loss"] > 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = {k: v for line in lines for k, v in line.items()}
    for k in ("AP", "AP50", "AP_mask", "AP50_mask", "AP75_mask", "APs_mask", "APm_mask", "APl_mask"):
        assert -1.0 <= final[f"val/{k}"] <= 1.0, k
    assert final["val/num_mask_detections"] == 4 * 6  # every query of the 4 val images
