import math
import os

import numpy as np
import pytest
from PIL import Image

from lfi_jax.data import shortcut_digits as sd
from lfi_jax.data.sources import ImageFolder, decode_image, get_source, subset_indices

# ----------------------------------------------------------------------------- shortcut digits


def _digits(split, **opts):
    return get_source("shortcut_digits", split, dict(opts))


def test_shortcut_digits_deterministic_and_prefix_stable():
    a = _digits("train", num_train=50, seed=3)
    b = _digits("train", num_train=80, seed=3)  # more examples: the first 50 are unchanged
    c = _digits("train", num_train=50, seed=4)
    for i in (0, 7, 49):
        ea, eb, ec = a[i], b[i], c[i]
        assert ea["id"] == eb["id"] == f"shortcut_digits/train/{i}" == a.example_id(i)
        np.testing.assert_array_equal(ea["image"], eb["image"])
        np.testing.assert_array_equal(ea["mask"], eb["mask"])
        assert ea["label"] == eb["label"]
        assert not np.array_equal(ea["image"], ec["image"])
    ex = a[0]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (48, 48, 3)
    assert ex["mask"].dtype == np.float32 and ex["mask"].shape == (48, 48)
    assert 0.0 <= ex["mask"].min() and ex["mask"].max() <= 1.0 and ex["mask"].max() > 0.9
    # the box is the tight box of the mask
    y0, x0, y1, x1 = ex["boxes"][0].astype(int)
    rows, cols = np.flatnonzero(ex["mask"].max(1) > 0), np.flatnonzero(ex["mask"].max(0) > 0)
    assert (y0, x0, y1, x1) == (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    with pytest.raises(IndexError, match="out of range"):
        a[50]


def test_shortcut_digits_labels_are_sklearn_targets_and_pools_disjoint():
    from sklearn.datasets import load_digits

    target = load_digits().target
    tr = _digits("train", num_train=3000)
    te = _digits("test_iid", num_test=1000)
    train_digits = {tr.digit_index(i) for i in range(len(tr))}
    test_digits = {te.digit_index(i) for i in range(len(te))}
    assert not train_digits & test_digits
    assert len(train_digits) > 1200 and len(test_digits) > 300  # most of each pool is used
    for src in (tr, te):
        for i in range(0, len(src), 97):
            assert src[i]["label"] == target[src.digit_index(i)]
    # the digit drawn is the sklearn digit: its mask, cropped to the paste box and
    # area-averaged back to 8x8, correlates with that digit best among all 1797
    images = load_digits().images.reshape(len(target), -1)
    images = (images - images.mean(1, keepdims=True)) / images.std(1, keepdims=True)
    hits = 0
    for i in range(20):
        ex = te[i]
        s, y, x = int(te._size[i]), int(te._y0[i]), int(te._x0[i])
        patch = ex["mask"][y : y + s, x : x + s]
        e = np.linspace(0, s, 9).round().astype(int)
        small = np.array([[patch[e[r] : e[r + 1], e[c] : e[c + 1]].mean() for c in range(8)] for r in range(8)]).ravel()
        small = (small - small.mean()) / small.std()
        hits += int(np.argmax(images @ small) == te.digit_index(i))
    assert hits >= 16


def test_spurious_p_is_honoured():
    n = 4000
    for p in (0.0, 0.7, 0.9):
        src = _digits("train", num_train=n, spurious_p=p)
        rate = np.mean(src.families() == src.labels())
        expected = p + (1 - p) / 10  # family = label w.p. p, else uniform over all 10
        sigma = math.sqrt(expected * (1 - expected) / n)
        assert abs(rate - expected) < 4 * sigma, (p, rate, expected)
    # presets by name; the background changes, the digit does not
    hard = _digits("train", num_train=200, spurious_p="hard")
    clean = _digits("train", num_train=200, spurious_p="clean")
    assert hard.spurious_p == 0.9 and clean.spurious_p == 0.0
    np.testing.assert_array_equal(hard[5]["mask"], clean[5]["mask"])
    assert sd.SPURIOUS_PRESETS == {"clean": 0.0, "shortcut": 0.7, "hard": 0.9}
    with pytest.raises(ValueError, match="data.options.spurious_p"):
        _digits("train", spurious_p="easy")


def test_test_shifted_is_independent_of_label_and_paired_with_iid():
    from scipy.stats import chi2_contingency

    n = 3000
    shifted = _digits("test_shifted", num_test=n, spurious_p=0.9)
    iid = _digits("test_iid", num_test=n, spurious_p=0.9)
    table = np.zeros((10, 10))
    np.add.at(table, (shifted.labels(), shifted.families()), 1)
    assert chi2_contingency(table).pvalue > 1e-3
    assert abs(np.mean(shifted.families() == shifted.labels()) - 0.1) < 0.03
    assert np.mean(iid.families() == iid.labels()) > 0.85
    np.testing.assert_array_equal(iid.labels(), shifted.labels())
    np.testing.assert_array_equal(iid[3]["mask"], shifted[3]["mask"])
    assert iid.example_id(3) != shifted.example_id(3)


def test_background_family_is_visible_in_the_pixels():
    # A nearest-centroid classifier on background spectra recovers the reported family: the
    # family field describes what is drawn (a permuted or constant field scores ~0.1).
    from sklearn.neighbors import NearestCentroid
    from sklearn.preprocessing import StandardScaler

    src = _digits("test_shifted", num_test=700, seed=1)

    def features(i):
        g = src[i]["image"].astype(np.float32).mean(-1)
        return np.log1p(np.abs(np.fft.fft2(g - g.mean()))[:24, :24]).ravel()

    x = np.stack([features(i) for i in range(len(src))])
    x = StandardScaler().fit(x[:500]).transform(x)
    y = src.families()
    clf = NearestCentroid().fit(x[:500], y[:500])
    assert clf.score(x[500:], y[500:]) > 0.4


def test_shortcut_digits_bad_options_name_the_key():
    with pytest.raises(ValueError, match="data.options.colour"):
        _digits("train", colour=1)
    with pytest.raises(ValueError, match="no split 'val'"):
        _digits("val")
    with pytest.raises(ValueError, match="data.options.num_train"):
        _digits("train", num_train=0)


def test_canvas_option():
    src = _digits("train", num_train=10, canvas=32)
    assert src[0]["image"].shape == (32, 32, 3) and src[0]["mask"].shape == (32, 32)


# ----------------------------------------------------------------------------- image folders


def _png(path, color, size=(5, 4)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.asarray(color, np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def test_imagefolder_flat_layout(tmp_path):
    a = _png(str(tmp_path / "zebra" / "b.png"), (10, 20, 30))
    b = _png(str(tmp_path / "zebra" / "a.png"), (1, 2, 3))
    c = _png(str(tmp_path / "ant" / "x.png"), (200, 100, 0))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    src = get_source(f"imagefolder:{tmp_path}", "train")
    assert src.class_names == ["ant", "zebra"]
    assert [src.example_id(i) for i in range(len(src))] == ["ant/x.png", "zebra/a.png", "zebra/b.png"]
    assert list(src.labels()) == [0, 1, 1]
    for i, arr in enumerate([c, b, a]):
        ex = src[i]
        assert ex["id"] == src.example_id(i)
        np.testing.assert_array_equal(ex["image"], arr)


def test_imagefolder_split_layout_uses_train_classes(tmp_path):
    for cls in ("b", "a", "c"):
        _png(str(tmp_path / "train" / cls / "0.png"), (0, 0, 0))
    _png(str(tmp_path / "val" / "c" / "9.png"), (5, 5, 5))
    val = get_source(f"imagefolder:{tmp_path}", "val")
    assert val.class_names == ["a", "b", "c"]
    assert len(val) == 1 and val[0]["label"] == 2 and val[0]["id"] == "c/9.png"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "test")):
        get_source(f"imagefolder:{tmp_path}", "test")
    _png(str(tmp_path / "val" / "zzz" / "1.png"), (5, 5, 5))
    with pytest.raises(ValueError, match="zzz"):
        get_source(f"imagefolder:{tmp_path}", "val")


def test_imagefolder_grayscale_is_rgb_and_corrupt_file_is_named(tmp_path):
    os.makedirs(tmp_path / "k")
    Image.fromarray(np.full((3, 3), 77, np.uint8), mode="L").save(tmp_path / "k" / "g.png")
    bad = tmp_path / "k" / "h.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    src = ImageFolder(str(tmp_path), "train")
    img = src[0]["image"]
    assert img.shape == (3, 3, 3) and img.dtype == np.uint8 and (img == 77).all()
    with pytest.raises(ValueError, match=str(bad)):
        src[1]
    with pytest.raises(ValueError, match="h.jpg"):
        decode_image(str(bad))


def test_missing_dir_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        get_source(f"imagefolder:{missing}", "train")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        get_source(f"tinyimagenet:{missing}", "train")


def test_bad_specs():
    with pytest.raises(ValueError, match="data.source='mnist'"):
        get_source("mnist", "train")
    with pytest.raises(ValueError, match="needs an argument"):
        get_source("imagefolder", "train")
    with pytest.raises(ValueError, match="data.options.foo"):
        get_source("imagefolder:/tmp", "train", {"foo": 1})


def test_tfds_without_tensorflow_datasets_is_a_clear_error():
    try:
        import tensorflow_datasets  # noqa: F401

        pytest.skip("tensorflow_datasets is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="tensorflow_datasets"):
        get_source("tfds:cifar10", "train")


# ----------------------------------------------------------------------------- tinyimagenet


def _tiny_tree(root):
    (root / "wnids.txt").write_text("n02\nn01\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tEuropean fire salamander\nn99\tunused\n")
    for w, color in (("n01", (255, 0, 0)), ("n02", (0, 255, 0))):
        for k in range(2):
            _png(str(root / "train" / w / "images" / f"{w}_{k}.JPEG"), color, size=(8, 6))
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t1\t2\t5\t4\n{w}_1.JPEG\t0\t0\t7\t5\n")
    _png(str(root / "val" / "images" / "val_1.JPEG"), (0, 0, 255), size=(8, 6))
    _png(str(root / "val" / "images" / "val_0.JPEG"), (9, 9, 9), size=(8, 6))
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t1\t3\t4\nval_1.JPEG\tn01\t2\t2\t6\t5\n")


def test_tinyimagenet_layout(tmp_path):
    _tiny_tree(tmp_path)
    tr = get_source(f"tinyimagenet:{tmp_path}", "train")
    assert tr.class_names == ["goldfish", "European fire salamander"]
    assert tr.wnids == ["n01", "n02"]
    ids = [tr.example_id(i) for i in range(len(tr))]
    assert ids == ["train/n01/n01_0.JPEG", "train/n01/n01_1.JPEG", "train/n02/n02_0.JPEG", "train/n02/n02_1.JPEG"]
    assert list(tr.labels()) == [0, 0, 1, 1]
    ex = tr[2]
    assert ex["image"].shape == (6, 8, 3) and ex["label"] == 1
    # (x0, y0, x1, y1) = (1, 2, 5, 4) inclusive -> (y0, x0, y1, x1) exclusive
    np.testing.assert_array_equal(ex["boxes"], [[2, 1, 5, 6]])
    va = get_source(f"tinyimagenet:{tmp_path}", "val")
    assert [va.example_id(i) for i in range(len(va))] == ["val/val_0.JPEG", "val/val_1.JPEG"]
    assert list(va.labels()) == [1, 0]
    np.testing.assert_array_equal(va[1]["boxes"], [[2, 2, 6, 7]])
    with pytest.raises(ValueError, match="'test'"):
        get_source(f"tinyimagenet:{tmp_path}", "test")


# ----------------------------------------------------------------------------- subsets


def test_data_ratio_subsets_are_deterministic_nested_and_stratified():
    opts = dict(num_train=1000)
    full = get_source("shortcut_digits", "train", opts)
    labels = full.labels()
    subsets = {}
    for r in (0.01, 0.1, 0.5):
        s1 = get_source("shortcut_digits", "train", dict(opts, data_ratio=r))
        s2 = get_source("shortcut_digits", "train", dict(opts, data_ratio=r))
        ids = [s1.example_id(i) for i in range(len(s1))]
        assert ids == [s2.example_id(i) for i in range(len(s2))]
        subsets[r] = set(ids)
        counts = np.bincount(s1.labels(), minlength=10)
        np.testing.assert_array_equal(counts, [math.ceil(r * c) for c in np.bincount(labels, minlength=10)])
        ex = s1[0]
        np.testing.assert_array_equal(ex["image"], full[int(ex["id"].rsplit("/", 1)[1])]["image"])
    assert subsets[0.01] < subsets[0.1] < subsets[0.5]
    other = get_source("shortcut_digits", "train", dict(opts, data_ratio=0.1, subset_seed=1))
    assert {other.example_id(i) for i in range(len(other))} != subsets[0.1]
    with pytest.raises(ValueError, match="data_ratio"):
        get_source("shortcut_digits", "train", dict(opts, data_ratio=0.0))


def test_subset_without_labels():
    idx = subset_indices(None, 100, 0.2, seed=5)
    assert len(idx) == 20 and len(set(idx)) == 20 and np.all(np.diff(idx) > 0)
    assert set(idx) <= set(subset_indices(None, 100, 0.5, seed=5))


def test_detection_subset_keeps_detection_attributes_and_is_stratified():
    opts = dict(num_train=80, canvas=48, size_range=(12, 24))
    full = get_source("shortcut_digits_det", "train", opts)
    # each image's most frequent class (ties to the lower label), brute force from its annotations
    strata = np.asarray([np.bincount(full.annotations(i)[1], minlength=10).argmax() for i in range(len(full))])
    subsets = {}
    for r in (0.05, 0.1):
        s1 = get_source("shortcut_digits_det", "train", dict(opts, data_ratio=r))
        s2 = get_source("shortcut_digits_det", "train", dict(opts, data_ratio=r))
        ids = [s1.example_id(i) for i in range(len(s1))]
        assert ids == [s2.example_id(i) for i in range(len(s2))]  # same seed, same subset
        subsets[r] = set(ids)
        picked = strata[[int(i) - 1 for i in ids]]  # ids are str(index + 1)
        np.testing.assert_array_equal(np.bincount(picked, minlength=10),
                                      [math.ceil(r * c) for c in np.bincount(strata, minlength=10)])
        assert r * len(full) <= len(s1) <= r * len(full) + 10
    assert subsets[0.05] < subsets[0.1]
    other = get_source("shortcut_digits_det", "train", dict(opts, data_ratio=0.1, subset_seed=1))
    assert {other.example_id(i) for i in range(len(other))} != subsets[0.1]

    sub = get_source("shortcut_digits_det", "train", dict(opts, data_ratio=0.1))
    assert sub.category_ids == full.category_ids and sub.class_names == full.class_names
    recs = [sub[i] for i in range(len(sub))]
    assert sub.image_ids() == [r["image_id"] for r in recs] == [int(sub.example_id(i)) for i in range(len(sub))]
    assert [sub.orig_size(i) for i in range(len(sub))] == [tuple(r["orig_size"]) for r in recs]
    assert sub.index_of(recs[3]["image_id"]) == 3
    gt = sub.gt_dataset()
    assert sorted(im["id"] for im in gt["images"]) == sorted(sub.image_ids())
    want = sorted((r["image_id"], *(float(v) for v in (b[1], b[0], b[3] - b[1], b[2] - b[0])))
                  for r in recs for b in r["boxes"])
    got = sorted((a["image_id"], *a["bbox"]) for a in gt["annotations"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want))
    assert gt["categories"] == full.gt_dataset()["categories"]
