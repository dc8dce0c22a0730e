"""Conditional-DETR's set criterion (sigmoid focal class loss, focal matching cost, auxiliary
layers) against transformers' loss of `ConditionalDetrForObjectDetection` on the same logits,
boxes and targets."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")

from transformers.loss.loss_deformable_detr import (  # noqa: E402
    DeformableDetrForObjectDetectionLoss,
    DeformableDetrHungarianMatcher,
)

from lfi_jax.detection.cond_criterion import FocalWeights, focal_set_criterion  # noqa: E402
from lfi_jax.detection.matcher import CONDITIONAL_DETR_COSTS, hungarian_match  # noqa: E402
from lfi_jax.detection.types import DetectionPredictions, DetectionTargets  # noqa: E402

C, Q, LAYERS, T = 5, 7, 3, 4
COUNTS = (3, 1, 0)  # targets per image (the last image has none)


def _targets(rng):
    labels = np.zeros((len(COUNTS), T), np.int32)
    boxes = np.tile(np.array([0.5, 0.5, 1.0, 1.0], np.float32), (len(COUNTS), T, 1))
    valid = np.zeros((len(COUNTS), T), bool)
    for b, n in enumerate(COUNTS):
        labels[b, :n] = rng.integers(0, C, n)
        centre = rng.uniform(0.2, 0.8, (n, 2))
        size = rng.uniform(0.05, 0.4, (n, 2))
        boxes[b, :n] = np.concatenate([centre, size], -1)
        valid[b, :n] = True
    return labels, boxes, valid


def _hf_labels(labels, boxes, valid):
    return [{"class_labels": torch.as_tensor(labels[b][valid[b]], dtype=torch.int64),
             "boxes": torch.as_tensor(boxes[b][valid[b]])} for b in range(len(labels))]


def _ours(logits, boxes, aux_logits, aux_boxes, labels, tboxes, valid, **kw):
    preds = DetectionPredictions(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(aux_logits),
                                 jnp.asarray(aux_boxes))
    targets = DetectionTargets(jnp.asarray(labels), jnp.asarray(tboxes), jnp.asarray(valid))
    return focal_set_criterion(preds, targets, num_classes=C, **kw)


def _hf_config(**kw):
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                         out_features=["stage2"])
    base = dict(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
                encoder_layers=1, decoder_layers=LAYERS, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=Q, num_labels=C, auxiliary_loss=True)
    base.update(kw)
    return transformers.ConditionalDetrConfig(**base)


def _compare(ours, loss_dict, total_hf, ours_weight1_total):
    final = ours.final
    for name, value in (("loss_ce", final.loss_ce), ("loss_bbox", final.loss_bbox), ("loss_giou", final.loss_giou),
                        ("cardinality_error", final.cardinality_error)):
        np.testing.assert_allclose(float(value), float(loss_dict[name]), rtol=1e-5, atol=1e-6, err_msg=name)
    for i in range(LAYERS - 1):
        for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            np.testing.assert_allclose(float(getattr(ours.aux, name)[i]), float(loss_dict[f"{name}_{i}"]), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name}_{i}")
    np.testing.assert_allclose(float(ours_weight1_total), float(total_hf), rtol=1e-5)


def test_focal_criterion_matches_transformers_on_random_outputs():
    rng = np.random.default_rng(0)
    logits_all = rng.normal(0.0, 2.0, (LAYERS, len(COUNTS), Q, C)).astype(np.float32)
    boxes_all = (1 / (1 + np.exp(-rng.normal(0.0, 1.0, (LAYERS, len(COUNTS), Q, 4))))).astype(np.float32)
    labels, tboxes, valid = _targets(rng)
    config = _hf_config()
    total_hf, loss_dict, _ = DeformableDetrForObjectDetectionLoss(
        torch.as_tensor(logits_all[-1]), _hf_labels(labels, tboxes, valid), "cpu", torch.as_tensor(boxes_all[-1]),
        config, torch.as_tensor(logits_all), torch.as_tensor(boxes_all),
    )
    args = (logits_all[-1], boxes_all[-1], logits_all[:-1], boxes_all[:-1], labels, tboxes, valid)
    ours1 = _ours(*args, weights=FocalWeights(ce_weight=1.0))
    _compare(ours1, loss_dict, total_hf, ours1.total)
    # the default weighs the class loss 2, as the original Conditional-DETR (cls_loss_coef)
    ours2 = _ours(*args)
    extra = float(ours1.final.loss_ce) + float(ours1.aux.loss_ce.sum())
    np.testing.assert_allclose(float(ours2.total), float(ours1.total) + extra, rtol=1e-6)
    # an image padded onto the batch changes nothing
    pad = lambda a, axis: np.concatenate([a, np.take(a, [0], axis=axis)], axis=axis)  # noqa: E731
    padded = _ours(pad(args[0], 0), pad(args[1], 0), pad(args[2], 1), pad(args[3], 1), pad(labels, 0), pad(tboxes, 0),
                   pad(valid, 0), weights=FocalWeights(ce_weight=1.0),
                   example_mask=jnp.asarray([True] * len(COUNTS) + [False]))
    np.testing.assert_allclose(float(padded.total), float(ours1.total), rtol=1e-6)


def test_focal_matching_is_transformers_assignment():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, (len(COUNTS), Q, C)).astype(np.float32)
    boxes = (1 / (1 + np.exp(-rng.normal(0.0, 1.0, (len(COUNTS), Q, 4))))).astype(np.float32)
    labels, tboxes, valid = _targets(rng)
    hf = DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)(
        {"logits": torch.as_tensor(logits), "pred_boxes": torch.as_tensor(boxes)}, _hf_labels(labels, tboxes, valid)
    )
    m = hungarian_match(jnp.asarray(logits), jnp.asarray(boxes),
                        DetectionTargets(jnp.asarray(labels), jnp.asarray(tboxes), jnp.asarray(valid)),
                        CONDITIONAL_DETR_COSTS)
    for b, (rows, cols) in enumerate(hf):
        want = dict(zip(cols.tolist(), rows.tolist()))
        got = {t: int(m.query_index[b, t]) for t in range(T) if bool(m.matched[b, t])}
        assert got == want, b


def test_focal_criterion_on_a_tiny_transformers_model():
    """The loss transformers' ConditionalDetrForObjectDetection computes in its forward pass, from
    that forward pass's own logits and boxes (auxiliary layers included)."""
    torch.manual_seed(0)
    model = transformers.ConditionalDetrForObjectDetection(_hf_config()).eval()
    rng = np.random.default_rng(2)
    labels, tboxes, valid = _targets(rng)
    pixels = torch.as_tensor(rng.normal(size=(len(COUNTS), 3, 32, 40)).astype(np.float32))
    with torch.no_grad():
        out = model(pixel_values=pixels, labels=_hf_labels(labels, tboxes, valid))
    aux_logits = np.stack([a["logits"].numpy() for a in out.auxiliary_outputs])
    aux_boxes = np.stack([a["pred_boxes"].numpy() for a in out.auxiliary_outputs])
    assert aux_logits.shape == (LAYERS - 1, len(COUNTS), Q, C)
    ours = _ours(out.logits.numpy(), out.pred_boxes.numpy(), aux_logits, aux_boxes, labels, tboxes, valid,
                 weights=FocalWeights(ce_weight=1.0))
    _compare(ours, out.loss_dict, out.loss, ours.total)


def test_sigmoid_postprocess_is_transformers_post_process_object_detection():
    from types import SimpleNamespace

    from lfi_jax.detection.postprocess import postprocess_sigmoid

    proc = transformers.ConditionalDetrImageProcessorPil()
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 2.0, (2, Q, C)).astype(np.float32)
    boxes = (1 / (1 + np.exp(-rng.normal(0.0, 1.0, (2, Q, 4))))).astype(np.float32)
    for k in (10, 100):  # fewer than and more than the Q x C pairs
        want = proc.post_process_object_detection(
            SimpleNamespace(logits=torch.as_tensor(logits), pred_boxes=torch.as_tensor(boxes)), threshold=-1.0,
            top_k=k)
        got = postprocess_sigmoid(jnp.asarray(logits), jnp.asarray(boxes), top_k=k)
        for b in range(2):
            np.testing.assert_allclose(np.asarray(got.scores[b]), want[b]["scores"].numpy(), rtol=1e-6)
            np.testing.assert_array_equal(np.asarray(got.labels[b]), want[b]["labels"].numpy())
            np.testing.assert_allclose(np.asarray(got.boxes[b]), want[b]["boxes"].numpy(), atol=1e-6)
