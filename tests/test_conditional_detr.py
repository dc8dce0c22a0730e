"""Conditional-DETR / I-Conditional-DETR against transformers' ConditionalDetrForObjectDetection.

Tiny random transformers models (a small `ResNetConfig` backbone, no timm) are saved with
`save_pretrained` and loaded by path. Their weights are redrawn at scales where every term
matters (frozen BatchNorm statistics, biases, the reference-point head), so a wrong layout,
a swapped half of the concatenated query or a missing mask shows up far above 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from detr_fixtures import (  # noqa: E402
    MICRO_SIZES,
    check_compare_command,
    flat_equal,
    gate_bias,
    grad_norms,
    hf_config,
    inputs,
    max_diff,
    micro_fields,
    one_torch_thread,  # noqa: F401
    perturb_interaction_queries,
    random_hf_model,
    random_values,
    reference_outputs,
    saved,
)
from flax import nnx  # noqa: E402

from lfi_jax.compare.detr import forward  # noqa: E402
from lfi_jax.models.conditional_detr import (  # noqa: E402
    ConditionalDetrConfig,
    count_params,
    iconditional_detr_config,
)
from lfi_jax.models.convert.conditional_detr import (  # noqa: E402
    _shapes,
    expected_tensors,
    fill_conditional_detr,
    iconditional_detr_from_conditional_detr,
    load_hf_conditional_detr,
    normalize_hf_conditional_detr_names,
    save_hf_conditional_detr,
)
from lfi_jax.models.convert.io import CheckpointError  # noqa: E402
from lfi_jax.models.detr import PRETRAINED_GATE_BIAS  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(transformers.ConditionalDetrForObjectDetection,
                           hf_config(transformers.ConditionalDetrConfig))


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    return saved(hf_model, tmp_path_factory, "tiny-conditional-detr")


@pytest.fixture(scope="module")
def cdetr(hf_dir):
    """(model, cfg) of the tiny checkpoint, loaded once (tests do not change it)."""
    return load_hf_conditional_detr(hf_dir)


@pytest.fixture(scope="module")
def reference(hf_dir):
    return reference_outputs(transformers.ConditionalDetrForObjectDetection, hf_dir)


def test_parity_with_transformers_through_the_compare_command(hf_dir, capsys):
    """Sigmoid classes (5, no no-object logit); the spatial half of the query matters."""
    check_compare_command("conditional_detr", hf_dir, capsys, perturbed="q_pos_sine_proj", num_classes=5)


def _icdetr(cdetr):
    """The I-Conditional-DETR of the checkpoint (Wq' = Wq, the pretrained gate bias)."""
    detr, cfg = cdetr
    icfg = iconditional_detr_config(cfg, gate_bias_init=PRETRAINED_GATE_BIAS)
    return iconditional_detr_from_conditional_detr(detr, icfg)


def test_cross_attention_rows_are_transformers_conditional_attention_maps(hf_dir, cdetr, reference):
    """IC on: the rows are the conditional cross-attention maps of every decoder layer, with
    IQ off (C_vfm) and with IQ on from Wq' = Wq (C_agt: the same query, content half replaced by
    an equal copy, the spatial half shared). The head-mean maps (`attn_rows=True`) come with them."""
    _, _, x, m = inputs()
    want = np.stack([a.numpy() for a in reference.cross_attentions], axis=1)  # [B, L, H, Q, Nk]
    model, cfg = load_hf_conditional_detr(hf_dir, interaction_constraint=True)
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s: nnx.merge(graphdef, s)(x, m, attn_rows=True))(state)
    assert out.agt_rows.shape == want.shape == (2, cfg.decoder_layers, 4, cfg.num_queries, 3 * 3)
    np.testing.assert_allclose(np.asarray(out.agt_rows), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.attn_rows), want.mean(axis=2), atol=1e-5, rtol=0)
    key_mask = np.asarray(out.key_mask)
    assert key_mask[0].all() and not key_mask[1].all()
    assert np.all(np.asarray(out.agt_rows)[1][..., ~key_mask[1]] == 0)

    imodel = _icdetr(cdetr)
    np.testing.assert_allclose(np.asarray(forward(imodel, x, m).agt_rows), want, atol=1e-5, rtol=0)
    # C_agt follows the interaction query, not the content projection.
    perturb_interaction_queries(imodel)
    assert np.max(np.abs(np.asarray(forward(imodel, x, m).agt_rows) - want)) > 1e-2


def test_iconditional_detr_starts_out_as_the_conditional_detr(cdetr):
    detr, cfg = cdetr
    _, _, x, m = inputs()
    base = forward(detr, x, m)
    model = _icdetr(cdetr)
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert sum("interaction_query" in p and p[-1] == "kernel" for p in paths) == cfg.decoder_layers
    out = forward(model, x, m)
    d_near = max_diff(out, base)
    assert d_near < 2e-2
    rows = np.asarray(out.agt_rows)
    assert rows.shape == (2, cfg.decoder_layers, 4, cfg.num_queries, 9)
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)

    # C_agt's gate weight exactly 0: the same model; at [-4, +4] again d_near ...
    gate_bias(model, [-1e4, 1e4])
    assert max_diff(forward(model, x, m), base) < 1e-6
    gate_bias(model, PRETRAINED_GATE_BIAS)
    assert max_diff(forward(model, x, m), base) == d_near
    # ... and much nearer than with Wq' != Wq (so the first check can fail).
    perturb_interaction_queries(model)
    assert max_diff(forward(model, x, m), base) > 5 * d_near


