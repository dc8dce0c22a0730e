"""Conditional-DETR / I-Conditional-DETR against transformers' ConditionalDetrForObjectDetection.

Tiny random transformers models (a small `ResNetConfig` backbone, no timm) are saved with
`save_pretrained` and loaded by path. Their weights are redrawn at scales where every term
matters (frozen BatchNorm statistics, biases, the reference-point head), so a wrong layout,
a swapped half of the concatenated query or a missing mask shows up far above 1e-4.
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from flax import nnx  # noqa: E402

from lfi_jax.compare import conditional_detr as compare_mod  # noqa: E402
from lfi_jax.compare.detr import forward, make_inputs  # noqa: E402
from lfi_jax.models.conditional_detr import (  # noqa: E402
    ConditionalDetrConfig,
    count_params,
    iconditional_detr_config,
)
from lfi_jax.models.convert.conditional_detr import (  # noqa: E402
    expected_tensors,
    iconditional_detr_from_conditional_detr,
    load_hf_conditional_detr,
    normalize_hf_conditional_detr_names,
    save_hf_conditional_detr,
)
from lfi_jax.models.convert.io import CheckpointError  # noqa: E402
from lfi_jax.models.detr import PRETRAINED_GATE_BIAS  # noqa: E402

SIZES = ((70, 90), (40, 50))  # two images of different sizes, padded to 70 x 90


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hf_config(**kw):
    backbone = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 2, 1, 1], layer_type="bottleneck",
        out_features=["stage4"],
    )
    base = dict(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
                encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=48, decoder_ffn_dim=40, num_queries=6, num_labels=5)
    base.update(kw)
    return transformers.ConditionalDetrConfig(**base)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("weight") and ("norm" in name or "layernorm" in name):
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith(("bias", "running_mean")):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            elif "query_position_embeddings" in name:
                t.copy_(torch.randn(t.shape, generator=g))
            else:  # conv / linear weights: unit-variance outputs
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(math.prod(t.shape[1:])))


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.ConditionalDetrForObjectDetection(_hf_config()).eval()
    _randomize(model, 0)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("cdetr") / "tiny-conditional-detr"
    hf_model.save_pretrained(d)
    return str(d)


def _inputs(sizes=SIZES, seed=1):
    pixels, mask = make_inputs(sizes, seed)
    return pixels, mask, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask.astype(bool))


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(a.logits - b.logits))), float(jnp.max(jnp.abs(a.pred_boxes - b.pred_boxes))))


def _set(model, pred, fn):
    """Replace the parameters whose path satisfies `pred` by fn(path, value), in place."""
    _, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        if pred(path):
            var.set_value(fn(path, var.get_value()))
    nnx.update(model, nnx.from_flat_state(flat))


def test_parity_with_transformers_on_a_padded_batch(hf_dir):
    report = compare_mod.compare_conditional_detr(hf_dir, sizes=SIZES, seed=1)
    assert set(report["max_abs_diff"]) == {"logits", "pred_boxes", "aux_logits", "aux_boxes"}
    assert report["ok"], report
    for key, diff in report["max_abs_diff"].items():
        assert diff < 1e-4, (key, diff)
    assert report["max_abs"]["logits"] > 1.0  # the weights make the outputs far from trivial
    assert report["config"]["num_classes"] == 5  # sigmoid classes, no no-object logit


def test_the_check_fails_when_a_weight_differs(hf_dir):
    report = compare_mod.compare_conditional_detr(hf_dir, sizes=SIZES, seed=1, perturb=True)
    assert not report["ok"] and "logits" in report["above_tol"]
    assert "q_pos_sine_proj" in report["perturbed"]  # the spatial half of the query matters


def test_compare_command_line(hf_dir, capsys):
    p = argparse.ArgumentParser()
    compare_mod.add_arguments(p)
    report = compare_mod.run(p.parse_args(["--hf", hf_dir, "--sizes", "70x90,40x50", "--seed", "2"]))
    assert report["ok"] and report["sizes"] == [[70, 90], [40, 50]]
    main = pytest.importorskip("lfi_jax.compare.__main__")
    assert main.main(["conditional_detr", "--hf", hf_dir, "--sizes", "70x90,40x50"]) == 0
    assert '"mode": "conditional_detr"' in capsys.readouterr().out
    assert main.main(["conditional_detr", "--hf", hf_dir, "--sizes", "70x90,40x50", "--perturb"]) == 1
    assert '"ok": false' in capsys.readouterr().out


def _hf_cross_attentions(hf_dir):
    pixels, mask, x, m = _inputs()
    hf = transformers.ConditionalDetrForObjectDetection.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask), output_attentions=True)
    return x, m, np.stack([a.numpy() for a in ref.cross_attentions], axis=1)  # [B, L, H, Q, Nk]


def test_cross_attention_rows_are_transformers_conditional_attention_maps(hf_dir):
    """IC on: the rows are the conditional cross-attention maps of every decoder layer, with
    IQ off (C_vfm) and with IQ on from Wq' = Wq (C_agt: the same query, content half replaced by
    an equal copy, the spatial half shared)."""
    x, m, want = _hf_cross_attentions(hf_dir)
    model, cfg = load_hf_conditional_detr(hf_dir, interaction_constraint=True)
    out = forward(model, x, m)
    assert out.agt_rows.shape == want.shape == (2, cfg.decoder_layers, 4, cfg.num_queries, 3 * 3)
    np.testing.assert_allclose(np.asarray(out.agt_rows), want, atol=1e-5, rtol=0)
    key_mask = np.asarray(out.key_mask)
    assert key_mask[0].all() and not key_mask[1].all()
    assert np.all(np.asarray(out.agt_rows)[1][..., ~key_mask[1]] == 0)

    imodel, icfg = load_hf_conditional_detr(hf_dir, interaction=True)
    assert icfg.interaction_queries and icfg.interaction_constraint
    np.testing.assert_allclose(np.asarray(forward(imodel, x, m).agt_rows), want, atol=1e-5, rtol=0)
    # C_agt follows the interaction query, not the content projection.
    _set(imodel, lambda p: "interaction_query" in p and p[-1] == "kernel",
         lambda p, v: v + 0.5 * jax.random.normal(jax.random.key(0), v.shape))
    assert np.max(np.abs(np.asarray(forward(imodel, x, m).agt_rows) - want)) > 1e-2


def test_iconditional_detr_starts_out_as_the_conditional_detr(hf_dir):
    detr, cfg = load_hf_conditional_detr(hf_dir)
    _, _, x, m = _inputs()
    base = forward(detr, x, m)

    model = iconditional_detr_from_conditional_detr(
        detr, iconditional_detr_config(cfg, gate_bias_init=PRETRAINED_GATE_BIAS)
    )
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert sum("interaction_query" in p and p[-1] == "kernel" for p in paths) == cfg.decoder_layers
    out = forward(model, x, m)
    d_near = _max_diff(out, base)
    assert d_near < 2e-2
    rows = np.asarray(out.agt_rows)
    assert rows.shape == (2, cfg.decoder_layers, 4, cfg.num_queries, 9)
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)

    # C_agt's gate weight exactly 0: the same model; at [-4, +4] again d_near ...
    _set(model, lambda p: p[-1] == "b2", lambda p, v: jnp.broadcast_to(jnp.asarray([-1e4, 1e4]), v.shape))
    assert _max_diff(forward(model, x, m), base) < 1e-6
    _set(model, lambda p: p[-1] == "b2", lambda p, v: jnp.broadcast_to(jnp.asarray(PRETRAINED_GATE_BIAS), v.shape))
    assert _max_diff(forward(model, x, m), base) == d_near
    # ... and much nearer than with Wq' != Wq (so the first check can fail).
    _set(model, lambda p: "interaction_query" in p and p[-1] == "kernel",
         lambda p, v: v + 0.5 * jax.random.normal(jax.random.key(0), v.shape))
    assert _max_diff(forward(model, x, m), base) > 5 * d_near


def test_save_and_load_round_trip(hf_dir, tmp_path):
    model, cfg = load_hf_conditional_detr(hf_dir)
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
    a = dict(nnx.to_flat_state(nnx.state(imodel, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    assert set(a) == set(b) and any("interaction_query" in p for p in a) and any("gate" in p for p in a)
    for p in a:
        np.testing.assert_array_equal(np.asarray(a[p].get_value()), np.asarray(b[p].get_value()), err_msg=str(p))


def test_in_memory_names_and_a_missing_tensor(hf_model, hf_dir, tmp_path):
    """transformers 5's in-memory names (q_content_proj, o_proj, mlp.fc1) read as the saved ones;
    a checkpoint lacking a tensor is refused with the file and the tensor named."""
    cfg = load_hf_conditional_detr(hf_dir)[1]
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
    from lfi_jax.models.convert.conditional_detr import _shapes, fill_conditional_detr
    from lfi_jax.models.resnet import ResNetConfig

    base = dict(backbone=ResNetConfig(embedding_size=4, hidden_sizes=(4, 8, 8, 8), depths=(1, 1, 1, 1)),
                hidden_size=8, encoder_layers=1, decoder_layers=2, encoder_heads=2, decoder_heads=2,
                encoder_ffn_dim=8, decoder_ffn_dim=8, num_queries=3, num_classes=2)
    base.update(kw)
    cfg = iconditional_detr_config(ConditionalDetrConfig(**base))
    rng = np.random.default_rng(0)
    values = {}
    for path, shape in _shapes(cfg):
        if path[-1] == "running_var":
            v = 0.5 + rng.random(shape)
        elif path[-1] == "scale" or "normalization" in path and path[-1] == "weight":
            v = 1.0 + 0.1 * rng.normal(size=shape)
        elif path[-1] in ("bias", "running_mean", "b1", "b2"):
            v = 0.1 * rng.normal(size=shape)
        elif path[-1] == "weight":
            v = rng.normal(size=shape)
        else:
            v = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
        values[path] = v.astype(np.float32)
    return fill_conditional_detr(cfg, values)


def test_dropout_only_with_an_rng_and_the_interaction_parts_get_gradients():
    """(interaction_in="encoder_self" is DETR's encoder, tested in tests/test_detr.py.)"""
    model = _micro_random(dropout=0.3)
    _, _, x, m = _inputs(((40, 40), (24, 32)))
    graphdef, params = nnx.split(model, nnx.Param)

    def value(out):
        return jnp.sum(out.logits ** 2) + jnp.sum(out.pred_boxes) + jnp.sum(out.aux_logits ** 2)

    def loss(params, rng):
        return value(nnx.merge(graphdef, params)(x, m, rng=rng))

    f = jax.jit(jax.value_and_grad(loss))
    a, grads = f(params, jax.random.key(0))
    assert f(params, jax.random.key(0))[0] == a and abs(float(f(params, jax.random.key(1))[0] - a)) > 1e-4
    plain = forward(model, x, m)
    assert _max_diff(plain, forward(model, x, m)) == 0.0  # no rng: no dropout
    out = forward(model, x, m)
    nk = int(out.key_mask.shape[1])
    assert out.agt_rows.shape == (2, 2, 2, 3, nk) and out.query_mask is None
    norms = {path: float(jnp.max(jnp.abs(g.get_value()))) for path, g in nnx.to_flat_state(grads)}
    assert max(v for p, v in norms.items() if "normalization" in p) == 0.0  # frozen BatchNorm
    parts = ("interaction_query", "gate", "ca_qpos_sine_proj", "ref_point_head", "query_scale", "convolution")
    for part in parts:
        assert max(v for p, v in norms.items() if part in p) > 0.0, part
