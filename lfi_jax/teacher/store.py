"""The teacher store: per-example teacher maps in ArrayRecord shards plus a JSON manifest.

Layout of a store directory (see docs/teacher.md):

  export.json                        what the store is being built from (written first; a
                                     re-export with a different one fails, naming the keys)
  shard-00000-of-00004.array_record  one record per example, in source order
  shard-00000-of-00004.json          the shard's ids, grid, counts and sha256 (written just
                                     before the shard is renamed into place)
  ...
  index.json                         the ids of every shard, in order (written by finalize)
  manifest.json                      written last, atomically: the store is complete

Records, digests and the content hash: lfi_jax/teacher/records.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_module

from lfi_jax.teacher.provenance import Provenance
from lfi_jax.teacher.provenance import check_compatible as _check_compatible
from lfi_jax.teacher.records import (
    atomic_write_json,
    check_map,
    content_hash,
    decode_record,
    describe,
    diff_keys,
    encode_record,
    read_json,
    record_digest,
    shard_name,
    to_json_value,
)
from lfi_jax.teacher.types import TeacherEntry

FORMAT = "lfi-teacher-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
EXPORT = "export.json"
DERIVED_KEYS = ("data_identity",)  # manifest keys computed from data, split and data_options
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access


# --------------------------------------------------------------------------- writer


def comparable(export: Mapping[str, Any]) -> dict[str, Any]:
    """An export record without the manifest keys derived from others (`DERIVED_KEYS`): what
    two exports must agree on, and what a shard's fingerprint covers (so a store written before
    such a key existed still resumes)."""
    out = dict(export)
    if isinstance(out.get("manifest"), Mapping):
        out["manifest"] = {k: v for k, v in out["manifest"].items() if k not in DERIVED_KEYS}
    return out


class StoreWriter:
    """Writes a store shard by shard (resumable, several processes may share one directory).

    `manifest` describes what the maps are (teacher provenance, data spec, split, ...); it is
    recorded in `export.json` when the directory is first used, and a writer opened later on
    the same directory with a different manifest, `num_examples` or `shard_size` fails with a
    ValueError naming every differing key (shards of two exports are never mixed).
    Shard i holds examples `shard_range(i)` of the source, in order.
    """

    def __init__(self, path: str, manifest: Mapping[str, Any], *, num_examples: int, shard_size: int = 1024):
        if int(num_examples) <= 0:
            raise ValueError(f"teacher store {path}: num_examples={num_examples} must be > 0")
        if int(shard_size) <= 0:
            raise ValueError(f"teacher store {path}: shard_size={shard_size} must be > 0")
        reserved = {"format", "format_version", "num_examples", "shard_size", "num_shards", "grid", "count",
                    "degenerate_count", "shards", "index", "content_hash"}
        clash = sorted(reserved & set(manifest))
        if clash:
            raise ValueError(f"teacher store {path}: manifest keys {clash} are reserved for the store itself")
        self.path = path
        self.num_examples = int(num_examples)
        self.shard_size = int(shard_size)
        self.num_shards = math.ceil(self.num_examples / self.shard_size)
        self.manifest = to_json_value(dict(manifest))
        self.export = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_examples": self.num_examples,
            "shard_size": self.shard_size,
            "num_shards": self.num_shards,
            "manifest": self.manifest,
        }
        self.fingerprint = hashlib.sha256(json.dumps(comparable(self.export), sort_keys=True).encode()).hexdigest()
        os.makedirs(path, exist_ok=True)
        self._check_existing()

    def _check_existing(self) -> None:
        export_file = os.path.join(self.path, EXPORT)
        if os.path.exists(export_file):
            old = read_json(export_file)
            diffs = diff_keys(comparable(old), comparable(self.export))
            if diffs:
                raise ValueError(
                    f"teacher store {self.path} was exported with other settings; refusing to mix them "
                    f"(use another --out or delete the store): {describe(diffs, 'store has', 'this export has')}"
                )
            return
        manifest_file = os.path.join(self.path, MANIFEST)
        if os.path.exists(manifest_file):  # a finalized store copied without export.json
            old = read_json(manifest_file)
            mine = {**self.manifest, "num_examples": self.num_examples, "shard_size": self.shard_size}
            mine = {k: v for k, v in mine.items() if k not in DERIVED_KEYS}
            diffs = diff_keys({k: old.get(k, "<absent>") for k in mine}, mine)
            if diffs:
                raise ValueError(
                    f"teacher store {self.path} holds another export; refusing to mix them: "
                    f"{describe(diffs, 'store has', 'this export has')}"
                )
        elif any(f.startswith("shard-") for f in os.listdir(self.path)):
            raise ValueError(
                f"teacher store {self.path} has shard files but no {EXPORT}: not a store this code "
                "can resume; use another --out or delete the directory"
            )
        atomic_write_json(export_file, self.export)

    # -- layout -----------------------------------------------------------------------------
    def shard_range(self, i: int) -> range:
        self._check_index(i)
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_examples))

    def _check_index(self, i: int) -> None:
        if not 0 <= int(i) < self.num_shards:
            raise IndexError(f"teacher store {self.path}: shard {i} out of range [0, {self.num_shards})")

    def shard_file(self, i: int) -> str:
        return os.path.join(self.path, shard_name(int(i), self.num_shards))

    def _info_file(self, i: int) -> str:
        return self.shard_file(i)[: -len(".array_record")] + ".json"

    def _shard_info(self, i: int) -> dict | None:
        if not (os.path.exists(self.shard_file(i)) and os.path.exists(self._info_file(i))):
            return None
        info = read_json(self._info_file(i))
        return info if info.get("fingerprint") == self.fingerprint else None

    def shard_done(self, i: int) -> bool:
        """Whether shard i is complete (written by an export with this same manifest)."""
        self._check_index(i)
        return self._shard_info(i) is not None

    def missing_shards(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_done(i)]

    # -- writing ----------------------------------------------------------------------------
    def write_shard(
        self, i: int, records: Sequence[tuple[str, TeacherEntry]], *, fingerprints: Sequence[str | None] | None = None
    ) -> None:
        """Write shard i atomically: validated, written to `<shard>.tmp`, then renamed.

        Records must be the examples of `shard_range(i)` (same count), with distinct ids, maps
        of one grid shape, finite, non-negative, summing to 1 (all zeros where degenerate).
        `fingerprints`: each example's image-file fingerprint (`content_fingerprint` of the
        source; kept in the index, not in the records, so the content hash depends on the maps
        only).
        """
        self._check_index(i)
        expected = len(self.shard_range(i))
        if len(records) != expected:
            raise ValueError(f"teacher store {self.path}: shard {i} needs {expected} records, got {len(records)}")
        if fingerprints is not None and len(fingerprints) != len(records):
            raise ValueError(
                f"teacher store {self.path}: shard {i}: {len(fingerprints)} fingerprints for "
                f"{len(records)} records"
            )
        grid, seen, blobs, degenerate = None, set(), [], 0
        for eid, entry in records:
            where = f"teacher store {self.path}: example {eid!r}"
            if not isinstance(eid, str) or not eid:
                raise ValueError(f"teacher store {self.path}: shard {i}: example id {eid!r} is not a non-empty string")
            if eid in seen:
                raise ValueError(f"{where}: duplicate id in shard {i}")
            seen.add(eid)
            m = np.asarray(entry.map)
            if m.dtype != np.float32:
                raise ValueError(f"{where}: map dtype {m.dtype}, expected float32")
            grid = grid or tuple(m.shape)
            check_map(m, entry.degenerate, grid, where)
            degenerate += bool(entry.degenerate)
            blobs.append(encode_record(eid, entry))
        final = self.shard_file(i)
        tmp = final + ".tmp"
        writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
        try:
            for b in blobs:
                writer.write(b)
        except BaseException:
            writer.close()
            os.unlink(tmp)
            raise
        writer.close()
        info = {
            "fingerprint": self.fingerprint,
            "shard": int(i),
            "file": os.path.basename(final),
            "count": len(blobs),
            "degenerate": degenerate,
            "grid": list(grid),
            "sha256": record_digest(blobs),
            "ids": [eid for eid, _ in records],
            "image_fingerprints": None if fingerprints is None else [f and str(f) for f in fingerprints],
        }
        atomic_write_json(self._info_file(i), info)
        os.replace(tmp, final)

    def finalize(self) -> dict:
        """Write index.json and manifest.json (atomically); returns the manifest.

        Refuses (ValueError naming them) while shards are missing, when shards disagree on
        the grid, or when an id occurs twice.
        """
        missing = self.missing_shards()
        if missing:
            names = [shard_name(i, self.num_shards) for i in missing]
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise ValueError(
                f"teacher store {self.path}: cannot finalize, {len(missing)} of {self.num_shards} "
                f"shards missing: {shown}"
            )
        infos = [self._shard_info(i) for i in range(self.num_shards)]
        grids = {tuple(s["grid"]) for s in infos}
        if len(grids) != 1:
            by = {tuple(s["grid"]): s["file"] for s in infos}
            raise ValueError(f"teacher store {self.path}: shards have different grids: {by}")
        first: dict[str, str] = {}
        for s in infos:
            for eid in s["ids"]:
                if eid in first:
                    raise ValueError(
                        f"teacher store {self.path}: example id {eid!r} in both {first[eid]} and "
                        f"{s['file']}"
                    )
                first[eid] = s["file"]
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, "shards": [s["ids"] for s in infos]}
        if all(s.get("image_fingerprints") for s in infos):
            index["image_fingerprints"] = [s["image_fingerprints"] for s in infos]
        atomic_write_json(os.path.join(self.path, INDEX), index)
        manifest = dict(self.manifest)
        manifest.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            grid=list(grids.pop()),
            count=sum(s["count"] for s in infos),
            degenerate_count=sum(s["degenerate"] for s in infos),
            num_examples=self.num_examples,
            shard_size=self.shard_size,
            num_shards=self.num_shards,
            shards=[{k: s[k] for k in ("file", "count", "degenerate", "sha256")} for s in infos],
            index=INDEX,
            content_hash=content_hash([s["sha256"] for s in infos]),
        )
        atomic_write_json(os.path.join(self.path, MANIFEST), manifest)
        return manifest


# --------------------------------------------------------------------------- reader


class TeacherStore:
    """Read access to a finalized store: `store[example_id] -> TeacherEntry`.

    The id index is loaded on open; shard readers open lazily. Picklable (readers are not
    pickled) and safe after fork (a child process opens its own readers).
    """

    def __init__(self, path: str):
        self.path = str(path)
        manifest_file = os.path.join(self.path, MANIFEST)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"teacher store not found: directory {self.path} does not exist")
        if not os.path.isfile(manifest_file):
            raise FileNotFoundError(
                f"teacher store {self.path}: {MANIFEST} not found (an unfinished export? re-run it to finish)"
            )
        m = read_json(manifest_file)
        if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_file}: format {m.get('format')!r} version {m.get('format_version')!r}, "
                f"this code reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        self.manifest: dict = m
        self.grid: tuple[int, int] = tuple(int(g) for g in m["grid"])
        index_file = os.path.join(self.path, m.get("index", INDEX))
        if not os.path.isfile(index_file):
            raise FileNotFoundError(f"teacher store {self.path}: index file {index_file} not found")
        index = read_json(index_file)
        shard_ids = index["shards"]
        shards = m["shards"]
        if len(shard_ids) != len(shards):
            raise ValueError(
                f"teacher store {self.path}: {index_file} lists {len(shard_ids)} shards, the manifest "
                f"{len(shards)}"
            )
        missing = [s["file"] for s in shards if not os.path.isfile(os.path.join(self.path, s["file"]))]
        if missing:
            raise FileNotFoundError(f"teacher store {self.path}: shard files missing: {', '.join(missing)}")
        self._files = [os.path.join(self.path, s["file"]) for s in shards]
        self._ids: list[str] = []
        self._index: dict[str, tuple[int, int]] = {}
        for k, ids in enumerate(shard_ids):
            if len(ids) != shards[k]["count"]:
                raise ValueError(
                    f"teacher store {self.path}: {shards[k]['file']}: index has {len(ids)} ids, "
                    f"manifest count {shards[k]['count']}"
                )
            for pos, eid in enumerate(ids):
                self._index[eid] = (k, pos)
            self._ids.extend(ids)
        if len(self._index) != len(self._ids):
            raise ValueError(f"teacher store {self.path}: the index lists some example id twice")
        fps = index.get("image_fingerprints")
        self._fingerprints: dict[str, str | None] = {}
        if isinstance(fps, list) and [len(f or ()) for f in fps] == [len(ids) for ids in shard_ids]:
            self._fingerprints = dict(zip(self._ids, (f for shard in fps for f in shard)))
        self._init_readers()

    def _init_readers(self) -> None:
        self._readers: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        for k in ("_readers", "_lock", "_pid"):
            d.pop(k, None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._init_readers()

    def _reader(self, k: int):
        if self._pid != os.getpid():  # forked: never share the parent's file handles
            self._init_readers()
        r = self._readers.get(k)
        if r is None:
            r = self._readers[k] = array_record_module.ArrayRecordReader(self._files[k], _READER_OPTIONS)
        return r

    def close(self) -> None:
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers = {}

    # -- mapping ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._index

    def ids(self) -> list[str]:
        return list(self._ids)

    def get(self, example_id: str, default: Any = None) -> TeacherEntry | Any:
        return self[example_id] if example_id in self._index else default

    def __getitem__(self, example_id: str) -> TeacherEntry:
        loc = self._index.get(example_id)
        if loc is None:
            raise KeyError(f"example id {example_id!r} not in teacher store {self.path}")
        k, pos = loc
        with self._lock:
            data = self._reader(k).read([pos])[0]
        where = f"teacher store {self.path}: example {example_id!r}"
        eid, entry = decode_record(data, where)
        if eid != example_id:
            raise ValueError(f"{where}: record at {os.path.basename(self._files[k])}[{pos}] holds id {eid!r}")
        check_map(entry.map, entry.degenerate, self.grid, where)
        return entry

    def __iter__(self):
        return iter(self._ids)

    def image_fingerprint(self, example_id: str) -> str | None:
        """The content fingerprint of the image file the map of `example_id` was exported from
        (None for a generated source, a store written before fingerprints, or an unknown id)."""
        return self._fingerprints.get(example_id)

    @property
    def provenance(self) -> Provenance:
        """A typed view of the manifest: teacher model, prompt, layers, grid, padding, data
        name/split/options and identity, counts and content hash."""
        return Provenance.from_manifest(self.manifest)

    def __repr__(self) -> str:
        return f"TeacherStore({self.path!r}, n={len(self)}, grid={self.grid})"

    # -- checks -----------------------------------------------------------------------------
    def check_compatible(self, data: str, split: str, **expected: Any) -> None:
        """ValueError naming each mismatch (with both sides) unless the store was built from
        the data `data`/`split` identifies (kind, name, split; not its path) and has
        `manifest[key] == value` for each keyword (JSON data, so tuples equal lists). Options:
        `lfi_jax.teacher.provenance.check_compatible`."""
        _check_compatible(self, spec=data, split=split, **expected)

    def verify(self) -> None:
        """Re-read every shard and check its digest and the content hash against the manifest."""
        digests = []
        for k, s in enumerate(self.manifest["shards"]):
            r = array_record_module.ArrayRecordReader(self._files[k])
            try:
                d = record_digest(r.read_all())
            finally:
                r.close()
            if d != s["sha256"]:
                raise ValueError(f"teacher store {self.path}: {s['file']} does not match its sha256 in the manifest")
            digests.append(d)
        if content_hash(digests) != self.manifest["content_hash"]:
            raise ValueError(f"teacher store {self.path}: content hash does not match the manifest")


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "StoreWriter",
    "TeacherStore",
    "atomic_write_json",
    "check_map",
    "decode_record",
    "encode_record",
    "to_json_value",
]
