"""Box operations in jnp (all boxes are [..., 4] float arrays).

Formats: `cxcywh` = (centre x, centre y, width, height), `xyxy` = (x0, y0, x1, y1); DETR
predicts normalised cxcywh (fractions of the unpadded image size). The pairwise functions
take boxes [N, 4] and [M, 4] and return [N, M]; they follow DETR's `box_ops`: degenerate boxes
(x1 < x0) are not checked here (the criterion and the data loaders reject them earlier), and
GIoU of two zero-area boxes is undefined (0/0), as in DETR.
"""

from __future__ import annotations

import jax.numpy as jnp


def cxcywh_to_xyxy(b: jnp.ndarray) -> jnp.ndarray:
    cx, cy, w, h = jnp.moveaxis(b, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(b: jnp.ndarray) -> jnp.ndarray:
    x0, y0, x1, y1 = jnp.moveaxis(b, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def xyxy_to_xywh(b: jnp.ndarray) -> jnp.ndarray:
    """COCO's (x, y, width, height) from xyxy."""
    x0, y0, x1, y1 = jnp.moveaxis(b, -1, 0)
    return jnp.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


def box_area(b: jnp.ndarray) -> jnp.ndarray:
    """Area of xyxy boxes [...] (negative sides count as zero)."""
    return jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)


def box_iou(a: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pairwise IoU of xyxy boxes a [N, 4], b [M, 4]: (iou [N, M], union [N, M])."""
    area_a, area_b = box_area(a), box_area(b)
    lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
    rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union, union


def generalized_box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes a [N, 4], b [M, 4] -> [N, M].

    GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest box enclosing both; in [-1, 1].
    """
    iou, union = box_iou(a, b)
    lt = jnp.minimum(a[:, None, :2], b[None, :, :2])
    rb = jnp.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    enclose = wh[..., 0] * wh[..., 1]
    return iou - (enclose - union) / enclose


def paired_generalized_box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Generalized IoU of corresponding xyxy boxes a [..., 4], b [..., 4] -> [...] (the pairwise diagonal)."""
    area_a, area_b = box_area(a), box_area(b)
    wh = jnp.maximum(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    ewh = jnp.maximum(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0.0)
    enclose = ewh[..., 0] * ewh[..., 1]
    return inter / union - (enclose - union) / enclose


__all__ = [
    "box_area",
    "box_iou",
    "cxcywh_to_xyxy",
    "generalized_box_iou",
    "paired_generalized_box_iou",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh",
]
