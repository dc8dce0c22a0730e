"""DETR / I-DETR against transformers' DetrForObjectDetection (same weights), and I-DETR's start.

Tiny random transformers DETRs (a small `ResNetConfig` backbone, no timm) are saved with
`save_pretrained` and loaded by path, as a user would. Their weights are redrawn at scales
where every term matters (frozen BatchNorm statistics included), so a wrong layout, a
missing mask or a swapped LayerNorm shows up far above the 1e-4 tolerance.
"""

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from flax import nnx  # noqa: E402

from lfi_jax.compare import detr as compare_detr_mod  # noqa: E402
from lfi_jax.compare.detr import forward  # noqa: E402
from lfi_jax.models.convert.detr import (  # noqa: E402
    detr_from_checkpoint,
    fill_detr,
    idetr_from_detr,
    load_hf_detr,
    normalize_hf_detr_names,
    param_shapes,
    save_hf_detr,
)
from lfi_jax.models.convert.io import CheckpointError  # noqa: E402
from lfi_jax.models.detr import (  # noqa: E402
    PRETRAINED_GATE_BIAS,
    Detr,
    DetrConfig,
    count_params,
    downsample_mask,
    feature_grid,
    idetr_config,
)
from lfi_jax.models.resnet import ResNetConfig  # noqa: E402

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
    return transformers.DetrConfig(**base)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif "norm" in name and name.endswith("weight") or name.endswith("layer_norm.weight"):
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith(("bias", "running_mean")):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            elif "query_position_embeddings" in name:
                t.copy_(torch.randn(t.shape, generator=g))
            else:  # conv / linear weights: unit-variance outputs
                fan_in = math.prod(t.shape[1:])
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(_hf_config()).eval()
    _randomize(model, 0)
    d = tmp_path_factory.mktemp("detr") / "tiny-detr"
    model.save_pretrained(d)
    return str(d)


def _inputs(sizes=SIZES, seed=1):
    pixels, mask = compare_detr_mod.make_inputs(sizes, seed)
    return pixels, mask, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask.astype(bool))


def test_parity_with_transformers_on_a_padded_batch(hf_dir):
    report = compare_detr_mod.compare_detr(hf_dir, sizes=SIZES, seed=1)
    assert set(report["max_abs_diff"]) == {"logits", "pred_boxes", "aux_logits", "aux_boxes"}
    assert report["ok"], report
    for key, diff in report["max_abs_diff"].items():
        assert diff < 1e-4, (key, diff)
    assert report["max_abs"]["logits"] > 1.0  # the weights make the outputs far from trivial


def test_the_check_fails_when_a_weight_differs(hf_dir):
    report = compare_detr_mod.compare_detr(hf_dir, sizes=SIZES, seed=1, perturb=True)
    assert not report["ok"] and "logits" in report["above_tol"]


def test_compare_command_line(hf_dir, capsys):
    p = argparse.ArgumentParser()
    compare_detr_mod.add_arguments(p)
    report = compare_detr_mod.run(p.parse_args(["--hf", hf_dir, "--sizes", "70x90,40x50", "--seed", "2"]))
    assert report["ok"] and report["sizes"] == [[70, 90], [40, 50]]
    main = pytest.importorskip("lfi_jax.compare.__main__")
    if "detr" not in main.SUBCOMMANDS:
        pytest.skip("compare detr is not registered in lfi_jax.compare yet")
    assert main.main(["detr", "--hf", hf_dir, "--sizes", "70x90,40x50"]) == 0
    assert '"mode": "detr"' in capsys.readouterr().out


