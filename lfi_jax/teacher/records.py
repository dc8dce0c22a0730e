"""Low-level pieces of the teacher store: JSON helpers, map checks and the record codec.

A record (format version 1) is `MAGIC | u8 version | u32 header length | JSON header | map`,
little-endian, where the header holds id, shape, geometry, degenerate and meta, and the map is
the raw float32 bytes (C order), so maps round-trip bit for bit. A shard's digest is sha256
over its records, each prefixed by its length as a little-endian u64; the content hash is
sha256 over the shards' digests in shard order.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lfi_jax.fileio import write_json_atomic
from lfi_jax.teacher.types import Geometry, TeacherEntry

SUM_TOLERANCE = 1e-3  # |sum(map) - 1| allowed for a non-degenerate map
RECORD_MAGIC = b"LFTM"
RECORD_VERSION = 1
_HEAD = struct.Struct("<4sBI")


# --------------------------------------------------------------------------- helpers


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def to_json_value(x: Any) -> Any:
    """`x` as plain JSON data (tuples -> lists, numpy scalars/arrays -> Python)."""
    return json.loads(json.dumps(x, default=_json_default))


def atomic_write_json(path: str, obj: Any) -> None:
    """The store's JSON files: `lfi_jax.fileio.write_json_atomic` with sorted keys, numpy
    values as plain JSON, fsynced before the rename."""
    write_json_atomic(path, obj, fsync=True, sort_keys=True, default=_json_default)


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a value, b value) for every leaf where JSON data `a` and `b` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append((key, a.get(k, "<absent>"), b.get(k, "<absent>")))
            else:
                out.extend(diff_keys(a[k], b[k], key))
        return out
    return [] if a == b else [(prefix or "<root>", a, b)]


def describe(diffs: Sequence[tuple[str, Any, Any]], left: str, right: str) -> str:
    def short(v):
        s = json.dumps(v, default=str)
        return s if len(s) <= 120 else s[:117] + "..."

    return "; ".join(f"{k}: {left} {short(x)}, {right} {short(y)}" for k, x, y in diffs)


def check_map(m: np.ndarray, degenerate: bool, grid: tuple[int, int] | None, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `m` is a valid teacher map."""
    if m.ndim != 2 or (grid is not None and tuple(m.shape) != tuple(grid)):
        want = tuple(grid) if grid else "[gh, gw]"
        raise ValueError(f"{where}: map shape {tuple(m.shape)}, expected the store grid {want}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{where}: map has {int(np.sum(~np.isfinite(m)))} non-finite values (NaN/inf)")
    if np.any(m < 0):
        raise ValueError(f"{where}: map has {int(np.sum(m < 0))} negative values (min {float(m.min())})")
    total = float(np.sum(m, dtype=np.float64))
    if degenerate:
        if total != 0.0:
            raise ValueError(f"{where}: degenerate map must be all zeros, sums to {total:.6g}")
    elif abs(total - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"{where}: map sums to {total:.6g}, expected 1 (L1-normalised) for a non-degenerate map")


# --------------------------------------------------------------------------- records


def encode_record(example_id: str, entry: TeacherEntry) -> bytes:
    """One example as record bytes (no validation of the map: see `StoreWriter.write_shard`)."""
    m = np.asarray(entry.map)
    header = {
        "id": str(example_id),
        "shape": [int(s) for s in m.shape],
        "dtype": "<f4",
        "geometry": entry.geometry.to_json(),
        "degenerate": bool(entry.degenerate),
        "meta": entry.meta or {},
    }
    try:
        hb = json.dumps(header, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"example {example_id!r}: meta/geometry is not JSON serialisable: {e}") from None
    return _HEAD.pack(RECORD_MAGIC, RECORD_VERSION, len(hb)) + hb + np.ascontiguousarray(m, dtype="<f4").tobytes()


def decode_record(data: bytes, where: str = "record") -> tuple[str, TeacherEntry]:
    """Record bytes -> (id, TeacherEntry) (map as a writable float32 array)."""
    if len(data) < _HEAD.size:
        raise ValueError(f"{where}: truncated record ({len(data)} bytes)")
    magic, version, n = _HEAD.unpack_from(data)
    if magic != RECORD_MAGIC:
        raise ValueError(f"{where}: not a teacher record (magic {magic!r})")
    if version != RECORD_VERSION:
        raise ValueError(f"{where}: record format version {version}, this code reads {RECORD_VERSION}")
    try:
        header = json.loads(data[_HEAD.size : _HEAD.size + n])
        shape = tuple(int(s) for s in header["shape"])
        body = data[_HEAD.size + n :]
        if len(body) != 4 * math.prod(shape):
            raise ValueError(f"map has {len(body)} bytes, shape {shape} needs {4 * math.prod(shape)}")
        m = np.frombuffer(body, dtype="<f4").reshape(shape).astype(np.float32)
        geometry = Geometry.from_json(header["geometry"])
        entry = TeacherEntry(m, geometry, bool(header["degenerate"]), dict(header["meta"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: corrupt record: {type(e).__name__}: {e}") from None
    return str(header["id"]), entry


def record_digest(records: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(struct.pack("<Q", len(r)))
        h.update(r)
    return h.hexdigest()


def content_hash(shard_digests: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in shard_digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.array_record"
