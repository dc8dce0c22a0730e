"""Hungarian matcher: its total cost equals the brute-force minimum over all assignments."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfi_jax.detection.matcher import MatcherCosts, hungarian_match
from lfi_jax.detection.types import DetectionTargets


def _np_cost(logits, boxes, labels, tboxes, w=(1.0, 5.0, 2.0)):
    """Float64 transcription of DETR's matching cost for one image: [Q, T]."""
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)

    def corners(b):
        b = np.asarray(b, np.float64)
        return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)

    a, b = corners(boxes), corners(tboxes)
    cost = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            iw = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            ih = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            inter = iw * ih
            union = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1]) + (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1]) - inter
            enc = (max(a[i, 2], b[j, 2]) - min(a[i, 0], b[j, 0])) * (max(a[i, 3], b[j, 3]) - min(a[i, 1], b[j, 1]))
            giou = inter / union - (enc - union) / enc
            l1 = np.abs(np.asarray(boxes[i], np.float64) - np.asarray(tboxes[j], np.float64)).sum()
            cost[i, j] = w[1] * l1 - w[0] * p[i, labels[j]] - w[2] * giou
    return cost


def _brute_min(cost):
    """Minimum total cost over all injective maps of the smaller side into the larger."""
    q, t = cost.shape
    if t == 0:
        return 0.0
    if t <= q:
        return min(sum(cost[r, c] for c, r in enumerate(perm)) for perm in itertools.permutations(range(q), t))
    return min(sum(cost[r, c] for r, c in enumerate(perm)) for perm in itertools.permutations(range(t), q))


def _random_case(rng, b, q, t, c, ties):
    logits = rng.normal(size=(b, q, c + 1)).astype(np.float32)
    boxes = np.concatenate([0.2 + 0.6 * rng.random((b, q, 2)), 0.05 + 0.4 * rng.random((b, q, 2))], -1)
    labels = rng.integers(0, c, size=(b, t))
    tboxes = np.concatenate([0.2 + 0.6 * rng.random((b, t, 2)), 0.05 + 0.4 * rng.random((b, t, 2))], -1)
    valid = rng.random((b, t)) < 0.7
    valid[0] = False  # an image without targets
    if t > 0:
        valid[1] = True  # one with all slots valid
    if ties:  # duplicated queries and duplicated targets: several optimal assignments
        logits[:, 1] = logits[:, 0]
        boxes[:, 1] = boxes[:, 0]
        if t > 1:
            labels[:, 1] = labels[:, 0]
            tboxes[:, 1] = tboxes[:, 0]
    return logits, boxes.astype(np.float32), labels, tboxes.astype(np.float32), valid


def _check(logits, boxes, labels, tboxes, valid, match, w=(1.0, 5.0, 2.0)):
    for i in range(len(logits)):
        cols = np.flatnonzero(valid[i])
        cost = _np_cost(logits[i], boxes[i], labels[i][cols], tboxes[i][cols], w)
        q = len(logits[i])
        qi, m, qt = (np.asarray(x[i]) for x in match)
        assert not m[~valid[i]].any()
        assert m.sum() == min(q, len(cols))
        rows = qi[cols][m[cols]]
        assert len(set(rows.tolist())) == len(rows)  # one query per target
        for c in np.flatnonzero(m):  # the query side agrees
            assert qt[qi[c]] == c
        assert (qt >= 0).sum() == m.sum()
        total = sum(cost[qi[c], k] for k, c in enumerate(cols) if m[c])
        np.testing.assert_allclose(total, _brute_min(cost), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["scipy", "optax"])
@pytest.mark.parametrize("ties", [False, True])
def test_matcher_brute_force_jit_vmap(impl, ties):
    rng = np.random.default_rng(1 + ties)
    d, b, q, t, c = 2, 4, 5, 4, 3
    cases = [_random_case(rng, b, q, t, c, ties) for _ in range(d)]
    logits, boxes, labels, tboxes, valid = (np.stack(x) for x in zip(*cases))

    @jax.jit
    @jax.vmap
    def run(lg, bx, lb, tb, v):
        return hungarian_match(lg, bx, DetectionTargets(lb, tb, v), impl=impl)

    out = run(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(tboxes), jnp.asarray(valid))
    for k in range(d):
        _check(logits[k], boxes[k], labels[k], tboxes[k], valid[k], [x[k] for x in out])


def test_matcher_more_targets_than_queries_and_weights():
    rng = np.random.default_rng(7)
    logits, boxes, labels, tboxes, valid = _random_case(rng, 3, 3, 5, 4, ties=False)
    w = MatcherCosts(class_weight=2.0, bbox_weight=1.0, giou_weight=0.5)
    out = jax.jit(lambda *a: hungarian_match(*a[:2], DetectionTargets(*a[2:]), w))(
        logits, boxes, labels, tboxes, valid
    )
    _check(logits, boxes, labels, tboxes, valid, out, w=tuple(w))


def test_matcher_no_gradient_and_bad_impl():
    rng = np.random.default_rng(3)
    logits, boxes, labels, tboxes, valid = _random_case(rng, 2, 4, 3, 3, ties=False)
    tg = DetectionTargets(jnp.asarray(labels), jnp.asarray(tboxes), jnp.asarray(valid))

    def f(lg):
        m = hungarian_match(lg, jnp.asarray(boxes), tg)
        return (lg.sum(-1) * (m.query_target >= 0)).sum()

    g = jax.jit(jax.grad(f))(jnp.asarray(logits))  # differentiates through the selection only
    assert np.isfinite(np.asarray(g)).all()
    with pytest.raises(ValueError, match="impl"):
        hungarian_match(jnp.asarray(logits), jnp.asarray(boxes), tg, impl="nope")
    with pytest.raises(ValueError, match="cannot all be 0"):
        hungarian_match(jnp.asarray(logits), jnp.asarray(boxes), tg, MatcherCosts(0, 0, 0))
