"""Figures: attention rows against the model and by hand, maps / convergence / similarity outputs."""

import json
import math
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from test_evaluate import trained_run

from lfi_jax import visualize as vz
from lfi_jax.config import ABLATIONS
from lfi_jax.eval import attention as att
from lfi_jax.eval import examples as exs
from lfi_jax.eval.predict import eval_data_config
from lfi_jax.models.vit import ViT, variant
from lfi_jax.run import load_config, load_run
from lfi_jax.teacher.store import TeacherStore


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
        vfm, agt = att.cls_attention_rows(model, images)
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
    layer0 = [[0.5, 0.25, 0.25, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]]
    layer1 = [[0.0, 1.0, 0.0, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0, 0.4]]
    rows = np.array([[layer0, layer1]])
    p = att.patch_maps(rows)  # [1, 2 layers, 2 heads, 4 patches]
    np.testing.assert_allclose(p[0, 0, 0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(p[0, 1, 1], [0, 0, 0, 1])
    np.testing.assert_allclose(att.select(p, 0, "mean")[0], [0.375, 0.375, 0.125, 0.125])
    np.testing.assert_allclose(att.select(p, "mean", 1)[0], [0.125, 0.125, 0.125, 0.625])
    np.testing.assert_allclose(att.select(p, -1, 0)[0], [1, 0, 0, 0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory)[0]


def test_maps_figure(trained, tmp_path):
    out = tmp_path / "maps.png"
    argv = ["maps", "--workdir", trained, "--split", "test_iid", "--n", "3", "--compare", f"ViT={trained}"]
    assert vz.main(argv + ["--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (int(1.9 * 5 * 110), int((1.9 * 3 + 0.4) * 110))
        a = np.asarray(im.convert("RGB"), np.float32)
    assert a.std() > 10  # not blank


def test_maps_teacher_is_recomputed_like_the_store(trained):
    # the run's store covers train; for train examples the recomputed oracle equals the store
    run = load_run(trained, devices=jax.devices()[:1])
    data_cfg = eval_data_config(run.config)
    from lfi_jax.data.sources import get_source
    from lfi_jax.teacher.store import TeacherStore

    store = TeacherStore(os.path.join(trained, "teacher", "train"))
    src = get_source("shortcut_digits", "train", data_cfg.options.to_dict())
    t = exs.TeacherSource(run, data_cfg, "test_iid")
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
    runs = {"a": str(tmp_path / "ivit"), "b": str(tmp_path / "vit")}
    r2 = vz.convergence_figure(runs, str(out), metric="test_shifted/accuracy")
    assert r2["target"] == 0.35 and r2["runs"]["b"]["step_reaching_baseline_final"] is None


def test_similarity_against_human_store(trained, tmp_path, capsys):
    from lfi_jax.data.sources import get_source
    from lfi_jax.teacher.export import export_store

    cfg = load_config(trained)
    src = get_source("shortcut_digits", "test_iid", cfg.data.options.to_dict())
    human = tmp_path / "human"
    g = cfg.model.image_size // cfg.model.patch_size  # the student grid: exact masks
    store = export_store(src, str(human), backend="oracle", grid=g, progress=False)
    out = tmp_path / "sim.png"
    # with the human maps as the teacher, C_vlm matches them exactly
    argv = ["similarity", "--workdir", trained, "--human", str(human), "--teacher", str(human), "--split", "test_iid"]
    assert vz.main(argv + ["--n", "16", "--out", str(out)]) == 0
    assert "C_agt" in capsys.readouterr().out
    res = json.loads((tmp_path / "sim.json").read_text())
    assert res["examples"] == 16
    assert res["similarity"]["C_vlm"]["mean"] == pytest.approx(1.0, abs=1e-6)
    # the uniform map's cosine with h (sum 1) is 1 / (sqrt(P) |h|)
    want = np.mean([1.0 / (g * np.linalg.norm(store[src.example_id(i)].map)) for i in range(16)])
    assert res["similarity"]["uniform"]["mean"] == pytest.approx(want, rel=1e-5)
    assert set(res["per_layer"]) == {"C_vfm", "C_agt"} and len(res["per_layer"]["C_agt"]) == 2
    for k in ("C_vfm", "C_agt"):
        assert 0.0 < res["similarity"][k]["mean"] <= 1.0
    with Image.open(out) as im:
        assert im.size == (int((1.3 * 4 + 2) * 110), int(3.8 * 110))


# --------------------------------------------------------------------------- own teacher, class names, sampling


def _run_with_vlm_store(trained, tmp_path):
    """A copy of the trained run whose config names a (non-oracle) store covering only its train split."""
    wd = tmp_path / "run"
    shutil.copytree(trained, wd, ignore=shutil.ignore_patterns("teacher"))
    store = tmp_path / "vlm_store"
    shutil.copytree(os.path.join(trained, "teacher", "train"), store)
    man = json.loads((store / "manifest.json").read_text())
    man["backend"] = "llava"
    man["teacher"] = {"model": "tiny-llava", "grid": man["teacher"]["grid"]}
    (store / "manifest.json").write_text(json.dumps(man))
    cfg = json.loads((wd / "config.json").read_text())
    cfg["teacher"]["store"], cfg["teacher"]["auto"] = str(store), ""
    (wd / "config.json").write_text(json.dumps(cfg))
    return str(wd), str(store)


def _record_teacher_panels(monkeypatch):
    """The C_vlm panels drawn: True where a map was drawn, False for an empty panel."""
    drawn = []
    overlay = vz._overlay

    def spy(ax, image, m, grid, title, note=""):
        if note.startswith("no teacher"):
            drawn.append(m is not None)
        return overlay(ax, image, m, grid, title, note)

    monkeypatch.setattr(vz, "_overlay", spy)
    return drawn


def test_maps_use_the_runs_own_vlm_store(trained, tmp_path, monkeypatch, capsys):
    """Issue 16 case 8: without --teacher, a run trained with a VLM store shows that store's maps
    (on the split it covers), and the JSON says what the panels show."""
    wd, store_path = _run_with_vlm_store(trained, tmp_path)
    store = TeacherStore(store_path)
    drawn = _record_teacher_panels(monkeypatch)
    assert vz.main(["maps", "--workdir", wd, "--n", "3", "--out", str(tmp_path / "m.png")]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["split"] == "train" and r["teacher"] == f"store {store_path}"
    assert r["teacher_maps"] == 3 and drawn == [True, True, True]
    assert all(row["teacher_map"] and row["id"] in store for row in r["examples"])
    # a split the store does not cover: no maps, and the JSON says so (not "oracle recomputed")
    drawn.clear()
    assert vz.main(["maps", "--workdir", wd, "--split", "test_iid", "--n", "2", "--out", str(tmp_path / "m2.png")]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["teacher"].startswith("none: the run's llava store") and "test_iid" in r["teacher"]
    assert r["teacher_maps"] == 0 and drawn == [False, False]


def test_maps_sample_across_classes_and_name_them(trained, tmp_path):
    """Issue 16 cases 8 and 11: rows drawn across classes (seeded), true and predicted classes by name."""
    from lfi_jax.data.sources import get_source
    from lfi_jax.eval.predict import predict

    r = vz.maps_figure(trained, str(tmp_path / "a.png"), split="test_iid", n=4)
    run = load_run(trained, devices=jax.devices()[:1])
    cfg = eval_data_config(run.config)
    src = get_source(cfg.source, "test_iid", cfg.options.to_dict())
    idx = [row["index"] for row in r["examples"]]
    labels = [int(src[i]["label"]) for i in idx]
    assert len(set(labels)) == 4  # four examples, four classes
    assert [row["true"] for row in r["examples"]] == [src.class_names[c] for c in labels]
    pred = predict(run, cfg, "test_iid", progress=False).logits[idx].argmax(1)
    assert [row["pred"] for row in r["examples"]] == [src.class_names[c] for c in pred]
    same = vz.maps_figure(trained, str(tmp_path / "b.png"), split="test_iid", n=4)["examples"]
    assert [row["index"] for row in same] == idx
    again = vz.maps_figure(trained, str(tmp_path / "c.png"), split="test_iid", n=4, seed=1)["examples"]
    assert [row["index"] for row in again] != idx
    consecutive = vz.maps_figure(trained, str(tmp_path / "d.png"), split="test_iid", n=2, start=5)["examples"]
    assert [row["index"] for row in consecutive] == [5, 6]


def test_sample_across_classes_by_hand():
    labels = np.array([0, 0, 1, 0, 2, 1, 0, 1, 0])
    idx = exs.sample_across_classes(labels, len(labels), 6, seed=3)
    assert len(set(idx)) == 6
    assert [int(labels[i]) for i in idx] == [0, 1, 2, 0, 1, 0]  # round robin over the classes
    assert idx == exs.sample_across_classes(labels, len(labels), 6, seed=3)
    assert sorted(exs.sample_across_classes(labels, len(labels), 20, seed=0)) == list(range(9))
    no_labels = exs.sample_across_classes(None, 100, 5, seed=0)
    assert len(set(no_labels)) == 5 and all(0 <= i < 100 for i in no_labels)


def test_model_class_names(tmp_path):
    import ml_collections

    for c in ("cat", "dog", "owl"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / c / "a.png")
    data = {"source": f"imagefolder:{tmp_path}", "train_split": "train", "options": {}}
    config = ml_collections.ConfigDict({"data": data})

    class FakeRun:
        def __init__(self, num_classes, workdir):
            self.config, self.mcfg, self.workdir = config, types.SimpleNamespace(num_classes=num_classes), str(workdir)

    wd = tmp_path / "run"
    wd.mkdir()
    assert exs.model_class_names(FakeRun(3, wd), ["x", "y"]) == ["cat", "dog", "owl"]
    assert exs.model_class_names(FakeRun(2, wd), ["x", "y"]) == ["x", "y"]
    assert exs.model_class_names(FakeRun(4, wd), ["x", "y"]) == ["0", "1", "2", "3"]
    # the names the trainer recorded at start come first (the training data may be gone since)
    (wd / "run_info.json").write_text(json.dumps({"data": {"class_names": ["ant", "bee", "cow"]}}))
    assert exs.model_class_names(FakeRun(3, wd), ["x", "y"]) == ["ant", "bee", "cow"]


# --------------------------------------------------------------------------- dense maps of a detection run


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    """A runlocal I-DETR of configs/detection_demo.py (2 steps, its dense oracle teacher store)."""
    pytest.importorskip("pycocotools")
    from lfi_jax.demo_detection import run_detection_demo

    wd = tmp_path_factory.getbasetemp() / "shared_det_runlocal"
    sets = {"total_steps": 2, "batch_size": 8, "eval_batch_size": 8, "checkpoint_every": 0}  # 8 test devices
    payload = run_detection_demo(str(wd), models=("idetr",), runlocal=True, sets=sets)
    return payload["runs"]["idetr"][0]["workdir"]


def _pooled_by_hand(rec, cells=8):
    """Eq. 12's oracle on the cells x cells feature grid, float64: each instance (its ink mask, or
    its filled box) summed per cell, normalised to mass 1, summed over instances, normalised."""
    from lfi_jax.teacher.oracle import boxes_mask

    img = np.asarray(rec["image"])
    h, w = img.shape[:2]
    dens = (np.asarray(rec["masks"], np.float64) if rec.get("masks") is not None
            else np.stack([boxes_mask(np.asarray(b, np.float64)[None], h, w) for b in rec["boxes"]]))
    per = dens.reshape(len(dens), cells, h // cells, cells, w // cells).sum((2, 4))
    m = (per / per.sum((1, 2), keepdims=True)).sum(0)
    return m / m.sum()


def test_maps_of_a_detection_run_show_the_dense_teacher_and_the_decoder_attention(det_run, tmp_path, capsys):
    from lfi_jax.data.sources import get_source
    from lfi_jax.eval import dense_maps as dm

    out = tmp_path / "dense.png"
    assert vz.main(["maps", "--workdir", det_run, "--n", "3", "--start", "0", "--out", str(out)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["columns"] == ["image", "C_vlm (teacher)", "C_agt"] and r["attention"] == "C_agt"
    assert r["split"] == "val" and r["rows"] == 3 and r["grid"] == [8, 8]
    assert r["teacher"].startswith("oracle_dense recomputed with the settings of store") and r["teacher_maps"] == 3
    with Image.open(out) as im:
        assert np.asarray(im.convert("L")).std() > 5
    run = load_run(det_run, devices=jax.devices()[:1])
    ex = dm.load_dense_examples(run, "val", [0, 1, 2], dm.DenseTeacher(run, "val"))
    src = get_source(run.config.data.source, "val", run.config.data.options.to_dict())
    assert [e["id"] for e in r["examples"]] == [src.example_id(i) for i in range(3)]
    for k in range(3):  # the teacher panel: the oracle of the val image, by hand on the 8 x 8 grid
        np.testing.assert_allclose(ex.teacher[k].reshape(8, 8), _pooled_by_hand(src[k]), atol=1e-6)
        assert r["examples"][k]["objects"] == len(src[k]["boxes"])
    # the decoder panel: the alignment rows the loss reads (last decoder layer's C_agt [B, H, Q, K]),
    # averaged over heads and object queries in float64 and renormalised
    model = nnx.merge(run.graphdef, run.params)
    rows = np.asarray(model(jnp.asarray(ex.image), jnp.asarray(ex.pixel_mask)).agt_rows, np.float64)
    for layer in (-1, 0):
        want = rows[:, layer].mean(axis=(1, 2))
        want /= want.sum(-1, keepdims=True)
        dec = dm.decoder_maps(run, ex, layer)
        np.testing.assert_allclose(dec["map"], want, atol=1e-5)
    np.testing.assert_allclose(dm.decoder_maps(run, ex, "mean")["map"].sum(-1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="means over heads"):
        vz.maps_figure(det_run, str(tmp_path / "x.png"), head=0)