def test_save_and_load_round_trip(hf_dir, tmp_path):
    model, cfg = load_hf_detr(hf_dir)
    save_hf_detr(model, str(tmp_path / "out"))
    original = transformers.DetrForObjectDetection.from_pretrained(hf_dir).state_dict()
    again = transformers.DetrForObjectDetection.from_pretrained(str(tmp_path / "out")).state_dict()
    assert set(again) == set(original)
    for k, v in original.items():
        assert torch.equal(again[k], v), k
    # An I-DETR with its gates and interaction queries comes back unchanged too.
    imodel = idetr_from_detr(model, idetr_config(cfg, gate_bias_init=PRETRAINED_GATE_BIAS, gate_hidden=3), seed=1)
    save_hf_detr(imodel, str(tmp_path / "idetr"))
    back, bcfg = load_hf_detr(str(tmp_path / "idetr"))
    assert bcfg == imodel.cfg
    a = dict(nnx.to_flat_state(nnx.state(imodel, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    assert set(a) == set(b) and any("interaction_query" in p for p in a) and any("gate" in p for p in a)
    for p in a:
        np.testing.assert_array_equal(np.asarray(a[p].get_value()), np.asarray(b[p].get_value()), err_msg=str(p))


def test_class_rows_keep_the_pretrained_head_for_a_subset_of_classes(hf_dir):
    """As for the released 92-way COCO head and a source's contiguous classes (category ids)."""
    model, cfg = load_hf_detr(hf_dir, class_rows=[3, 0, 4])
    assert cfg.num_classes == 3
    pixels, mask, x, m = _inputs()
    out = forward(model, x, m)
    hf = transformers.DetrForObjectDetection.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask))
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy()[..., [3, 0, 4, 5]], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="class_rows"):
        load_hf_detr(hf_dir, class_rows=[7])


def test_detr_from_checkpoint_for_a_run(hf_dir):
    _, cfg = load_hf_detr(hf_dir)
    model = detr_from_checkpoint(hf_dir, idetr_config(cfg, gate_bias_init=PRETRAINED_GATE_BIAS, num_classes=2), seed=0)
    attn = model.decoder.layers[1].encoder_attn
    np.testing.assert_array_equal(np.asarray(attn.interaction_query.kernel[...]), np.asarray(attn.q_proj.kernel[...]))
    np.testing.assert_array_equal(np.asarray(attn.gate.b2[...])[0], PRETRAINED_GATE_BIAS)
    assert model.class_labels_classifier.kernel.shape == (cfg.hidden_size, 3)
    with pytest.raises(CheckpointError, match="model.num_queries=7 in the config, 6 in the checkpoint"):
        detr_from_checkpoint(hf_dir, dataclasses.replace(cfg, num_queries=7))


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


@pytest.mark.parametrize("where", ["decoder_cross", "encoder_self"])
def test_idetr_from_detr_starts_out_as_the_detr(hf_dir, where):
    detr, cfg = load_hf_detr(hf_dir)
    pixels, mask, x, m = _inputs()
    base = forward(detr, x, m)

    # The pretrained gate [-4, +4] with Wq' = Wq: nearly the DETR (C_agt = C_vfm and
    # g1 + g2 = 1 up to the gate's small weights) ...
    model = idetr_from_detr(detr, idetr_config(cfg, interaction_in=where, gate_bias_init=PRETRAINED_GATE_BIAS))
    out = forward(model, x, m)
    d_near = _max_diff(out, base)
    assert d_near < 2e-2
    rows = np.asarray(out.agt_rows)
    layers = cfg.decoder_layers if where == "decoder_cross" else cfg.encoder_layers
    nk = rows.shape[-1]
    assert rows.shape == (2, layers, 4, cfg.num_queries if where == "decoder_cross" else nk, nk)
    valid = np.asarray(out.key_mask)
    assert valid[0].all() and not valid[1].all()
    np.testing.assert_allclose(rows.sum(-1)[0], 1.0, atol=1e-5)
    assert np.all(rows[1][..., ~valid[1]] == 0)
    if where == "encoder_self":
        np.testing.assert_array_equal(np.asarray(out.query_mask), valid)

    # ... C_agt's gate weight exactly 0 (sigmoid(-1e4) == 0, sigmoid(1e4) == 1): the same model,
    # and the C_agt rows (Wq' = Wq) are transformers' attention maps of the DETR.
    _set(model, lambda p: p[-1] == "b2", lambda p, v: jnp.broadcast_to(jnp.asarray([-1e4, 1e4]), v.shape))
    exact = forward(model, x, m)
    assert _max_diff(exact, base) < 1e-6
    hf = transformers.DetrForObjectDetection.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask), output_attentions=True)
    maps = ref.cross_attentions if where == "decoder_cross" else ref.encoder_attentions
    np.testing.assert_allclose(np.asarray(exact.agt_rows), np.stack([a.numpy() for a in maps], axis=1), atol=1e-5)
    # ... and at [-4, +4] much nearer to it than with Wq' != Wq (so the first check can fail).
    _set(model, lambda p: p[-1] == "b2", lambda p, v: jnp.broadcast_to(jnp.asarray(PRETRAINED_GATE_BIAS), v.shape))
    assert _max_diff(forward(model, x, m), base) == d_near
    _set(model, lambda p: "interaction_query" in p and p[-1] == "kernel",
         lambda p, v: v + 0.5 * jax.random.normal(jax.random.key(0), v.shape))
    assert _max_diff(forward(model, x, m), base) > 5 * d_near


