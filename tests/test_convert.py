"""Checkpoint import/export (HF, timm), the I-ViT made from a ViT, parameter and MAC counts.

The independent side is transformers' own ViT (built here, random weights, saved to disk),
a timm-named state dict written by hand, and closed-form counts.
"""

import json
import math
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

from lfi_jax.errors import UserError  # noqa: E402
from lfi_jax.models import (  # noqa: E402
    ModelConfig,
    ViT,
    build_model,
    convert,  # noqa: E402
    count_params,
    ivit_config,
    ivit_from_vit,
    variant,
)
from lfi_jax.models.flops import macs, xla_flops  # noqa: E402

D, DEPTH, HEADS, MLP, PATCH, IMAGE, CLASSES = 32, 2, 4, 64, 8, 32, 5


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny models: one intra-op thread is fastest, and on a busy machine a thread pool
    # waiting for cores it does not get is many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hf_model(cls=ViTForImageClassification, *, eps=1e-12, seed=0, **kw):
    """A tiny transformers ViT with random weights at scales that make every term matter."""
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
                       image_size=IMAGE, patch_size=PATCH, num_labels=CLASSES, layer_norm_eps=eps, **kw)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim in (2, 4):  # Linear / Conv2d weights
                fan_in = p.shape[1] * (p[0, 0].numel() if p.ndim == 4 else 1)
                p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 3:  # cls token, position embeddings
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def _images(n=2, size=IMAGE, seed=1):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _torch_logits(model, images):
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state[:, 0]).numpy()


def _save(model, directory, fmt="safetensors"):
    model.save_pretrained(directory)
    if fmt == "bin":  # the classic layout: Hub names in a torch pickle
        sd = load_file(os.path.join(directory, "model.safetensors"))
        torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, os.path.join(directory, "pytorch_model.bin"))
        os.remove(os.path.join(directory, "model.safetensors"))
    elif fmt == "module_names":  # a raw state_dict() of the installed transformers' modules
        sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(directory, "model.safetensors"))
    return str(directory)


def _flat(model):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "module_names"])
def test_hf_vit_logits_match_transformers(tmp_path, fmt):
    hf = _hf_model()
    model, cfg = convert.load_hf_vit(_save(hf, tmp_path, fmt))
    sizes = (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size, cfg.image_size, cfg.num_classes)
    assert sizes == (D, DEPTH, HEADS, MLP, PATCH, IMAGE, CLASSES)
    assert cfg.layer_norm_eps == 1e-12 and not cfg.interaction_queries
    x = _images()
    ours = np.asarray(model(jnp.asarray(x))[0])
    ref = _torch_logits(hf, x)
    assert np.abs(ref).max() > 0.5  # a non-trivial output
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_hf_vitmodel_is_headless_and_a_new_head_starts_fresh(tmp_path):
    hf = _hf_model(ViTModel)  # with a pooler, which our model does not have: dropped
    path = _save(hf, tmp_path)
    assert any(k.startswith("pooler.") for k in load_file(os.path.join(path, "model.safetensors")))
    model, cfg = convert.load_hf_vit(path)
    assert cfg.num_classes == 0 and model.classifier is None
    x = _images()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))[0]), _torch_logits(hf, x), atol=1e-4, rtol=0)

    headed, cfg7 = convert.load_hf_vit(path, num_classes=7)
    assert cfg7.num_classes == 7
    flat, flat0 = _flat(headed), _flat(model)
    assert flat[("classifier", "kernel")].shape == (D, 7)
    for path_, value in flat0.items():
        np.testing.assert_array_equal(flat[path_], value)


