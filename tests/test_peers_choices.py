"""The peers' and choices' loss switches against float64 NumPy transcriptions and hand-built
cases, and the experiment grids that use them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfi_jax.config import load_config_file, validate
from lfi_jax.errors import UserError
from lfi_jax.experiments.base import GridOptions
from lfi_jax.experiments.cells import DEMO_CONFIG, cell_config, cell_dirname, config_hash
from lfi_jax.experiments.cli import EXPERIMENTS
from lfi_jax.losses import (
    alignment_loss,
    input_gradients,
    object_rows_alignment_loss,
    outside_mask,
    rrr_penalty,
)

RNG = np.random.default_rng(0)


def _maps(b, p, zeros=0):
    t = RNG.random((b, p))
    t[:, :zeros] = 0
    return t / t.sum(1, keepdims=True)


def _kl(t, a):
    m = t > 0
    return float(np.sum(t[m] * (np.log(t[m]) - np.log(a[m]))))


def test_layer_mean_matches_numpy():
    b, layers, h, n = 3, 4, 2, 10
    rows = RNG.random((b, layers, h, n))
    rows /= rows.sum(-1, keepdims=True)
    t = _maps(b, n - 1, zeros=3)
    want_layer_mean, want_per_layer = [], []
    for i in range(b):
        maps = []
        for ll in range(layers):
            a = rows[i, ll].mean(0)[1:]
            maps.append(a / a.sum())
        want_per_layer.append(np.mean([_kl(t[i], a) for a in maps]))
        want_layer_mean.append(_kl(t[i], np.mean(maps, axis=0)))
    got = alignment_loss(jnp.asarray(rows, jnp.float32), jnp.asarray(t, jnp.float32), reduce="layer_mean")
    np.testing.assert_allclose(float(got), np.mean(want_layer_mean), rtol=1e-5)
    got = alignment_loss(jnp.asarray(rows, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(float(got), np.mean(want_per_layer), rtol=1e-5)
    assert np.mean(want_layer_mean) < np.mean(want_per_layer)  # KL is convex: the two differ
    with pytest.raises(ValueError, match="align_reduce"):
        alignment_loss(jnp.asarray(rows), jnp.asarray(t), reduce="mean")


@pytest.mark.parametrize("reduce", ["per_layer", "layer_mean"])
def test_object_rows_match_numpy(reduce):
    b, layers, n = 3, 2, 10
    rows = RNG.random((b, layers, n, n))
    rows /= rows.sum(-1, keepdims=True)
    t = _maps(b, n - 1, zeros=4)
    t[2] = 0.0  # no object patch: left out
    mask = np.array([1.0, 1.0, 1.0])
    want = []
    for i in range(2):
        obj = [j + 1 for j in range(n - 1) if t[i, j] > 0]  # patch queries (CLS is query 0)
        maps = []
        for ll in range(layers):
            a = np.mean([rows[i, ll, q, 1:] for q in obj], axis=0)
            maps.append(a / a.sum())
        if reduce == "layer_mean":
            want.append(_kl(t[i], np.mean(maps, axis=0)))
        else:
            want.append(np.mean([_kl(t[i], a) for a in maps]))
    got = object_rows_alignment_loss(
        jnp.asarray(rows, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(mask), reduce=reduce
    )
    np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-5)


def test_outside_mask_hand_built():
    t = np.zeros((1, 4))  # 2x2 grid over a 4x4 image
    t[0, 1] = 0.7
    t[0, 2] = 0.3
    got = np.asarray(outside_mask(jnp.asarray(t), (2, 2), (4, 4)))
    want = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], float)
    np.testing.assert_array_equal(got[0], 1 - want)
    got = np.asarray(outside_mask(jnp.asarray(t), (2, 2), (4, 4), threshold=0.5))  # 0.3 <= 0.35: outside
    np.testing.assert_array_equal(got[0][2:, :2], np.ones((2, 2)))


def test_rrr_penalty_linear_model_float64():
    """A linear classifier: d/dx sum_k log softmax(Wx + c)_k = W^T (1 - K softmax), by hand."""
    b, hw, ch, k = 3, 4, 2, 5
    x = RNG.standard_normal((b, hw, hw, ch))
    w = RNG.standard_normal((hw * hw * ch, k))
    c = RNG.standard_normal(k)
    t = _maps(b, 4, zeros=1)
    mask = np.array([1.0, 0.0, 1.0])

    def fn(images):
        return images.reshape(images.shape[0], -1) @ jnp.asarray(w, jnp.float32) + jnp.asarray(c, jnp.float32), {
            "unused": jnp.zeros(())
        }

    (logits, _), grads = input_gradients(fn, jnp.asarray(x, jnp.float32))
    z = x.reshape(b, -1) @ w + c
    sm = np.exp(z - z.max(1, keepdims=True))
    sm /= sm.sum(1, keepdims=True)
    want_g = ((1 - k * sm) @ w.T).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(grads), want_g, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), z, rtol=1e-4, atol=1e-4)
    cells = (t.reshape(b, 2, 2) <= 0).astype(float)
    outside = np.repeat(np.repeat(cells, 2, 1), 2, 2)[..., None]
    per = np.sum((outside * want_g) ** 2, axis=(1, 2, 3))
    want = np.sum(per * mask) / mask.sum()
    got = rrr_penalty(grads, jnp.asarray(t, jnp.float32), (2, 2), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-4)


def _demo(arg, **loss):
    c = load_config_file("demo", arg)
    for key, v in loss.items():
        c.loss[key] = v
    return c


def test_rrr_through_the_vit_matches_finite_differences():
    """The task loss's RRR term: its input gradients agree with central differences of the
    summed log-probabilities of the ViT (float32, a random classifier so the gradient is not 0)."""
    from flax import nnx

    from lfi_jax.models.config import model_config
    from lfi_jax.tasks.classification import new_model

    c = _demo("ic_only,runlocal", align_weight=0.0, rrr_weight=1.0)
    model = new_model(model_config(c), 0)
    model.classifier.kernel[...] = jnp.asarray(RNG.standard_normal(model.classifier.kernel.shape) * 0.5, jnp.float32)
    x = jnp.asarray(RNG.standard_normal((2, 48, 48, 3)), jnp.float32)

    def f(images):
        return jnp.sum(jax.nn.log_softmax(model(images)[0], -1))

    _, grads = input_gradients(lambda im: model(im), x)
    v = jnp.asarray(RNG.standard_normal(x.shape), jnp.float32)
    eps = 1e-2
    fd = (float(f(x + eps * v)) - float(f(x - eps * v))) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(grads * v)), fd, rtol=2e-2)
    assert isinstance(nnx.state(model), nnx.State)


def test_model_rows_hold_the_cls_row():
    from lfi_jax.models.config import model_config
    from lfi_jax.tasks.classification import new_model

    for arg in ("ivit,runlocal", "ic_only,runlocal"):
        model = new_model(model_config(_demo(arg)), 0)
        x = jnp.asarray(RNG.standard_normal((2, 48, 48, 3)), jnp.float32)
        logits, aux = model(x)
        logits_r, aux_r = model(x, attn_rows=True)
        np.testing.assert_allclose(np.asarray(logits_r), np.asarray(logits), atol=1e-5)
        rows = np.asarray(aux_r["attn_rows"])  # [B, L, N, N]
        n = model.cfg.num_tokens  # 1 + the demo's patch grid
        assert rows.shape == (2, 4, n, n)
        np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(rows[:, :, 0], np.asarray(aux["cls_attn"]).mean(2), atol=1e-6)


def test_rrr_needs_the_teacher_and_switches_are_checked():
    validate(_demo("ic_only", align_weight=0.0, rrr_weight=1.0))
    with pytest.raises(UserError, match="loss.rrr_weight"):
        validate(_demo("vit", rrr_weight=1.0))
    with pytest.raises(UserError, match="loss.align_rows"):
        validate(_demo("ivit", align_rows="all"))


def test_experiment_grids():
    opts = GridOptions()
    peers = EXPERIMENTS["peers"].grid(opts)
    assert {c.labels["regime"] for c in peers} == {"shortcut", "hard"}
    rrr = [c for c in peers if c.labels["method"] == "rrr"]
    assert rrr and all(c.edits["loss.rrr_weight"] > 0 and c.edits["loss.align_weight"] == 0 for c in rrr)
    assert [c.edits["ablation"] for c in peers if c.labels["method"] == "attention_transfer"] == ["ic_only"] * 2
    names = set()
    for name in ("peers", "choices", "hard"):
        e = EXPERIMENTS[name]
        for cell in e.grid(opts):
            cfg = cell_config(DEMO_CONFIG, e.default_arg, cell, {}, {})
            validate(cfg)
            names.add((name, cell_dirname(cfg)))
    dirs = [d for _, d in names]
    assert any("rrr" in d for d in dirs) and any("objrows" in d for d in dirs) and any("layermean" in d for d in dirs)
    noise = EXPERIMENTS["teacher_noise"].grid(GridOptions(regimes=("shortcut",)))
    assert all(c.edits["data.options.spurious_p"] == 0.7 for c in noise)
    with pytest.raises(ValueError, match="one regime"):
        EXPERIMENTS["teacher_noise"].grid(GridOptions(regimes=("shortcut", "hard")))


def test_default_switches_keep_the_hash():
    c = _demo("ivit")
    h = config_hash(c)
    for k in ("align_reduce", "align_rows", "rrr_weight", "rrr_threshold"):
        del c.loss[k]
    assert config_hash(c) == h


def test_rrr_weights_option_restricts_the_rrr_rows(capsys):
    from lfi_jax.experiments.cli import main

    cells = EXPERIMENTS["peers"].grid(GridOptions(regimes=("shortcut",), rrr_weights=(1.0,)))
    assert [(c.labels["method"], c.labels["rrr_weight"]) for c in cells] == [
        ("vit", 0.0), ("ivit", 0.0), ("attention_transfer", 0.0), ("rrr", 1.0)]
    assert [c.edits["loss.rrr_weight"] for c in cells if c.labels["method"] == "rrr"] == [1.0]
    for bad, words in (("0", "must be > 0"), ("1,x", "comma-separated numbers")):
        assert main(["peers", "--rrr_weights", bad]) == 2
        err = capsys.readouterr().err
        assert "--rrr_weights" in err and words in err
