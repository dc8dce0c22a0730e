"""Image and teacher map moved together (SPEC section 3): crop, flip, resize, pool.

The teacher map is a probability mass on the teacher's grid; `entry.geometry.box` says where
that whole grid lies on the original image (it may stick out where the teacher padded the
image to a square, or lie inside where it centre-cropped). Every operation here is an exact
area overlap of axis-aligned cells, done separably (one overlap matrix per axis):

  render_teacher   teacher grid -> mass per image pixel (mass over padding is dropped)
  area_pool        a per-pixel mass, optionally of a sub-box -> mass per cell of a grid
  teacher_to_grid  the two composed without the pixel grid: teacher grid -> crop box ->
                   student patch grid (what the pipeline uses; equal to render + pool)

The image takes the same crop box through separable bilinear resampling (antialiased when
shrinking, like PIL's BILINEAR) with the same edge-aligned geometry, so image and map never
drift apart. A horizontal flip reverses the columns of
both. All randomness comes from an explicit numpy Generator.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lfi_jax.teacher.types import TeacherEntry

MASS_EPS = 1e-6  # a crop that keeps less teacher mass than this masks the example's teacher


# --------------------------------------------------------------------------- 1-D overlaps


def _edges(lo: float, hi: float, n: int) -> np.ndarray:
    n = int(n)
    e = float(lo) + (float(hi) - float(lo)) / n * np.arange(n + 1, dtype=np.float64)
    e[-1] = float(hi)
    return e


def overlap_matrix(dst_edges: np.ndarray, src_edges: np.ndarray) -> np.ndarray:
    """[n_dst, n_src] overlap length of dst interval r with src interval s (float64)."""
    d = np.asarray(dst_edges, np.float64)
    s = np.asarray(src_edges, np.float64)
    hi = np.minimum(d[1:, None], s[None, 1:])
    lo = np.maximum(d[:-1, None], s[None, :-1])
    return np.maximum(hi - lo, 0.0)


def _cell_transfer(dst_edges: np.ndarray, cell_edges: np.ndarray, limit: float) -> np.ndarray:
    """[n_dst, n_cells]: fraction of each cell's mass landing in each dst interval.

    A cell's mass is spread uniformly over the cell; the part of a cell outside [0, limit]
    (padding beyond the image) lands nowhere.
    """
    c = np.asarray(cell_edges, np.float64)
    length = c[1:] - c[:-1]
    if not (length > 0).all():
        raise ValueError(f"teacher geometry: empty or reversed cells (edges {c[0]}..{c[-1]})")
    clipped = np.minimum(np.maximum(c, 0.0), float(limit))
    d = np.asarray(dst_edges, np.float64)
    lo = np.maximum(d[:-1, None], clipped[None, :-1])
    hi = np.minimum(d[1:, None], clipped[None, 1:])
    return np.maximum(hi - lo, 0.0) / length[None, :]


@functools.lru_cache(maxsize=16384)
def _transfer(d_lo: float, d_hi: float, n_dst: int, c_lo: float, c_hi: float, n_cells: int, limit: float) -> np.ndarray:
    """Cached `_cell_transfer` for evenly spaced dst intervals and cells (read-only result).

    Crop boxes are integer pixels, so the same few thousand matrices recur.
    """
    out = _cell_transfer(_edges(d_lo, d_hi, n_dst), _edges(c_lo, c_hi, n_cells), limit)
    out.flags.writeable = False
    return out


def _check_entry(entry: TeacherEntry) -> tuple[np.ndarray, tuple[int, int], tuple[float, float, float, float]]:
    m = np.asarray(entry.map, np.float64)
    if m.ndim != 2:
        raise ValueError(f"teacher map must be 2-D [gh, gw], got shape {m.shape}")
    return m, tuple(int(x) for x in entry.geometry.image_hw), tuple(float(x) for x in entry.geometry.box)


# --------------------------------------------------------------------------- teacher maps


def render_teacher(
    entry: TeacherEntry, image_hw: Sequence[int] | None = None, *, out_hw: Sequence[int] | None = None
) -> np.ndarray:
    """The teacher map as mass per pixel of the original image, float32 [H, W].

    Exact area overlap of teacher cells with pixels; mass on padding (outside the image) is
    dropped, so the result sums to the in-image share of the map. `image_hw`, if given, must
    equal `entry.geometry.image_hw`. `out_hw` renders on a coarser or finer working grid that
    spans the same image (cell (r, c) covers H / out_h rows ...).
    """
    m, (h, w), (y0, x0, y1, x1) = _check_entry(entry)
    if image_hw is not None and tuple(int(x) for x in image_hw) != (h, w):
        raise ValueError(f"render_teacher: image_hw {tuple(image_hw)} differs from the geometry's {(h, w)}")
    oh, ow = (h, w) if out_hw is None else (int(out_hw[0]), int(out_hw[1]))
    gh, gw = m.shape
    ay = _cell_transfer(_edges(0, h, oh), _edges(y0, y1, gh), h)
    ax = _cell_transfer(_edges(0, w, ow), _edges(x0, x1, gw), w)
    return (ay @ m @ ax.T).astype(np.float32)


def area_pool(
    density: np.ndarray,
    grid_hw: Sequence[int],
    box: Sequence[float] | None = None,
    *,
    normalize: bool = True,
) -> np.ndarray:
    """Mass of a per-pixel density [h, w] in each cell of a [gh, gw] grid laid over `box`.

    `box` = (y0, x0, y1, x1) in pixel coordinates (default: the whole array); pixels count
    with the exact area they share with a cell. With `normalize`, the result is divided by its
    sum (left at zero where nothing lies inside the box). float32 [gh, gw].
    """
    d = np.asarray(density, np.float64)
    h, w = d.shape
    y0, x0, y1, x1 = (0.0, 0.0, float(h), float(w)) if box is None else (float(b) for b in box)
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    py = overlap_matrix(_edges(y0, y1, gh), np.arange(h + 1))
    px = overlap_matrix(_edges(x0, x1, gw), np.arange(w + 1))
    out = py @ d @ px.T
    if normalize:
        total = out.sum()
        out = out / total if total > 0 else np.zeros_like(out)
    return out.astype(np.float32)


def teacher_to_grid(
    entry: TeacherEntry,
    crop_box: Sequence[float] | None,
    grid_hw: Sequence[int],
    *,
    flip: bool = False,
) -> tuple[np.ndarray, bool]:
    """The teacher map on the student's patch grid after cropping to `crop_box` (and a flip).

    Returns (map float32 [gh, gw] summing to 1, True), or (zeros, False) where the crop keeps
    no teacher mass (or the entry is all zeros). Equal to
    `area_pool(render_teacher(entry), grid_hw, crop_box)` (then flipped), without the pixels.
    """
    m, (h, w), (y0, x0, y1, x1) = _check_entry(entry)
    cy0, cx0, cy1, cx1 = (0.0, 0.0, float(h), float(w)) if crop_box is None else (float(b) for b in crop_box)
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    ay = _transfer(cy0, cy1, gh, y0, y1, m.shape[0], float(h))
    ax = _transfer(cx0, cx1, gw, x0, x1, m.shape[1], float(w))
    out = ay @ m @ ax.T
    total = out.sum()
    if not np.isfinite(total) or total <= MASS_EPS:
        return np.zeros((gh, gw), np.float32), False
    out = out / total
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32), True


# --------------------------------------------------------------------------- image geometry


CROP_ATTEMPTS = 10
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def example_uniforms(seed: int, epochs, indices, n: int) -> np.ndarray:
    """float64 [B, n] uniforms in [0, 1), a pure function of (seed, epoch, index, k): the
    augmentation draws of example `indices[b]` in epoch `epochs[b]`, for a whole batch at once
    (a counter-based generator: splitmix64 of the hashed counter)."""
    e = np.asarray(epochs, np.int64).astype(np.uint64).reshape(-1)
    i = np.asarray(indices, np.int64).astype(np.uint64).reshape(-1)
    key = _mix64(np.full(e.shape, np.uint64(int(seed) % 2**64)) + _GOLDEN)
    key = _mix64(key ^ (e + _GOLDEN))
    key = _mix64(key ^ (i + _GOLDEN))
    k = (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :]
    bits = _mix64(key[:, None] + k) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / 2**53)


def sample_crops(
    u: np.ndarray,
    image_hw: np.ndarray,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Random resized crop boxes (y0, x0, y1, x1), int64 [B, 4], integer pixels inside each image.

    `u`: uniforms [B, attempts, 4] (area, aspect, row, column of each attempt); `image_hw`
    [B, 2]. Area fraction uniform in `scale`, aspect ratio (w / h) log-uniform in `ratio`; the
    first attempt that fits; where none fits, the largest centred crop with an aspect ratio
    within `ratio`.
    """
    u = np.asarray(u, np.float64)
    hw = np.asarray(image_hw, np.int64).reshape(-1, 2)
    h, w = hw[:, 0:1], hw[:, 1:2]  # [B, 1]: broadcast over attempts
    target = (h * w) * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[..., 1])
    cw = np.round(np.sqrt(target * aspect)).astype(np.int64)
    ch = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    y = np.minimum((u[..., 2] * (h - ch + 1)).astype(np.int64), h - ch)
    x = np.minimum((u[..., 3] * (w - cw + 1)).astype(np.int64), w - cw)
    first = fits.argmax(1)
    rows = np.arange(len(hw))
    ch, cw, y, x = ch[rows, first], cw[rows, first], y[rows, first], x[rows, first]
    # the fallback: the whole image, trimmed to the nearest allowed aspect ratio
    hh, ww = hw[:, 0], hw[:, 1]
    in_ratio = ww / hh
    fch = np.where(in_ratio > max(ratio), hh, np.where(in_ratio < min(ratio), np.round(ww / min(ratio)), hh))
    fcw = np.where(in_ratio > max(ratio), np.round(hh * max(ratio)), ww)
    fch, fcw = fch.astype(np.int64), fcw.astype(np.int64)
    miss = ~fits.any(1)
    ch, cw = np.where(miss, fch, ch), np.where(miss, fcw, cw)
    y, x = np.where(miss, (hh - ch) // 2, y), np.where(miss, (ww - cw) // 2, x)
    return np.stack([y, x, y + ch, x + cw], 1)


def sample_crop(
    rng: np.random.Generator,
    image_hw: Sequence[int],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    attempts: int = CROP_ATTEMPTS,
) -> tuple[int, int, int, int]:
    """One random resized crop box (y0, x0, y1, x1) drawn from `rng` (see `sample_crops`)."""
    box = sample_crops(rng.random((1, attempts, 4)), [tuple(image_hw)], scale, ratio)[0]
    return tuple(int(v) for v in box)


@functools.lru_cache(maxsize=16384)
def resample_matrix(lo: float, hi: float, n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights resampling the interval [lo, hi] of n_in pixels onto n_out.

    Bilinear (triangle filter) on pixel centres; when shrinking, the triangle widens by the
    scale (antialiasing), as PIL's BILINEAR does. Output pixel o covers [lo + o * s,
    lo + (o + 1) * s] with s = (hi - lo) / n_out: the same edge-aligned geometry as the
    teacher's cells. Weights outside the image are dropped and each row renormalised.
    """
    scale = (float(hi) - float(lo)) / n_out
    support = max(scale, 1.0)
    centre = float(lo) + (np.arange(n_out) + 0.5) * scale
    src = np.arange(n_in) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centre[:, None]) / support)
    total = w.sum(1, keepdims=True)
    if not (total > 0).all():
        raise ValueError(f"resample: box [{lo}, {hi}] lies outside the {n_in} pixels")
    out = (w / total).astype(np.float32)
    out.flags.writeable = False
    return out


def resize_image(image: np.ndarray, box: Sequence[float] | None, size: int | Sequence[int]) -> np.ndarray:
    """Crop `box` = (y0, x0, y1, x1) of a uint8 [H, W, C] image and resize it (bilinear,
    antialiased, separable; see `resample_matrix`) to `size`; float32 [S, S, C] in [0, 1]."""
    oh, ow = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    h, w, c = image.shape
    y0, x0, y1, x1 = (0, 0, h, w) if box is None else box
    img = np.asarray(image, np.float32) * np.float32(1.0 / 255.0)
    if (oh, ow) == (h, w) and tuple(float(b) for b in (y0, x0, y1, x1)) == (0.0, 0.0, float(h), float(w)):
        return img
    ry = resample_matrix(float(y0), float(y1), oh, h)
    rx = resample_matrix(float(x0), float(x1), ow, w)
    rows = (ry @ img.reshape(h, w * c)).reshape(oh, w, c).transpose(1, 0, 2).reshape(w, oh * c)
    return (rx @ rows).reshape(ow, oh, c).transpose(1, 0, 2)  # two BLAS calls, no batched matmul


# --------------------------------------------------------------------------- one example


@dataclasses.dataclass(frozen=True)
class Augment:
    """Train-time augmentation (`data.augment` in the config)."""

    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "Augment":
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join('data.augment.' + k for k in unknown)}")
        aug = cls(**d)
        lo, hi = aug.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"config.data.augment.crop_scale={tuple(aug.crop_scale)} must satisfy 0 < lo <= hi <= 1")
        if not 0 < aug.crop_ratio[0] <= aug.crop_ratio[1]:
            raise ValueError(f"config.data.augment.crop_ratio={tuple(aug.crop_ratio)} must satisfy 0 < lo <= hi")
        ratio = tuple(float(r) for r in aug.crop_ratio)
        return dataclasses.replace(aug, crop_scale=(float(lo), float(hi)), crop_ratio=ratio)


def transform_example(
    image: np.ndarray,
    entry: TeacherEntry | None,
    *,
    image_size: int,
    grid_hw: Sequence[int],
    rng: np.random.Generator | None = None,
    augment: Augment | None = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, np.ndarray]:
    """One example through the geometry: image [S, S, 3] normalised, teacher [gh * gw], mask.

    Train (`augment` given, `rng` required): a random resized crop (if enabled) and a random
    horizontal flip (if enabled), the same for image and teacher. Eval (`augment=None`): the
    whole image resized. `entry=None` gives a zero teacher with mask 0; so does a crop that
    keeps no teacher mass, or a degenerate entry.
    """
    h, w = image.shape[:2]
    box = (0, 0, h, w)
    flip = False
    if augment is not None:
        if rng is None:
            raise ValueError("transform_example: train augmentation needs an rng")
        if augment.random_resized_crop:
            box = sample_crop(rng, (h, w), augment.crop_scale, augment.crop_ratio)
        if augment.hflip:
            flip = bool(rng.random() < 0.5)
    return transform_single(
        image, entry, box=box, flip=flip, image_size=image_size, grid_hw=grid_hw, mean=mean, std=std
    )


def transform_single(
    image: np.ndarray,
    entry: TeacherEntry | None,
    *,
    box: Sequence[float],
    flip: bool,
    image_size: int,
    grid_hw: Sequence[int],
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, np.ndarray]:
    """`transform_example` with the crop box and the flip given."""
    img = resize_image(image, box, image_size)
    if flip:
        img = img[:, ::-1]
    img = (img - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if entry is None or entry.degenerate:
        teacher, ok = np.zeros((gh, gw), np.float32), False
    else:
        teacher, ok = teacher_to_grid(entry, box, (gh, gw), flip=flip)
    return {
        "image": np.ascontiguousarray(img, dtype=np.float32),
        "teacher": teacher.reshape(-1),
        "teacher_mask": np.float32(1.0 if ok else 0.0),
    }


__all__ = [
    "Augment",
    "MASS_EPS",
    "area_pool",
    "overlap_matrix",
    "render_teacher",
    "resample_matrix",
    "resize_image",
    "CROP_ATTEMPTS",
    "example_uniforms",
    "sample_crop",
    "sample_crops",
    "teacher_to_grid",
    "transform_example",
    "transform_single",
]
