"""Oracle teacher maps (area pooling, boxes, noise) and the export (resume, --shard, CLI)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from lfi_jax.data.sources import get_source
from lfi_jax.teacher import export, oracle, show
from lfi_jax.teacher.export import export_store
from lfi_jax.teacher.oracle import oracle_entry
from lfi_jax.teacher.store import TeacherStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ex(mask=None, boxes=None, hw=None, eid="e"):
    hw = hw or (mask.shape if mask is not None else (8, 8))
    d = {"id": eid, "image": np.zeros((*hw, 3), np.uint8), "label": 0}
    if mask is not None:
        d["mask"] = np.asarray(mask, np.float32)
    if boxes is not None:
        d["boxes"] = np.asarray(boxes, np.float32)
    return d


# --------------------------------------------------------------------------- pooling


def test_single_pixel_split_over_four_cells():
    # 6 px, 4 cells of 1.5 px: pixel 1 = [1, 2) lies half in cell 0 = [0, 1.5), half in cell 1.
    m = np.zeros((6, 6))
    m[1, 1] = 1
    e = oracle_entry(_ex(m), grid=4)
    want = np.zeros((4, 4))
    want[:2, :2] = 0.25
    np.testing.assert_allclose(e.map, want, atol=1e-7)
    assert e.map.dtype == np.float32 and not e.degenerate
    assert e.geometry.box == (0.0, 0.0, 6.0, 6.0) and e.geometry.image_hw == (6, 6)


def test_pad_to_square_geometry_hand_computed():
    # 4 x 6 image padded to 6 x 6: box rows [-1, 5); 3 x 3 cells of 2 px. Row cells hold
    # image rows {0}, {1, 2}, {3}: masses 1, 2, 1 rows x 2 columns each.
    e = oracle_entry(_ex(np.ones((4, 6))), grid=3, geometry="pad")
    assert e.geometry.box == (-1.0, 0.0, 5.0, 6.0)
    np.testing.assert_allclose(e.map, np.array([[2, 2, 2], [4, 4, 4], [2, 2, 2]]) / 24.0, atol=1e-7)


@pytest.mark.parametrize("size, grid, factor", [(6, 4, 2), (48, 7, 7), (10, 3, 3)])
def test_area_pooling_equals_supersampled_block_sums(size, grid, factor):
    # Independent: subdivide each pixel into factor x factor subpixels so that every cell is
    # exactly (size * factor / grid)^2 subpixels, and sum blocks.
    rng = np.random.default_rng(size)
    m = rng.random((size, size)) * (rng.random((size, size)) > 0.6)
    fine = np.kron(m, np.ones((factor, factor)))
    b = size * factor // grid
    assert b * grid == size * factor
    want = fine.reshape(grid, b, grid, b).sum((1, 3))
    want /= want.sum()
    np.testing.assert_allclose(oracle_entry(_ex(m), grid=grid).map, want, rtol=1e-5, atol=1e-7)


def test_boxes_filled_equal_mask():
    m = np.zeros((6, 8))
    m[1:4, 2:5] = 1
    a = oracle_entry(_ex(boxes=[[1, 2, 4, 5]], hw=(6, 8)), grid=(3, 4))
    b = oracle_entry(_ex(m), grid=(3, 4))
    assert a.meta["target"] == "boxes" and b.meta["target"] == "mask"
    np.testing.assert_array_equal(a.map, b.map)
    # fractional box: rows [0.5, 1.5) cover half of each pixel row; grid cells = pixels
    f = oracle_entry(_ex(boxes=[[0.5, 0, 1.5, 1]], hw=(2, 2)), grid=2)
    np.testing.assert_allclose(f.map, [[0.5, 0], [0.5, 0]], atol=1e-7)
    # target=boxes ignores the mask
    c = oracle_entry(_ex(np.ones((6, 8)), boxes=[[1, 2, 4, 5]]), grid=(3, 4), target="boxes")
    np.testing.assert_array_equal(c.map, a.map)


def test_empty_mask_is_degenerate_and_missing_target_names_id():
    e = oracle_entry(_ex(np.zeros((5, 5))), grid=3, uniform=0.5, blur=1.0)
    assert e.degenerate and e.meta["degenerate_reason"] == "empty mask"
    np.testing.assert_array_equal(e.map, np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="'img/7'.*neither"):
        oracle_entry(_ex(hw=(4, 4), eid="img/7"), grid=2)
    with pytest.raises(ValueError, match="'img/8'.*no 'mask'"):
        oracle_entry(_ex(boxes=[[0, 0, 1, 1]], hw=(4, 4), eid="img/8"), grid=2, target="mask")
    with pytest.raises(ValueError, match="unknown oracle teacher options.*'blurr'"):
        oracle_entry(_ex(np.ones((4, 4))), blurr=1.0)
    with pytest.raises(ValueError, match="uniform=1.5"):
        oracle_entry(_ex(np.ones((4, 4))), uniform=1.5)


# --------------------------------------------------------------------------- noise


def _center_mask(grid=9, px=3):
    m = np.zeros((grid * px, grid * px))
    c = grid // 2
    m[c * px : (c + 1) * px, c * px : (c + 1) * px] = 1  # exactly the centre cell
    return m, c


def test_noise_deterministic_and_changes_map():
    m, _ = _center_mask()
    clean = oracle_entry(_ex(m, eid="a"), grid=9).map
    kw = dict(grid=9, blur=0.7, shift=1.3, uniform=0.1, seed=3)
    a1 = oracle_entry(_ex(m, eid="a"), **kw)
    a2 = oracle_entry(_ex(m, eid="a"), **kw)
    assert a1.map.tobytes() == a2.map.tobytes() and a1.meta == a2.meta
    assert not np.allclose(a1.map, clean)
    assert abs(float(a1.map.sum()) - 1) < 1e-5 and a1.map.min() >= 0
    b = oracle_entry(_ex(m, eid="b"), **kw)  # other example: other direction
    c = oracle_entry(_ex(m, eid="a"), **{**kw, "seed": 4})  # other seed
    assert not np.allclose(b.map, a1.map) and not np.allclose(c.map, a1.map)


def test_shift_moves_mass_bilinearly():
    m, c = _center_mask()
    e = oracle_entry(_ex(m, eid="x/1"), grid=9, shift=1.5, seed=11)
    dy, dx = e.meta["noise_shift"]
    assert math.hypot(dy, dx) == pytest.approx(1.5)
    want = np.zeros((9, 9))  # a unit mass at cell c moved to c + (dy, dx), split bilinearly
    y, x = c + dy, c + dx
    i, j = math.floor(y), math.floor(x)
    fy, fx = y - i, x - j
    want[i, j], want[i + 1, j] = (1 - fy) * (1 - fx), fy * (1 - fx)
    want[i, j + 1], want[i + 1, j + 1] = (1 - fy) * fx, fy * fx
    np.testing.assert_allclose(e.map, want, atol=1e-6)


def test_shift_off_the_grid_is_degenerate():
    m = np.zeros((4, 4))
    m[0, 0] = 1
    e = oracle_entry(_ex(m), grid=2, shift=5.0)
    assert e.degenerate and "off the grid" in e.meta["degenerate_reason"]
    assert not e.map.any()


def test_blur_is_a_gaussian_and_uniform_mixes():
    m, c = _center_mask()
    s = 1.2
    e = oracle_entry(_ex(m), grid=9, blur=s)
    ii, jj = np.mgrid[:9, :9]
    want = np.exp(-((ii - c) ** 2 + (jj - c) ** 2) / (2 * s * s))
    np.testing.assert_allclose(e.map, want / want.sum(), atol=1e-6)
    rng = np.random.default_rng(0)
    r = rng.random((12, 12))
    clean = oracle_entry(_ex(r), grid=4).map.astype(np.float64)
    mixed = oracle_entry(_ex(r), grid=4, uniform=0.3).map
    np.testing.assert_allclose(mixed, 0.7 * clean + 0.3 / 16, atol=1e-6)


# --------------------------------------------------------------------------- export


class FakeSource:
    """12 examples of varying size; #5 has an empty mask, #7 only boxes."""
    name = "fake"
    class_names = ["a", "b"]

    def __init__(self, n=12, split="train"):
        self.n, self.split = n, split

    def __len__(self):
        return self.n

    def example_id(self, i):
        return f"fake/{self.split}/{i}"

    def __getitem__(self, i):
        h, w = 10 + i % 3, 12
        rng = np.random.default_rng(i)
        d = {"id": self.example_id(i), "image": np.zeros((h, w, 3), np.uint8), "label": i % 2}
        if i == 7:
            d["boxes"] = np.array([[1, 1, 5, 6]], np.float32)
        else:
            d["mask"] = (rng.random((h, w)) > 0.7).astype(np.float32) * (i != 5)
        return d


