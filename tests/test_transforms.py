import numpy as np
import pytest

from lfi_jax.data.sources import get_source
from lfi_jax.data.transforms import (
    Augment,
    area_pool,
    render_teacher,
    resize_image,
    sample_crop,
    teacher_to_grid,
    transform_example,
)
from lfi_jax.teacher.types import Geometry, TeacherEntry


def _one_hot(gh, gw, i, j):
    m = np.zeros((gh, gw), np.float32)
    m[i, j] = 1.0
    return m


def _supersampled(entry, out_hw, crop=None, sub=32):
    """Brute-force reference: point-sample each output cell at sub x sub points, look up the
    teacher cell under each point, and add that cell's mass times the sample's share of the
    cell's area (points outside the image add nothing)."""
    m = np.asarray(entry.map, np.float64)
    gh, gw = m.shape
    h, w = entry.geometry.image_hw
    y0, x0, y1, x1 = entry.geometry.box
    cy0, cx0, cy1, cx1 = (0, 0, h, w) if crop is None else crop
    oh, ow = out_hw
    ch, cw = (y1 - y0) / gh, (x1 - x0) / gw
    out = np.zeros(out_hw)
    for r in range(oh):
        for c in range(ow):
            top, left = cy0 + r * (cy1 - cy0) / oh, cx0 + c * (cx1 - cx0) / ow
            sh, sw = (cy1 - cy0) / oh / sub, (cx1 - cx0) / ow / sub
            ys = top + (np.arange(sub) + 0.5) * sh
            xs = left + (np.arange(sub) + 0.5) * sw
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            ti = np.floor((yy - y0) / ch).astype(int)
            tj = np.floor((xx - x0) / cw).astype(int)
            ok = inside & (ti >= 0) & (ti < gh) & (tj >= 0) & (tj < gw)
            out[r, c] = (m[ti[ok], tj[ok]] * (sh * sw) / (ch * cw)).sum()
    return out


# ----------------------------------------------------------------------------- render_teacher


def test_render_full_image_one_hot():
    e = TeacherEntry(_one_hot(2, 3, 0, 1), Geometry.full_image(4, 6))
    expected = np.zeros((4, 6))
    expected[0:2, 2:4] = 0.25
    np.testing.assert_allclose(render_teacher(e, (4, 6)), expected, atol=1e-7)


def test_render_pad_to_square_drops_padding():
    # 4x8 image padded to 8x8: box (-2, 0, 6, 8).
    g = Geometry.pad_to_square(4, 8)
    assert g.box == (-2.0, 0.0, 6.0, 8.0)
    # a cell entirely on the padding renders to nothing
    np.testing.assert_array_equal(render_teacher(TeacherEntry(_one_hot(4, 4, 0, 0), g)), np.zeros((4, 8)))
    # cell (1, 2) of 2x2-pixel cells covers rows 0..2, cols 4..6
    expected = np.zeros((4, 8))
    expected[0:2, 4:6] = 0.25
    np.testing.assert_allclose(render_teacher(TeacherEntry(_one_hot(4, 4, 1, 2), g)), expected, atol=1e-7)
    # a 3x3 grid: cell (0, 0) covers rows -2..2/3, cols 0..8/3 (cell side 8/3)
    # row 0 keeps 1/(8/3) = 3/8 of the cell's height; cols 0, 1 get 3/8 each, col 2 gets 1/4
    expected = np.zeros((4, 8))
    expected[0, 0:3] = [0.25 * 0.375, 0.25 * 0.375, 0.25 * 0.25]
    got = render_teacher(TeacherEntry(_one_hot(3, 3, 0, 0), g))
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert got.sum() == pytest.approx(0.25)


def test_render_centre_crop_geometry():
    # the teacher saw the centre 4x4 of a 6x6 image: box (1, 1, 5, 5); cell (1, 1) -> [3:5, 3:5]
    e = TeacherEntry(_one_hot(2, 2, 1, 1), Geometry((6, 6), (1.0, 1.0, 5.0, 5.0)))
    expected = np.zeros((6, 6))
    expected[3:5, 3:5] = 0.25
    np.testing.assert_allclose(render_teacher(e), expected, atol=1e-7)
    with pytest.raises(ValueError, match="image_hw"):
        render_teacher(e, (6, 7))


def test_render_matches_supersampling_on_odd_geometry():
    rng = np.random.default_rng(0)
    m = rng.random((5, 7)).astype(np.float32)
    e = TeacherEntry(m / m.sum(), Geometry((9, 13), (-1.5, -0.25, 10.5, 13.75)))
    np.testing.assert_allclose(render_teacher(e), _supersampled(e, (9, 13)), atol=2e-4)
    np.testing.assert_allclose(render_teacher(e, out_hw=(4, 5)), _supersampled(e, (4, 5), sub=160), atol=2e-4)


# ----------------------------------------------------------------------------- crops and pooling


