"""DETR / I-DETR against transformers' DetrForObjectDetection (same weights), and I-DETR's start.

Tiny random transformers DETRs (a small `ResNetConfig` backbone, no timm) are saved with
`save_pretrained` and loaded by path, as a user would. Their weights are redrawn at scales
where every term matters (frozen BatchNorm statistics included), so a wrong layout, a
missing mask or a swapped LayerNorm shows up far above the 1e-4 tolerance.
"""

import dataclasses
import math

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


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return saved(random_hf_model(transformers.DetrForObjectDetection, hf_config(transformers.DetrConfig)),
                 tmp_path_factory, "tiny-detr")


@pytest.fixture(scope="module")
def detr(hf_dir):
    """(model, cfg) of the tiny checkpoint, loaded once (tests do not change it)."""
    return load_hf_detr(hf_dir)


@pytest.fixture(scope="module")
def reference(hf_dir):
    return reference_outputs(transformers.DetrForObjectDetection, hf_dir)


def test_parity_with_transformers_through_the_compare_command(hf_dir, capsys):
    check_compare_command("detr", hf_dir, capsys, perturbed="encoder_attn.q_proj", num_classes=5)


def test_save_and_load_round_trip(hf_dir, detr, tmp_path):
    model, cfg = detr
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
    a = flat_equal(imodel, back)
    assert any("interaction_query" in p for p in a) and any("gate" in p for p in a)


def test_class_rows_keep_the_pretrained_head_for_a_subset_of_classes(hf_dir, reference):
    """As for the released 92-way COCO head and a source's contiguous classes (category ids)."""
    model, cfg = load_hf_detr(hf_dir, class_rows=[3, 0, 4])
    assert cfg.num_classes == 3
    _, _, x, m = inputs()
    out = forward(model, x, m)
    np.testing.assert_allclose(np.asarray(out.logits), reference.logits.numpy()[..., [3, 0, 4, 5]], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="class_rows"):
        load_hf_detr(hf_dir, class_rows=[7])


def test_detr_from_checkpoint_for_a_run(hf_dir, detr):
    _, cfg = detr
    model = detr_from_checkpoint(hf_dir, idetr_config(cfg, gate_bias_init=PRETRAINED_GATE_BIAS, num_classes=2), seed=0)
    attn = model.decoder.layers[1].encoder_attn
    np.testing.assert_array_equal(np.asarray(attn.interaction_query.kernel[...]), np.asarray(attn.q_proj.kernel[...]))
    np.testing.assert_array_equal(np.asarray(attn.gate.b2[...])[0], PRETRAINED_GATE_BIAS)
    assert model.class_labels_classifier.kernel.shape == (cfg.hidden_size, 3)
    with pytest.raises(CheckpointError, match="model.num_queries=7 in the config, 6 in the checkpoint"):
        detr_from_checkpoint(hf_dir, dataclasses.replace(cfg, num_queries=7))


@pytest.mark.parametrize("where", ["decoder_cross", "encoder_self"])
def test_idetr_from_detr_starts_out_as_the_detr(detr, reference, where):
    detr, cfg = detr
    _, _, x, m = inputs()
    base = forward(detr, x, m)

    # The pretrained gate [-4, +4] with Wq' = Wq: nearly the DETR (C_agt = C_vfm and
    # g1 + g2 = 1 up to the gate's small weights) ...
    model = idetr_from_detr(detr, idetr_config(cfg, interaction_in=where, gate_bias_init=PRETRAINED_GATE_BIAS))
    out = forward(model, x, m)
    d_near = max_diff(out, base)
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
    gate_bias(model, [-1e4, 1e4])
    exact = forward(model, x, m)
    assert max_diff(exact, base) < 1e-6
    maps = reference.cross_attentions if where == "decoder_cross" else reference.encoder_attentions
    np.testing.assert_allclose(np.asarray(exact.agt_rows), np.stack([a.numpy() for a in maps], axis=1), atol=1e-5)
    # ... and at [-4, +4] much nearer to it than with Wq' != Wq (so the first check can fail).
    gate_bias(model, PRETRAINED_GATE_BIAS)
    assert max_diff(forward(model, x, m), base) == d_near
    perturb_interaction_queries(model)
    assert max_diff(forward(model, x, m), base) > 5 * d_near


def test_attn_rows_are_the_head_mean_cross_attention_maps(detr, reference):
    """`model(x, m, attn_rows=True).attn_rows` (the maps a visualisation draws) without the
    interaction constraint: transformers' cross-attention maps of every decoder layer, averaged
    over heads; the alignment rows stay off."""
    detr, cfg = detr
    _, _, x, m = inputs()
    graphdef, state = nnx.split(detr)
    out = jax.jit(lambda s: nnx.merge(graphdef, s)(x, m, attn_rows=True))(state)
    want = np.stack([a.numpy().mean(axis=1) for a in reference.cross_attentions], axis=1)  # [B, L, Q, Nk]
    assert out.attn_rows.shape == want.shape == (2, cfg.decoder_layers, cfg.num_queries, int(out.key_mask.shape[1]))
    np.testing.assert_allclose(np.asarray(out.attn_rows), want, atol=1e-5, rtol=0)
    assert out.agt_rows is None and not cfg.interaction_constraint
    np.testing.assert_allclose(np.asarray(out.logits), reference.logits.numpy(), atol=1e-4, rtol=0)


def _micro(**kw):
    """A very small DETR (for tests whose point is not parity)."""
    return DetrConfig(**micro_fields(**kw))


def test_feature_grid_and_mask_downsampling_match_torch():
    cfg = _micro(backbone=ResNetConfig(embedding_size=4, hidden_sizes=(4, 8, 8, 8), depths=(1, 1, 1, 1)))
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
    return fill_detr(cfg, random_values(param_shapes(cfg), seed))


def test_dropout_only_with_an_rng_and_gradients_reach_the_interaction_queries_gates_and_heads():
    """One compiled value-and-gradient of a micro I-DETR serves both checks."""
    model = _random_detr(idetr_config(_micro(dropout=0.3)))
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
    norms = grad_norms(grads)
    assert max(v for p, v in norms.items() if "normalization" in p) == 0.0  # frozen BatchNorm
    assert min(v for p, v in norms.items() if "convolution" in p) > 0.0  # every backbone conv trains
    for part in ("interaction_query", "gate", "class_labels_classifier", "bbox_predictor", "q_proj"):
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