def test_new_num_classes_drops_the_head(tmp_path):
    model, cfg = convert.load_hf_vit(_save(_hf_model(), tmp_path), num_classes=3)
    assert cfg.num_classes == 3
    assert _flat(model)[("classifier", "kernel")].shape == (D, 3)


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    path = _save(_hf_model(), tmp_path)
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    del sd["vit.encoder.layer.1.output.dense.bias"]
    del sd["vit.layernorm.weight"]
    sd["vit.encoder.layer.0.attention.attention.extra.weight"] = np.zeros((2, 2), np.float32)
    sd["vit.encoder.layer.0.intermediate.dense.weight"] = np.zeros((MLP + 1, D), np.float32)
    save_file(sd, file)
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_hf_vit(path)
    msg = str(e.value)
    assert file in msg
    for name in ("encoder.layer.1.output.dense.bias", "layernorm.weight",
                 "encoder.layer.0.attention.attention.extra.weight",
                 f"encoder.layer.0.intermediate.dense.weight: checkpoint ({MLP + 1}, {D}) vs expected ({MLP}, {D})"):
        assert name in msg, msg
    assert "missing (2)" in msg and "unexpected (1)" in msg and "mis-shaped (1)" in msg


def test_missing_config_is_an_error(tmp_path):
    path = _save(_hf_model(), tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(convert.CheckpointError, match="config.json"):
        convert.load_hf_vit(path)


def test_position_embedding_interpolation_keeps_cls_and_resamples_the_grid(tmp_path):
    hf = _hf_model()
    g = IMAGE // PATCH  # 4
    rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    slope = np.linspace(0.5, 1.5, D)
    ramp = (rows[..., None] * slope + 2.0 * cols[..., None]).reshape(g * g, D)  # linear in position
    with torch.no_grad():
        pos = hf.vit.embeddings.position_embeddings
        pos[0, 1:] = torch.tensor(ramp, dtype=torch.float32)
        cls_pos = pos[0, 0].numpy().copy()
    path = _save(hf, tmp_path)
    model, cfg = convert.load_hf_vit(path, image_size=2 * IMAGE)
    assert cfg.image_size == 2 * IMAGE and cfg.grid == (2 * g, 2 * g)
    new = _flat(model)[("embeddings", "position_embeddings")][0]
    assert new.shape == (1 + 4 * g * g, D)
    np.testing.assert_array_equal(new[0], cls_pos)
    # Bicubic resampling reproduces a linear function away from the borders: new pixel j sits
    # at old coordinate (j + 0.5) / 2 - 0.5 (pixel centres aligned).
    grid = new[1:].reshape(2 * g, 2 * g, D)
    u = (np.arange(2 * g) + 0.5) / 2 - 0.5
    inner = [j for j in range(2 * g) if 1 <= u[j] <= g - 2]
    assert inner
    for i in inner:
        for j in inner:
            np.testing.assert_allclose(grid[i, j], u[i] * slope + 2.0 * u[j], atol=1e-4)
    logits, _ = model(jnp.asarray(_images(size=2 * IMAGE)))
    assert logits.shape == (2, CLASSES) and np.isfinite(np.asarray(logits)).all()


def _timm_state_dict(hf):
    """timm's names for a transformers ViT, written out by hand."""
    sd = {k: v.numpy().copy() for k, v in convert_hub_names(hf).items()}
    out = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
        "head.weight": sd["classifier.weight"],
        "head.bias": sd["classifier.bias"],
    }
    for i in range(DEPTH):
        p = f"vit.encoder.layer.{i}."
        b = f"blocks.{i}."
        for kind in ("weight", "bias"):
            if p + f"attention.attention.query.{kind}" in sd:  # no qkv bias: no fused bias either
                out[b + f"attn.qkv.{kind}"] = np.concatenate(
                    [sd[p + f"attention.attention.{n}.{kind}"] for n in ("query", "key", "value")], axis=0)
            out[b + f"attn.proj.{kind}"] = sd[p + f"attention.output.dense.{kind}"]
            out[b + f"norm1.{kind}"] = sd[p + f"layernorm_before.{kind}"]
            out[b + f"norm2.{kind}"] = sd[p + f"layernorm_after.{kind}"]
            out[b + f"mlp.fc1.{kind}"] = sd[p + f"intermediate.dense.{kind}"]
            out[b + f"mlp.fc2.{kind}"] = sd[p + f"output.dense.{kind}"]
    return out


def convert_hub_names(hf):
    """A transformers model's state dict under the Hub names (whatever its module names)."""
    sd = hf.state_dict()
    names, _ = convert.normalize_hf_names(dict.fromkeys(sd))
    return {(k if k.startswith("classifier.") else "vit." + k): sd[orig] for k, orig in zip(names, sd)}


