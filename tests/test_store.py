"""TeacherStore / StoreWriter: round trip, atomicity, resume, manifest checks, validation."""

import hashlib
import json
import os
import pickle
import struct

import numpy as np
import pytest
from array_record.python import array_record_module

from lfi_jax.teacher import store as store_mod
from lfi_jax.teacher.store import StoreWriter, TeacherStore, encode_record
from lfi_jax.teacher.types import Geometry, TeacherEntry

GRID = (3, 4)
MANIFEST = {"backend": "test", "teacher": {"name": "t", "grid": list(GRID)}, "data": "fake", "split": "train"}


def _entry(rng, i, degenerate=False):
    if degenerate:
        m = np.zeros(GRID, np.float32)
    else:
        m = rng.random(GRID).astype(np.float32)
        m /= m.sum()
    geom = Geometry.full_image(10 + i, 12) if i % 2 else Geometry.pad_to_square(10 + i, 12)
    meta = {"i": i, "words": f"w{i}", "nested": {"x": [1.5, i]}} if i % 3 else {}
    return TeacherEntry(m, geom, degenerate, meta)


def _records(n, seed=0, degenerate=(3,)):
    rng = np.random.default_rng(seed)
    return [(f"ex/{i:03d}", _entry(rng, i, i in degenerate)) for i in range(n)]


def _build(path, records, shard_size=3, manifest=MANIFEST):
    w = StoreWriter(str(path), manifest, num_examples=len(records), shard_size=shard_size)
    for i in range(w.num_shards):
        w.write_shard(i, [records[j] for j in w.shard_range(i)])
    return w, w.finalize()


def test_round_trip_bitwise(tmp_path):
    records = _records(8)
    records[5][1].map[0, 0] = np.float32(np.nextafter(records[5][1].map[0, 0], 1, dtype=np.float32))  # odd ulp
    w, man = _build(tmp_path, records)
    assert w.num_shards == 3 and [len(w.shard_range(i)) for i in range(3)] == [3, 3, 2]
    s = TeacherStore(str(tmp_path))
    assert len(s) == 8 and s.grid == GRID and s.ids() == [r[0] for r in records]
    assert man["count"] == 8 and man["degenerate_count"] == 1 and man["grid"] == list(GRID)
    assert man["teacher"] == MANIFEST["teacher"] and man["data"] == "fake" and len(man["shards"]) == 3
    for eid, e in reversed(records):  # out of order: random access
        got = s[eid]
        assert got.map.dtype == np.float32 and got.map.tobytes() == e.map.tobytes()
        assert got.geometry == e.geometry and got.degenerate == e.degenerate and got.meta == e.meta
    assert "ex/000" in s and "nope" not in s and s.get("nope") is None
    with pytest.raises(KeyError, match=r"nope.*" + str(tmp_path)):
        s["nope"]
    s.verify()


def test_pickle_and_reopen(tmp_path):
    records = _records(5)
    _build(tmp_path, records)
    s = TeacherStore(str(tmp_path))
    s["ex/001"]  # opens a reader
    s2 = pickle.loads(pickle.dumps(s))
    assert s2["ex/004"].map.tobytes() == records[4][1].map.tobytes()
    s._pid = -1  # as after a fork: the reader is reopened, not shared
    assert s["ex/002"].map.tobytes() == records[2][1].map.tobytes()


def test_missing_store_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        TeacherStore(str(tmp_path / "none"))
    w = StoreWriter(str(tmp_path / "s"), MANIFEST, num_examples=2, shard_size=2)
    w.write_shard(0, _records(2))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TeacherStore(str(tmp_path / "s"))


def test_crash_in_write_shard_leaves_no_shard(tmp_path, monkeypatch):
    records = _records(6)
    w = StoreWriter(str(tmp_path), MANIFEST, num_examples=6, shard_size=3)
    real = array_record_module.ArrayRecordWriter

    class Crashing:
        def __init__(self, *a, **k):
            self._w = real(*a, **k)
            self.n = 0

        def write(self, b):
            if self.n == 1:
                raise KeyboardInterrupt("killed")  # in the middle of the shard
            self.n += 1
            self._w.write(b)

        def close(self):
            self._w.close()

    monkeypatch.setattr(store_mod.array_record_module, "ArrayRecordWriter", Crashing)
    with pytest.raises(KeyboardInterrupt):
        w.write_shard(0, records[:3])
    assert not w.shard_done(0)
    assert not any(f.startswith("shard-00000") for f in os.listdir(tmp_path)), os.listdir(tmp_path)
    monkeypatch.setattr(store_mod.array_record_module, "ArrayRecordWriter", real)
    # a stale tmp from a hard kill is overwritten, never read
    with open(w.shard_file(0) + ".tmp", "wb") as f:
        f.write(b"partial garbage")
    w2 = StoreWriter(str(tmp_path), MANIFEST, num_examples=6, shard_size=3)
    assert w2.missing_shards() == [0, 1]
    w2.write_shard(0, records[:3])
    w2.write_shard(1, records[3:])
    w2.finalize()
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))
    assert TeacherStore(str(tmp_path))["ex/001"].map.tobytes() == records[1][1].map.tobytes()


