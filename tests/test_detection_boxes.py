"""Box ops against hand-worked values and a float64 NumPy transcription."""

import jax.numpy as jnp
import numpy as np
import pytest

from lfi_jax.detection.boxes import (
    box_area,
    box_iou,
    cxcywh_to_xyxy,
    generalized_box_iou,
    paired_generalized_box_iou,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)


def _np_giou(a, b):
    """Scalar, float64, one pair at a time (the textbook definition)."""
    out_iou = np.zeros((len(a), len(b)))
    out_giou = np.zeros((len(a), len(b)))
    for i, p in enumerate(np.asarray(a, np.float64)):
        for j, q in enumerate(np.asarray(b, np.float64)):
            area_p = (p[2] - p[0]) * (p[3] - p[1])
            area_q = (q[2] - q[0]) * (q[3] - q[1])
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = area_p + area_q - inter
            cw = max(p[2], q[2]) - min(p[0], q[0])
            ch = max(p[3], q[3]) - min(p[1], q[1])
            out_iou[i, j] = inter / union
            out_giou[i, j] = inter / union - (cw * ch - union) / (cw * ch)
    return out_iou, out_giou


def test_giou_hand_worked():
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7, enclosing box [0,0,3,3] area 9:
    # GIoU = 1/7 - (9 - 7)/9 = (9 - 14)/63 = -5/63.
    a = jnp.array([[0.0, 0, 2, 2]])
    b = jnp.array([[1.0, 1, 3, 3]])
    np.testing.assert_allclose(generalized_box_iou(a, b), [[-5 / 63]], rtol=1e-6)
    np.testing.assert_allclose(box_iou(a, b)[0], [[1 / 7]], rtol=1e-6)
    # disjoint [0,0,1,1] vs [2,2,3,3]: IoU 0, union 2, enclosing 9: GIoU = 0 - 7/9.
    a = jnp.array([[0.0, 0, 1, 1]])
    b = jnp.array([[2.0, 2, 3, 3]])
    np.testing.assert_allclose(generalized_box_iou(a, b), [[-7 / 9]], rtol=1e-6)
    # identical boxes: 1; a box inside another (area ratio 1/4): IoU = GIoU = 1/4
    a = jnp.array([[0.0, 0, 2, 2]])
    np.testing.assert_allclose(generalized_box_iou(a, a), [[1.0]], rtol=1e-6)
    np.testing.assert_allclose(generalized_box_iou(a, jnp.array([[0.5, 0.5, 1.5, 1.5]])), [[0.25]], rtol=1e-6)


def test_conversions_hand_worked():
    b = jnp.array([[0.5, 0.25, 0.2, 0.1]])
    np.testing.assert_allclose(cxcywh_to_xyxy(b), [[0.4, 0.2, 0.6, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(b)), b, rtol=1e-6)
    np.testing.assert_allclose(xyxy_to_xywh(jnp.array([[1.0, 2, 4, 8]])), [[1, 2, 3, 6]])
    np.testing.assert_allclose(box_area(jnp.array([[1.0, 2, 4, 8], [3, 3, 1, 5]])), [18, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_giou_matches_numpy_float64(seed):
    rng = np.random.default_rng(seed)

    def boxes(n):
        cxcy = rng.random((n, 2))
        wh = 0.05 + 0.5 * rng.random((n, 2))
        return np.concatenate([cxcy, wh], 1)

    a, b = boxes(7), boxes(5)
    a_xyxy = np.concatenate([a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2], 1)
    b_xyxy = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)
    np.testing.assert_allclose(cxcywh_to_xyxy(jnp.asarray(a, jnp.float32)), a_xyxy, atol=1e-6)
    iou_ref, giou_ref = _np_giou(a_xyxy, b_xyxy)
    iou, _ = box_iou(jnp.asarray(a_xyxy, jnp.float32), jnp.asarray(b_xyxy, jnp.float32))
    giou = generalized_box_iou(jnp.asarray(a_xyxy, jnp.float32), jnp.asarray(b_xyxy, jnp.float32))
    np.testing.assert_allclose(iou, iou_ref, atol=1e-6)
    np.testing.assert_allclose(giou, giou_ref, atol=1e-6)
    paired = paired_generalized_box_iou(jnp.asarray(a_xyxy[:5], jnp.float32), jnp.asarray(b_xyxy, jnp.float32))
    np.testing.assert_allclose(paired, np.diag(giou_ref[:5]), atol=1e-6)
    assert (giou_ref < 0).any() and (iou_ref > 0).any()  # the draw covers both cases
