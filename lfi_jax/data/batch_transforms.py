"""`transforms.transform_example`'s geometry, vectorised over a batch of same-sized images.

    out = transform_batch(images, entries, boxes, flips, image_size=48, grid_hw=(6, 6),
                          mean=mean, std=std)

images uint8 [B, H, W, 3]; entries a list of TeacherEntry or None; boxes [B, 4] crop boxes
(y0, x0, y1, x1) in pixels; flips [B] bool. Returns a `Batch` (image float32 [B, S, S, 3]
normalised, teacher float32 [B, gh * gw], teacher_mask float32 [B]), equal up to float rounding
to `transform_example` on each example with the same box and flip.

Why: on a small CPU the per-example numpy calls of `transform_example` (two BLAS products, a
handful of temporaries) cost as much as the model's step at the main job's size, and the data
thread takes its CPU from the step (docs/performance.md, "The training loop"). Here the
resampling runs for all images at once, as two batched products with each example's
`resample_matrix`; the teacher maps go through one batched product too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from lfi_jax.data.transforms import MASS_EPS, _transfer, resample_matrix
from lfi_jax.teacher.types import TeacherEntry


class Batch(NamedTuple):
    image: np.ndarray  # float32 [B, S, S, 3], normalised
    teacher: np.ndarray  # float32 [B, gh * gw], rows sum to 1 where teacher_mask is 1
    teacher_mask: np.ndarray  # float32 [B]


def resize_batch(
    images: np.ndarray,
    boxes: np.ndarray,
    size: int,
    flips: np.ndarray | None = None,
    scale: float = 1.0 / 255.0,
    offset: np.ndarray | float = 0.0,
) -> np.ndarray:
    """uint8 [B, H, W, C] cropped to `boxes` [B, 4], resized to [B, size, size, C] and mirrored
    where `flips`; float32 `scale * resampled + offset` (offset per channel). `resize_image` on
    each example (then `/ 255`), in two batched products: rows with `matmul`, columns with
    `einsum` (which writes the [B, S, S, C] layout directly; a transpose copy would cost more
    than the product on a small CPU)."""
    b, h, w, c = images.shape
    boxes = np.asarray(boxes, np.float64).reshape(b, 4)
    ry = np.stack([resample_matrix(float(y0), float(y1), size, h) for y0, _, y1, _ in boxes])
    rx = np.stack([resample_matrix(float(x0), float(x1), size, w) for _, x0, _, x1 in boxes])
    if flips is not None and np.any(flips):
        rx = np.where(np.asarray(flips, bool)[:, None, None], rx[:, ::-1], rx)
    x = np.matmul(ry * np.float32(scale), images.reshape(b, h, w * c).astype(np.float32))
    out = np.einsum("bow,bswc->bsoc", rx, x.reshape(b, size, w, c), optimize=True)
    out += np.asarray(offset, np.float32)
    return out


def teachers_to_grid(
    entries: Sequence[TeacherEntry | None], boxes: np.ndarray, grid_hw: Sequence[int], flips: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`transforms.teacher_to_grid` for a batch: (maps float32 [B, gh * gw], mask float32 [B]);
    a missing or degenerate entry, or a crop that keeps no mass, gives zeros and mask 0."""
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    n = len(entries)
    out = np.zeros((n, gh, gw), np.float64)
    live = [i for i, e in enumerate(entries) if e is not None and not e.degenerate]
    shapes = {np.shape(entries[i].map) for i in live}
    for shape in shapes:
        rows = [i for i in live if np.shape(entries[i].map) == shape]
        if len(shape) != 2:
            raise ValueError(f"teacher map must be 2-D [gh, gw], got shape {shape}")
        m = np.stack([np.asarray(entries[i].map, np.float64) for i in rows])
        ay, ax = [], []
        for i in rows:
            (h, w), (y0, x0, y1, x1) = entries[i].geometry.image_hw, entries[i].geometry.box
            cy0, cx0, cy1, cx1 = (float(v) for v in boxes[i])
            ay.append(_transfer(cy0, cy1, gh, float(y0), float(y1), shape[0], float(h)))
            ax.append(_transfer(cx0, cx1, gw, float(x0), float(x1), shape[1], float(w)))
        out[rows] = np.stack(ay) @ m @ np.stack(ax).transpose(0, 2, 1)
    total = out.sum((1, 2))
    ok = np.isfinite(total) & (total > MASS_EPS)
    out = np.where(ok[:, None, None], out / np.where(ok, total, 1.0)[:, None, None], 0.0)
    out = np.where(np.asarray(flips, bool)[:, None, None], out[:, :, ::-1], out)
    return out.reshape(n, gh * gw).astype(np.float32), ok.astype(np.float32)


def transform_batch(
    images: np.ndarray,
    entries: Sequence[TeacherEntry | None],
    boxes: np.ndarray,
    flips: np.ndarray,
    *,
    image_size: int,
    grid_hw: Sequence[int],
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> Batch:
    """The batch's images and teacher maps through their crops and flips (module docstring)."""
    flips = np.asarray(flips, bool)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    img = resize_batch(images, boxes, int(image_size), flips, scale=1.0, offset=-255.0 * mean)
    img *= np.float32(1.0 / 255.0) / std  # (v / 255 - mean) / std
    teacher, mask = teachers_to_grid(entries, boxes, grid_hw, flips)
    return Batch(img, teacher, mask)


__all__ = ["Batch", "resize_batch", "teachers_to_grid", "transform_batch"]
