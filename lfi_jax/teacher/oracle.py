"""The oracle teacher: C_vlm from ground-truth masks or boxes (SPEC sections 3-4).

The ideal teacher: the object's mask (or its boxes, filled) is area-pooled onto the teacher
grid and L1-normalised. The grid covers the whole image (`geometry="full"`) or, like
LLaVA-1.5, the image padded to a square (`geometry="pad"`; the padding holds no mass), and
the map is stored with that geometry so the pipeline can resample it onto any student grid.

`teacher_noise` degrades it, in this order, deterministically from (seed, example id):
  shift    the map is displaced by exactly `shift` cells in a random direction (area
           interpolation; mass pushed off the grid is lost),
  blur     separable Gaussian of std `blur` cells (each cell's mass is spread over the grid
           and renormalised there, so no mass leaks at the border),
  uniform  mixed with the uniform map: (1 - uniform) * map + uniform / (gh * gw).
An empty mask (or one shifted entirely off the grid) gives a degenerate entry: all zeros,
flagged, with the reason in `meta["degenerate_reason"]`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lfi_jax.teacher.types import Geometry, TeacherEntry

ORACLE_VERSION = 1  # bump when the maps this module computes change
OPTIONS: dict[str, tuple[Any, str]] = {
    # option name: (default, help)
    "grid": (24, "teacher grid: N (N x N) or H,W"),
    "geometry": ("full", "full (the grid covers the image) | pad (the image padded to a square, like LLaVA-1.5)"),
    "target": ("auto", "auto (the mask, else the boxes) | mask | boxes"),
    "blur": (0.0, "noise: Gaussian blur, std in teacher cells"),
    "shift": (0.0, "noise: displacement by this many cells in a random direction"),
    "uniform": (0.0, "noise: mixing weight of the uniform map, in [0, 1]"),
    "seed": (0, "noise seed (the noise of an example depends on (seed, example id) only)"),
}
GEOMETRIES = ("full", "pad")
TARGETS = ("auto", "mask", "boxes")


def parse_grid(grid: Any) -> tuple[int, int]:
    """24 | "24" | (24, 32) | "24,32" | "24x32" -> (gh, gw), both positive."""
    try:
        if isinstance(grid, str):
            parts = grid.replace("x", ",").split(",")
            g = tuple(int(p) for p in parts)
        elif isinstance(grid, (int, np.integer)):
            g = (int(grid),)
        else:
            g = tuple(int(p) for p in grid)
    except (TypeError, ValueError):
        raise ValueError(f"teacher grid {grid!r}: expected N, 'H,W' or (H, W)") from None
    if len(g) == 1:
        g = (g[0], g[0])
    if len(g) != 2 or min(g) <= 0:
        raise ValueError(f"teacher grid {grid!r}: expected one or two positive sizes")
    return g


def resolve_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options with defaults filled in and checked; an unknown option is an error naming it."""
    return resolve_teacher_options(options, OPTIONS, {"geometry": GEOMETRIES, "target": TARGETS}, "oracle")


def resolve_teacher_options(options: Mapping[str, Any] | None, known: Mapping[str, tuple[Any, str]],
                            choices: Mapping[str, Sequence[str]], teacher: str) -> dict[str, Any]:
    """The oracle teachers' option check: defaults from `known` ({name: (default, help)}), the
    grid parsed, the noise options (blur, shift, uniform, seed) checked, each of `choices`
    ({name: allowed}) one of its values; errors name the option and `teacher`."""
    opts = {k: d for k, (d, _) in known.items()}
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {teacher} teacher options {unknown} (known: {sorted(known)})")
    opts.update(given)
    opts["grid"] = list(parse_grid(opts["grid"]))
    for k in ("blur", "shift", "uniform"):
        try:
            opts[k] = float(opts[k])
        except (TypeError, ValueError):
            raise ValueError(f"{teacher} teacher option {k}={opts[k]!r} is not a number") from None
        if not (math.isfinite(opts[k]) and opts[k] >= 0):
            raise ValueError(f"{teacher} teacher option {k}={opts[k]} must be finite and >= 0")
    if opts["uniform"] > 1:
        raise ValueError(f"{teacher} teacher option uniform={opts['uniform']} must lie in [0, 1]")
    opts["seed"] = int(opts["seed"])
    for k, allowed in choices.items():
        if opts[k] not in allowed:
            raise ValueError(f"{teacher} teacher option {k}={opts[k]!r}: expected one of {allowed}")
    return opts


