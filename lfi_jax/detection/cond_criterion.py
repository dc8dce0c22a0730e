"""Conditional-DETR's set criterion (Meng et al. 2021; transformers' `DeformableDetrImageLoss` +
`DeformableDetrForObjectDetectionLoss`, which `ConditionalDetrForObjectDetection` uses).

Per decoder layer, after Hungarian matching with the focal class cost
(`lfi_jax.detection.matcher`, `CONDITIONAL_DETR_COSTS`: class 2, L1 5, GIoU 2):

- `loss_ce`: the sigmoid focal loss over all B x Q x C logits (C = num_classes, no no-object
  logit): target 1 for a matched query's class, 0 everywhere else (an unmatched query's
  targets are all 0); per element ce = BCE-with-logits, p_t = p t + (1 - p)(1 - t),
  alpha_t = alpha t + (1 - alpha)(1 - t), loss = alpha_t ce (1 - p_t)^gamma (alpha 0.25,
  gamma 2), summed over B, Q and C and divided by num_boxes (transformers writes it as
  `loss.mean(1).sum() / num_boxes * Q`, the same sum);
- `loss_bbox`, `loss_giou`: DETR's (`lfi_jax.detection.criterion.box_losses`), / num_boxes;
- `cardinality_error` (logging only): mean |#queries whose largest sigmoid exceeds 0.5 - #targets|.

total = sum over the last and every auxiliary layer of ce_weight * loss_ce + bbox_weight *
loss_bbox + giou_weight * loss_giou. The original Conditional-DETR weighs the class loss 2
(`cls_loss_coef`, transformers' `ConditionalDetrConfig.cls_loss_coefficient`), the default
here; transformers' `DeformableDetrForObjectDetectionLoss` sums it with weight 1 (its
`weight_dict` ignores `cls_loss_coefficient`): `FocalWeights(ce_weight=1.0)` gives its total.
num_boxes and padded images (`example_mask`) as in `lfi_jax.detection.criterion`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lfi_jax.detection.criterion import LayerLosses, SetCriterionOutput, box_losses, criterion_over_layers
from lfi_jax.detection.matcher import CONDITIONAL_DETR_COSTS, MatcherCosts
from lfi_jax.detection.types import DetectionPredictions, DetectionTargets, Match


class FocalWeights(NamedTuple):
    ce_weight: float = 2.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0


def sigmoid_focal_sum(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
    """Elementwise sigmoid focal loss of logits and {0, 1} targets (same shape), float32, not reduced."""
    x = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    prob = jax.nn.sigmoid(x)
    ce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))  # stable BCE with logits
    p_t = prob * t + (1.0 - prob) * (1.0 - t)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return loss


def focal_layer_losses(
    logits: jax.Array,
    boxes: jax.Array,
    targets: DetectionTargets,
    match: Match,
    num_boxes: jax.Array,
    *,
    num_classes: int,
    alpha: float = 0.25,
    gamma: float = 2.0,
    example_mask: jax.Array | None = None,
) -> LayerLosses:
    """The Conditional-DETR losses of one layer given its matching (logits [B, Q, C], boxes [B, Q, 4])."""
    b, q, c = logits.shape
    if c != num_classes:
        raise ValueError(f"logits have {c} classes; a focal (Conditional-DETR) criterion expects num_classes = "
                         f"{num_classes} (no no-object logit)")
    ex = jnp.ones((b,), jnp.float32) if example_mask is None else example_mask.astype(jnp.float32)
    has = match.query_target >= 0
    tgt_label = jnp.take_along_axis(targets.labels.astype(jnp.int32), jnp.maximum(match.query_target, 0), axis=1)
    onehot = jax.nn.one_hot(jnp.where(has, tgt_label, num_classes), num_classes + 1, dtype=jnp.float32)[..., :-1]
    focal = sigmoid_focal_sum(logits, onehot, alpha, gamma)  # [B, Q, C]
    loss_ce = (focal.sum((1, 2)) * ex).sum() / num_boxes

    loss_bbox, loss_giou = box_losses(boxes, targets, match, num_boxes, example_mask=example_mask)

    pred_objects = (jax.nn.sigmoid(logits.astype(jnp.float32)).max(-1) > 0.5).sum(-1).astype(jnp.float32)
    n_targets = targets.valid.sum(-1).astype(jnp.float32)
    card = jax.lax.stop_gradient((jnp.abs(pred_objects - n_targets) * ex).sum() / jnp.maximum(ex.sum(), 1.0))
    return LayerLosses(loss_ce, loss_bbox, loss_giou, card)


def focal_set_criterion(
    preds: DetectionPredictions,
    targets: DetectionTargets,
    *,
    num_classes: int,
    weights: FocalWeights = FocalWeights(),
    costs: MatcherCosts = CONDITIONAL_DETR_COSTS,
    example_mask: jax.Array | None = None,
    matcher_impl: str = "scipy",
) -> SetCriterionOutput:
    """Conditional-DETR's loss of a batch: last layer plus auxiliary layers (see the module docstring)."""
    if costs.class_kind != "focal":
        raise ValueError(f"a focal criterion matches with the focal class cost, not class_kind={costs.class_kind!r}")

    def losses(logits, boxes, targets, match, num_boxes):
        return focal_layer_losses(logits, boxes, targets, match, num_boxes, num_classes=num_classes,
                                  alpha=weights.alpha, gamma=weights.gamma, example_mask=example_mask)

    return criterion_over_layers(preds, targets, losses, (weights.ce_weight, weights.bbox_weight, weights.giou_weight),
                                 costs=costs, example_mask=example_mask, matcher_impl=matcher_impl)


__all__ = ["FocalWeights", "focal_layer_losses", "focal_set_criterion", "sigmoid_focal_sum"]