def _micro(**kw):
    """A very small DETR (for tests whose point is not parity)."""
    base = dict(backbone=ResNetConfig(embedding_size=4, hidden_sizes=(4, 8, 8, 8), depths=(1, 1, 1, 1)),
                hidden_size=8, encoder_layers=1, decoder_layers=2, encoder_heads=2, decoder_heads=2,
                encoder_ffn_dim=8, decoder_ffn_dim=8, num_queries=3, num_classes=2)
    base.update(kw)
    return DetrConfig(**base)


def test_feature_grid_and_mask_downsampling_match_torch():
    cfg = _micro()
    rng = np.random.default_rng(0)
    for h, w in ((33, 47), (64, 64), (65, 31), (97, 130)):
        feats = nnx.eval_shape(lambda: Detr(cfg, rngs=nnx.Rngs(0)).backbone(jnp.zeros((1, h, w, 3))))[-1]  # noqa: B023
        assert feature_grid(cfg, h, w) == feats.shape[1:3] == (math.ceil(h / 32), math.ceil(w / 32))
        mask = rng.random((2, h, w)) < 0.7
        gh, gw = feature_grid(cfg, h, w)
        want = torch.nn.functional.interpolate(torch.from_numpy(mask)[None].float(), size=(gh, gw))[0].bool()
        np.testing.assert_array_equal(np.asarray(downsample_mask(jnp.asarray(mask), (gh, gw))), want.numpy())


def test_parameter_counts_of_detr_r50_and_idetr_r50():
    hf_cfg = transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91,
        backbone_config=transformers.ResNetConfig(out_features=["stage4"]),
    )
    with torch.device("meta"):
        hf = transformers.DetrForObjectDetection(hf_cfg)
    n_hf = sum(p.numel() for p in hf.parameters())  # frozen BatchNorm tensors are buffers there
    n_detr = count_params(DetrConfig())
    n_idetr = count_params(idetr_config(DetrConfig()))
    assert n_detr == n_hf == 41_524_768  # the paper: 41.5M
    # + one D x D + bias interaction query and one gate (8 heads, G = 8) per decoder layer
    assert n_idetr - n_detr == 6 * (256 * 256 + 256) + 6 * 8 * (2 * 8 + 8 + 8 * 2 + 2)  # 41.9M