# --------------------------------------------------------------------------- pooling


def interval_overlap(n_cells: int, lo: float, hi: float, n_pixels: int) -> np.ndarray:
    """[n_cells, n_pixels]: length of cell i = [lo + i c, lo + (i + 1) c), c = (hi - lo) / n_cells,
    inside pixel p = [p, p + 1)."""
    c = (hi - lo) / n_cells
    a = lo + c * np.arange(n_cells, dtype=np.float64)[:, None]
    p = np.arange(n_pixels, dtype=np.float64)[None, :]
    return np.clip(np.minimum(a + c, p + 1.0) - np.maximum(a, p), 0.0, None)


def area_pool(density: np.ndarray, geometry: Geometry, grid: Sequence[int]) -> np.ndarray:
    """Mass of a per-pixel density [H, W] (piecewise constant on pixels, zero outside the
    image) in each cell of the [gh, gw] grid laid over `geometry.box`; float64, unnormalised."""
    d = np.asarray(density, np.float64)
    y0, x0, y1, x1 = geometry.box
    ry = interval_overlap(int(grid[0]), y0, y1, d.shape[0])
    rx = interval_overlap(int(grid[1]), x0, x1, d.shape[1])
    return ry @ d @ rx.T


def boxes_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fractional coverage [H, W] of the union of boxes (y0, x0, y1, x1), y1/x1 exclusive."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = np.zeros((height, width), np.float64)
    for y0, x0, y1, x1 in b:
        cy = interval_overlap(1, y0, max(y1, y0), height)[0]
        cx = interval_overlap(1, x0, max(x1, x0), width)[0]
        out = np.maximum(out, np.outer(cy, cx))
    return out


# --------------------------------------------------------------------------- noise


def example_rng(seed: int, example_id: str) -> np.random.Generator:
    """A generator that depends on (seed, example id) only (not on order or process)."""
    words = np.frombuffer(hashlib.sha256(str(example_id).encode()).digest()[:16], dtype="<u4")
    return np.random.default_rng([int(seed) % 2**32, *(int(w) for w in words)])


def shift_map(m: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """`m` moved by (dy, dx) cells with area interpolation; mass moved off the grid is lost."""
    gh, gw = m.shape
    ty = interval_overlap(gh, dy, dy + gh, gh).T  # [target i, source k]: source k lands on [k + dy, k + dy + 1)
    tx = interval_overlap(gw, dx, dx + gw, gw).T
    return ty @ m @ tx.T


def _gauss_spread(n: int, sigma: float) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)  # [target, source]
    return k / k.sum(0, keepdims=True)


