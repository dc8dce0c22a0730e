import numpy as np
import pytest
from ml_collections import ConfigDict

from lfi_jax.data.pipeline import build_teacher_lookup, make_eval_iterator, make_train_iterator
from lfi_jax.data.sources import get_source
from lfi_jax.data.transforms import area_pool
from lfi_jax.teacher.types import Geometry, TeacherEntry

N_TRAIN, N_TEST, PATCH = 64, 37, 6


class FakeStore:
    """In-memory stand-in with the TeacherStore interface used by the pipeline."""

    def __init__(self, entries, data="shortcut_digits", split="train", grid=(7, 7), data_options=None):
        self.entries = dict(entries)
        self.grid = tuple(grid)
        self.manifest = {"data": data, "split": split, "grid": list(grid), "data_options": dict(data_options or {})}
        self.path = "<memory>"

    def __getitem__(self, example_id):
        if example_id not in self.entries:
            raise KeyError(f"example id {example_id!r} not in teacher store {self.path}")
        return self.entries[example_id]

    def __contains__(self, example_id):
        return example_id in self.entries

    def __len__(self):
        return len(self.entries)

    def ids(self):
        return list(self.entries)

    def check_compatible(self, data, split):
        bad = [k for k, v in (("data", data), ("split", split)) if self.manifest[k] != v]
        if bad:
            raise ValueError(f"teacher store {self.path} does not fit: {', '.join(bad)}")


def _oracle_store(split="train", n=N_TRAIN, grid=(7, 7), drop=()):
    src = get_source("shortcut_digits", split, {"num_train": n, "num_test": n})
    entries = {}
    for i in range(len(src)):
        ex = src[i]
        if ex["id"] in drop:
            continue
        entries[ex["id"]] = TeacherEntry(area_pool(ex["mask"], grid), Geometry.full_image(*ex["mask"].shape))
    return FakeStore(entries, split=split, grid=grid, data_options={"num_train": n, "num_test": n})


def _cfg(**data_overrides):
    data = ConfigDict(
        dict(
            source="shortcut_digits",
            train_split="train",
            eval_splits=("test_iid", "test_shifted"),
            image_size=48,
            data_ratio=1.0,
            options=ConfigDict(dict(num_train=N_TRAIN, num_test=N_TEST)),
            augment=ConfigDict(
                dict(random_resized_crop=True, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 4 / 3), hflip=True)
            ),
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            num_workers=0,
        )
    )
    data.update(data_overrides)
    teacher = ConfigDict(dict(store="", allow_missing=False))
    return data, teacher


def _train(store=None, *, batch=16, seed=0, process_index=0, process_count=1, **data_overrides):
    data, teacher = _cfg(**data_overrides)
    return make_train_iterator(
        data,
        teacher,
        global_batch_size=batch,
        patch_size=PATCH,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        store=store,
        return_index=True,
    )