def test_timm_checkpoint_loads_and_round_trips(tmp_path):
    hf = _hf_model(eps=1e-6)  # timm's LayerNorm eps
    timm_sd = _timm_state_dict(hf)
    file = str(tmp_path / "vit_tiny_custom.safetensors")
    save_file(timm_sd, file)
    model, cfg = convert.load_timm_vit(file, num_heads=HEADS)
    sizes = (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size, cfg.image_size, cfg.num_classes)
    assert sizes == (D, DEPTH, HEADS, MLP, PATCH, IMAGE, CLASSES)
    assert cfg.layer_norm_eps == 1e-6
    x = _images()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))[0]), _torch_logits(hf, x), atol=1e-4, rtol=0)
    back = convert.to_timm_state_dict(model)
    assert set(back) == set(timm_sd)
    for k in timm_sd:
        np.testing.assert_array_equal(back[k], timm_sd[k], err_msg=k)

    # A directory with timm's config.json gives the heads; a torch pickle reads the same.
    d = tmp_path / "timm_dir"
    d.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in timm_sd.items()}, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({"architecture": "vit_custom", "model_args": {"num_heads": HEADS}}))
    model2, cfg2 = convert.load_timm_vit(str(d))
    assert cfg2 == cfg
    for k, v in _flat(model).items():
        np.testing.assert_array_equal(_flat(model2)[k], v)


def test_timm_unsupported_tensors_are_reported(tmp_path):
    sd = _timm_state_dict(_hf_model(eps=1e-6))
    sd["fc_norm.weight"] = np.ones(D, np.float32)
    sd["blocks.0.ls1.gamma"] = np.ones(D, np.float32)
    file = str(tmp_path / "bad.safetensors")
    save_file(sd, file)
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_timm_vit(file, num_heads=HEADS)
    assert file in str(e.value) and "fc_norm.weight" in str(e.value) and "blocks.0.ls1.gamma" in str(e.value)


def test_save_hf_is_read_by_transformers(tmp_path):
    hf = _hf_model()
    model, _ = convert.load_hf_vit(_save(hf, tmp_path / "in"))
    convert.save_hf(model, str(tmp_path / "out"))
    again = ViTForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
    want, got = hf.state_dict(), again.state_dict()
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


def test_ivit_export_import_round_trip(tmp_path):
    cfg = ivit_config(ModelConfig(hidden_size=D, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, patch_size=PATCH,
                                  image_size=IMAGE, num_classes=CLASSES, gate_hidden=3, align_layers=(-1,)))
    model = ViT(cfg, rngs=nnx.Rngs(3))
    convert.save_hf(model, str(tmp_path))
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "vit.encoder.layer.1.attention.attention.interaction_query.weight" in names
    assert "vit.encoder.layer.1.attention.attention.gate.w1" in names
    loaded, cfg2 = convert.load_hf_vit(str(tmp_path))
    assert cfg2 == cfg
    for k, v in _flat(model).items():
        np.testing.assert_array_equal(_flat(loaded)[k], v)
    timm_file = str(tmp_path / "ivit_timm.safetensors")
    convert.save_timm(model, timm_file)
    from_timm, cfg3 = convert.load_timm_vit(timm_file, num_heads=HEADS, layer_norm_eps=cfg.layer_norm_eps)
    assert cfg3.interaction_queries and cfg3.gate_hidden == 3
    for k, v in _flat(model).items():
        np.testing.assert_array_equal(_flat(from_timm)[k], v)


# --------------------------------------------------------------------------------------
# An I-ViT from ViT weights (SPEC section 1: Wq' = Wq, gate bias [-4, +4]).


