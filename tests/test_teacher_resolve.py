"""Which store a run reads (teacher/resolve.py) and whether a store fits the data
(teacher/provenance.py): identity, not paths; a changed image is caught where it is joined."""

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from lfi_jax.config import base_config
from lfi_jax.data.pipeline import build_teacher_lookup, make_train_iterator
from lfi_jax.data.sources import get_source
from lfi_jax.teacher import export
from lfi_jax.teacher.export import export_store
from lfi_jax.teacher.provenance import Provenance, check_compatible, data_identity
from lfi_jax.teacher.resolve import TeacherChoice, resolve_teacher, teacher_key
from lfi_jax.teacher.store import TeacherStore
from lfi_jax.teacher.types import Geometry, TeacherEntry


class ManifestOnly:
    """A store as the compatibility check sees it: a path and a manifest."""

    def __init__(self, manifest, path="/stores/s"):
        self.manifest, self.path = manifest, path


def _exported_manifest(spec, split, options):
    """The data part of the manifest export_store writes for this source (independently built)."""
    src = get_source(spec, split, options)
    return {"backend": "oracle", "data": spec, "split": split, "data_options": dict(src.options, **options),
            "data_identity": data_identity(spec, split, dict(src.options, **options)).to_json()}


def test_shortcut_store_is_refused_by_a_clean_run_naming_both_sides():
    # the case: a store of the shortcut regime (spurious_p 0.7, 20,000 examples) and a
    # clean runlocal run (spurious_p 0, 256 examples)
    store = ManifestOnly(_exported_manifest("shortcut_digits", "train", {"spurious_p": 0.7, "num_train": 20000}))
    run = get_source("shortcut_digits", "train", {"spurious_p": 0.0, "num_train": 256})
    with pytest.raises(ValueError) as e:
        check_compatible(store, run)
    msg = str(e.value)
    assert "\n" not in msg and "/stores/s" in msg
    assert "data_options.spurious_p: store has 0.7, expected 0.0" in msg
    assert "data_options.num_train: store has 20000, expected 256" in msg
    # a preset name and its value are the same data; the other split's count does not matter
    same = get_source("shortcut_digits", "train", {"spurious_p": "shortcut", "num_train": 20000, "num_test": 7})
    assert check_compatible(store, same) == []
    # a subset of the store's split (data_ratio) is fine
    half = get_source("shortcut_digits", "train", {"num_train": 20000, "data_ratio": 0.5})
    assert check_compatible(store, half) == []
    with pytest.raises(ValueError, match=r'split: store has "train", expected "test_iid"'):
        check_compatible(store, spec="shortcut_digits", split="test_iid", options={"num_test": 20000})


def test_identity_ignores_where_the_data_lies():
    a = data_identity("imagefolder:/data/pacs/sketch", "train")
    assert a == data_identity("imagefolder:/mnt/moved/sketch/", "train")  # moved, trailing slash
    assert a.kind == "imagefolder" and a.name == ""
    tfds_a = data_identity("tfds:cifar10", "train", {"data_dir": "/a"})
    assert tfds_a == data_identity("tfds:cifar10", "train", {"data_dir": "/b"})
    assert data_identity("tfds:cifar10", "train") != data_identity("tfds:cifar100", "train")
    # an old manifest without data_identity is read from its data/split/data_options
    teacher = {"teacher": "oracle", "geometry": "pad", "noise": {"blur": 1, "shift": 0, "uniform": 0}}
    old = Provenance.from_manifest(
        {"data": "shortcut_digits", "split": "train", "data_options": {"spurious_p": "clean"}, "grid": [7, 7],
         "teacher": teacher}
    )
    assert old.data_identity.options["spurious_p"] == 0.0 and old.data_identity.options["num_train"] == 20000
    assert old.padding == "pad" and old.noise == {"blur": 1.0, "shift": 0.0, "uniform": 0.0} and old.grid == (7, 7)


def _folder(root, sizes=((12, 20), (16, 16), (20, 10))):
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sizes):
        d = root / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"im{k}.png")
    return root


def _uniform_backend(source, indices, options):
    out = []
    for i in indices:
        ex = source[i]
        h, w = ex["image"].shape[:2]
        out.append((ex["id"], TeacherEntry(np.full((2, 2), 0.25, np.float32), Geometry.full_image(h, w))))
    return out


def _data_cfg(spec):
    return ConfigDict(dict(source=spec, train_split="train", image_size=16, data_ratio=1.0, options=ConfigDict(),
                           augment=ConfigDict(dict(random_resized_crop=False, hflip=False)),
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))


