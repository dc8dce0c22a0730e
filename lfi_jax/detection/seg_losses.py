"""DETR's segmentation losses: sigmoid focal and dice loss on the matched queries' masks.

Transcribed from DETR's `models/segmentation.py` (Carion et al. 2020) and its `SetCriterion.
loss_masks`:

- `sigmoid_focal_loss(logits, targets, num_boxes)` [N, P] -> scalar: per pixel
  ce = BCE-with-logits, p_t = p t + (1 - p)(1 - t), loss = alpha_t ce (1 - p_t)^gamma with
  alpha_t = alpha t + (1 - alpha)(1 - t) (alpha 0.25, gamma 2; alpha < 0 disables the
  weighting, as in DETR); the mean over the P pixels of each mask, summed over the N masks,
  / num_boxes.
- `dice_loss(logits, targets, num_boxes)` [N, P] -> scalar: p = sigmoid(logits),
  1 - (2 sum(p t) + 1) / (sum p + sum t + 1) per mask, summed, / num_boxes.

`mask_losses` applies both to a batch: each matched target's query mask (pred_masks
[B, Q, h, w] logits, as DETR's mask head produces them at 1/4 of the padded input) is
resized bilinearly (PyTorch's `interpolate(mode="bilinear", align_corners=False)`: half-pixel
centres, edge samples clamped, no antialiasing) to the target masks' size [H, W] (the padded
batch canvas; target pixels outside the image are 0, as in DETR's nested tensors) and
compared there. Unmatched slots and images padded onto the batch (`example_mask` False)
contribute nothing. num_boxes is the criterion's (`SetCriterionOutput.num_boxes`: valid target
boxes in the global batch, at least 1; see `lfi_jax.detection.criterion`), so the mask losses
are normalised like the box losses. DETR weights them 1 and 1 (`mask_loss_coef`,
`dice_loss_coef`).

`segmentation_criterion` is DETR's segmentation loss of a batch: the box criterion
(`set_criterion`, every decoder layer) plus the mask losses of the LAST layer's matching (DETR
computes masks for the last layer only), total = boxes.total + mask_weight * loss_mask +
dice_weight * loss_dice.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lfi_jax.detection.criterion import CriterionWeights, SetCriterionOutput, set_criterion
from lfi_jax.detection.matcher import MatcherCosts
from lfi_jax.detection.types import DetectionPredictions, DetectionTargets, Match


class MaskLosses(NamedTuple):
    loss_mask: jax.Array  # sigmoid focal loss
    loss_dice: jax.Array


class MaskLossWeights(NamedTuple):
    mask_weight: float = 1.0
    dice_weight: float = 1.0
    alpha: float = 0.25
    gamma: float = 2.0


def _focal_per_mask(logits: jax.Array, targets: jax.Array, alpha: float, gamma: float) -> jax.Array:
    """[..., P] -> [...]: the focal loss averaged over the pixels of each mask."""
    x = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    prob = jax.nn.sigmoid(x)
    ce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))  # stable BCE with logits
    p_t = prob * t + (1.0 - prob) * (1.0 - t)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return loss.mean(-1)


def _dice_per_mask(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[..., P] -> [...]: 1 - soft Dice coefficient (+1 smoothing) of each mask."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    t = targets.astype(jnp.float32)
    num = 2.0 * (p * t).sum(-1)
    den = p.sum(-1) + t.sum(-1)
    return 1.0 - (num + 1.0) / (den + 1.0)


def _check_pair(logits: jax.Array, targets: jax.Array, what: str) -> None:
    if logits.shape != targets.shape or logits.ndim != 2:
        raise ValueError(f"{what}: logits {logits.shape} and targets {targets.shape} must both be [N, P]")


def sigmoid_focal_loss(
    logits: jax.Array, targets: jax.Array, num_boxes: jax.Array | float, *, alpha: float = 0.25, gamma: float = 2.0
) -> jax.Array:
    """DETR's `sigmoid_focal_loss` of masks logits [N, P] vs binary targets [N, P] (see the module docstring)."""
    _check_pair(logits, targets, "sigmoid_focal_loss")
    return _focal_per_mask(logits, targets, alpha, gamma).sum() / num_boxes