def _set(model, fn):
    """Apply fn(path, value) -> new value (or None to keep) to every parameter."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        new = fn(tuple(str(p) for p in path), np.asarray(var.get_value()))
        if new is not None:
            var.set_value(jnp.asarray(new, jnp.float32))
    nnx.update(model, nnx.from_flat_state(flat))


def test_ivit_from_vit_starts_as_the_vit(tmp_path):
    path = _save(_hf_model(), tmp_path)
    vit, _ = convert.load_hf_vit(path, interaction_constraint=True)  # returns C_vfm CLS rows
    ivit, cfg = convert.load_hf_vit(path, interaction=True)
    assert cfg.interaction_queries and cfg.interaction_constraint and cfg.gate_bias_init == (-4.0, 4.0)
    fv, fi = _flat(vit), _flat(ivit)
    for k, v in fv.items():
        np.testing.assert_array_equal(fi[k], v)
    for k, v in fi.items():
        if "interaction_query" in k:
            np.testing.assert_array_equal(v, fv[tuple("query" if p == "interaction_query" else p for p in k)])
        if k[-1] == "b2":
            np.testing.assert_array_equal(v, np.tile([-4.0, 4.0], (HEADS, 1)))
    x = jnp.asarray(_images())
    lv, av = vit(x)
    li, ai = ivit(x)
    # Wq' = Wq: in the first layer (same input) the interaction map is the ViT's map exactly.
    np.testing.assert_allclose(np.asarray(ai["cls_attn"])[:, 0], np.asarray(av["cls_attn"])[:, 0], atol=1e-6)
    # With the gate's weights at zero, g1 + g2 = sigmoid(-4) + sigmoid(4) = 1 exactly: every
    # layer's map and the logits are the ViT's.
    _set(ivit, lambda p, v: np.zeros_like(v) if p[-1] in ("w1", "w2") else None)
    li0, ai0 = ivit(x)
    np.testing.assert_allclose(np.asarray(ai0["cls_attn"]), np.asarray(av["cls_attn"]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(li0), np.asarray(lv), atol=2e-5, rtol=0)
    # The small random gate weights of the initialisation move g1 + g2 off 1 only slightly.
    assert np.abs(np.asarray(li) - np.asarray(lv)).max() < 0.01 * np.abs(np.asarray(lv)).max()


def test_ivit_from_vit_leaks_only_sigmoid_minus_4_of_a_different_interaction_map(tmp_path):
    """Once Wq' differs from Wq, the constant gate [-4, +4] gives C_f = C_vfm + s (C_agt - C_vfm)
    with s = sigmoid(-4): the logits are F(s) of the family F(t) (gate bias [logit t,
    logit(1-t)]), F(0) being the ViT. The triangle inequality over the chords of [0, s]
    bounds |F(s) - F(0)| by s * (steepest chord slope); F is smooth, so the bound is tight."""
    path = _save(_hf_model(), tmp_path)
    vit, _ = convert.load_hf_vit(path)
    ivit, _ = convert.load_hf_vit(path, interaction=True)
    rng = np.random.default_rng(0)
    _set(ivit, lambda p, v: (v + rng.normal(0, 0.5, v.shape) if "interaction_query" in p
                             else np.zeros_like(v) if p[-1] in ("w1", "w2") else None))
    x = jnp.asarray(_images())
    f0 = np.asarray(vit(x)[0], np.float64)

    def logits_at(t):
        b = math.log(t / (1 - t))
        _set(ivit, lambda p, v: np.tile([b, -b], (HEADS, 1)) if p[-1] == "b2" else None)
        return np.asarray(ivit(x)[0], np.float64)

    s = 1 / (1 + math.exp(4.0))
    knots = [s * i / 4 for i in range(1, 5)]
    values = [f0] + [logits_at(t) for t in knots]
    slopes = [np.abs(values[i + 1] - values[i]).max() / (s / 4) for i in range(4)]
    bound = s * max(slopes)
    dev = np.abs(values[-1] - f0).max()
    assert dev > 1e-3  # the leak is visible ...
    assert dev <= bound * (1 + 1e-3) + 1e-6  # ... and within what sigmoid(-4) allows ...
    assert dev >= 0.8 * bound  # ... and the bound is tight
    full = np.abs(logits_at(1 - 1e-7) - f0).max()  # the interaction map alone
    assert dev < 0.1 * full


# --------------------------------------------------------------------------------------
# Parameter and MAC counts (docs/models.md).


@pytest.mark.parametrize("name,paper_delta", [("S/16", 1.77e6), ("B/16", 7.09e6), ("L/16", 25.2e6)])
def test_ivit_parameter_delta_matches_the_paper(name, paper_delta):
    full = variant(name, image_size=224, num_classes=200)
    # Every layer adds the same parameters, so one layer's delta times the depth is the
    # whole delta (and tracing one layer is much cheaper than 24).
    one = variant(name, image_size=224, num_classes=200, depth=1)
    delta = full.depth * (count_params(ivit_config(one)) - count_params(one))
    d, h, g = full.hidden_size, full.num_heads, full.gate_hidden
    assert delta == full.depth * (d * d + d + h * (2 * g + g + 2 * g + 2))  # Wq' + bias, gates
    assert abs(delta - paper_delta) / paper_delta < 0.01


@pytest.mark.parametrize("name,vit_g,ivit_g", [("S/16", 15.5, 18.1), ("B/16", 55.5, 62.7), ("L/16", 191.2, 213.9)])
def test_macs_reproduce_the_papers_table(name, vit_g, ivit_g):
    cfg = variant(name, image_size=384, num_classes=1000)
    m = macs(ivit_config(cfg))
    assert round(m["vit"] / 1e9, 1) == vit_g
    assert round(m["paper"] / 1e9, 1) == ivit_g
    n, d = 577, cfg.hidden_size
    assert m["paper"] - m["vit"] == cfg.depth * (n * d * d + n * n * d)
    assert m["total"] - m["paper"] == cfg.depth * cfg.num_heads * n * n * (4 * 8 + 2)


def test_macs_agree_with_xla_cost_analysis():
    """XLA's count of the compiled forward: 2 FLOPs per MAC plus the elementwise ops we leave out."""
    cfg = variant("S/16", depth=1, image_size=64, num_classes=10)  # one S/16 layer, 17 tokens
    ours, xla = macs(cfg)["total"], xla_flops(cfg)
    assert 1.0 <= xla / (2 * ours) < 1.06, (xla, 2 * ours)
    # The interaction queries and second Q K^T in XLA's count (gate off, so nearly all MACs).
    iv = ivit_config(cfg, gated_control=False)
    extra_xla = xla_flops(iv) - xla
    extra_ours = 2 * (macs(iv)["paper"] - macs(cfg)["paper"])
    assert 1.0 <= extra_xla / extra_ours < 1.25, (extra_xla, extra_ours)


