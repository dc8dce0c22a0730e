import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_math import dot_product_attention_ref, interaction_attention_ref

from lfi_jax.ops import GateParams, default_block_q, dot_product_attention, interaction_attention


def make_inputs(b, n, h, d, g, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 8)
    q, q2, k, v = (jax.random.normal(ks[i], (b, n, h, d)).astype(dtype) for i in range(4))
    if g is None:
        gate = None
    elif g == 0:
        gate = {"w2": jax.random.normal(ks[4], (h, 2, 2)) * 0.3, "b2": jax.random.normal(ks[5], (h, 2))}
    else:
        gate = {
            "w1": jax.random.normal(ks[4], (h, 2, g)) * 0.5,
            "b1": jax.random.normal(ks[5], (h, g)) * 0.5,
            "w2": jax.random.normal(ks[6], (h, g, 2)) * 0.5,
            "b2": jax.random.normal(ks[7], (h, 2)),
        }
    return q, q2, k, v, gate


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("n,h,d,g", [(5, 1, 4, 3), (37, 3, 8, 8), (50, 2, 16, 0), (19, 2, 8, None)])
def test_matches_float64_reference(impl, n, h, d, g):
    q, q2, k, v, gate = make_inputs(2, n, h, d, g, seed=n)
    o, cls = interaction_attention(q, q2, k, v, gate, impl=impl, block_q=16)
    o_ref, cls_ref = interaction_attention_ref(q, q2, k, v, gate)
    np.testing.assert_allclose(np.asarray(o), o_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(cls), cls_ref, atol=1e-6, rtol=1e-5)
    assert cls.dtype == jnp.float32


@pytest.mark.parametrize("n", [37, 197])
def test_chunked_equals_xla_values_and_grads(n):
    q, q2, k, v, gate = make_inputs(1, n, 2, 8, 4, seed=1)
    w = jax.random.normal(jax.random.key(9), (1, n, 2, 8))
    wc = jax.random.normal(jax.random.key(10), (1, 2, n))

    def loss(impl):
        def f(q, q2, k, v, gate):
            o, cls = interaction_attention(q, q2, k, v, gate, impl=impl, block_q=32)
            return jnp.sum(o * w) + jnp.sum(cls * wc)

        return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4))(q, q2, k, v, gate)

    (lx, gx), (lc, gc) = loss("xla"), loss("chunked")
    np.testing.assert_allclose(lx, lc, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gc)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_bfloat16_inputs_keep_float32_softmax():
    q, q2, k, v, gate = make_inputs(1, 37, 2, 16, 4, seed=3, dtype=jnp.bfloat16)
    o, cls = interaction_attention(q, q2, k, v, gate, impl="chunked", block_q=16)
    assert o.dtype == jnp.bfloat16 and cls.dtype == jnp.float32
    o_ref, cls_ref = interaction_attention_ref(q, q2, k, v, gate)
    np.testing.assert_allclose(np.asarray(o, np.float32), o_ref, atol=6e-2, rtol=5e-2)
    np.testing.assert_allclose(np.asarray(cls), cls_ref, atol=1e-2)


def test_chunked_memory_is_linear():
    # Compiled temporaries of forward+backward at N=785: chunked must stay far below xla.
    n, h, d = 785, 6, 64
    q, q2, k, v, gate = make_inputs(1, n, h, d, 8)

    def temp_bytes(impl):
        f = lambda *a: jnp.sum(interaction_attention(*a, impl=impl)[0])  # noqa: E731
        g = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))
        return g.lower(q, q2, k, v, gate).compile().memory_analysis().temp_size_in_bytes

    xla, chunked = temp_bytes("xla"), temp_bytes("chunked")
    assert chunked * 4 < xla, (chunked, xla)


def test_shape_errors_are_clear():
    q, q2, k, v, gate = make_inputs(1, 9, 2, 4, 2)
    with pytest.raises(ValueError, match="k has shape"):
        interaction_attention(q, q2, k[:, :, :1], v, gate)
    with pytest.raises(ValueError, match="unknown impl"):
        interaction_attention(q, q2, k, v, gate, impl="nope")
    bad = dict(gate, w1=gate["w1"][:1])
    with pytest.raises(ValueError, match="heads"):
        interaction_attention(q, q2, k, v, bad)