def _random_detr(cfg, seed=0):
    """A Detr with NumPy-drawn parameters (an eager random init compiles op by op: slow)."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, shape in param_shapes(cfg):
        name = path[-1]
        if name == "running_var":
            v = 0.5 + rng.random(shape)
        elif name in ("scale", "weight") and "normalization" in path or name == "scale":
            v = 1.0 + 0.1 * rng.normal(size=shape)
        elif name in ("bias", "running_mean", "b1", "b2"):
            v = 0.1 * rng.normal(size=shape)
        elif name == "weight":  # query position embeddings
            v = rng.normal(size=shape)
        else:
            v = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
        values[path] = v.astype(np.float32)
    return fill_detr(cfg, values)


def test_dropout_only_with_an_rng():
    cfg = idetr_config(_micro(dropout=0.3))
    model = _random_detr(cfg)
    _, _, x, m = _inputs(((40, 40), (24, 32)))
    graphdef, params = nnx.split(model, nnx.Param)
    out = jax.jit(lambda rng: nnx.merge(graphdef, params)(x, m, rng=rng))
    plain = forward(model, x, m)
    assert _max_diff(plain, forward(model, x, m)) == 0.0  # no rng: no dropout
    a, b = out(jax.random.key(0)), out(jax.random.key(1))
    assert _max_diff(a, out(jax.random.key(0))) == 0.0 and _max_diff(a, b) > 1e-4 and _max_diff(a, plain) > 1e-4


def test_frozen_batchnorm_gets_no_gradient():
    cfg = _micro()
    backbone = _random_detr(cfg).backbone
    graphdef, params = nnx.split(backbone, nnx.Param)
    x = jax.random.normal(jax.random.key(0), (1, 40, 40, 3))
    grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(f ** 2) for f in nnx.merge(graphdef, p)(x))))(params)
    norms = {path: float(jnp.max(jnp.abs(g.get_value()))) for path, g in nnx.to_flat_state(grads)}
    bn = [v for p, v in norms.items() if "normalization" in p]
    conv = [v for p, v in norms.items() if "convolution" in p]
    assert bn and max(bn) == 0.0 and conv and min(conv) > 0.0


@pytest.mark.slow  # compiling the backward pass of even a tiny DETR takes minutes on a loaded CPU
def test_gradients_reach_the_interaction_queries_gates_and_heads():
    cfg = idetr_config(_micro())
    model = _random_detr(cfg)
    _, _, x, m = _inputs(((40, 40), (24, 32)))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        out = nnx.merge(graphdef, params)(x, m)
        return jnp.sum(out.logits ** 2) + jnp.sum(out.pred_boxes) + jnp.sum(out.aux_logits ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    norms = {path: float(jnp.max(jnp.abs(g.get_value()))) for path, g in nnx.to_flat_state(grads)}
    assert max(v for p, v in norms.items() if "normalization" in p) == 0.0
    for part in ("interaction_query", "gate", "class_labels_classifier", "bbox_predictor", "q_proj", "convolution"):
        assert max(v for p, v in norms.items() if part in p) > 0.0, part


def test_timm_backbone_names_of_the_released_checkpoints():
    prefix = "model.backbone.conv_encoder.model."
    names = {
        "conv1.weight": "embedder.embedder.convolution.weight",
        "bn1.running_var": "embedder.embedder.normalization.running_var",
        "layer1.0.conv1.weight": "encoder.stages.0.layers.0.layer.0.convolution.weight",
        "layer1.0.bn3.bias": "encoder.stages.0.layers.0.layer.2.normalization.bias",
        "layer2.3.conv2.weight": "encoder.stages.1.layers.3.layer.1.convolution.weight",
        "layer4.0.downsample.0.weight": "encoder.stages.3.layers.0.shortcut.convolution.weight",
        "layer4.0.downsample.1.running_mean": "encoder.stages.3.layers.0.shortcut.normalization.running_mean",
    }
    sd = {prefix + k: np.zeros(1) for k in names}
    sd[prefix + "layer1.0.bn1.num_batches_tracked"] = np.zeros(())
    sd["model.decoder.layers.0.encoder_attn.o_proj.weight"] = np.zeros(1)  # transformers 5's in-memory names
    sd["model.encoder.layers.1.mlp.fc2.bias"] = np.zeros(1)
    out = normalize_hf_detr_names(sd)
    assert set(out) == {prefix + v for v in names.values()} | {
        "model.decoder.layers.0.encoder_attn.out_proj.weight", "model.encoder.layers.1.fc2.bias"}
