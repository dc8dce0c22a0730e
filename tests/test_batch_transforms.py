"""The batched geometry (lfi_jax/data/batch_transforms.py), the counter-based augmentation draws
and the image cache, against the per-example path and scalar transcriptions."""

import math

import numpy as np
from ml_collections import ConfigDict

from lfi_jax.data import cache as image_cache
from lfi_jax.data.batch_transforms import transform_batch
from lfi_jax.data.pipeline import make_eval_iterator, make_train_iterator
from lfi_jax.data.transforms import example_uniforms, sample_crops, transform_single
from lfi_jax.teacher.types import Geometry, TeacherEntry


def _entries(rng, n, h, w):
    out = []
    for i in range(n):
        m = rng.random((5, 7)).astype(np.float32)
        geo = Geometry.pad_to_square(h, w) if i % 2 else Geometry.full_image(h, w)
        out.append(TeacherEntry(m / m.sum(), geo))
    out[1] = None  # no teacher
    out[2] = TeacherEntry(np.zeros((5, 7), np.float32), Geometry.full_image(h, w), degenerate=True)
    return out


def test_transform_batch_equals_transform_single_per_example():
    rng = np.random.default_rng(0)
    b, h, w = 12, 40, 52
    images = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    entries = _entries(rng, b, h, w)
    boxes = []
    for _ in range(b):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        boxes.append((y0, x0, rng.integers(y0 + 4, h + 1), rng.integers(x0 + 4, w + 1)))
    boxes[3] = (0, 0, h, w)
    boxes = np.asarray(boxes)
    flips = rng.random(b) < 0.5
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    kw = dict(image_size=24, grid_hw=(4, 3), mean=mean, std=std)
    got = transform_batch(images, entries, boxes, flips, **kw)
    assert got.image.shape == (b, 24, 24, 3) and got.image.dtype == np.float32
    for i in range(b):
        ref = transform_single(images[i], entries[i], box=tuple(boxes[i]), flip=bool(flips[i]), **kw)
        np.testing.assert_allclose(got.image[i], ref["image"], atol=2e-5, err_msg=f"example {i}")
        np.testing.assert_allclose(got.teacher[i], ref["teacher"], atol=1e-6, err_msg=f"example {i}")
        assert got.teacher_mask[i] == ref["teacher_mask"]
    assert got.teacher_mask[1] == 0 and got.teacher_mask[2] == 0 and not got.teacher[1:3].any()


def _scalar_crop(u, h, w, scale, ratio):
    """The crop rule written out per attempt with Python floats (the transcription)."""
    for a in range(u.shape[0]):
        target = h * w * (scale[0] + (scale[1] - scale[0]) * u[a, 0])
        lo, hi = math.log(ratio[0]), math.log(ratio[1])
        aspect = math.exp(lo + (hi - lo) * u[a, 1])
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            y = min(int(u[a, 2] * (h - ch + 1)), h - ch)
            x = min(int(u[a, 3] * (w - cw + 1)), w - cw)
            return (y, x, y + ch, x + cw)
    if w / h < min(ratio):
        cw, ch = w, round(w / min(ratio))
    elif w / h > max(ratio):
        ch, cw = h, round(h * max(ratio))
    else:
        ch, cw = h, w
    return ((h - ch) // 2, (w - cw) // 2, (h - ch) // 2 + ch, (w - cw) // 2 + cw)


def test_sample_crops_match_the_scalar_rule():
    rng = np.random.default_rng(1)
    hw = np.stack([rng.integers(8, 70, 200), rng.integers(8, 70, 200)], 1)
    for scale, ratio in [((0.3, 1.0), (0.75, 4 / 3)), ((0.9, 1.0), (2.5, 3.0)), ((0.05, 0.2), (0.5, 2.0))]:
        u = rng.random((200, 10, 4))
        got = sample_crops(u, hw, scale, ratio)
        want = [_scalar_crop(u[i], int(hw[i, 0]), int(hw[i, 1]), scale, ratio) for i in range(200)]
        assert [tuple(int(v) for v in g) for g in got] == want


def test_example_uniforms_are_a_function_of_seed_epoch_index():
    a = example_uniforms(3, [0, 0, 1, 5], [7, 8, 7, 123456], 41)
    b = example_uniforms(3, [1, 5], [7, 123456], 41)
    np.testing.assert_array_equal(a[2:], b)  # a row does not depend on the rest of the batch
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], a[2])
    assert not np.array_equal(a, example_uniforms(4, [0, 0, 1, 5], [7, 8, 7, 123456], 41))
    many = example_uniforms(0, np.zeros(4000), np.arange(4000), 8)
    assert many.min() >= 0.0 and many.max() < 1.0
    assert abs(many.mean() - 0.5) < 0.01 and abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.05


def test_image_cache_budget_and_sharing():
    c = image_cache.ImageCache(3 * 12)
    img = np.zeros((2, 2, 3), np.uint8)  # 12 bytes
    calls = []

    def load(i):
        calls.append(i)
        return (f"id{i}", img.copy(), i)

    for i in [0, 1, 2, 3, 0, 3]:
        c.get(i, load)
    assert calls == [0, 1, 2, 3, 3] and len(c) == 3 and c.nbytes == 36  # 3 does not fit: read again
    one = image_cache.shared_image_cache("shortcut_digits", "train", {"seed": 1}, 1)
    assert image_cache.shared_image_cache("shortcut_digits", "train", {"seed": 1}, 1) is one
    assert image_cache.shared_image_cache("shortcut_digits", "train", {"seed": 2}, 1) is not one
    assert image_cache.shared_image_cache("x", "train", {}, 0).budget == 0


def _data(cache_mb):
    return ConfigDict(
        dict(
            source="shortcut_digits", train_split="train", image_size=32, data_ratio=1.0,
            options=ConfigDict(dict(num_train=64, num_test=40, canvas=40)),
            augment=ConfigDict(dict(random_resized_crop=True, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 4 / 3),
                                    hflip=True)),
            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_workers=0, num_threads=1, prefetch=2,
            cache_mb=cache_mb,
        )
    )


def test_pipeline_stream_is_the_same_with_the_cache():
    image_cache.clear()
    teacher = ConfigDict(dict(store="", allow_missing=False))
    streams = []
    for mb in (0, 64, 64):  # the third pass reads everything from the cache
        it = make_train_iterator(_data(mb), teacher, global_batch_size=16, patch_size=8, seed=5)
        streams.append([next(it) for _ in range(6)])  # 1.5 epochs
        ev = list(make_eval_iterator(_data(mb), teacher, "test_iid", global_batch_size=16, patch_size=8))
        streams[-1] += ev
        assert ev[-1]["valid"].sum() == 8 and not ev[-1]["image"][8:].any()  # padding stays zero
    for other in streams[1:]:
        for x, y in zip(streams[0], other):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    image_cache.clear()