def test_resume_and_finalize_refuses_missing(tmp_path):
    records = _records(7)
    w = StoreWriter(str(tmp_path), MANIFEST, num_examples=7, shard_size=2)
    assert w.num_shards == 4
    w.write_shard(0, records[0:2])
    w.write_shard(2, records[4:6])
    missing = r"2 of 4 shards missing: shard-00001-of-00004.array_record, shard-00003-of-00004"
    with pytest.raises(ValueError, match=missing):
        w.finalize()
    w2 = StoreWriter(str(tmp_path), dict(MANIFEST), num_examples=7, shard_size=2)
    assert [w2.shard_done(i) for i in range(4)] == [True, False, True, False]
    w2.write_shard(1, records[2:4])
    w2.write_shard(3, records[6:7])
    assert w2.finalize()["count"] == 7


def test_write_shard_checks_count_and_ids(tmp_path):
    w = StoreWriter(str(tmp_path), MANIFEST, num_examples=4, shard_size=2)
    r = _records(4)
    with pytest.raises(ValueError, match="shard 1 needs 2 records, got 1"):
        w.write_shard(1, r[2:3])
    with pytest.raises(ValueError, match="ex/002.*duplicate"):
        w.write_shard(1, [r[2], r[2]])


def test_content_hash(tmp_path):
    records = _records(5)
    _, m1 = _build(tmp_path / "a", records)
    _, m2 = _build(tmp_path / "b", _records(5))
    assert m1["content_hash"] == m2["content_hash"]  # deterministic
    # independent recomputation from the shard files
    digests = []
    for s in m1["shards"]:
        r = array_record_module.ArrayRecordReader(str(tmp_path / "a" / s["file"]))
        h = hashlib.sha256()
        for rec in r.read_all():
            h.update(struct.pack("<Q", len(rec)) + rec)
        r.close()
        digests.append(h.digest())
    assert hashlib.sha256(b"".join(digests)).hexdigest() == m1["content_hash"]
    changed = _records(5)
    m = changed[4][1].map
    m[1, 1] = np.nextafter(m[1, 1], np.float32(1), dtype=np.float32)  # one ulp
    _, m3 = _build(tmp_path / "c", changed)
    assert m3["content_hash"] != m1["content_hash"]
    meta_changed = _records(5)
    meta_changed[0][1].meta["note"] = "x"
    _, m4 = _build(tmp_path / "d", meta_changed)
    assert m4["content_hash"] != m1["content_hash"]


def test_verify_detects_tampering(tmp_path):
    records = _records(4)
    _, man = _build(tmp_path, records, shard_size=2)
    f = str(tmp_path / man["shards"][1]["file"])
    bad = list(records[2:4])
    bad[0] = (bad[0][0], TeacherEntry(bad[0][1].map[::-1].copy(), bad[0][1].geometry, False, {}))
    _rewrite(f, bad)
    with pytest.raises(ValueError, match="shard-00001-of-00002.*sha256"):
        TeacherStore(str(tmp_path)).verify()


def test_reexport_with_other_manifest_fails(tmp_path):
    _build(tmp_path, _records(4))
    other = {**MANIFEST, "teacher": {"name": "t", "grid": [5, 5]}}
    with pytest.raises(ValueError, match=r"manifest\.teacher\.grid: store has \[3, 4\], this export has \[5, 5\]"):
        StoreWriter(str(tmp_path), other, num_examples=4, shard_size=3)
    with pytest.raises(ValueError, match=r"manifest\.split"):
        StoreWriter(str(tmp_path), {**MANIFEST, "split": "val"}, num_examples=4, shard_size=3)
    with pytest.raises(ValueError, match=r"shard_size: store has 3, this export has 2"):
        StoreWriter(str(tmp_path), MANIFEST, num_examples=4, shard_size=2)
    # a finalized store copied without export.json is still protected
    os.unlink(tmp_path / "export.json")
    with pytest.raises(ValueError, match=r"holds another export.*teacher\.grid: store has \[3, 4\]"):
        StoreWriter(str(tmp_path), other, num_examples=4, shard_size=3)


