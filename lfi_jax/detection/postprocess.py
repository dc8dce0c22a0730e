"""Detector outputs -> COCO results (DETR's `PostProcess`).

`postprocess` (jnp, jittable: the eval step runs it on device) turns logits [B, Q, C+1] and
normalised cxcywh boxes [B, Q, 4] into per-query detections: softmax over all classes, the
no-object class dropped, each query's best real class and its probability as the score,
boxes as normalised xyxy; then the `top_k` best-scoring queries per image (default all Q, as
DETR evaluates its 100 queries; COCOeval keeps at most 100 per image and category).

`postprocess_sigmoid` is Conditional-DETR's (transformers' `ConditionalDetrImageProcessor.
post_process_object_detection`, the original code's `PostProcess`): logits [B, Q, C] without a
no-object class, sigmoid scores, the `top_k` (default 100) best of all Q x C (query, class)
pairs per image, so one query may give detections of several classes; box of pair k is its
query's box.

`to_coco_results` (numpy, on the host) scales the normalised boxes by each image's ORIGINAL
(height, width) — DETR's boxes are fractions of the unpadded image, and resizing for the
network keeps those fractions — converts them to COCO's absolute [x, y, width, height], maps
contiguous class ids back to the data set's category ids, and drops padded batch rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lfi_jax.detection.boxes import cxcywh_to_xyxy


class Detections(NamedTuple):
    scores: jax.Array  # [B, K] probability of the label
    labels: jax.Array  # [B, K] int32 contiguous class ids in [0, C)
    boxes: jax.Array  # [B, K, 4] normalised xyxy


def postprocess(logits: jax.Array, boxes: jax.Array, *, top_k: int | None = None) -> Detections:
    """Per-query detections, best `top_k` first (all queries in score order when None)."""
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]
    scores = prob.max(-1)
    labels = prob.argmax(-1).astype(jnp.int32)
    xyxy = cxcywh_to_xyxy(boxes.astype(jnp.float32))
    k = scores.shape[-1] if top_k is None else min(int(top_k), scores.shape[-1])
    scores, idx = jax.lax.top_k(scores, k)
    labels = jnp.take_along_axis(labels, idx, axis=-1)
    xyxy = jnp.take_along_axis(xyxy, idx[..., None], axis=-2)
    return Detections(scores, labels, xyxy)


def postprocess_sigmoid(logits: jax.Array, boxes: jax.Array, *, top_k: int = 100) -> Detections:
    """Top-k (query, class) pairs by sigmoid score per image (see the module docstring)."""
    b, q, c = logits.shape
    prob = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(b, q * c)
    k = min(int(top_k), q * c)
    scores, idx = jax.lax.top_k(prob, k)
    labels = (idx % c).astype(jnp.int32)
    xyxy = jnp.take_along_axis(cxcywh_to_xyxy(boxes.astype(jnp.float32)), (idx // c)[..., None], axis=-2)
    return Detections(scores, labels, xyxy)


def to_coco_results(
    detections: Detections,
    image_ids: Sequence[int] | np.ndarray,
    orig_sizes: np.ndarray,
    category_ids: Sequence[int],
    *,
    valid: np.ndarray | None = None,
    min_score: float = 0.0,
) -> list[dict[str, Any]]:
    """COCO result dicts {"image_id", "category_id", "bbox": [x, y, w, h], "score"} of one batch.

    orig_sizes [B, 2] = (height, width) in pixels of the original images; category_ids[c] is
    the data set's id of contiguous class c; rows with valid == 0 (batch padding) are skipped.
    """
    scores = np.asarray(detections.scores, np.float64)
    labels = np.asarray(detections.labels)
    boxes = np.asarray(detections.boxes, np.float64)
    sizes = np.asarray(orig_sizes, np.float64).reshape(len(scores), 2)
    cats = np.asarray(category_ids)
    if labels.size and (labels.min() < 0 or labels.max() >= len(cats)):
        raise ValueError(
            f"predicted class ids span [{labels.min()}, {labels.max()}] but there are {len(cats)} categories"
        )
    out: list[dict[str, Any]] = []
    for b in range(len(scores)):
        if valid is not None and not valid[b]:
            continue
        h, w = sizes[b]
        xyxy = boxes[b] * np.array([w, h, w, h])
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], -1)
        keep = scores[b] >= min_score
        for s, c, bb in zip(scores[b][keep], labels[b][keep], xywh[keep]):
            out.append(
                {
                    "image_id": int(image_ids[b]),
                    "category_id": int(cats[c]),
                    "bbox": [float(v) for v in bb],
                    "score": float(s),
                }
            )
    return out


__all__ = ["Detections", "postprocess", "postprocess_sigmoid", "to_coco_results"]