def blur_map(m: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (std `sigma` cells); each source cell's mass stays on the grid."""
    if sigma <= 0:
        return m
    return _gauss_spread(m.shape[0], sigma) @ m @ _gauss_spread(m.shape[1], sigma).T


# --------------------------------------------------------------------------- entries


def _density(example: Mapping[str, Any], target: str, hw: tuple[int, int], where: str) -> tuple[np.ndarray, str]:
    mask, boxes = example.get("mask"), example.get("boxes")
    if target == "auto":
        target = "mask" if mask is not None else "boxes" if boxes is not None else ""
        if not target:
            raise ValueError(f"{where}: the oracle teacher needs a 'mask' or 'boxes', the example has neither")
    if target == "mask":
        if mask is None:
            raise ValueError(f"{where}: oracle target=mask, but the example has no 'mask'")
        d = np.asarray(mask, np.float64)
        if d.shape != hw:
            raise ValueError(f"{where}: mask shape {d.shape} differs from the image's {hw}")
        if not np.all(np.isfinite(d)) or np.any(d < 0):
            raise ValueError(f"{where}: mask has negative or non-finite values")
        return d, "mask"
    if boxes is None:
        raise ValueError(f"{where}: oracle target=boxes, but the example has no 'boxes'")
    b = np.asarray(boxes, np.float64)
    if b.size % 4 or not np.all(np.isfinite(b)):
        raise ValueError(f"{where}: boxes must be finite [K, 4] (y0, x0, y1, x1), got shape {b.shape}")
    return boxes_mask(b, *hw), "boxes"


def oracle_entry(example: Mapping[str, Any], options: Mapping[str, Any] | None = None, **kw: Any) -> TeacherEntry:
    """The oracle teacher entry of one source example (`{"id", "image", "mask"?, "boxes"?}`).

    Options (or keywords): see OPTIONS.
    """
    opts = resolve_options({**(options or {}), **kw})
    eid = str(example.get("id", "<no id>"))
    where = f"example {eid!r}"
    image = np.asarray(example["image"]) if "image" in example else None
    if image is None or image.ndim < 2:
        raise ValueError(f"{where}: the oracle teacher needs the image (for its size)")
    hw = (int(image.shape[0]), int(image.shape[1]))
    geometry = Geometry.full_image(*hw) if opts["geometry"] == "full" else Geometry.pad_to_square(*hw)
    density, used = _density(example, opts["target"], hw, where)
    m = area_pool(density, geometry, opts["grid"])
    meta: dict[str, Any] = {"target": used}
    return noisy_entry(m, geometry, opts, eid, meta, None if m.sum() > 0 else f"empty {used}")


def noisy_entry(m: np.ndarray, geometry: Geometry, opts: Mapping[str, Any], eid: str, meta: dict[str, Any],
                reason: str | None) -> TeacherEntry:
    """The entry of a pooled map `m` (unnormalised, float64): the noise of `opts` applied (shift,
    blur, uniform; see the module doc) and L1-normalised; degenerate (zeros, flagged, `reason`
    in meta) when `reason` is given or the shift moves all mass off the grid."""
    if reason is None and (opts["shift"] > 0 or opts["blur"] > 0):
        m = m / m.sum()
        if opts["shift"] > 0:
            theta = example_rng(opts["seed"], eid).uniform(0.0, 2.0 * math.pi)
            dy, dx = opts["shift"] * math.sin(theta), opts["shift"] * math.cos(theta)
            meta["noise_shift"] = [dy, dx]
            m = shift_map(m, dy, dx)
            if not m.sum() > 1e-12:
                reason = "noise shift moved all mass off the grid"
        if reason is None:
            m = blur_map(m, opts["blur"])
    if reason is not None:
        meta["degenerate_reason"] = reason
        return TeacherEntry(np.zeros(tuple(opts["grid"]), np.float32), geometry, True, meta)
    m = m / m.sum()
    if opts["uniform"] > 0:
        m = (1.0 - opts["uniform"]) * m + opts["uniform"] / m.size
    m = m / m.sum()
    return TeacherEntry(m.astype(np.float32), geometry, False, meta)


# --------------------------------------------------------------------------- export backend


def provenance(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the store manifest records about this teacher (compared when an export resumes)."""
    opts = resolve_options(options)
    return {
        "teacher": "oracle",
        "version": ORACLE_VERSION,
        "grid": opts["grid"],
        "geometry": opts["geometry"],
        "target": opts["target"],
        "noise": {"blur": opts["blur"], "shift": opts["shift"], "uniform": opts["uniform"]},
        "seed": opts["seed"],
        "pooling": "area pooling of the mask (or filled boxes) onto the grid, L1-normalised",
    }


def export_backend(source, indices: Sequence[int], options: Mapping[str, Any] | None) -> list[tuple[str, TeacherEntry]]:
    """The export registry's `oracle` backend: (source, indices, options) -> [(id, entry)]."""
    return export_entries(source, indices, resolve_options(options), oracle_entry)


def export_entries(
    source, indices: Sequence[int], opts: Mapping[str, Any], entry: Callable[..., TeacherEntry]
) -> list[tuple[str, TeacherEntry]]:
    """[(example id, entry(example, opts))] of the source's `indices`; an example whose 'id'
    differs from `source.example_id(i)` is an error naming the source and index."""
    name = f"{getattr(source, 'name', 'source')}/{getattr(source, 'split', '?')}"
    out = []
    for i in indices:
        eid = source.example_id(i)
        ex = source[i]
        if "id" in ex and ex["id"] != eid:
            raise ValueError(f"{name}: index {i}: example_id() gives {eid!r}, the example's 'id' is {ex['id']!r}")
        out.append((eid, entry({**ex, "id": eid}, opts)))
    return out


__all__ = [
    "OPTIONS",
    "ORACLE_VERSION",
    "area_pool",
    "blur_map",
    "boxes_mask",
    "example_rng",
    "export_backend",
    "export_entries",
    "interval_overlap",
    "noisy_entry",
    "oracle_entry",
    "parse_grid",
    "provenance",
    "resolve_options",
    "resolve_teacher_options",
    "shift_map",
]