def test_check_compatible_names_keys(tmp_path):
    _build(tmp_path, _records(4))
    s = TeacherStore(str(tmp_path))
    s.check_compatible("fake", "train")
    s.check_compatible("fake", "train", grid=GRID, backend="test")
    with pytest.raises(ValueError) as e:
        s.check_compatible("imagefolder:/x", "val", grid=(7, 7))
    msg = str(e.value)
    assert str(tmp_path) in msg
    for part in ('data: store has "fake", expected "imagefolder:/x"', 'split: store has "train", expected "val"',
                 "grid: store has [3, 4], expected [7, 7]"):
        assert part in msg, msg
    with pytest.raises(ValueError, match='backend: store has "test", expected "oracle"'):
        s.check_compatible("fake", "train", backend="oracle")


def _rewrite(shard_file, records):
    """Low-level: write records into a shard file, bypassing the writer's checks."""
    w = array_record_module.ArrayRecordWriter(shard_file, "group_size:1")
    for eid, e in records:
        w.write(encode_record(eid, e))
    w.close()


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (lambda m: np.where(np.arange(m.size).reshape(m.shape) == 5, np.nan, m), "non-finite"),
        (lambda m: np.where(np.arange(m.size).reshape(m.shape) == 0, -0.25, m + 0.25 / (m.size - 1)), "negative"),
        (lambda m: np.full((4, 3), 1 / 12), r"shape \(4, 3\).*\(3, 4\)"),
        (lambda m: m * 2, "sums to 2"),
    ],
)
def test_bad_maps_raise_on_read(tmp_path, bad, pattern):
    records = _records(4, degenerate=())
    _, man = _build(tmp_path, records, shard_size=2)
    eid, e = records[3]
    broken = TeacherEntry(bad(e.map).astype(np.float32), e.geometry, False, e.meta)
    _rewrite(str(tmp_path / man["shards"][1]["file"]), [records[2], (eid, broken)])
    s = TeacherStore(str(tmp_path))
    assert s["ex/002"].map.tobytes() == records[2][1].map.tobytes()  # the good neighbour still reads
    with pytest.raises(ValueError, match=pattern) as err:
        s[eid]
    assert eid in str(err.value) and str(tmp_path) in str(err.value)


def test_degenerate_must_be_zero_on_read(tmp_path):
    records = _records(2, degenerate=(1,))
    _, man = _build(tmp_path, records, shard_size=2)
    eid, e = records[1]
    flagged = TeacherEntry(records[0][1].map, e.geometry, True, {})
    _rewrite(str(tmp_path / man["shards"][0]["file"]), [records[0], (eid, flagged)])
    with pytest.raises(ValueError, match=f"{eid}.*degenerate map must be all zeros"):
        TeacherStore(str(tmp_path))[eid]


def test_writer_rejects_bad_maps(tmp_path):
    w = StoreWriter(str(tmp_path), MANIFEST, num_examples=2, shard_size=2)
    r = _records(2, degenerate=())
    nan = np.full(GRID, np.nan, np.float32)
    with pytest.raises(ValueError, match="ex/001.*non-finite"):
        w.write_shard(0, [r[0], ("ex/001", TeacherEntry(nan, r[1][1].geometry))])
    with pytest.raises(ValueError, match=r"ex/001.*shape \(2, 2\)"):
        w.write_shard(0, [r[0], ("ex/001", TeacherEntry(np.full((2, 2), 0.25, np.float32), r[1][1].geometry))])
    with pytest.raises(ValueError, match="ex/001.*float32"):
        w.write_shard(0, [r[0], ("ex/001", TeacherEntry(r[1][1].map.astype(np.float64), r[1][1].geometry))])
    with pytest.raises(ValueError, match="ex/001.*JSON"):
        w.write_shard(0, [r[0], ("ex/001", TeacherEntry(r[1][1].map, r[1][1].geometry, False, {"f": object()}))])
    assert not w.shard_done(0) and not os.path.exists(w.shard_file(0) + ".tmp")


def test_manifest_files_are_json_and_complete(tmp_path):
    _build(tmp_path, _records(4))
    with open(tmp_path / "manifest.json") as f:
        man = json.load(f)
    with open(tmp_path / "index.json") as f:
        index = json.load(f)
    assert [len(ids) for ids in index["shards"]] == [s["count"] for s in man["shards"]]
    assert man["format"] == "lfi-teacher-store" and man["format_version"] == 1
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["export.json", "index.json", "manifest.json"]
        + [f"shard-0000{i}-of-00002.{ext}" for i in range(2) for ext in ("array_record", "json")]
    )
