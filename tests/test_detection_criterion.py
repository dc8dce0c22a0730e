"""DETR set criterion against transformers' DETR loss (PyTorch) on the same inputs."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfi_jax.detection.criterion import CriterionWeights, set_criterion
from lfi_jax.detection.types import DetectionPredictions, DetectionTargets

torch = pytest.importorskip("torch")
hf_loss = pytest.importorskip("transformers.loss.loss_for_object_detection")

L, B, Q, T, C = 3, 4, 6, 4, 5


def _case(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(L, B, Q, C + 1)).astype(np.float32)
    boxes = np.concatenate([0.2 + 0.6 * rng.random((L, B, Q, 2)), 0.05 + 0.3 * rng.random((L, B, Q, 2))], -1)
    labels = rng.integers(0, C, size=(B, T)).astype(np.int32)
    tboxes = np.concatenate([0.2 + 0.6 * rng.random((B, T, 2)), 0.05 + 0.3 * rng.random((B, T, 2))], -1)
    valid = rng.random((B, T)) < 0.6
    valid[0] = False  # an image without objects
    valid[1] = True
    return logits, boxes.astype(np.float32), labels, tboxes.astype(np.float32), valid


def _torch_loss(logits, boxes, labels, tboxes, valid, w=CriterionWeights()):
    cfg = SimpleNamespace(
        class_cost=1.0,
        bbox_cost=5.0,
        giou_cost=2.0,
        num_labels=C,
        eos_coefficient=w.eos_coef,
        auxiliary_loss=True,
        bbox_loss_coefficient=w.bbox_weight,
        giou_loss_coefficient=w.giou_weight,
        decoder_layers=L,
    )
    lg = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    bx = torch.tensor(boxes, dtype=torch.float32, requires_grad=True)
    tg = [
        {
            "class_labels": torch.tensor(labels[i][valid[i]], dtype=torch.int64),
            "boxes": torch.tensor(tboxes[i][valid[i]], dtype=torch.float32),
        }
        for i in range(len(labels))
    ]
    loss, loss_dict, _ = hf_loss.ForObjectDetectionLoss(
        lg[-1], tg, "cpu", bx[-1], cfg, outputs_class=lg, outputs_coord=bx
    )
    loss.backward()
    return loss.item(), {k: float(v.detach()) for k, v in loss_dict.items()}, lg.grad.numpy(), bx.grad.numpy()


def _loss_fn(lg, bx, labels, tboxes, valid, example_mask):
    preds = DetectionPredictions(lg[-1], bx[-1], lg[:-1], bx[:-1])
    out = set_criterion(preds, DetectionTargets(labels, tboxes, valid), num_classes=C, example_mask=example_mask)
    return out.total, out


# one compiled function for every test (same shapes; example_mask all True = no padding)
_jax_grad = jax.jit(jax.value_and_grad(_loss_fn, argnums=(0, 1), has_aux=True))


def _jax_loss(logits, boxes, labels, tboxes, valid, example_mask=None):
    mask = np.ones(len(labels), bool) if example_mask is None else np.asarray(example_mask)
    (total, out), grads = _jax_grad(logits, boxes, labels, tboxes, valid, mask)
    return total, out, grads


@pytest.mark.parametrize("seed", [0, 1])
def test_criterion_matches_transformers(seed):
    logits, boxes, labels, tboxes, valid = _case(seed)
    ref_total, ref, ref_glg, ref_gbx = _torch_loss(logits, boxes, labels, tboxes, valid)
    total, out, (glg, gbx) = _jax_loss(logits, boxes, labels, tboxes, valid)
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5, atol=1e-5)
    for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
        np.testing.assert_allclose(float(getattr(out.final, name)), ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
        for i in range(L - 1):
            np.testing.assert_allclose(
                float(getattr(out.aux, name)[i]), ref[f"{name}_{i}"], rtol=1e-5, atol=1e-5, err_msg=f"{name}_{i}"
            )
    np.testing.assert_allclose(float(out.num_boxes), valid.sum())
    np.testing.assert_allclose(np.asarray(glg), ref_glg, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gbx), ref_gbx, atol=1e-5)


def test_padded_examples_contribute_nothing():
    logits, boxes, labels, tboxes, valid = _case(2)
    keep = np.array([True, True, False, True])
    ref_total, _, _, _ = _torch_loss(
        logits[:, keep], boxes[:, keep], labels[keep], tboxes[keep], valid[keep]
    )
    total, _, _ = _jax_loss(logits, boxes, labels, tboxes, valid, example_mask=jnp.asarray(keep))
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5, atol=1e-5)