def test_moved_folder_accepted_changed_image_caught_with_the_right_cause(tmp_path, monkeypatch):
    backend = dataclasses.replace(export.BACKENDS["oracle"], export=_uniform_backend)
    monkeypatch.setitem(export.BACKENDS, "uniform", backend)
    data = _folder(tmp_path / "data")
    src = get_source(f"imagefolder:{data}", "train")
    store = export_store(src, str(tmp_path / "store"), "uniform", shard_size=2, progress=False)
    for i in range(len(src)):  # fingerprints of the exported image files, in the index
        with open(src.path(i), "rb") as f:
            want = hashlib.blake2b(f.read(), digest_size=8).hexdigest()
        assert store.image_fingerprint(src.example_id(i)) == want
    # a generated source records none (its options identify it)
    digits = get_source("shortcut_digits", "train", {"num_train": 4, "canvas": 24})
    plain = export_store(digits, str(tmp_path / "digits"), grid=4, progress=False)
    assert plain.image_fingerprint(digits.example_id(0)) is None
    moved = tmp_path / "moved"
    shutil.move(str(data), str(moved))
    spec = f"imagefolder:{moved}/"  # moved, with a trailing slash
    teacher = ConfigDict(dict(store=str(tmp_path / "store"), allow_missing=False))
    assert build_teacher_lookup(teacher, spec, "train", source=get_source(spec, "train")) is not None
    it = make_train_iterator(_data_cfg(spec), teacher, global_batch_size=3, patch_size=8, seed=0)
    assert next(it)["teacher_mask"].tolist() == [1.0, 1.0, 1.0]
    # change one image's pixels (same size) after the export
    path = moved / "c1" / "im1.png"
    a = np.asarray(Image.open(path)).copy()
    a[0, 0] = 255 - a[0, 0]
    Image.fromarray(a).save(path)
    it = make_train_iterator(_data_cfg(spec), teacher, global_batch_size=3, patch_size=8, seed=0)
    changed = r"example 'c1/im1.png': the image changed after teacher store .* was exported"
    with pytest.raises(ValueError, match=changed):
        next(it)


def _config(**teacher):
    c = base_config()
    c.data.options = ConfigDict(dict(num_train=12, canvas=24))
    c.teacher.grid = 4
    for k, v in teacher.items():
        c.teacher[k] = v
    return c


def test_resolve_teacher(tmp_path):
    off = _config(auto="oracle")
    off.model.interaction_constraint = False
    choice = resolve_teacher(off, workdir=str(tmp_path / "w0"))
    assert choice == TeacherChoice(None, choice.reason) and not choice.active and "off" in choice.reason
    assert not os.path.exists(tmp_path / "w0")  # nothing built
    c = _config(store="/some/store")
    c.model.interaction_constraint = True
    assert resolve_teacher(c).store == "/some/store"
    c = _config()
    c.model.interaction_constraint = True
    with pytest.raises(ValueError, match="no teacher is configured"):
        resolve_teacher(c)
    # auto: built once in the run's workdir, then reused
    c = _config(auto="oracle")
    c.model.interaction_constraint = True
    with pytest.raises(ValueError, match="needs a directory"):
        resolve_teacher(c)
    first = resolve_teacher(c, workdir=str(tmp_path / "w"))
    assert first.built and first.store == str(tmp_path / "w" / "teacher" / "train") and first.auto == "oracle"
    store = TeacherStore(first.store)
    assert len(store) == 12 and store.provenance.grid == (4, 4) and store.provenance.teacher["seed"] == 0
    again = resolve_teacher(c, workdir=str(tmp_path / "w"))
    assert not again.built and again.store == first.store
    other = _config(auto="oracle", grid=5)
    other.model.interaction_constraint = True
    with pytest.raises(ValueError, match=r"grid: store has \[4, 4\], config.teacher.grid \[5, 5\]"):
        resolve_teacher(other, workdir=str(tmp_path / "w"))
    clean = _config(auto="oracle")
    clean.model.interaction_constraint = True
    clean.data.options.spurious_p = 0.0
    with pytest.raises(ValueError, match=r"data_options.spurious_p: store has 0.7, expected 0.0"):
        resolve_teacher(clean, workdir=str(tmp_path / "w"))
    noisy = _config(auto="oracle")
    noisy.model.interaction_constraint = True
    noisy.teacher.noise.blur = 1.0
    assert resolve_teacher(noisy, workdir=str(tmp_path / "n")).built
    noisy.seed = 3
    with pytest.raises(ValueError, match=r"noise seed: store has 0, config.seed 3"):
        resolve_teacher(noisy, workdir=str(tmp_path / "n"))
    # cache_root: one store per teacher_key, recorded beside it; not built when build=False
    shared = resolve_teacher(other, cache_root=str(tmp_path / "cache"), build=False)
    assert not shared.ready and not os.path.exists(shared.store)
    shared = resolve_teacher(other, cache_root=str(tmp_path / "cache"))
    assert shared.built and os.path.dirname(shared.store) == str(tmp_path / "cache")
    with open(os.path.join(shared.store, "key.json")) as f:
        assert json.load(f) == json.loads(json.dumps(teacher_key(other)))
    assert resolve_teacher(other, cache_root=str(tmp_path / "cache")).store == shared.store