def _use_backend(monkeypatch, name, fn):
    """Backends hold function references: swap the export function in the registry."""
    monkeypatch.setitem(export.BACKENDS, name, dataclasses.replace(export.BACKENDS[name], export=fn))


def _entries(store):
    return {k: store[k] for k in store.ids()}


def test_export_store_matches_oracle_and_resumes(tmp_path, monkeypatch):
    src = FakeSource()
    calls = []
    real = oracle.export_backend

    def counting(source, indices, options):
        calls.append(list(indices))
        if len(calls) == 3 and crash["on"]:
            raise RuntimeError("killed")
        return real(source, indices, options)

    crash = {"on": True}
    _use_backend(monkeypatch, "oracle", counting)
    out = str(tmp_path / "s")
    kw = dict(shard_size=5, progress=False, grid=4, blur=0.5, seed=1)
    with pytest.raises(RuntimeError, match="killed"):
        export_store(src, out, "oracle", **kw)
    assert calls == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    crash["on"] = False
    calls.clear()
    store = export_store(src, out, "oracle", **kw)
    assert calls == [[10, 11]]  # finished shards skipped
    assert len(store) == 12 and store.manifest["degenerate_count"] == 1
    assert store.manifest["teacher"]["noise"] == {"blur": 0.5, "shift": 0.0, "uniform": 0.0}
    store.check_compatible("fake", "train", backend="oracle", grid=[4, 4])
    for i in range(12):
        want = oracle_entry(src[i], grid=4, blur=0.5, seed=1)
        got = store[src.example_id(i)]
        assert got.map.tobytes() == want.map.tobytes() and got.geometry == want.geometry
        assert got.degenerate == (i == 5)
    calls.clear()
    assert export_store(src, out, "oracle", **kw).manifest == store.manifest and calls == []
    with pytest.raises(ValueError, match=r"manifest\.teacher\.grid"):
        export_store(src, out, "oracle", **{**kw, "grid": 5})


