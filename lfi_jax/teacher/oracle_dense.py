"""The dense oracle teacher for detection: one map per image from every ground-truth object.

Eq. 12 of the paper builds the detection teacher as C_vlm = relu(sum_k C_obj^(k) - C_back) / L1,
one attention map per object instance, each a distribution (mass 1). The oracle version
replaces each C_obj^(k) by the ground truth of instance k (its instance mask where the source
has one and `target` allows it, else its filled box) area-pooled onto the teacher grid, and
C_back by 0:

  instance_weight="equal" (default, Eq. 12's form): each instance normalised to mass 1, summed;
  instance_weight="area": the instances' coverage summed as it is (larger objects weigh more).

The result is L1-normalised. An image without objects (or whose objects all have zero area)
gives a degenerate entry (all zeros, flagged, reason in meta), which the pipeline masks. The
grid covers the image (`geometry="full"`) or the image padded to a square (`"pad"`, as
LLaVA-1.5 sees it), and the noise options (blur, shift, uniform, seed) act as in
`lfi_jax.teacher.oracle`. Entries go to the same TeacherStore format, keyed by the source's
example id (the image id for detection sources); `export_backend` / `provenance` / `OPTIONS`
form the export backend `oracle_dense` (`lfi_jax.teacher.export.export_store(source, out,
"oracle_dense", ...)` writes a store once the backend is registered there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lfi_jax.teacher.oracle import area_pool, boxes_mask, export_entries, noisy_entry, resolve_teacher_options
from lfi_jax.teacher.types import Geometry, TeacherEntry

ORACLE_DENSE_VERSION = 1  # bump when the maps change
OPTIONS: dict[str, tuple[Any, str]] = {
    "grid": (24, "teacher grid: N (N x N) or H,W"),
    "geometry": ("full", "full (the grid covers the image) | pad (the image padded to a square, like LLaVA-1.5)"),
    "target": ("auto", "auto (instance masks where the example has them, else boxes) | masks | boxes"),
    "instance_weight": ("equal", "equal (each object mass 1, Eq. 12) | area (coverage summed)"),
    "blur": (0.0, "noise: Gaussian blur, std in teacher cells"),
    "shift": (0.0, "noise: displacement by this many cells in a random direction"),
    "uniform": (0.0, "noise: mixing weight of the uniform map, in [0, 1]"),
    "seed": (0, "noise seed (the noise of an example depends on (seed, example id) only)"),
}
_CHOICES = {"geometry": ("full", "pad"), "target": ("auto", "masks", "boxes"), "instance_weight": ("equal", "area")}


def resolve_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options with defaults filled in and checked; an unknown option is an error naming it."""
    return resolve_teacher_options(options, OPTIONS, _CHOICES, "oracle_dense")


def instance_densities(example: Mapping[str, Any], target: str, where: str) -> tuple[list[np.ndarray], str]:
    """Per-instance pixel densities [H, W] (masks or filled boxes) and which one was used."""
    image = example.get("image")
    if image is None or np.asarray(image).ndim < 2:
        raise ValueError(f"{where}: the dense oracle teacher needs the image (for its size)")
    hw = tuple(np.asarray(image).shape[:2])
    masks = example.get("masks")
    use = ("masks" if masks is not None else "boxes") if target == "auto" else target
    if use == "masks":
        if masks is None:
            raise ValueError(f"{where}: oracle_dense target=masks, but the example has no 'masks'")
        m = np.asarray(masks, np.float64)
        if m.ndim != 3 or m.shape[1:] != hw:
            raise ValueError(f"{where}: masks shape {m.shape} is not [K, {hw[0]}, {hw[1]}]")
        if not np.all(np.isfinite(m)) or np.any(m < 0):
            raise ValueError(f"{where}: masks have negative or non-finite values")
        return list(m), "masks"
    boxes = example.get("boxes")
    if boxes is None:
        raise ValueError(f"{where}: the dense oracle teacher needs 'boxes' (or 'masks')")
    b = np.asarray(boxes, np.float64)
    if b.size % 4 or not np.all(np.isfinite(b)):
        raise ValueError(f"{where}: boxes must be finite [K, 4] (y0, x0, y1, x1), got shape {b.shape}")
    return [boxes_mask(box[None], *hw) for box in b.reshape(-1, 4)], "boxes"


def dense_entry(example: Mapping[str, Any], options: Mapping[str, Any] | None = None, **kw: Any) -> TeacherEntry:
    """The dense oracle entry of one detection record (`{"id", "image", "boxes", "masks"?}`)."""
    opts = resolve_options({**(options or {}), **kw})
    eid = str(example.get("id", "<no id>"))
    where = f"example {eid!r}"
    dens, used = instance_densities(example, opts["target"], where)
    hw = np.asarray(example["image"]).shape[:2]
    geometry = Geometry.full_image(*hw) if opts["geometry"] == "full" else Geometry.pad_to_square(*hw)
    grid = tuple(opts["grid"])
    m = np.zeros(grid, np.float64)
    for d in dens:
        p = area_pool(d, geometry, grid)
        if opts["instance_weight"] == "equal":
            s = p.sum()
            p = p / s if s > 0 else p
        m += p
    meta: dict[str, Any] = {"target": used, "instances": len(dens)}
    reason = None if m.sum() > 0 else ("no objects" if not dens else f"empty {used}")
    return noisy_entry(m, geometry, opts, eid, meta, reason)


def provenance(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the store manifest records about this teacher."""
    opts = resolve_options(options)
    return {
        "teacher": "oracle_dense",
        "version": ORACLE_DENSE_VERSION,
        "grid": opts["grid"],
        "geometry": opts["geometry"],
        "target": opts["target"],
        "instance_weight": opts["instance_weight"],
        "noise": {"blur": opts["blur"], "shift": opts["shift"], "uniform": opts["uniform"]},
        "seed": opts["seed"],
        "pooling": "per-instance masks (or filled boxes) area-pooled onto the grid, summed, L1-normalised",
    }


def export_backend(source, indices: Sequence[int], options: Mapping[str, Any] | None) -> list[tuple[str, TeacherEntry]]:
    """The export registry's `oracle_dense` backend: (source, indices, options) -> [(id, entry)]."""
    return export_entries(source, indices, resolve_options(options), dense_entry)


__all__ = [
    "OPTIONS",
    "ORACLE_DENSE_VERSION",
    "dense_entry",
    "export_backend",
    "instance_densities",
    "provenance",
    "resolve_options",
]