def test_train_batches_shapes_and_teacher():
    store = _oracle_store()
    it = _train(store)
    b = next(it)
    assert b["image"].shape == (16, 48, 48, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (16,) and b["label"].dtype == np.int32
    assert b["teacher"].shape == (16, 64) and b["teacher_mask"].shape == (16,)
    assert set(b) == {"image", "label", "teacher", "teacher_mask", "index"}
    assert -1.0 - 1e-6 <= b["image"].min() and b["image"].max() <= 1.0 + 1e-6  # (x - 0.5) / 0.5
    src = get_source("shortcut_digits", "train", {"num_train": N_TRAIN})
    np.testing.assert_array_equal(b["label"], src.labels()[b["index"]])
    ok = b["teacher_mask"] == 1
    assert ok.sum() >= 12
    np.testing.assert_allclose(b["teacher"][ok].sum(1), 1.0, atol=1e-5)
    assert not b["teacher"][~ok].any()


def test_no_teacher_keeps_the_keys():
    b = next(_train(None))
    assert b["teacher"].shape == (16, 64) and not b["teacher"].any() and not b["teacher_mask"].any()


def test_epochs_cover_everything_and_reshuffle():
    it = _train(None, batch=16)
    epochs = [np.concatenate([next(it)["index"] for _ in range(N_TRAIN // 16)]) for _ in range(2)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(N_TRAIN))
    assert not np.array_equal(epochs[0], epochs[1])
    # a different seed, a different order
    other = _train(None, batch=16, seed=1)
    assert not np.array_equal(next(other)["index"], epochs[0][:16])


def test_state_round_trip_gives_identical_batches():
    store = _oracle_store()
    it = _train(store)
    for _ in range(5):  # crosses into the second epoch (4 batches per epoch)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = _train(store)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_process_shards_are_disjoint_cover_and_match_single_process():
    single = _train(None, batch=16)
    shards = [_train(None, batch=16, process_index=p, process_count=2) for p in range(2)]
    for _ in range(6):
        g = next(single)
        parts = [next(s) for s in shards]
        assert all(len(p["index"]) == 8 for p in parts)
        a, b = (set(p["index"].tolist()) for p in parts)
        assert not a & b
        assert a | b == set(g["index"].tolist())
        # the same example in the same epoch gets the same augmentation on any topology
        for p in parts:
            for j, idx in enumerate(p["index"]):
                k = int(np.flatnonzero(g["index"] == idx)[0])
                np.testing.assert_array_equal(p["image"][j], g["image"][k])


def test_global_batch_must_divide_over_processes():
    with pytest.raises(ValueError, match="config.batch_size=15"):
        _train(None, batch=15, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="image_size=50"):
        _train(None, image_size=50)


def test_missing_teacher_entry_is_an_error_naming_the_id_or_masked():
    missing = "shortcut_digits/train/5"
    store = _oracle_store(drop={missing})
    data, teacher = _cfg()
    with pytest.raises(KeyError, match=missing):
        make_train_iterator(data, teacher, global_batch_size=16, patch_size=PATCH, seed=0, store=store)
    teacher.allow_missing = True
    it = make_train_iterator(
        data, teacher, global_batch_size=16, patch_size=PATCH, seed=0, store=store, return_index=True
    )
    seen = False
    for _ in range(N_TRAIN // 16):
        b = next(it)
        for j, idx in enumerate(b["index"]):
            if idx == 5:
                seen = True
                assert b["teacher_mask"][j] == 0 and not b["teacher"][j].any()
            else:
                assert b["teacher_mask"][j] == 1 or b["teacher"][j].sum() == 0
    assert seen
    # the per-example lookup names the id too (a store that loses entries after the check)
    cfg = ConfigDict(dict(store="", allow_missing=False))
    lookup = build_teacher_lookup(cfg, "shortcut_digits", "train", store=store)
    with pytest.raises(KeyError, match=missing):
        lookup.get(missing)


def test_store_for_another_source_or_split_is_refused():
    store = _oracle_store()
    data, teacher = _cfg(train_split="test_iid")
    with pytest.raises(ValueError, match="split"):
        make_train_iterator(data, teacher, global_batch_size=16, patch_size=PATCH, seed=0, store=store)


def test_teacher_for_another_image_size_is_refused_naming_the_id():
    store = _oracle_store()
    # a store whose manifest says canvas 40 but whose maps are for 48x48 images (no fingerprints):
    # the per-example geometry check names the example
    store.manifest["data_options"]["canvas"] = 40
    data, teacher = _cfg(options=ConfigDict(dict(num_train=N_TRAIN, canvas=40)))
    it = make_train_iterator(data, teacher, global_batch_size=16, patch_size=PATCH, seed=0, store=store)
    with pytest.raises(ValueError, match=r"shortcut_digits/train/\d+.*\(48, 48\)"):
        next(it)


def test_eval_covers_every_example_once_with_padding():
    data, teacher = _cfg()
    n_batches = -(-N_TEST // 16)
    per_process = []
    for p in range(2):
        ev = make_eval_iterator(
            data, teacher, "test_shifted", global_batch_size=16, patch_size=PATCH, process_index=p, process_count=2,
            return_index=True,
        )
        batches = list(ev)
        assert len(batches) == n_batches
        assert all(b["image"].shape == (8, 48, 48, 3) for b in batches)
        assert set(batches[0]) == {"image", "label", "teacher", "teacher_mask", "valid", "index"}
        per_process.append(batches)
        assert len(list(ev)) == n_batches  # re-iterable: a fresh pass
    idx = np.concatenate([b["index"][b["valid"] == 1] for bs in per_process for b in bs])
    np.testing.assert_array_equal(np.sort(idx), np.arange(N_TEST))
    pad = np.concatenate([b["index"][b["valid"] == 0] for bs in per_process for b in bs])
    assert len(pad) == n_batches * 16 - N_TEST and (pad == -1).all()
    # eval is deterministic (no augmentation) and matches a plain resize of the source image
    src = get_source("shortcut_digits", "test_shifted", {"num_test": N_TEST})
    b = per_process[0][0]
    np.testing.assert_allclose(b["image"][0], (src[int(b["index"][0])]["image"] / 255.0 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_array_equal(b["label"], src.labels()[b["index"]])


def test_eval_ignores_the_train_data_ratio():
    data, teacher = _cfg(data_ratio=0.25)
    ev = make_eval_iterator(data, teacher, "test_iid", global_batch_size=64, patch_size=PATCH)
    assert sum(int(b["valid"].sum()) for b in ev) == N_TEST
    n_sub = len(get_source("shortcut_digits", "train", {"num_train": N_TRAIN, "data_ratio": 0.25}))
    assert 16 <= n_sub < 26  # ceil(25 % of each class)
    it = _train(None, batch=16, data_ratio=0.25)
    idx = np.concatenate([next(it)["index"] for _ in range(n_sub)])  # 16 whole epochs
    np.testing.assert_array_equal(np.bincount(idx), np.full(n_sub, 16))


def test_with_the_real_store(tmp_path):
    store_mod = pytest.importorskip("lfi_jax.teacher.store")
    fake = _oracle_store(n=32, grid=(5, 5))
    manifest = {"data": "shortcut_digits", "split": "train"}
    writer = store_mod.StoreWriter(str(tmp_path / "s"), manifest, num_examples=32, shard_size=16)
    ids = [f"shortcut_digits/train/{i}" for i in range(32)]
    for k in range(2):
        writer.write_shard(k, [(eid, fake[eid]) for eid in ids[16 * k : 16 * (k + 1)]])
    writer.finalize()
    data, teacher = _cfg(options=ConfigDict(dict(num_train=32)))
    teacher.store = str(tmp_path / "s")
    it = make_train_iterator(data, teacher, global_batch_size=8, patch_size=PATCH, seed=0, return_index=True)
    b = next(it)
    ref = _train(fake, batch=8, options=ConfigDict(dict(num_train=32)))
    want = next(ref)
    np.testing.assert_array_equal(b["index"], want["index"])
    np.testing.assert_allclose(b["teacher"], want["teacher"], atol=1e-6)


@pytest.mark.slow
def test_worker_processes_give_the_same_stream():
    # Batches are formed before the worker split, so num_workers changes speed, not data;
    # a restored multi-worker iterator continues exactly (its state is worker-specific).
    store = _oracle_store()
    plain = _train(store)
    workers = _train(store, num_workers=2)
    try:
        for _ in range(4):
            want, got = next(plain), next(workers)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        state = workers.get_state()
        restored = _train(store, num_workers=2)
        try:
            restored.set_state(state)
            np.testing.assert_array_equal(next(restored)["index"], next(plain)["index"])
        finally:
            restored.close()
    finally:
        workers.close()


def test_lower_thread_priority_applies_to_the_calling_thread_only():
    import os
    import sys
    import threading

    from lfi_jax.data.priority import lower_thread_priority

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are a Linux behaviour")

    def nice_of(tid: int) -> int:  # field 19 of /proc/<pid>/task/<tid>/stat, read independently
        with open(f"/proc/{os.getpid()}/task/{tid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[16])

    main_before = nice_of(threading.get_native_id())
    seen = {}

    def worker():
        tid = threading.get_native_id()
        before = nice_of(tid)
        lower_thread_priority(3)
        lower_thread_priority(3)  # once per thread: the second call does nothing
        seen["delta"] = nice_of(tid) - before
        seen["before"] = before

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["delta"] == min(3, 19 - seen["before"])
    assert nice_of(threading.get_native_id()) == main_before
