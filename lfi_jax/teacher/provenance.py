"""What a teacher store was built from, and whether it fits a data source.

A store fits a run when it was built from the same data, not from the same place: the check
compares what identifies the images (`DataIdentity`: the source kind, the data set's name where
the spec carries one, the split, and the options that change the images or which examples the
split holds, defaults filled in) and the example ids, never a directory path, so a moved data
folder or a trailing slash is fine and a store of the shortcut regime is refused by a clean run.

For sources read from files, each image file's content fingerprint (`content_fingerprint`,
recorded at export in the store's index) lets the input pipeline notice, cheaply, an image that
changed after the export. Generated sources (shortcut digits) are identified by their options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lfi_jax.data.sources import SOURCE_KINDS, source_options
from lfi_jax.teacher.records import describe, diff_keys, to_json_value

# --------------------------------------------------------------------------- data identity


@dataclasses.dataclass(frozen=True)
class DataIdentity:
    """What identifies a split's images, independent of where they lie.

    kind: the source kind ("shortcut_digits", "imagefolder", ...).
    name: the data set's name where the spec names one (tfds:NAME); "" where it gives a path.
    split: the split.
    options: the options that change the images or which examples the split holds (JSON data).
    """

    kind: str
    name: str
    split: str
    options: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "split": self.split, "options": to_json_value(self.options)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DataIdentity:
        return cls(str(d["kind"]), str(d.get("name", "")), str(d["split"]), dict(d.get("options") or {}))

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kind}{':' + self.name if self.name else ''}/{self.split}" + (f" ({opts})" if opts else "")


def data_identity(spec: str, split: str, options: Mapping[str, Any] | None = None) -> DataIdentity:
    """The identity of data source `spec`'s split `split` built with `options`.

    A kind this code does not know (a test double, a store from elsewhere) keeps its spec
    argument as its name and every option except the generic subset options.
    """
    kind, _, arg = str(spec).partition(":")
    known = SOURCE_KINDS.get(kind)
    if known is None:
        opts = {k: v for k, v in dict(options or {}).items() if k not in ("data_ratio", "subset_seed")}
        return DataIdentity(kind, arg, str(split), to_json_value(opts))
    name = arg if known.arg == "NAME" else ""
    return DataIdentity(kind, name, str(split), to_json_value(known.identity_options(str(split), options)))


# --------------------------------------------------------------------------- provenance


def _padding(backend: str, teacher: Mapping[str, Any]) -> str:
    if "image_pad" in teacher:  # llava: "square" (LLaVA-1.5's pad) or "processor" (its own resize/crop)
        return "pad" if teacher.get("image_pad") == "square" or teacher.get("do_pad") else "crop"
    if "geometry" in teacher:  # oracle: "full" | "pad"
        return str(teacher["geometry"])
    return "crop" if backend == "llava" else "unknown"


@dataclasses.dataclass(frozen=True)
class Provenance:
    """A typed view of a store's manifest (`TeacherStore.provenance`).

    backend: the export backend ("oracle", "llava", ...); teacher: its own record, as written.
    model / prompt / layers: the VLM's checkpoint, prompt and averaged layers (None for the oracle).
    noise: the oracle's {"blur", "shift", "uniform"} (None for a VLM).
    grid: the teacher grid (gh, gw). padding: how that grid lies on the image: "full" (the whole
      image), "pad" (the image padded to a square, LLaVA-1.5) or "crop" (a centre crop).
    data / split / data_options: the data spec, split and options as given at export (the path
      in `data` is informational); data_identity: what the compatibility check compares.
    class_names, count, degenerate_count, content_hash: as recorded by the store.
    """

    backend: str
    teacher: dict[str, Any]
    model: str | None
    prompt: str | None
    layers: tuple[int, ...] | None
    noise: dict[str, float] | None
    grid: tuple[int, int]
    padding: str
    data: str
    split: str
    data_options: dict[str, Any]
    data_identity: DataIdentity
    class_names: tuple[str, ...]
    count: int
    degenerate_count: int
    content_hash: str

    @classmethod
    def from_manifest(cls, m: Mapping[str, Any]) -> Provenance:
        teacher = dict(m.get("teacher") or {}) if isinstance(m.get("teacher"), Mapping) else {}
        backend = str(m.get("backend") or teacher.get("teacher") or "")
        grid = m.get("grid") or teacher.get("grid") or (0, 0)
        data, split = str(m.get("data", "")), str(m.get("split", ""))
        options = dict(m.get("data_options") or {})
        ident = m.get("data_identity")
        identity = DataIdentity.from_json(ident) if isinstance(ident, Mapping) else data_identity(data, split, options)
        layers = teacher.get("layers")
        noise = teacher.get("noise")
        return cls(
            backend=backend,
            teacher=teacher,
            model=teacher.get("model"),
            prompt=teacher.get("prompt"),
            layers=tuple(int(x) for x in layers) if isinstance(layers, (list, tuple)) else None,
            noise={k: float(v) for k, v in noise.items()} if isinstance(noise, Mapping) else None,
            grid=tuple(int(g) for g in grid),
            padding=_padding(backend, teacher),
            data=data,
            split=split,
            data_options=options,
            data_identity=identity,
            class_names=tuple(str(c) for c in m.get("class_names") or ()),
            count=int(m.get("count", 0)),
            degenerate_count=int(m.get("degenerate_count", 0)),
            content_hash=str(m.get("content_hash", "")),
        )


def store_provenance(store: Any) -> Provenance:
    prov = getattr(store, "provenance", None)
    return prov if isinstance(prov, Provenance) else Provenance.from_manifest(getattr(store, "manifest", {}) or {})


# --------------------------------------------------------------------------- compatibility


def check_compatible(
    store: Any,
    source: Any = None,
    *,
    spec: str | None = None,
    split: str | None = None,
    options: Mapping[str, Any] | None = None,
    allow_missing: bool | None = None,
    **expected: Any,
) -> list[str]:
    """Refuse (ValueError, one line naming the store and both sides of every difference) a
    store that was not built from this data; returns the ids of `source` the store lacks.

    The data is `source` (its name, split and options) or `spec`/`split`/`options` (each
    overriding the source's); without a source or options only the kind, name and split count.
    `expected` compares further manifest keys (e.g. grid=(7, 7), backend="oracle") as JSON data.
    With a `source` and `allow_missing` not None, the ids of examples without a map are
    counted; some missing and not `allow_missing` is a KeyError.
    """
    spec = str(spec if spec is not None else getattr(source, "name", ""))
    split = str(split if split is not None else getattr(source, "split", ""))
    manifest = getattr(store, "manifest", {}) or {}
    # a store that records no data options (written by hand) is compared on kind, name and split
    compare_options = (options is not None or source is not None) and (
        "data_identity" in manifest or "data_options" in manifest
    )
    if options is None:
        options = source_options(source) if source is not None else {}
    options = dict(options.to_dict() if hasattr(options, "to_dict") else options)
    path = getattr(store, "path", "<store>")
    prov = store_provenance(store)
    have, want = prov.data_identity, data_identity(spec, split, options)
    diffs: list[tuple[str, Any, Any]] = []
    if (have.kind, have.name) != (want.kind, want.name):
        diffs.append(("data", prov.data or have.describe(), spec))
    if have.split != want.split:
        diffs.append(("split", have.split, want.split))
    if compare_options and (have.kind, have.name) == (want.kind, want.name):
        diffs.extend(diff_keys(have.options, want.options, "data_options"))
    for key, value in expected.items():
        got = manifest.get(key, "<absent>")
        if to_json_value(got) != to_json_value(value):
            diffs.append((key, got, value))
    if diffs:
        raise ValueError(
            f"teacher store {path} does not fit {want.describe()}: {describe(diffs, 'store has', 'expected')}"
            " (export a store for this data, or point config.teacher.store at the right one)"
        )
    if source is None or allow_missing is None:
        return []
    missing = [eid for eid in (source.example_id(i) for i in range(len(source))) if eid not in store]
    if missing and not allow_missing:
        raise KeyError(
            f"teacher store {path} lacks maps for {len(missing)} of {len(source)} examples of "
            f"{spec}/{split}, e.g. {missing[:3]} (set config.teacher.allow_missing=True to mask them out)"
        )
    return missing


__all__ = [
    "DataIdentity",
    "Provenance",
    "check_compatible",
    "data_identity",
    "store_provenance",
]
