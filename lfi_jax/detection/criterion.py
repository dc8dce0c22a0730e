"""DETR's set criterion (Carion et al. 2020; transformers' `ImageLoss` + `ForObjectDetectionLoss`).

Per decoder layer, after Hungarian matching (`lfi_jax.detection.matcher`):

- `loss_ce`: cross-entropy over all B x Q queries, the target of an unmatched query the
  no-object class (index `num_classes`), class weights 1 and `eos_coef` (0.1) for no-object,
  reduced as PyTorch's weighted mean: sum(w * nll) / sum(w);
- `loss_bbox`: L1 between matched predicted and target normalised cxcywh boxes, summed, / num_boxes;
- `loss_giou`: sum of (1 - GIoU) over matched pairs, / num_boxes;

total = sum over the last layer and every auxiliary layer of
ce_weight * loss_ce + bbox_weight * loss_bbox + giou_weight * loss_giou (1 / 5 / 2).
Each auxiliary layer is matched on its own outputs, as in DETR.

num_boxes. DETR divides the box losses by the number of target boxes all-reduced over the
data-parallel processes and divided by their count (clamped at 1), then DDP averages the
gradients over processes; together that is sum over the GLOBAL batch / number of boxes in the
global batch. Here the loss is computed once on the global batch inside one jit (the batch
axis sharded over devices, no psum needed: XLA's reductions are global), so
num_boxes = max(number of valid targets in the batch, 1), which is that same quantity. (Two
small differences to per-device DETR: the clamp applies to the global count rather than the
per-device average, and the class loss is the global weighted mean rather than the average of
per-device weighted means.)

Images padded onto a batch (`example_mask` False) contribute nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lfi_jax.detection.boxes import cxcywh_to_xyxy, paired_generalized_box_iou
from lfi_jax.detection.matcher import MatcherCosts, hungarian_match
from lfi_jax.detection.types import DetectionPredictions, DetectionTargets, Match


class CriterionWeights(NamedTuple):
    ce_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1  # class weight of no-object


class LayerLosses(NamedTuple):
    loss_ce: jax.Array
    loss_bbox: jax.Array
    loss_giou: jax.Array
    cardinality_error: jax.Array  # logging only (no gradient): mean |#predicted objects - #targets|


class SetCriterionOutput(NamedTuple):
    total: jax.Array  # the scalar to minimise
    final: LayerLosses  # last decoder layer
    aux: LayerLosses | None  # each field [L-1], decoder order; None without auxiliary outputs
    match: Match  # the last layer's assignment (e.g. for matched-query alignment)
    num_boxes: jax.Array


# A NumPy constant: a jnp array here would start the JAX backend at import, before
# jax.distributed.initialize can run in a multi-process job.
_UNIT = np.array([0.5, 0.5, 1.0, 1.0], np.float32)


def box_losses(
    boxes: jax.Array, targets: DetectionTargets, match: Match, num_boxes: jax.Array, *,
    example_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(loss_bbox, loss_giou) of one layer's matched boxes (boxes [B, Q, 4]), each / num_boxes."""
    b = boxes.shape[0]
    ex = jnp.ones((b,), jnp.float32) if example_mask is None else example_mask.astype(jnp.float32)
    m = match.matched & (ex[:, None] > 0)  # [B, T]
    src = jnp.take_along_axis(boxes.astype(jnp.float32), match.query_index[..., None], axis=1)  # [B, T, 4]
    src = jnp.where(m[..., None], src, _UNIT)
    tgt = jnp.where(m[..., None], targets.boxes.astype(jnp.float32), _UNIT)
    loss_bbox = jnp.abs(src - tgt).sum(-1).sum() / num_boxes
    giou = paired_generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt))
    loss_giou = jnp.where(m, 1.0 - giou, 0.0).sum() / num_boxes
    return loss_bbox, loss_giou