def test_bfloat16_safetensors_are_read(tmp_path):
    from safetensors.torch import save_file as save_torch

    hf = _hf_model()
    path = _save(hf, tmp_path)
    f32 = load_file(os.path.join(path, "model.safetensors"))
    sd = {k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in f32.items()}
    save_torch(sd, os.path.join(path, "model.safetensors"))  # numpy has no bfloat16: decoded by hand
    model, _ = convert.load_hf_vit(path)
    got = convert.to_hf_state_dict(model)
    for k, v in sd.items():
        np.testing.assert_array_equal(got[k], v.float().numpy(), err_msg=k)


# --------------------------------------------------------------------------------------
# build_model (a run's start from config.init) and the architecture check of ivit_from_vit.


def _init_config(hf="", timm=""):
    return ml_collections.ConfigDict(dict(init=dict(hf=hf, timm=timm)))


def _tiny_cfg(**kw):
    base = dict(hidden_size=D, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, patch_size=PATCH, image_size=IMAGE,
                num_classes=CLASSES)
    base.update(kw)
    return ModelConfig(**base)


def _b2(model):
    return [np.asarray(layer.attention.gate.b2.get_value()) for layer in model.encoder.layer]


def test_build_model_honours_a_configured_zero_gate_bias(tmp_path):
    """Defect: with init.hf a configured gate bias of (0, 0) was replaced by (-4, 4)."""
    config = _init_config(hf=_save(_hf_model(), tmp_path))
    explicit = build_model(config, ivit_config(_tiny_cfg(), gate_bias_init=(0.0, 0.0)), seed=0)
    for b2 in _b2(explicit):
        np.testing.assert_array_equal(b2, np.zeros((HEADS, 2)))
    unset = build_model(config, ivit_config(_tiny_cfg()), seed=0)  # gate_bias_init=None: the pretrained default
    assert unset.cfg.gate_bias_init == (-4.0, 4.0)
    for b2 in _b2(unset):
        np.testing.assert_array_equal(b2, np.tile([-4.0, 4.0], (HEADS, 1)))
    other = build_model(config, ivit_config(_tiny_cfg(), gate_bias_init=(-1.0, 2.0)), seed=0)
    for b2 in _b2(other):
        np.testing.assert_array_equal(b2, np.tile([-1.0, 2.0], (HEADS, 1)))
    # From scratch the unset bias is (0, 0).
    for b2 in _b2(build_model(_init_config(), ivit_config(_tiny_cfg()), seed=0)):
        np.testing.assert_array_equal(b2, np.zeros((HEADS, 2)))


