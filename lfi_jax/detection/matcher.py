"""DETR's Hungarian matcher (Carion et al. 2020) for padded targets, under jit and vmap.

Cost of assigning query q to target t (transformers' `HungarianMatcher`, DETR's defaults
class 1, L1 5, GIoU 2):

    C[q, t] = w_class * class_cost[q, label_t] + w_bbox * |box_q - box_t|_1
              + w_giou * (-GIoU(box_q, box_t))

with `MatcherCosts.class_kind`
- "softmax" (DETR): class_cost = -softmax(logits)[q, c] over the C+1 logits (no-object last);
- "focal" (Conditional-DETR, Deformable-DETR; transformers' `DeformableDetrHungarianMatcher`):
  over C sigmoid logits, p = sigmoid(logits)[q, c],
  class_cost = alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8))
  (alpha 0.25, gamma 2; Conditional-DETR weighs it 2, `w_class`, with L1 5 and GIoU 2).

on normalised cxcywh boxes (GIoU on their xyxy corners). Non-finite costs are replaced by the
largest float32 so such pairs are taken only when nothing else is left. The assignment itself
has no gradient: the cost is computed under `stop_gradient` and solved

- `impl="scipy"` (default): `scipy.optimize.linear_sum_assignment` on the host through
  `jax.pure_callback` (`vmap_method="broadcast_all"`: a vmapped call hands the callback the
  whole batch), one assignment per image over its valid targets only;
- `impl="optax"`: on device with `optax.assignment.hungarian_algorithm`; padded target
  columns get a constant cost, which leaves the optimum over the valid columns unchanged when
  Q >= T (required for this impl).

With more valid targets than queries, min(Q, T) targets are matched (`Match.matched`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfi_jax.detection.boxes import cxcywh_to_xyxy, generalized_box_iou
from lfi_jax.detection.types import DetectionTargets, Match

_BIG = float(np.finfo(np.float32).max)


CLASS_KINDS = ("softmax", "focal")


class MatcherCosts(NamedTuple):
    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    class_kind: str = "softmax"  # softmax (DETR) | focal (Conditional-DETR)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


CONDITIONAL_DETR_COSTS = MatcherCosts(2.0, 5.0, 2.0, "focal")


def class_cost(logits: jax.Array, labels: jax.Array, costs: MatcherCosts) -> jax.Array:
    """The class term [B, Q, T] of the cost for target labels [B, T] (see the module docstring)."""
    x = logits.astype(jnp.float32)
    if costs.class_kind == "softmax":
        return -jnp.take_along_axis(jax.nn.softmax(x, axis=-1), labels[:, None, :], axis=-1)
    if costs.class_kind == "focal":
        p = jnp.take_along_axis(jax.nn.sigmoid(x), labels[:, None, :], axis=-1)
        a, g = costs.focal_alpha, costs.focal_gamma
        pos = a * (1.0 - p) ** g * (-jnp.log(p + 1e-8))
        neg = (1.0 - a) * p**g * (-jnp.log(1.0 - p + 1e-8))
        return pos - neg
    raise ValueError(f"matcher class_kind={costs.class_kind!r}: expected one of {CLASS_KINDS}")


def match_cost(
    logits: jax.Array, boxes: jax.Array, targets: DetectionTargets, costs: MatcherCosts = MatcherCosts()
) -> jax.Array:
    """The matching cost [B, Q, T] (float32; padded target columns hold finite junk)."""
    if costs.class_weight == 0 and costs.bbox_weight == 0 and costs.giou_weight == 0:
        raise ValueError("matcher costs: class_weight, bbox_weight and giou_weight cannot all be 0")
    labels = jnp.where(targets.valid, targets.labels, 0).astype(jnp.int32)
    cls = class_cost(logits, labels, costs)  # [B, Q, T]
    # padded slots get a harmless unit box so GIoU stays finite there
    unit = jnp.array([0.5, 0.5, 1.0, 1.0], jnp.float32)
    tboxes = jnp.where(targets.valid[..., None], targets.boxes.astype(jnp.float32), unit)
    pboxes = boxes.astype(jnp.float32)
    l1 = jnp.abs(pboxes[:, :, None, :] - tboxes[:, None, :, :]).sum(-1)
    giou = jax.vmap(generalized_box_iou)(cxcywh_to_xyxy(pboxes), cxcywh_to_xyxy(tboxes))
    cost = costs.bbox_weight * l1 + costs.class_weight * cls + costs.giou_weight * (-giou)
    return jnp.nan_to_num(cost, nan=_BIG, posinf=_BIG, neginf=_BIG)


def _assign_host(cost: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """linear_sum_assignment per image; cost [..., Q, T], valid [..., T] (any leading dims)."""
    from scipy.optimize import linear_sum_assignment

    *lead, q, t = cost.shape
    cost = np.asarray(cost, np.float64).reshape(-1, q, t)
    valid = np.broadcast_to(np.asarray(valid, bool), (*lead, t)).reshape(-1, t)
    query_index = np.zeros((len(cost), t), np.int32)
    matched = np.zeros((len(cost), t), bool)
    query_target = np.full((len(cost), q), -1, np.int32)
    for b in range(len(cost)):
        cols = np.flatnonzero(valid[b])
        if len(cols) == 0:
            continue
        rows, sub = linear_sum_assignment(cost[b][:, cols])
        query_index[b, cols[sub]] = rows
        matched[b, cols[sub]] = True
        query_target[b, rows] = cols[sub]
    return (
        query_index.reshape(*lead, t),
        matched.reshape(*lead, t),
        query_target.reshape(*lead, q),
    )


def _solve_scipy(cost: jax.Array, valid: jax.Array) -> Match:
    b, q, t = cost.shape
    shapes = (
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, t), jnp.bool_),
        jax.ShapeDtypeStruct((b, q), jnp.int32),
    )
    out = jax.pure_callback(_assign_host, shapes, cost, valid, vmap_method="broadcast_all")
    return Match(*out)


def _solve_optax(cost: jax.Array, valid: jax.Array) -> Match:
    b, q, t = cost.shape
    if q < t:
        raise ValueError(f"matcher impl='optax' needs num_queries >= max targets, got Q={q} < T={t}")
    padded = jnp.where(valid[:, None, :], cost, 0.0)

    def one(c, v):
        rows, cols = optax.assignment.hungarian_algorithm(c)  # t pairs (t <= q)
        query_index = jnp.zeros((t,), jnp.int32).at[cols].set(rows.astype(jnp.int32))
        query_target = jnp.full((q,), -1, jnp.int32).at[rows].set(jnp.where(v[cols], cols, -1).astype(jnp.int32))
        return query_index, v, query_target

    query_index, matched, query_target = jax.vmap(one)(padded, valid)
    return Match(jnp.where(matched, query_index, 0), matched, query_target)


def hungarian_match(
    logits: jax.Array,
    boxes: jax.Array,
    targets: DetectionTargets,
    costs: MatcherCosts = MatcherCosts(),
    *,
    impl: str = "scipy",
) -> Match:
    """Assign each valid target to one query minimising the total cost; logits [B, Q, C+1] (softmax
    costs) or [B, Q, C] (focal costs), boxes [B, Q, 4]."""
    cost = jax.lax.stop_gradient(match_cost(logits, boxes, targets, costs))
    valid = jax.lax.stop_gradient(targets.valid.astype(bool))
    if impl == "scipy":
        return _solve_scipy(cost, valid)
    if impl == "optax":
        return _solve_optax(cost, valid)
    raise ValueError(f"matcher impl={impl!r}: expected 'scipy' or 'optax'")


__all__ = ["CLASS_KINDS", "CONDITIONAL_DETR_COSTS", "MatcherCosts", "class_cost", "hungarian_match", "match_cost"]