def layer_losses(
    logits: jax.Array,
    boxes: jax.Array,
    targets: DetectionTargets,
    match: Match,
    num_boxes: jax.Array,
    *,
    num_classes: int,
    eos_coef: float,
    example_mask: jax.Array | None = None,
) -> LayerLosses:
    """The three DETR losses of one layer given its matching (logits [B, Q, C+1], boxes [B, Q, 4])."""
    b, q, c1 = logits.shape
    if c1 != num_classes + 1:
        raise ValueError(f"logits have {c1} classes; expected num_classes + 1 = {num_classes + 1}")
    ex = jnp.ones((b,), jnp.float32) if example_mask is None else example_mask.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    has = match.query_target >= 0
    tgt_label = jnp.take_along_axis(targets.labels.astype(jnp.int32), jnp.maximum(match.query_target, 0), axis=1)
    target_class = jnp.where(has, tgt_label, num_classes)  # [B, Q]
    nll = -jnp.take_along_axis(logp, target_class[..., None], axis=-1)[..., 0]
    w = jnp.where(target_class == num_classes, eos_coef, 1.0) * ex[:, None]
    loss_ce = (w * nll).sum() / jnp.maximum(w.sum(), 1e-12)

    loss_bbox, loss_giou = box_losses(boxes, targets, match, num_boxes, example_mask=example_mask)

    pred_objects = (jnp.argmax(logits, -1) != num_classes).sum(-1).astype(jnp.float32)
    n_targets = targets.valid.sum(-1).astype(jnp.float32)
    card = jax.lax.stop_gradient((jnp.abs(pred_objects - n_targets) * ex).sum() / jnp.maximum(ex.sum(), 1.0))
    return LayerLosses(loss_ce, loss_bbox, loss_giou, card)


def set_criterion(
    preds: DetectionPredictions,
    targets: DetectionTargets,
    *,
    num_classes: int,
    weights: CriterionWeights = CriterionWeights(),
    costs: MatcherCosts = MatcherCosts(),
    example_mask: jax.Array | None = None,
    matcher_impl: str = "scipy",
) -> SetCriterionOutput:
    """DETR's loss of a batch: last layer plus auxiliary layers (see the module docstring)."""

    def losses(logits, boxes, targets, match, num_boxes):
        return layer_losses(logits, boxes, targets, match, num_boxes, num_classes=num_classes,
                            eos_coef=weights.eos_coef, example_mask=example_mask)

    return criterion_over_layers(preds, targets, losses, (weights.ce_weight, weights.bbox_weight, weights.giou_weight),
                                 costs=costs, example_mask=example_mask, matcher_impl=matcher_impl)


def criterion_over_layers(
    preds: DetectionPredictions,
    targets: DetectionTargets,
    losses,
    weights: tuple[float, float, float],
    *,
    costs: MatcherCosts,
    example_mask: jax.Array | None = None,
    matcher_impl: str = "scipy",
) -> SetCriterionOutput:
    """A set criterion over the last and every auxiliary decoder layer, each matched on its own
    outputs. losses(logits, boxes, targets, match, num_boxes) -> LayerLosses of one layer;
    weights = (class, bbox, giou) of the total. num_boxes: valid targets of the batch (>= 1)."""
    valid = targets.valid.astype(bool)
    if example_mask is not None:
        valid = valid & example_mask.astype(bool)[:, None]
    targets = targets._replace(valid=valid)
    num_boxes = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
    w_class, w_bbox, w_giou = weights

    def one(logits, boxes):
        match = hungarian_match(logits, boxes, targets, costs, impl=matcher_impl)
        return losses(logits, boxes, targets, match, num_boxes), match

    def weighted(ls: LayerLosses) -> jax.Array:
        return w_class * ls.loss_ce + w_bbox * ls.loss_bbox + w_giou * ls.loss_giou

    final, match = one(preds.logits, preds.boxes)
    total = weighted(final)
    aux = None
    if preds.aux_logits is not None:
        if preds.aux_boxes is None or preds.aux_boxes.shape[0] != preds.aux_logits.shape[0]:
            raise ValueError("aux_logits and aux_boxes must both be given with the same number of layers")
        aux, _ = jax.vmap(one)(preds.aux_logits, preds.aux_boxes)  # one host call matches all layers
        total = total + weighted(aux).sum()
    return SetCriterionOutput(total, final, aux, match, num_boxes)


__all__ = ["CriterionWeights", "LayerLosses", "SetCriterionOutput", "box_losses", "criterion_over_layers",
           "layer_losses", "set_criterion"]