def test_build_model_from_timm_keeps_timm_layer_norm_eps(tmp_path):
    """Defect: a timm checkpoint (eps 1e-6) was rebuilt with the config default 1e-12, silently."""
    hf = _hf_model(eps=1e-6)
    file = str(tmp_path / "vit_timm.safetensors")
    save_file(_timm_state_dict(hf), file)
    config = _init_config(timm=file)
    with pytest.raises(UserError, match=r"model\.layer_norm_eps: 1e-06 vs 1e-12"):
        build_model(config, _tiny_cfg(num_heads=HEADS), seed=0)
    model = build_model(config, _tiny_cfg(layer_norm_eps=1e-6), seed=0)
    assert model.cfg.layer_norm_eps == 1e-6
    x = _images()
    ref = _torch_logits(hf, x)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))[0]), ref, atol=1e-4, rtol=0)
    ivit = build_model(config, ivit_config(_tiny_cfg(layer_norm_eps=1e-6)), seed=0)
    assert ivit.cfg.layer_norm_eps == 1e-6 and ivit.encoder.layer[0].layernorm_before.epsilon == 1e-6


def test_ivit_from_vit_compares_layer_norm_eps_and_qkv_bias():
    vit = ViT(_tiny_cfg(layer_norm_eps=1e-6), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"model\.layer_norm_eps: 1e-06 vs 1e-12"):
        ivit_from_vit(vit, ivit_config(_tiny_cfg()))
    no_bias = ViT(_tiny_cfg(qkv_bias=False), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"model\.qkv_bias: False vs True"):  # was a KeyError
        ivit_from_vit(no_bias, ivit_config(_tiny_cfg()))


def test_vit_without_qkv_bias_becomes_an_ivit(tmp_path):
    hf = _hf_model(qkv_bias=False)
    path = _save(hf, tmp_path)
    vit, cfg = convert.load_hf_vit(path)
    assert not cfg.qkv_bias
    x = _images()
    np.testing.assert_allclose(np.asarray(vit(jnp.asarray(x))[0]), _torch_logits(hf, x), atol=1e-4, rtol=0)
    ivit, icfg = convert.load_hf_vit(path, interaction=True)
    flat = _flat(ivit)
    assert not icfg.qkv_bias and ("encoder", "layer", 0, "attention", "interaction_query", "bias") not in flat
    np.testing.assert_array_equal(flat[("encoder", "layer", 0, "attention", "interaction_query", "kernel")],
                                  flat[("encoder", "layer", 0, "attention", "query", "kernel")])
    _set(ivit, lambda p, v: np.zeros_like(v) if p[-1] in ("w1", "w2") else None)
    np.testing.assert_allclose(np.asarray(ivit(jnp.asarray(x))[0]), _torch_logits(hf, x), atol=1e-4, rtol=0)
    # Through config.init: the run's config must say qkv_bias=False (one line naming the key).
    with pytest.raises(UserError, match=r"model\.qkv_bias: False vs True"):
        build_model(_init_config(hf=path), ivit_config(_tiny_cfg()), seed=0)
    built = build_model(_init_config(hf=path), ivit_config(_tiny_cfg(qkv_bias=False)), seed=0)
    assert not built.cfg.qkv_bias
    # timm: the bias is read off the tensors.
    timm_sd = _timm_state_dict(hf)
    assert "blocks.0.attn.qkv.weight" in timm_sd and "blocks.0.attn.qkv.bias" not in timm_sd
    file = str(tmp_path / "nobias_timm.safetensors")
    save_file(timm_sd, file)
    _, tcfg = convert.load_timm_vit(file, num_heads=HEADS, layer_norm_eps=1e-12)
    assert not tcfg.qkv_bias
