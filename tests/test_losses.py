import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_math import alignment_loss_ref, dense_alignment_loss_ref

from lfi_jax.losses import alignment_loss, cross_entropy, dense_alignment_loss


def _rows(b, layers, h, n, seed=0):
    return jax.nn.softmax(jax.random.normal(jax.random.key(seed), (b, layers, h, n)) * 2, axis=-1)


def test_one_hot_teacher_is_minus_log_of_student_mass():
    # Teacher all on patch 2: KL = -log a_2, a = head-mean of patch keys, renormalised.
    rows = _rows(1, 1, 3, 5)
    t = jnp.zeros((1, 4)).at[0, 2].set(1.0)
    a = np.asarray(rows)[0, 0].mean(0)[1:]
    expected = -math.log(a[2] / a.sum())
    np.testing.assert_allclose(float(alignment_loss(rows, t)), expected, rtol=1e-5)


def test_matches_reference_with_zeros_and_mask():
    rows = _rows(4, 3, 2, 10, seed=1)
    t = jax.nn.relu(jax.random.normal(jax.random.key(2), (4, 9)))
    t = t / t.sum(-1, keepdims=True)
    mask = jnp.array([1.0, 0.0, 1.0, 1.0])
    got = float(alignment_loss(rows, t, mask))
    np.testing.assert_allclose(got, alignment_loss_ref(rows, t, mask), rtol=1e-5)
    # The masked example does not matter at all.
    t2 = t.at[1].set(jnp.full((9,), 1 / 9))
    assert float(alignment_loss(rows, t2, mask)) == pytest.approx(got, rel=1e-6)


def test_all_masked_gives_zero_and_finite_grad():
    rows = _rows(2, 1, 1, 5)
    t = jnp.zeros((2, 4))
    loss, g = jax.value_and_grad(lambda r: alignment_loss(r, t, jnp.zeros(2)))(rows)
    assert float(loss) == 0.0 and bool(jnp.all(jnp.isfinite(g)))


def test_paper_direction_is_finite_with_eps_and_matches_reference():
    rows = _rows(2, 2, 2, 6, seed=3)
    t = jnp.array([[1.0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0]])
    got = alignment_loss(rows, t, direction="paper", eps=1e-3)
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), alignment_loss_ref(rows, t, direction="paper", eps=1e-3), rtol=1e-5)
    # Without smoothing, the paper's order is infinite where the teacher is 0.
    assert float(alignment_loss(rows, t, direction="paper", eps=0.0)) > 50


def test_gradient_flows_and_is_finite_with_zero_teacher_entries():
    rows = _rows(2, 2, 2, 6, seed=4)
    t = jnp.array([[1.0, 0, 0, 0, 0], [0, 0, 0.25, 0.75, 0]])
    g = jax.grad(lambda r: alignment_loss(r, t))(rows)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


def test_bad_shapes_and_direction():
    rows = _rows(2, 1, 1, 5)
    with pytest.raises(ValueError, match="teacher must be"):
        alignment_loss(rows, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="align_direction"):
        alignment_loss(rows, jnp.zeros((2, 4)), direction="backwards")


def test_cross_entropy_with_label_smoothing():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    p = np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum()
    assert float(cross_entropy(logits, jnp.array([0]))) == pytest.approx(-math.log(p[0]), rel=1e-6)
    s = 0.3
    target = np.array([1 - s + s / 3, s / 3, s / 3])
    assert float(cross_entropy(logits, jnp.array([0]), label_smoothing=s)) == pytest.approx(
        -(target * np.log(p)).sum(), rel=1e-6
    )


# ----------------------------------------------------------------------------- dense (SPEC section 7)


def _dense_case(b=3, layers=2, h=2, nq=5, nk=8, seed=0):
    r = np.random.default_rng(seed)
    mask = np.ones((b, nk), bool)
    mask[0, -3:] = False
    mask[1, 2] = False
    logits = r.normal(size=(b, layers, h, nq, nk)) * 2
    rows = np.exp(logits) * mask[:, None, None, None, :]
    rows = rows / rows.sum(-1, keepdims=True)
    t = np.maximum(r.normal(size=(b, nk)), 0) * mask
    t[:, 0] += 0.1 * mask[:, 0]
    t = t / t.sum(-1, keepdims=True)
    return jnp.asarray(rows, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(mask)


def test_dense_alignment_matches_float64_reference_query_mean_and_matched():
    rows, t, mask = _dense_case()
    got = float(dense_alignment_loss(rows, t, mask))
    np.testing.assert_allclose(got, dense_alignment_loss_ref(rows, t, mask), rtol=1e-5)
    qm = jnp.asarray([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)  # example 1: nothing matched
    got = float(dense_alignment_loss(rows, t, mask, qm))
    np.testing.assert_allclose(got, dense_alignment_loss_ref(rows, t, mask, qm), rtol=1e-5)
    qml = jnp.asarray(np.random.default_rng(1).random((3, 2, 5)) > 0.5)  # matched per layer
    got = float(dense_alignment_loss(rows, t, mask, qml, example_mask=jnp.asarray([1.0, 1.0, 0.0])))
    np.testing.assert_allclose(got, dense_alignment_loss_ref(rows, t, mask, qml, [1, 1, 0]), rtol=1e-5)


def test_dense_alignment_hand_worked_and_premeaned_form():
    # One example, one layer, one head, two queries over 3 keys (the last padded):
    # a = mean of [0.5, 0.5, 0] and [0.9, 0.1, 0] = [0.7, 0.3]; teacher [1, 0] -> KL = -log 0.7.
    rows = jnp.asarray([[[[[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]]]]])
    t = jnp.asarray([[1.0, 0.0, 0.0]])
    mask = jnp.asarray([[True, True, False]])
    assert float(dense_alignment_loss(rows, t, mask)) == pytest.approx(-math.log(0.7), rel=1e-6)
    assert float(dense_alignment_loss(rows, t, mask, jnp.asarray([[False, True]]))) == pytest.approx(
        -math.log(0.9), rel=1e-6
    )
    pre = jnp.asarray([[[0.7, 0.3, 0.0]]])
    assert float(dense_alignment_loss(pre, t, mask)) == pytest.approx(-math.log(0.7), rel=1e-6)


def test_dense_alignment_gradient_finite_and_none_on_padding():
    rows, t, mask = _dense_case(seed=2)
    g = jax.grad(lambda r: dense_alignment_loss(r, t, mask))(rows)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
    assert float(jnp.abs(jnp.where(mask[:, None, None, None, :], 0.0, g)).max()) == 0.0
    nothing = jnp.zeros((3, 5), bool)
    loss, g0 = jax.value_and_grad(lambda r: dense_alignment_loss(r, t, mask, nothing))(rows)
    assert float(loss) == 0.0 and bool(jnp.all(g0 == 0))


def test_dense_alignment_bad_shapes():
    rows, t, mask = _dense_case()
    with pytest.raises(ValueError, match="must both be"):
        dense_alignment_loss(rows, t[:, :4], mask)
    with pytest.raises(ValueError, match="query_mask must be"):
        dense_alignment_loss(rows, t, mask, jnp.ones((3, 4), bool))
    with pytest.raises(ValueError, match="agt_rows must be"):
        dense_alignment_loss(rows[:, 0], t, mask)
