"""Figures: attention rows against the model and by hand, maps / convergence / similarity outputs."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lfi_jax import visualize as vz
from lfi_jax.config import ABLATIONS
from lfi_jax.models.vit import ViT, variant

from test_evaluate import trained_run


def _tiny(row, seed=0):
    """(graphdef, params) of a tiny model, initialised under jit (one compile, not one per tensor)."""
    iq, ic, gc = ABLATIONS[row]
    cfg = variant("S/6", hidden_size=32, depth=2, num_heads=2, mlp_dim=64, image_size=24, num_classes=10, gate_hidden=2,
                  interaction_queries=iq, interaction_constraint=ic, gated_control=gc)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(seed))))
    params = jax.jit(lambda: nnx.split(ViT(cfg, rngs=nnx.Rngs(seed)))[1])()
    return graphdef, params


def _run_model(graphdef, params, images):
    def fn(params, images):
        model = nnx.merge(graphdef, params)
        _, aux = model(images)
        vfm, agt = vz.cls_attention_rows(model, images)
        return aux["cls_attn"], vfm, agt, model.embeddings(images)

    return jax.device_get(jax.jit(fn)(params, images))


def test_attention_rows_match_the_model_and_a_hand_computation():
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, 24, 3)), jnp.float32)
    # I-ViT: the model's own CLS rows (used by the alignment loss) are C_agt's
    graphdef, params = _tiny("ivit")
    cls_attn, vfm, agt, x = _run_model(graphdef, params, images)
    assert vfm.shape == agt.shape == (2, 2, 2, 17)
    np.testing.assert_allclose(agt, cls_attn, atol=1e-6)
    # IQ off, IC on: the model's CLS rows are C_vfm's
    g2, p2 = _tiny("ic_only", seed=1)
    cls_ic, vfm_ic, agt_ic, _ = _run_model(g2, p2, images)
    assert agt_ic is None
    np.testing.assert_allclose(vfm_ic, cls_ic, atol=1e-6)
    # layer 0 of the I-ViT's original queries, by hand in float64 from the parameters
    x = np.asarray(x, np.float64)
    layer = jax.device_get(nnx.to_pure_dict(params))["encoder"]["layer"][0]
    ln, att = layer["layernorm_before"], layer["attention"]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    h = (x - mu) / np.sqrt(var + 1e-12) * ln["scale"] + ln["bias"]
    q = h[:, 0] @ att["query"]["kernel"] + att["query"]["bias"]
    k = h @ att["key"]["kernel"] + att["key"]["bias"]
    q = q.reshape(2, 2, 16)
    k = k.reshape(2, 17, 2, 16)
    s = np.einsum("bhd,bkhd->bhk", q, k) / math.sqrt(16)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(vfm[:, 0], p, atol=1e-5)
    # and the interaction queries' row of layer 0, from its own projection
    q2 = (h[:, 0] @ att["interaction_query"]["kernel"] + att["interaction_query"]["bias"]).reshape(2, 2, 16)
    s2 = np.einsum("bhd,bkhd->bhk", q2, k) / math.sqrt(16)
    p2 = np.exp(s2 - s2.max(-1, keepdims=True))
    np.testing.assert_allclose(agt[:, 0], p2 / p2.sum(-1, keepdims=True), atol=1e-5)


def test_patch_maps_and_select():
    rows = np.array([[[[0.5, 0.25, 0.25, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]], [[0.0, 1.0, 0.0, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0, 0.4]]]])
    p = vz.patch_maps(rows)  # [1, 2 layers, 2 heads, 4 patches]
    np.testing.assert_allclose(p[0, 0, 0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(p[0, 1, 1], [0, 0, 0, 1])
    np.testing.assert_allclose(vz.select(p, 0, "mean")[0], [0.375, 0.375, 0.125, 0.125])
    np.testing.assert_allclose(vz.select(p, "mean", 1)[0], [0.125, 0.125, 0.125, 0.625])
    np.testing.assert_allclose(vz.select(p, -1, 0)[0], [1, 0, 0, 0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory)[0]


def test_maps_figure(trained, tmp_path):
    out = tmp_path / "maps.png"
    assert vz.main(["maps", "--workdir", trained, "--split", "test_iid", "--n", "3", "--compare", f"ViT={trained}", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (int(1.9 * 5 * 110), int((1.9 * 3 + 0.4) * 110))
        a = np.asarray(im.convert("RGB"), np.float32)
    assert a.std() > 10  # not blank


def test_maps_teacher_is_recomputed_like_the_store(trained):
    # the run's store covers train; for train examples the recomputed oracle equals the store
    run = vz.load_run(trained, devices=jax.devices()[:1])
    data_cfg = vz.eval_data_config(run.config)
    from lfi_jax.data.sources import get_source
    from lfi_jax.teacher.store import TeacherStore

    store = TeacherStore(os.path.join(trained, "teacher", "train"))
    src = get_source("shortcut_digits", "train", data_cfg.options.to_dict())
    t = vz.TeacherSource(run, data_cfg, "test_iid")
    assert t.oracle is not None
    for i in range(3):
        ex = src[i]
        np.testing.assert_array_equal(t.get(ex).map, store[ex["id"]].map)


def _fake_run(path, accs, steps):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"data": {"eval_splits": ["test_iid", "test_shifted"]}}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for s, a in zip(steps, accs):
            f.write(json.dumps({"step": s, "loss": 1.0}) + "\n")
            f.write(json.dumps({"step": s, "test_iid/accuracy": a, "test_shifted/accuracy": a / 2}) + "\n")


def test_convergence_speedup_and_png(tmp_path, capsys):
    steps = [10, 20, 30, 40, 50]
    _fake_run(tmp_path / "vit", [0.1, 0.2, 0.3, 0.4, 0.5], steps)
    _fake_run(tmp_path / "ivit", [0.3, 0.5, 0.6, 0.6, 0.7], steps)
    out = tmp_path / "conv.png"
    assert vz.main(["convergence", "--runs", f"ViT={tmp_path}/vit", f"I-ViT={tmp_path}/ivit", "--out", str(out)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["metric"] == "test_iid/accuracy" and r["target"] == 0.5
    assert r["runs"]["ViT"]["step_reaching_baseline_final"] == 50
    assert r["runs"]["I-ViT"]["step_reaching_baseline_final"] == 20
    assert r["runs"]["I-ViT"]["speedup"] == pytest.approx(2.5)
    with Image.open(out) as im:
        assert im.size == (int(6.4 * 110), int(4.2 * 110))
    r2 = vz.convergence_figure({"a": str(tmp_path / "ivit"), "b": str(tmp_path / "vit")}, str(out), metric="test_shifted/accuracy")
    assert r2["target"] == 0.35 and r2["runs"]["b"]["step_reaching_baseline_final"] is None


def test_similarity_against_human_store(trained, tmp_path, capsys):
    from lfi_jax.data.sources import get_source
    from lfi_jax.evaluate import load_config
    from lfi_jax.teacher.export import export_store

    cfg = load_config(trained)
    src = get_source("shortcut_digits", "test_iid", cfg.data.options.to_dict())
    human = tmp_path / "human"
    store = export_store(src, str(human), backend="oracle", grid=8, progress=False)  # the student grid, exact masks
    out = tmp_path / "sim.png"
    # with the human maps as the teacher, C_vlm matches them exactly
    assert vz.main(["similarity", "--workdir", trained, "--human", str(human), "--teacher", str(human), "--split", "test_iid",
                    "--n", "16", "--out", str(out)]) == 0
    assert "C_agt" in capsys.readouterr().out
    res = json.loads((tmp_path / "sim.json").read_text())
    assert res["examples"] == 16
    assert res["similarity"]["C_vlm"]["mean"] == pytest.approx(1.0, abs=1e-6)
    # the uniform map's cosine with h (sum 1) is 1 / (sqrt(P) |h|)
    want = np.mean([1.0 / (8.0 * np.linalg.norm(store[src.example_id(i)].map)) for i in range(16)])
    assert res["similarity"]["uniform"]["mean"] == pytest.approx(want, rel=1e-5)
    assert set(res["per_layer"]) == {"C_vfm", "C_agt"} and len(res["per_layer"]["C_agt"]) == 2
    for k in ("C_vfm", "C_agt"):
        assert 0.0 < res["similarity"][k]["mean"] <= 1.0
    with Image.open(out) as im:
        assert im.size == (int((1.3 * 4 + 2) * 110), int(3.8 * 110))
