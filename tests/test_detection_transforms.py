"""Detection geometry: image, boxes and the dense teacher moved together; the dense oracle teacher."""

import numpy as np
import pytest

from lfi_jax.data.det_transforms import (
    DetAugment,
    View,
    collate,
    feature_grid,
    flip_example,
    resize_size,
    sample_view,
    teacher_on_grid,
    transform_detection,
    valid_cells,
    view_boxes,
)
from lfi_jax.data.shortcut_digits_det import ShortcutDigitsDet
from lfi_jax.teacher.oracle_dense import dense_entry, export_backend

H, W = 60, 80
BOXES = np.array([[10, 5, 30, 25], [40, 50, 58, 79], [0, 0, 8, 12]], np.float32)  # (y0, x0, y1, x1)


def _example():
    rng = np.random.default_rng(0)
    return {"id": "5", "image_id": 5, "image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
            "boxes": BOXES.copy(), "labels": np.array([0, 1, 2]), "orig_size": (H, W)}


def _chain_boxes(boxes, s1, crop, s2):
    """Float64 transcription of DETR's chain: resize by s1 = (sy, sx), crop (top, left, h, w)
    with clipping, resize by s2: boxes in the final image's pixels and which survive."""
    b = boxes.astype(np.float64) * [s1[0], s1[1], s1[0], s1[1]]
    top, left, h, w = crop
    b = np.clip(b - [top, left, top, left], 0, [h, w, h, w])
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b * [s2[0], s2[1], s2[0], s2[1]], keep


def _coverage_map(boxes, pad_hw, grid_hw, out_hw):
    """The teacher computed from boxes directly on the feature grid: each box's exact area in each
    cell (cells of pad / grid pixels), summed, zeroed where the nearest-sampled pixel is padding."""
    gh, gw = grid_hw
    ey = np.arange(gh + 1) * pad_hw[0] / gh
    ex = np.arange(gw + 1) * pad_hw[1] / gw
    m = np.zeros(grid_hw)
    for y0, x0, y1, x1 in boxes:
        oy = np.clip(np.minimum(ey[1:], y1) - np.maximum(ey[:-1], y0), 0, None)
        ox = np.clip(np.minimum(ex[1:], x1) - np.maximum(ex[:-1], x0), 0, None)
        m += np.outer(oy, ox)
    rows = np.array([int(np.floor(i * pad_hw[0] / gh)) < out_hw[0] for i in range(gh)])
    cols = np.array([int(np.floor(j * pad_hw[1] / gw)) < out_hw[1] for j in range(gw)])
    m *= rows[:, None] & cols[None, :]
    return m / m.sum(), rows[:, None] & cols[None, :]


def test_resize_size_is_detrs():
    assert resize_size((480, 640), 800, 1333) == (800, 1066)
    assert resize_size((1000, 200), 800, 1333) == (1335, 267)  # round(1333 * 200 / 1000) = 267, int(267 * 5)
    assert resize_size((600, 800), 600) == (600, 800)
    assert resize_size((96, 96), 64) == (64, 64)


@pytest.mark.parametrize("flip", [False, True])
def test_teacher_after_resize_crop_pad_equals_the_map_of_the_transformed_boxes(flip):
    ex = _example()
    # a pixel-resolution teacher: pooled onto any grid it is exactly the boxes' coverage
    entry = dense_entry(ex, grid=(H, W), instance_weight="area", target="boxes")
    if flip:
        ex, entry = flip_example(ex, entry)
        np.testing.assert_array_equal(ex["boxes"][0], [10, W - 25, 30, W - 5])
    view = View.identity((H, W)).resized((90, 120)).cropped(7, 13, 70, 95).resized((50, 67))
    boxes, keep = view_boxes(ex["boxes"], view)
    ref_boxes, ref_keep = _chain_boxes(ex["boxes"], (90 / H, 120 / W), (7, 13, 70, 95), (50 / 70, 67 / 95))
    np.testing.assert_array_equal(keep, ref_keep)
    np.testing.assert_allclose(boxes[keep], ref_boxes[ref_keep], atol=1e-4)
    pad, grid = (66, 96), feature_grid((66, 96), stride=8)
    assert grid == (9, 12)
    t, ok = teacher_on_grid(entry, view, pad, grid)
    ref, valid = _coverage_map(ref_boxes[ref_keep], pad, grid, (50, 67))
    assert ok and not valid.all()  # padding cells exist
    np.testing.assert_allclose(t[valid].sum(), 1.0, atol=1e-6)
    assert (t[~valid] == 0).all()
    np.testing.assert_allclose(t, ref, atol=1e-6)
    np.testing.assert_array_equal(valid_cells((50, 67), pad, grid), valid)


def test_valid_cells_is_torch_nearest():
    torch = pytest.importorskip("torch")
    for out_hw, pad in (((50, 67), (66, 96)), ((33, 64), (64, 64)), ((800, 1066), (800, 1088))):
        grid = feature_grid(pad, 32 if pad[0] > 100 else 8)
        mask = torch.zeros(1, 1, *pad)
        mask[..., : out_hw[0], : out_hw[1]] = 1
        ref = torch.nn.functional.interpolate(mask, size=grid).to(torch.bool)[0, 0].numpy()
        np.testing.assert_array_equal(valid_cells(out_hw, pad, grid), ref)