def dice_loss(logits: jax.Array, targets: jax.Array, num_boxes: jax.Array | float) -> jax.Array:
    """DETR's `dice_loss` of mask logits [N, P] vs binary targets [N, P] (see the module docstring)."""
    _check_pair(logits, targets, "dice_loss")
    return _dice_per_mask(logits, targets).sum() / num_boxes


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[..., h, w] -> [..., H, W] as PyTorch's bilinear interpolate with align_corners=False."""
    return jax.image.resize(x.astype(jnp.float32), (*x.shape[:-2], *size), method="bilinear", antialias=False)


def mask_losses(
    pred_masks: jax.Array,
    target_masks: jax.Array,
    match: Match,
    num_boxes: jax.Array | float,
    *,
    example_mask: jax.Array | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> MaskLosses:
    """Focal and dice loss of the matched queries' masks.

    pred_masks [B, Q, h, w] logits; target_masks [B, T, H, W] in {0, 1} (slot t of image b is
    the mask of target box t, as `DetectionTargets`); match: the last layer's assignment
    (`SetCriterionOutput.match`); num_boxes: the criterion's normaliser.
    """
    if pred_masks.ndim != 4 or target_masks.ndim != 4:
        raise ValueError(f"pred_masks {pred_masks.shape} must be [B, Q, h, w], target_masks {target_masks.shape} "
                         "[B, T, H, W]")
    b, _, _, _ = pred_masks.shape
    bt, t, hh, ww = target_masks.shape
    if bt != b or match.query_index.shape != (b, t):
        raise ValueError(f"pred_masks {pred_masks.shape}, target_masks {target_masks.shape} and the match's "
                         f"query_index {match.query_index.shape} disagree on [B, T]")
    src = jax.vmap(lambda pm, qi: pm[qi])(pred_masks, match.query_index.astype(jnp.int32))  # [B, T, h, w]
    src = resize_bilinear(src, (hh, ww)).reshape(b, t, hh * ww)
    tgt = target_masks.astype(jnp.float32).reshape(b, t, hh * ww)
    m = match.matched.astype(bool)
    if example_mask is not None:
        m = m & example_mask.astype(bool)[:, None]
    w = m.astype(jnp.float32)
    focal = (_focal_per_mask(src, tgt, alpha, gamma) * w).sum() / num_boxes
    dice = (_dice_per_mask(src, tgt) * w).sum() / num_boxes
    return MaskLosses(focal, dice)


def weighted_mask_loss(losses: MaskLosses, weights: MaskLossWeights = MaskLossWeights()) -> jax.Array:
    """mask_weight * loss_mask + dice_weight * loss_dice (DETR: 1 and 1)."""
    return weights.mask_weight * losses.loss_mask + weights.dice_weight * losses.loss_dice


class SegCriterionOutput(NamedTuple):
    total: jax.Array
    boxes: SetCriterionOutput
    masks: MaskLosses


def segmentation_criterion(
    preds: DetectionPredictions,
    pred_masks: jax.Array,
    targets: DetectionTargets,
    target_masks: jax.Array,
    *,
    num_classes: int,
    weights: CriterionWeights = CriterionWeights(),
    mask_weights: MaskLossWeights = MaskLossWeights(),
    costs: MatcherCosts = MatcherCosts(),
    example_mask: jax.Array | None = None,
    matcher_impl: str = "scipy",
) -> SegCriterionOutput:
    """Box criterion + the last layer's mask losses (see the module docstring)."""
    boxes = set_criterion(preds, targets, num_classes=num_classes, weights=weights, costs=costs,
                          example_mask=example_mask, matcher_impl=matcher_impl)
    masks = mask_losses(pred_masks, target_masks, boxes.match, boxes.num_boxes, example_mask=example_mask,
                        alpha=mask_weights.alpha, gamma=mask_weights.gamma)
    return SegCriterionOutput(boxes.total + weighted_mask_loss(masks, mask_weights), boxes, masks)


__all__ = [
    "MaskLossWeights",
    "MaskLosses",
    "SegCriterionOutput",
    "dice_loss",
    "mask_losses",
    "resize_bilinear",
    "segmentation_criterion",
    "sigmoid_focal_loss",
    "weighted_mask_loss",
]