def test_shard_workers_union_to_the_whole_store(tmp_path):
    src = FakeSource()
    kw = dict(shard_size=2, progress=False, grid=(3, 5), shift=0.7)
    whole = export_store(src, str(tmp_path / "whole"), **kw)
    out = str(tmp_path / "parts")
    assert export_store(src, out, shard="2/3", **kw) is None
    assert export_store(src, out, shard=(0, 3), **kw) is None
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    parts = export_store(src, out, shard="1/3", **kw)
    assert parts.manifest["content_hash"] == whole.manifest["content_hash"]
    a, b = _entries(whole), _entries(parts)
    assert list(a) == list(b) == [src.example_id(i) for i in range(12)]
    for k in a:
        assert a[k].map.tobytes() == b[k].map.tobytes() and a[k].meta == b[k].meta


def test_backend_with_wrong_ids_fails(tmp_path, monkeypatch):
    def bad(source, indices, options):
        return [(f"other/{i}", oracle_entry(source[i], options)) for i in indices]

    _use_backend(monkeypatch, "oracle", bad)
    with pytest.raises(ValueError, match=r"missing e\.g\. \['fake/train/0'.*unexpected e\.g\. \['other/0'"):
        export_store(FakeSource(), str(tmp_path), shard_size=4, progress=False)
    with pytest.raises(ValueError, match="unknown teacher backend 'nope'"):
        export_store(FakeSource(), str(tmp_path / "x"), "nope")


def test_parse_helpers():
    assert export.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            export.parse_shard(bad)
    assert export.parse_data_options(["num_train=10", "spurious_p=shortcut", "scale_range=[0.4,0.6]", "p=0.5"]) == {
        "num_train": 10, "spurious_p": "shortcut", "scale_range": [0.4, 0.6], "p": 0.5
    }
    with pytest.raises(ValueError, match="'canvas'"):
        export.parse_data_options(["canvas"])
    args, opts = export.parse_args(["--data=d", "--out=o", "--grid=24,32", "--noise_blur=1.5", "--seed=2"])
    assert opts == {
        "grid": "24,32", "geometry": "full", "target": "auto", "blur": 1.5, "shift": 0.0, "uniform": 0.0, "seed": 2
    }
    assert oracle.parse_grid(opts["grid"]) == (24, 32)
    _, opts = export.parse_args(["--data=d", "--out=o", "--noise-shift=0.5"])  # hyphenated spelling too
    assert opts["shift"] == 0.5


