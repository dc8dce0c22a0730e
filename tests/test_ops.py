import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfi_jax.ops import interaction_attention
from reference_math import interaction_attention_ref


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
    from lfi_jax.ops.interaction_attention import default_block_q

    assert [default_block_q(n) for n in (37, 197, 785, 2048, 3137, 8192, 10**6)] == [128, 128, 128, 128, 64, 32, 16]
