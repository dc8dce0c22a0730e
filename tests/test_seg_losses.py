"""Segmentation losses vs float64 NumPy transcriptions of DETR's (and torch's interpolate)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lfi_jax.detection.seg_losses import (
    dice_loss,
    mask_losses,
    resize_bilinear,
    segmentation_criterion,
    sigmoid_focal_loss,
)
from lfi_jax.detection.types import DetectionPredictions, DetectionTargets, Match


def np_focal(x, t, num_boxes, alpha=0.25, gamma=2.0):
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.mean(1).sum() / num_boxes


def np_dice(x, t, num_boxes):
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    num = 2 * (p * t).sum(1)
    den = p.sum(1) + t.sum(1)
    return (1 - (num + 1) / (den + 1)).sum() / num_boxes


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (5, 37)).astype(np.float32)
    t = (rng.random((5, 37)) < 0.4).astype(np.float32)
    return x, t


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0)])
def test_focal_matches_numpy(pair, alpha, gamma):
    x, t = pair
    got = float(sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(t), 3.0, alpha=alpha, gamma=gamma))
    np.testing.assert_allclose(got, np_focal(x, t, 3.0, alpha, gamma), rtol=1e-5)


def test_dice_matches_numpy(pair):
    x, t = pair
    np.testing.assert_allclose(float(dice_loss(jnp.asarray(x), jnp.asarray(t), 4.0)), np_dice(x, t, 4.0), rtol=1e-5)


def test_dice_perfect_and_empty():
    big = np.full((1, 16), 30.0, np.float32)
    assert float(dice_loss(jnp.asarray(big), jnp.ones((1, 16)), 1.0)) == pytest.approx(0.0, abs=1e-6)
    # both empty: (0 + 1) / (0 + 1) -> loss 0
    assert float(dice_loss(jnp.asarray(-big), jnp.zeros((1, 16)), 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_focal_extreme_logits_finite():
    x = jnp.asarray([[80.0, -80.0, 0.0]])
    t = jnp.asarray([[0.0, 1.0, 1.0]])
    v = sigmoid_focal_loss(x, t, 1.0)
    assert np.isfinite(float(v))
    # the saturated wrong pixels lose ce = 80 each, weighted (0.75 / 0.25) * 1^2
    assert float(v) == pytest.approx((0.75 * 80 + 0.25 * 80 + 0.25 * np.log(2) * 0.25) / 3, rel=1e-4)


def test_gradients_vs_float64_transcription(pair):
    x, t = pair
    x, t = x[:3, :11], t[:3, :11]

    def total(v):
        return sigmoid_focal_loss(v, jnp.asarray(t), 2.0) + dice_loss(v, jnp.asarray(t), 2.0)

    got = np.asarray(jax.grad(total)(jnp.asarray(x)), np.float64)
    # central finite differences of the float64 NumPy transcription
    eps = 1e-6
    want = np.zeros_like(got)
    x64 = x.astype(np.float64)
    for idx in np.ndindex(*x.shape):
        hi, lo = x64.copy(), x64.copy()
        hi[idx] += eps
        lo[idx] -= eps
        f = lambda z: np_focal(z, t, 2.0) + np_dice(z, t, 2.0)  # noqa: E731
        want[idx] = (f(hi) - f(lo)) / (2 * eps)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[N, P\]"):
        dice_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 1.0)


def test_resize_matches_torch_bilinear():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
    for size in [(20, 28), (9, 13), (3, 4)]:
        want = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False)
        np.testing.assert_allclose(np.asarray(resize_bilinear(jnp.asarray(x), size)), want.numpy(), atol=1e-5)


def test_mask_losses_on_matched_queries():
    rng = np.random.default_rng(2)
    b, q, t, h, w = 2, 6, 3, 4, 5
    hh, ww = 8, 10
    pred = rng.normal(0, 2, (b, q, h, w)).astype(np.float32)
    tgt = (rng.random((b, t, hh, ww)) < 0.5).astype(np.float32)
    query_index = np.array([[4, 1, 0], [2, 5, 0]], np.int32)
    matched = np.array([[True, True, False], [True, True, True]])
    example_mask = np.array([True, False])  # image 1 is batch padding
    query_target = -np.ones((b, q), np.int32)
    match = Match(jnp.asarray(query_index), jnp.asarray(matched), jnp.asarray(query_target))
    num_boxes = 2.0
    got = mask_losses(jnp.asarray(pred), jnp.asarray(tgt), match, num_boxes, example_mask=jnp.asarray(example_mask))

    up = torch.nn.functional.interpolate(torch.from_numpy(pred).double(), size=(hh, ww), mode="bilinear",
                                         align_corners=False).numpy()
    src, tg = [], []
    for bi in range(b):
        for ti in range(t):
            if matched[bi, ti] and example_mask[bi]:
                src.append(up[bi, query_index[bi, ti]].ravel())
                tg.append(tgt[bi, ti].ravel())
    src, tg = np.stack(src), np.stack(tg)
    np.testing.assert_allclose(float(got.loss_mask), np_focal(src, tg, num_boxes), rtol=1e-5)
    np.testing.assert_allclose(float(got.loss_dice), np_dice(src, tg, num_boxes), rtol=1e-5)

    jitted = jax.jit(lambda p: mask_losses(p, jnp.asarray(tgt), match, num_boxes))(jnp.asarray(pred))
    assert np.isfinite(float(jitted.loss_mask)) and np.isfinite(float(jitted.loss_dice))


def test_mask_losses_shape_mismatch():
    match = Match(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), -jnp.ones((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="disagree"):
        mask_losses(jnp.zeros((1, 3, 4, 4)), jnp.zeros((1, 5, 8, 8)), match, 1.0)


def test_segmentation_criterion_uses_the_last_layer_matching():
    # targets' boxes equal one query's box each and its logits favour the target's class, so the
    # Hungarian assignment is known by construction: target t of image b -> query perm[b][t]
    rng = np.random.default_rng(3)
    b, q, t, c, h, w = 2, 5, 2, 3, 6, 6
    tboxes = np.array([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]], [[0.5, 0.5, 0.4, 0.4], [0.2, 0.8, 0.1, 0.2]]],
                      np.float32)
    labels = np.array([[0, 2], [1, 1]], np.int32)
    valid = np.array([[True, True], [True, False]])
    perm = [[3, 1], [0, 4]]
    boxes = np.tile(np.float32([0.9, 0.1, 0.05, 0.05]), (b, q, 1))
    logits = np.zeros((b, q, c + 1), np.float32)
    logits[..., c] = 3.0
    for bi in range(b):
        for ti in range(t):
            boxes[bi, perm[bi][ti]] = tboxes[bi, ti]
            logits[bi, perm[bi][ti], labels[bi, ti]] = 5.0
    pred_masks = rng.normal(0, 2, (b, q, h, w)).astype(np.float32)
    tmasks = (rng.random((b, t, h, w)) < 0.5).astype(np.float32)
    preds = DetectionPredictions(jnp.asarray(logits), jnp.asarray(boxes))
    targets = DetectionTargets(jnp.asarray(labels), jnp.asarray(tboxes), jnp.asarray(valid))
    out = segmentation_criterion(preds, jnp.asarray(pred_masks), targets, jnp.asarray(tmasks), num_classes=c)
    pairs = [(bi, ti) for bi in range(b) for ti in range(t) if valid[bi, ti]]
    src = np.stack([pred_masks[bi, perm[bi][ti]].ravel() for bi, ti in pairs])
    tg = np.stack([tmasks[bi, ti].ravel() for bi, ti in pairs])
    np.testing.assert_allclose(float(out.masks.loss_mask), np_focal(src, tg, 3.0), rtol=1e-5)
    np.testing.assert_allclose(float(out.masks.loss_dice), np_dice(src, tg, 3.0), rtol=1e-5)
    want_total = float(out.boxes.total) + np_focal(src, tg, 3.0) + np_dice(src, tg, 3.0)
    np.testing.assert_allclose(float(out.total), want_total, rtol=1e-5)