def test_cli_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "cli")
    cmd = ["--teacher=oracle", "--data=shortcut_digits", "--split=train", f"--out={out}", "--grid=7",
           "--shard_size=4", "--data_option", "num_train=10", "--data_option", "canvas=24", "--noise_uniform=0.2"]
    r = subprocess.run([sys.executable, "-m", "lfi_jax.teacher.export", *cmd], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["count"] == 10 and summary["grid"] == [7, 7]
    assert "shard 3/3" in r.stderr and "ex/s" in r.stderr and "ETA" in r.stderr

    src = get_source("shortcut_digits", "train", {"num_train": 10, "canvas": 24})
    store = TeacherStore(out)
    store.check_compatible("shortcut_digits", "train")
    assert store.manifest["data_options"]["num_train"] == 10 and store.manifest["data_options"]["canvas"] == 24
    for i in (0, 9):
        want = oracle_entry(src[i], grid=7, uniform=0.2)
        assert store[src.example_id(i)].map.tobytes() == want.map.tobytes()
    # re-run in-process: nothing to do; a conflicting re-run fails naming the key
    capsys.readouterr()
    assert export.main(cmd) == 0
    assert "3 of this worker's 3 shards already done" in capsys.readouterr().err
    assert export.main([*cmd[:-1], "--noise_uniform=0.3"]) == 2  # lfi_jax.cli: a user error exits 2
    assert "manifest.teacher.noise.uniform: store has 0.2, this export has 0.3" in capsys.readouterr().err
    assert export.main([c.replace("canvas=24", "canvas=32") for c in cmd]) == 2
    assert "manifest.data_options.canvas" in capsys.readouterr().err


def test_ctrl_c_ends_with_one_line_of_what_was_saved(tmp_path, monkeypatch, capsys):
    real, calls = oracle.export_backend, []

    def interrupted_in_second_shard(source, indices, options):
        calls.append(list(indices))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(source, indices, options)

    _use_backend(monkeypatch, "oracle", interrupted_in_second_shard)
    out = str(tmp_path / "s")
    cmd = ["--data=shortcut_digits", f"--out={out}", "--grid=4", "--shard_size=4", "--data_option", "num_train=10",
           "--data_option", "canvas=24"]
    assert export.main(cmd) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("interrupted")]
    assert f"export {out}: 1 of 3 shards saved" in line and "re-run" in line
    _use_backend(monkeypatch, "oracle", real)
    assert export.main(cmd) == 0 and TeacherStore(out).manifest["count"] == 10


def test_show_samples_across_classes_by_default(tmp_path):
    src = get_source("shortcut_digits", "train", {"num_train": 60, "canvas": 24})
    store = export_store(src, str(tmp_path / "s"), shard_size=64, progress=False, grid=4,
                         data_options={"num_train": 60, "canvas": 24})
    labels = [src[i]["label"] for i in range(len(src))]  # read from the examples themselves
    classes = len(set(labels))
    picked = show.pick(src, store, classes)
    assert len({labels[i] for i in picked}) == classes  # every class once
    assert show.pick(src, store, classes) == picked  # seeded (default seed 0)
    assert show.pick(src, store, classes, seed=1) != picked
    assert show.pick(src, store, 5, first=True) == [0, 1, 2, 3, 4]
    png = tmp_path / "grid.png"
    assert show.main(["--store", store.path, "--n", "4", "--out", str(png)]) == 0
    assert show.main(["--store", store.path, "--n", "0", "--out", str(png)]) == 2


def test_store_written_before_data_identity_still_resumes(tmp_path, monkeypatch):
    src = FakeSource()
    out = str(tmp_path / "s")
    kw = dict(shard_size=5, progress=False, grid=4)
    export_store(src, out, "oracle", **kw)
    for name in ("export.json", "manifest.json"):  # as an older version wrote them
        path = os.path.join(out, name)
        with open(path) as f:
            d = json.load(f)
        (d["manifest"] if name == "export.json" else d).pop("data_identity")
        with open(path, "w") as f:
            json.dump(d, f)
    calls = []

    def counting(source, indices, options):
        calls.append(list(indices))
        return oracle.export_backend(source, indices, options)

    _use_backend(monkeypatch, "oracle", counting)
    store = export_store(src, out, "oracle", **kw)
    assert calls == [] and len(store) == 12  # nothing re-exported, nothing refused
    assert store.provenance.data_identity.kind == "fake"  # derived from data/split/data_options