def test_teacher_to_grid_hand_computed_crop_and_flip():
    # 8x8 image, 4x4 teacher grid: cell (1, 2) covers rows 2..4, cols 4..6
    e = TeacherEntry(_one_hot(4, 4, 1, 2), Geometry.full_image(8, 8))
    got, ok = teacher_to_grid(e, (2, 2, 6, 6), (2, 2))
    assert ok
    np.testing.assert_allclose(got, [[0, 1], [0, 0]], atol=1e-7)
    got, _ = teacher_to_grid(e, (2, 2, 6, 6), (2, 2), flip=True)
    np.testing.assert_allclose(got, [[1, 0], [0, 0]], atol=1e-7)
    # crop (3, 3, 7, 7): student cells are 2x2 pixels; the teacher cell overlaps cell (0, 0)
    # over rows 3..4 x cols 4..5 and cell (0, 1) over rows 3..4 x cols 5..6: 1/4 each -> 1/2, 1/2
    got, _ = teacher_to_grid(e, (3, 3, 7, 7), (2, 2))
    np.testing.assert_allclose(got, [[0.5, 0.5], [0, 0]], atol=1e-7)
    # a crop that misses the teacher's mass masks the example
    got, ok = teacher_to_grid(e, (5, 0, 8, 3), (3, 3))
    assert not ok and not got.any()


def test_teacher_to_grid_equals_render_then_pool_and_supersampling():
    rng = np.random.default_rng(1)
    m = rng.random((6, 6)).astype(np.float32) ** 3
    e = TeacherEntry(m / m.sum(), Geometry.pad_to_square(10, 16))
    for crop in [(0, 0, 10, 16), (1, 3, 9, 11), (2.5, 4.25, 7.5, 15.0)]:
        direct, ok = teacher_to_grid(e, crop, (4, 5))
        assert ok
        ref = _supersampled(e, (4, 5), crop, sub=256)
        np.testing.assert_allclose(direct, ref / ref.sum(), atol=4e-4)  # reference error ~ 1/sub
        assert direct.sum() == pytest.approx(1.0, abs=1e-6)
        # rendering on pixels first treats each pixel's mass as uniform inside it: close,
        # but only exact where teacher cell edges fall on pixel edges
        via_pixels = area_pool(render_teacher(e), (4, 5), crop)
        np.testing.assert_allclose(direct, via_pixels, atol=0.02)
        fine = area_pool(render_teacher(e, out_hw=(160, 256)), (4, 5), np.asarray(crop) * 16)
        np.testing.assert_allclose(direct, fine, atol=2e-3)
    # pixel-aligned teacher cells and crop: the two paths agree exactly
    e = TeacherEntry(m / m.sum(), Geometry.full_image(12, 18))
    want = area_pool(render_teacher(e), (4, 3), (2, 3, 10, 15))
    np.testing.assert_allclose(teacher_to_grid(e, (2, 3, 10, 15), (4, 3))[0], want, atol=1e-6)


def test_area_pool_hand_computed():
    d = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(
        area_pool(d, (2, 2), normalize=False), [[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]
    )
    # a 1.5 x 1.5 box over the top-left: pixel (0,0) whole, (0,1),(1,0) half, (1,1) a quarter
    np.testing.assert_allclose(area_pool(d, (1, 1), (0, 0, 1.5, 1.5), normalize=False), [[0 + 0.5 + 2 + 1.25]])
    assert area_pool(np.zeros((3, 3)), (2, 2)).sum() == 0


# ----------------------------------------------------------------------------- images


def test_sample_crop_bounds_scale_and_determinism():
    for seed in range(50):
        rng = np.random.default_rng(seed)
        y0, x0, y1, x1 = sample_crop(rng, (40, 60), (0.3, 0.9), (0.5, 2.0))
        assert 0 <= y0 < y1 <= 40 and 0 <= x0 < x1 <= 60
        frac = (y1 - y0) * (x1 - x0) / (40 * 60)
        ratio = (x1 - x0) / (y1 - y0)
        assert 0.25 < frac < 0.95 and 0.45 < ratio < 2.2
        assert sample_crop(np.random.default_rng(seed), (40, 60), (0.3, 0.9), (0.5, 2.0)) == (y0, x0, y1, x1)
    # impossible ratio range -> the centred fallback with the closest allowed ratio
    assert sample_crop(np.random.default_rng(0), (10, 10), (1.0, 1.0), (3.0, 4.0)) == (3, 0, 6, 10)


def test_resize_image_matches_pil_bilinear():
    from PIL import Image

    img = np.random.default_rng(3).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    cases = [((0, 0, 40, 36), 48), ((5, 7, 30, 33), 48), ((0, 0, 40, 36), 16), ((3, 2, 39, 35), 24)]
    for (y0, x0, y1, x1), size in cases:
        ref = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1))) / 255.0
        got = resize_image(img, (y0, x0, y1, x1), size)
        assert got.shape == (size, size, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1.01 / 255)  # PIL rounds to uint8