def test_loading_with_interaction_is_the_interaction_start(hf_dir, cdetr):
    """`load_hf_conditional_detr(dir, interaction=True)` = `iconditional_detr_from_conditional_detr`
    of the loaded model with the pretrained gate bias (IQ, IC and GC on)."""
    imodel, icfg = load_hf_conditional_detr(hf_dir, interaction=True)
    assert icfg.interaction_queries and icfg.interaction_constraint and icfg.gated_control
    flat_equal(imodel, _icdetr(cdetr))


def test_save_and_load_round_trip(hf_dir, cdetr, tmp_path):
    model, cfg = cdetr
    save_hf_conditional_detr(model, str(tmp_path / "out"))
    original = transformers.ConditionalDetrForObjectDetection.from_pretrained(hf_dir).state_dict()
    again = transformers.ConditionalDetrForObjectDetection.from_pretrained(str(tmp_path / "out")).state_dict()
    assert set(again) == set(original)
    for k, v in original.items():
        assert torch.equal(again[k], v), k
    back, bcfg = load_hf_conditional_detr(str(tmp_path / "out"))
    assert bcfg == cfg and isinstance(bcfg, ConditionalDetrConfig)
    imodel = iconditional_detr_from_conditional_detr(
        model, iconditional_detr_config(cfg, gate_bias_init=PRETRAINED_GATE_BIAS, gate_hidden=3), seed=1
    )
    save_hf_conditional_detr(imodel, str(tmp_path / "icdetr"))
    back, bcfg = load_hf_conditional_detr(str(tmp_path / "icdetr"))
    assert bcfg == imodel.cfg
    a = flat_equal(imodel, back)
    assert any("interaction_query" in p for p in a) and any("gate" in p for p in a)


def test_in_memory_names_and_a_missing_tensor(hf_model, hf_dir, cdetr, tmp_path):
    """transformers 5's in-memory names (q_content_proj, o_proj, mlp.fc1) read as the saved ones;
    a checkpoint lacking a tensor is refused with the file and the tensor named."""
    cfg = cdetr[1]
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert any(".self_attn.q_content_proj." in k for k in sd) and any(".mlp.fc1." in k for k in sd)
    assert set(normalize_hf_conditional_detr_names(sd)) == set(expected_tensors(cfg))
    assert "model.decoder.layers.0.ca_qpos_proj.weight" in expected_tensors(cfg)
    assert "model.decoder.layers.1.ca_qpos_proj.weight" not in expected_tensors(cfg)

    from safetensors.numpy import load_file, save_file

    d = tmp_path / "broken"
    d.mkdir()
    tensors = load_file(f"{hf_dir}/model.safetensors")
    del tensors["model.decoder.layers.1.ca_qpos_sine_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(open(f"{hf_dir}/config.json").read())
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*\n.*missing.*\n.*ca_qpos_sine_proj"):
        load_hf_conditional_detr(str(d))


def test_parameter_count_of_conditional_detr_r50():
    hf_cfg = transformers.ConditionalDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91,
        backbone_config=transformers.ResNetConfig(out_features=["stage4"]),
    )
    with torch.device("meta"):
        hf = transformers.ConditionalDetrForObjectDetection(hf_cfg)
    n_hf = sum(p.numel() for p in hf.parameters())  # frozen BatchNorm tensors are buffers there
    cfg = ConditionalDetrConfig()
    assert cfg.num_queries == 300
    n = count_params(cfg)
    assert n == n_hf
    assert 43.0e6 < n < 43.6e6  # Conditional-DETR-R50: 43M
    # I-Conditional-DETR: + one D x D + bias interaction query and one gate per decoder layer
    n_i = count_params(iconditional_detr_config(cfg))
    assert n_i - n == 6 * (256 * 256 + 256) + 6 * 8 * (2 * 8 + 8 + 8 * 2 + 2)


def _micro_random(**kw):
    """A very small I-Conditional-DETR with NumPy-drawn parameters (eager random init is slow)."""
    cfg = iconditional_detr_config(ConditionalDetrConfig(**micro_fields(**kw)))
    return fill_conditional_detr(cfg, random_values(_shapes(cfg)))


def test_dropout_only_with_an_rng_and_the_interaction_parts_get_gradients():
    """(interaction_in="encoder_self" is DETR's encoder, tested in tests/test_detr.py.)"""
    model = _micro_random(dropout=0.3)
    _, _, x, m = inputs(MICRO_SIZES)
    graphdef, params = nnx.split(model, nnx.Param)

    def value(out):
        return jnp.sum(out.logits ** 2) + jnp.sum(out.pred_boxes) + jnp.sum(out.aux_logits ** 2)

    def loss(params, rng):
        return value(nnx.merge(graphdef, params)(x, m, rng=rng))

    f = jax.jit(jax.value_and_grad(loss))
    a, grads = f(params, jax.random.key(0))
    assert f(params, jax.random.key(0))[0] == a and abs(float(f(params, jax.random.key(1))[0] - a)) > 1e-4
    plain = forward(model, x, m)
    assert max_diff(plain, forward(model, x, m)) == 0.0  # no rng: no dropout
    assert abs(float(value(plain)) - a) > 1e-4  # dropout on with an rng
    nk = int(plain.key_mask.shape[1])
    assert plain.agt_rows.shape == (2, 2, 2, 3, nk) and plain.query_mask is None
    norms = grad_norms(grads)
    assert max(v for p, v in norms.items() if "normalization" in p) == 0.0  # frozen BatchNorm
    parts = ("interaction_query", "gate", "ca_qpos_sine_proj", "ref_point_head", "query_scale", "convolution")
    for part in parts:
        assert max(v for p, v in norms.items() if part in p) > 0.0, part