def test_default_block_q_bounds_the_block_maps():
    assert [default_block_q(n) for n in (37, 197, 785, 2048, 3137, 8192, 10**6)] == [128, 128, 128, 128, 64, 32, 16]


# ----------------------------------------------------------------------------- cross-attention


def _cross_inputs(b, nq, nk, h, d, g, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q, q2, _, _, gate = make_inputs(b, nq, h, d, g, seed=seed)
    k, v = (jax.random.normal(ks[i], (b, nk, h, d)) for i in range(2))
    valid = np.ones((b, nk), bool)
    valid[0, nk - 3 :] = False  # padded keys at the end of example 0
    if b > 1:
        valid[1, [1, 4]] = False  # and in the middle of example 1
    return q, q2, k, v, gate, jnp.asarray(valid)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("nq,nk,g", [(7, 19, 3), (40, 13, 0), (9, 9, None)])
def test_cross_attention_with_key_mask_matches_float64_reference(impl, nq, nk, g):
    q, q2, k, v, gate, mask = _cross_inputs(2, nq, nk, 2, 8, g, seed=nq)
    o, rows = interaction_attention(q, q2, k, v, gate, impl=impl, block_q=16, key_mask=mask, return_rows=True)
    o_ref, rows_ref = interaction_attention_ref(q, q2, k, v, gate, key_mask=mask, return_rows=True)
    assert rows.shape == (2, 2, nq, nk) and rows.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o), o_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(rows), rows_ref, atol=1e-6, rtol=1e-5)
    assert float(jnp.max(jnp.where(mask[:, None, None, :], 0.0, rows))) == 0.0  # no mass on padding
    _, cls = interaction_attention(q, q2, k, v, gate, impl=impl, block_q=16, key_mask=mask)
    np.testing.assert_allclose(np.asarray(cls), rows_ref[:, :, 0], atol=1e-6, rtol=1e-5)


def test_padded_keys_do_not_change_the_output():
    """Appending masked keys (any values) gives the same result as leaving them out."""
    q, q2, k, v, gate, _ = _cross_inputs(1, 5, 11, 2, 8, 4, seed=3)
    junk = jax.random.normal(jax.random.key(5), (1, 6, 2, 8)) * 10
    kp, vp = jnp.concatenate([k, junk], 1), jnp.concatenate([v, junk], 1)
    mask = jnp.arange(17)[None] < 11
    for impl in ("xla", "chunked"):
        o, rows = interaction_attention(q, q2, k, v, gate, impl=impl, return_rows=True)
        op, rowsp = interaction_attention(q, q2, kp, vp, gate, impl=impl, key_mask=mask, return_rows=True)
        np.testing.assert_allclose(np.asarray(op), np.asarray(o), atol=1e-6)
        np.testing.assert_allclose(np.asarray(rowsp[..., :11]), np.asarray(rows), atol=1e-7)


def _numeric_grads(f, args, eps=1e-4):
    """Central differences of a float64 scalar function of a tuple of arrays."""
    out = []
    for i, x in enumerate(args):
        x = np.array(x, np.float64)
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            hi, lo = x.copy(), x.copy()
            hi[idx] += eps
            lo[idx] -= eps
            g[idx] = (f(*args[:i], hi, *args[i + 1 :]) - f(*args[:i], lo, *args[i + 1 :])) / (2 * eps)
        out.append(g)
    return out


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_cross_attention_gradients_match_float64_finite_differences(impl):
    b, nq, nk, h, d, g = 2, 3, 5, 2, 4, 2
    q, q2, k, v, gate, mask = _cross_inputs(b, nq, nk, h, d, g, seed=11)
    mask = mask.at[0, 1].set(False)
    r = np.random.default_rng(0)
    wo = r.normal(size=(b, nq, h, d))
    wr = r.normal(size=(b, h, nq, nk)) * nk
    keys = ("w1", "b1", "w2", "b2")
    args = (q, q2, k, v) + tuple(gate[key] for key in keys)

    def loss_ref(*a):
        o, rows = interaction_attention_ref(*a[:4], dict(zip(keys, a[4:])), key_mask=mask, return_rows=True)
        return float(np.sum(o * wo) + np.sum(rows * wr))

    def loss(*a):
        o, rows = interaction_attention(
            *a[:4], dict(zip(keys, a[4:])), impl=impl, block_q=2, key_mask=mask, return_rows=True
        )
        return jnp.sum(o * wo) + jnp.sum(rows * wr)

    grads = jax.grad(loss, argnums=tuple(range(len(args))))(*args)
    expected = _numeric_grads(loss_ref, [np.asarray(a, np.float64) for a in args])
    for name, got, want in zip(("q", "q2", "k", "v") + keys, grads, expected):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-3, err_msg=name)
    # Masked keys receive no gradient at all.
    assert float(jnp.max(jnp.abs(jnp.where(mask[..., None, None], 0.0, grads[2])))) == 0.0
    assert float(jnp.max(jnp.abs(jnp.where(mask[..., None, None], 0.0, grads[3])))) == 0.0