def test_train_views_stay_inside_and_collate_pads():
    aug = DetAugment(scales=(48, 64, 80), max_size=120, crop_pre_scales=(60, 80), crop_size=(40, 60))
    rng = np.random.default_rng(1)
    ex = _example()
    entry = dense_entry(ex, grid=12)
    outs = []
    for _ in range(20):
        v = sample_view(rng, (H, W), aug)
        y0, x0, y1, x1 = v.box
        assert 0 <= y0 < y1 <= H + 1e-9 and 0 <= x0 < x1 <= W + 1e-9
        assert min(v.out_hw) in aug.scales or max(v.out_hw) <= aug.max_size
        outs.append(transform_detection(ex, entry, rng=rng, augment=aug))
    batch = collate(outs[:3], max_boxes=5, stride=8, pad_hw=(128, 128), batch_size=4)
    assert batch["image"].shape == (4, 128, 128, 3) and batch["teacher"].shape == (4, 16 * 16)
    np.testing.assert_array_equal(batch["valid"], [1, 1, 1, 0])
    for b, e in enumerate(outs[:3]):
        oh, ow = e.image.shape[:2]
        assert batch["pixel_mask"][b, :oh, :ow].all() and batch["pixel_mask"][b].sum() == oh * ow
        assert (batch["image"][b][~batch["pixel_mask"][b]] == 0).all()
        k = len(e.boxes)
        assert batch["box_valid"][b].sum() == k and (batch["labels"][b, :k] == e.labels).all()
        assert ((batch["boxes"][b, :k] >= 0) & (batch["boxes"][b, :k] <= 1)).all()
        t = batch["teacher"][b].reshape(16, 16)
        km = batch["key_mask"][b].reshape(16, 16)
        if batch["teacher_mask"][b]:
            np.testing.assert_allclose(t[km].sum(), 1.0, atol=1e-5)
        assert (t[~km] == 0).all()
    assert batch["teacher"][3].sum() == 0 and not batch["box_valid"][3].any()
    with pytest.raises(ValueError, match="image id 5: 3 boxes after transforms exceed max_boxes=2"):
        collate([transform_detection(ex, None)], max_boxes=2)
    auto = collate(outs[:2], max_boxes=5, stride=8, pad_multiple=32)
    assert auto["image"].shape[1] % 32 == 0 and auto["image"].shape[1] >= max(e.image.shape[0] for e in outs[:2])


def test_eval_transform_keeps_normalised_boxes():
    ex = _example()
    e = transform_detection(ex, None, eval_size=30, max_size=None)
    assert e.image.shape[:2] == (30, 40)
    # boxes are fractions of the image: unchanged by a pure resize
    y0, x0, y1, x1 = BOXES.T
    ref = np.stack([(x0 + x1) / 2 / W, (y0 + y1) / 2 / H, (x1 - x0) / W, (y1 - y0) / H], -1)
    np.testing.assert_allclose(e.boxes, ref, atol=1e-6)


# ----------------------------------------------------------------------------- the dense oracle


def test_dense_oracle_instance_weights_and_masks():
    ex = {"id": "1", "image": np.zeros((8, 8, 3), np.uint8), "boxes": np.array([[0, 0, 4, 4], [4, 4, 6, 6]])}
    eq = dense_entry(ex, grid=8).map
    np.testing.assert_allclose(eq[:4, :4].sum(), 0.5, atol=1e-6)  # each object mass 1/2 (Eq. 12's form)
    np.testing.assert_allclose(eq[4:6, 4:6], np.full((2, 2), 0.5 / 4), atol=1e-6)
    area = dense_entry(ex, grid=8, instance_weight="area").map
    np.testing.assert_allclose(area[:4, :4].sum(), 16 / 20, atol=1e-6)
    masks = np.zeros((1, 8, 8), np.float32)
    masks[0, 1, 2] = 1.0
    m = dense_entry({**ex, "masks": masks}, grid=8)
    assert m.meta["target"] == "masks" and m.map[1, 2] == 1.0
    assert dense_entry({**ex, "masks": masks}, grid=8, target="boxes").meta["target"] == "boxes"
    empty = dense_entry({**ex, "boxes": np.zeros((0, 4))}, grid=4)
    assert empty.degenerate and empty.meta["degenerate_reason"] == "no objects" and empty.map.sum() == 0
    with pytest.raises(ValueError, match="unknown oracle_dense teacher options"):
        dense_entry(ex, nope=1)
    with pytest.raises(ValueError, match="example '1': oracle_dense target=masks"):
        dense_entry(ex, target="masks")


def test_dense_oracle_store_round_trip(tmp_path):
    pytest.importorskip("array_record")
    from lfi_jax.teacher.store import StoreWriter, TeacherStore

    src = ShortcutDigitsDet("train", {"num_train": 5, "clutter": True})
    entries = export_backend(src, range(5), {"grid": 12})
    writer = StoreWriter(str(tmp_path / "store"), {"teacher": "oracle_dense"}, num_examples=5, shard_size=3)
    for k in range(writer.num_shards):
        writer.write_shard(k, [entries[i] for i in writer.shard_range(k)])
    writer.finalize()
    store = TeacherStore(str(tmp_path / "store"))
    assert store.ids() == [str(i + 1) for i in range(5)] and store.grid == (12, 12)
    for eid, e in entries:
        np.testing.assert_array_equal(store[eid].map, e.map)
        assert e.meta["target"] == "masks"
    # the distractors' ink is in no instance mask (only where a target overlaps them, IoU <= 0.1)
    r = src[0]
    inside = np.zeros((96, 96), bool)
    for y0, x0, y1, x1 in r["distractor_boxes"].astype(int):
        inside[y0:y1, x0:x1] = True
    assert r["masks"][:, inside].sum() <= 0.2 * r["masks"].sum()