def test_resize_image_crop_at_unit_scale_is_exact():
    img = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    got = resize_image(img, (2, 4, 8, 10), (6, 6))
    np.testing.assert_allclose(got, img[2:8, 4:10] / 255.0, atol=1e-6)
    # no half-pixel drift: a bright square's centroid maps through crop + resize as the
    # teacher's edge-aligned geometry says (c -> (c - crop_start) * out / crop_len)
    big = np.zeros((40, 40, 3), np.uint8)
    big[10:14, 22:26] = 255  # centroid (12, 24) in edge coordinates
    for box, size in [((0, 0, 40, 40), 20), ((4, 8, 36, 40), 16), ((6, 12, 26, 32), 30)]:
        out = resize_image(big, box, size)[..., 0]
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        cy, cx = (out * yy).sum() / out.sum(), (out * xx).sum() / out.sum()
        ey = (12 - box[0]) * size / (box[2] - box[0])
        ex = (24 - box[1]) * size / (box[3] - box[1])
        assert abs(cy - ey) < 0.05 and abs(cx - ex) < 0.05, (box, cy, ey, cx, ex)


def test_eval_transform_is_a_plain_resize_and_normalises():
    img = np.full((8, 8, 3), 255, np.uint8)
    e = TeacherEntry(_one_hot(2, 2, 0, 1), Geometry.full_image(8, 8))
    out = transform_example(img, e, image_size=4, grid_hw=(2, 2), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    np.testing.assert_allclose(out["image"], 2.0)
    np.testing.assert_allclose(out["teacher"], [0, 1, 0, 0])
    assert out["teacher_mask"] == 1.0
    none = transform_example(img, None, image_size=4, grid_hw=(2, 2))
    assert none["teacher_mask"] == 0.0 and not none["teacher"].any()
    zeros = TeacherEntry(np.zeros((2, 2)), e.geometry, degenerate=True)
    degenerate = transform_example(img, zeros, image_size=4, grid_hw=(2, 2))
    assert degenerate["teacher_mask"] == 0.0


@pytest.mark.parametrize("teacher_grid", [None, (8, 8)])
def test_random_crops_and_flips_keep_teacher_mass_on_the_digit(teacher_grid):
    # The teacher is the digit's mask (at pixel resolution, or pooled to 6-pixel cells), and
    # the image shows that same teacher density (rendered independently, with np.kron).
    # After the same random crop + flip, the pooled teacher must match the transformed
    # image's patch means (PIL bilinear path vs. exact-area path) and sit on the digit.
    src = get_source("shortcut_digits", "train", {"num_train": 40})
    aug = Augment(random_resized_crop=True, crop_scale=(0.2, 1.0), crop_ratio=(0.75, 4 / 3), hflip=True)
    grid, patch = (6, 6), 8
    kept = 0
    for i in range(len(src)):
        mask = src[i]["mask"]
        if teacher_grid is None:
            teacher_map, density = mask / mask.sum(), mask / mask.sum()
        else:
            teacher_map = mask.reshape(8, 6, 8, 6).sum((1, 3)) / mask.sum()
            density = np.kron(teacher_map, np.ones((6, 6))) / 36
        image = np.repeat(np.round(density / density.max() * 255).astype(np.uint8)[..., None], 3, -1)
        entry = TeacherEntry(teacher_map, Geometry.full_image(*mask.shape))
        rng = np.random.default_rng([7, 0, i])
        out = transform_example(image, entry, image_size=48, grid_hw=grid, rng=rng, augment=aug)
        patches = out["image"][..., 0].reshape(grid[0], patch, grid[1], patch).mean((1, 3)).ravel()
        if out["teacher_mask"] == 0:
            assert patches.max() < 0.02  # nothing of the teacher in the crop
            continue
        kept += 1
        t = out["teacher"]
        assert t.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.abs(t - patches / patches.sum()).sum() < 0.1, i
        if teacher_grid is None:
            assert t[patches > 0.02].sum() > 0.97, i
    assert kept >= 30


def test_flip_moves_image_and_teacher_together():
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = 255  # left half white
    e = TeacherEntry(_one_hot(1, 2, 0, 0), Geometry.full_image(8, 8))  # mass on the left half
    aug = Augment(random_resized_crop=False, hflip=True)
    seen = set()
    for seed in range(20):
        out = transform_example(img, e, image_size=8, grid_hw=(1, 2), rng=np.random.default_rng(seed), augment=aug)
        white_left = out["image"][:, :4].mean() > 0.5
        assert (out["teacher"][0] == 1.0) == white_left
        seen.add(bool(white_left))
    assert seen == {True, False}


def test_augment_from_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="data.augment.vflip"):
        Augment.from_config({"vflip": True})
    with pytest.raises(ValueError, match="crop_scale"):
        Augment.from_config({"crop_scale": (0.0, 1.0)})