def test_dot_product_attention_with_mask_matches_reference():
    q, _, k, v, _, mask = _cross_inputs(2, 6, 10, 3, 8, None, seed=4)
    o, c = dot_product_attention(q, k, v, key_mask=mask)
    o_ref, c_ref = dot_product_attention_ref(q, k, v, key_mask=mask)
    np.testing.assert_allclose(np.asarray(o), o_ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(c), c_ref, atol=1e-6)
    o2, c2 = dot_product_attention(q, k, v)
    o2_ref, c2_ref = dot_product_attention_ref(q, k, v)
    np.testing.assert_allclose(np.asarray(o2), o2_ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(c2), c2_ref, atol=1e-6)


def test_gate_params_and_dict_forms_agree():
    q, q2, k, v, gate = make_inputs(1, 9, 2, 8, 3, seed=2)
    params = GateParams.from_dict(gate)
    assert params.hidden == 3 and GateParams.from_dict({"w2": gate["w2"][:, :2], "b2": gate["b2"]}).hidden == 0
    o1, c1 = interaction_attention(q, q2, k, v, gate)
    o2, c2 = interaction_attention(q, q2, k, v, params)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    linear = GateParams(None, None, gate["w2"][:, :2], gate["b2"])
    g = jax.grad(lambda p: jnp.sum(interaction_attention(q, q2, k, v, p)[0]))(linear)
    assert isinstance(g, GateParams) and g.w1 is None and g.w2.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="expected keys"):
        GateParams.from_dict({"w1": gate["w1"], "w2": gate["w2"]})


def test_cross_attention_errors_name_the_argument():
    q, q2, k, v, gate, mask = _cross_inputs(2, 4, 6, 2, 8, 2)
    with pytest.raises(ValueError, match="key_mask must be"):
        interaction_attention(q, q2, k, v, gate, key_mask=mask[:, :5])
    with pytest.raises(ValueError, match="q2 has shape"):
        interaction_attention(q, q2[:, :3], k, v, gate)
    with pytest.raises(ValueError, match="v has 5"):
        interaction_attention(q, q2, k, v[:, :5], gate)


def test_auto_choice_is_logged_once(caplog):
    from lfi_jax.ops import default_impl

    with caplog.at_level("INFO", logger="lfi_jax.ops.interaction_attention"):
        assert default_impl("tpu") == "pallas" and default_impl("tpu") == "pallas"
        assert default_impl("cpu") == "chunked"
    tpu_lines = [r for r in caplog.records if "on tpu: pallas" in r.getMessage()]
    assert len(tpu_lines) == 1


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_value_width_may_differ_from_query_width(impl):
    """Conditional-DETR's cross-attention: q, k 2 d_head wide, v d_head wide."""
    q, q2, k, _, gate, mask = _cross_inputs(2, 20, 13, 2, 16, 3, seed=6)
    v = jax.random.normal(jax.random.key(8), (2, 13, 2, 8))
    o, rows = interaction_attention(q, q2, k, v, gate, impl=impl, block_q=8, key_mask=mask, return_rows=True)
    o_ref, rows_ref = interaction_attention_ref(q, q2, k, v, gate, key_mask=mask, return_rows=True)
    assert o.shape == (2, 20, 2, 8)
    np.testing.assert_allclose(np.asarray(o), o_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(rows), rows_ref, atol=1e-6, rtol=1e-5)
    o2, c2 = dot_product_attention(q, k, v, key_mask=mask)
    o2_ref, _ = dot_product_attention_ref(q, k, v, key_mask=mask)
    np.testing.assert_allclose(np.asarray(o2), o2_ref, atol=2e-5)
