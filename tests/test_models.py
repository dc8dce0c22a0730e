
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lfi_jax.models import PRETRAINED_GATE_BIAS, ViT, count_params, ivit_config, ivit_from_vit, variant


def tiny(**kw):
    base = dict(image_size=16, num_classes=5, depth=3, hidden_size=32, num_heads=4, mlp_dim=64)
    base.update(kw)
    return variant("Ti/4", **base)


def _images(b=2, s=16, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, s, s, 3))


def test_vit_shapes_and_no_aux():
    m = ViT(tiny(), rngs=nnx.Rngs(0))
    logits, aux = m(_images())
    assert logits.shape == (2, 5) and aux == {}


def test_ivit_returns_cls_rows_for_align_layers_only():
    cfg = ivit_config(tiny(), align_layers=(0, -1))
    logits, aux = ViT(cfg, rngs=nnx.Rngs(0))(_images())
    rows = aux["cls_attn"]
    assert rows.shape == (2, 2, 4, 17)
    np.testing.assert_allclose(np.asarray(rows.sum(-1)), 1.0, rtol=1e-5)


def test_iq_off_ic_on_supervises_original_queries():
    cfg = tiny(interaction_constraint=True)
    m = ViT(cfg, rngs=nnx.Rngs(0))
    _, aux = m(_images())
    assert aux["cls_attn"].shape == (2, 3, 4, 17)
    assert not hasattr(m.encoder.layer[0].attention, "interaction_query")


def test_ivit_from_vit_matches_vit_within_gate_bound():
    vit = ViT(tiny(num_classes=5), rngs=nnx.Rngs(0))
    # A non-zero head so logits are informative.
    vit.classifier.kernel[...] = jax.random.normal(jax.random.key(5), vit.classifier.kernel.shape)
    x = _images()
    lv, _ = vit(x)
    icfg = ivit_config(vit.cfg, gate_bias_init=PRETRAINED_GATE_BIAS, gate_init_scale=0.0)
    iv = ivit_from_vit(vit, icfg)
    li, _ = iv(x)
    # With Wq' = Wq, C_agt = C_vfm, so C_f = (g1 + g2) C_vfm with g1 + g2 = sigmoid(-4) + sigmoid(4) = 1.
    np.testing.assert_allclose(np.asarray(li), np.asarray(lv), atol=1e-4)
    # Now change Wq' only: the effect is bounded by g1 = sigmoid(-4) ~ 0.018 per layer.
    for layer in iv.encoder.layer:
        a = layer.attention.interaction_query
        a.kernel[...] = a.kernel[...] + jax.random.normal(jax.random.key(1), a.kernel.shape)
    li2, _ = iv(x)
    d_small = float(jnp.abs(li2 - lv).max())
    # Same perturbation with an open gate (g1 = g2 = 0.5) moves the logits far more.
    for layer in iv.encoder.layer:
        layer.attention.gate.b2[...] = jnp.zeros_like(layer.attention.gate.b2[...])
    li3, _ = iv(x)
    d_open = float(jnp.abs(li3 - lv).max())
    assert 0 < d_small < d_open / 5


def test_param_counts_match_paper_table1():
    deltas = {}
    for name, paper in [("S/16", 1.8e6), ("B/16", 7e6), ("L/16", 25e6)]:
        v = variant(name, image_size=224, num_classes=200)
        deltas[name] = count_params(ivit_config(v)) - count_params(v)
        # Wq' is D*D + D per layer; the gates are tiny.
        d, depth = v.hidden_size, v.depth
        h, g = v.num_heads, v.gate_hidden
        assert deltas[name] == depth * (d * d + d) + depth * h * (2 * g + g + 2 * g + 2)
        assert deltas[name] == pytest.approx(paper, rel=0.05)
    # Absolute ViT sizes: 22M, 86M, 304M in the paper.
    assert count_params(variant("S/16", num_classes=200)) == pytest.approx(22e6, rel=0.03)


def test_bfloat16_compute_float32_params():
    cfg = ivit_config(tiny(dtype="bfloat16"))
    m = ViT(cfg, rngs=nnx.Rngs(0))
    logits, aux = m(_images())
    assert logits.dtype == jnp.float32 and aux["cls_attn"].dtype == jnp.float32
    params = nnx.state(m, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_remat_and_chunked_give_same_gradients():
    cfg = ivit_config(tiny())
    x = _images()

    def grads(c):
        m = ViT(c, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(m, nnx.Param)

        def f(p):
            logits, aux = nnx.merge(graphdef, p)(x)
            return jnp.sum(logits**2) + jnp.sum(aux["cls_attn"] ** 2)

        return jax.grad(f)(params)

    g1 = grads(cfg)
    g2 = grads(ivit_config(tiny(remat=True, attn_impl="chunked")))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.image_size"):
        tiny(image_size=18)
    with pytest.raises(ValueError, match="align_layers"):
        tiny(align_layers=(7,))
    with pytest.raises(ValueError, match="unknown ViT variant"):
        variant("XL/16")
    m = ViT(tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.image_size"):
        m(jnp.zeros((1, 32, 32, 3)))


def test_gate_bias_unset_means_zero_from_scratch_and_minus4_plus4_from_a_vit():
    assert tiny().gate_bias_init is None
    scratch = ViT(ivit_config(tiny()), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(scratch.encoder.layer[0].attention.gate.b2[...]), np.zeros((4, 2)))
    vit = ViT(tiny(), rngs=nnx.Rngs(0))
    made = ivit_from_vit(vit, ivit_config(tiny()))
    assert made.cfg.gate_bias_init == PRETRAINED_GATE_BIAS == (-4.0, 4.0)
    for layer in made.encoder.layer:
        np.testing.assert_array_equal(np.asarray(layer.attention.gate.b2[...]), np.tile([-4.0, 4.0], (4, 1)))
    zero = ivit_from_vit(vit, ivit_config(tiny(), gate_bias_init=[0, 0]))  # a list, as JSON gives it
    assert zero.cfg.gate_bias_init == (0.0, 0.0)
    np.testing.assert_array_equal(np.asarray(zero.encoder.layer[1].attention.gate.b2[...]), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="model.gate_bias_init"):
        tiny(gate_bias_init=(1.0, 2.0, 3.0))


def test_gate_kind_comes_from_the_config():
    linear = ViT(ivit_config(tiny(gate_hidden=0)), rngs=nnx.Rngs(0)).encoder.layer[0].attention.gate.params()
    assert linear.w1 is None and linear.b1 is None and linear.w2.shape == (4, 2, 2) and linear.hidden == 0
    hidden = ViT(ivit_config(tiny(gate_hidden=3)), rngs=nnx.Rngs(0)).encoder.layer[0].attention.gate.params()
    assert hidden.w1.shape == (4, 2, 3) and hidden.b1.shape == (4, 3) and hidden.w2.shape == (4, 3, 2)
    assert hidden.hidden == 3
