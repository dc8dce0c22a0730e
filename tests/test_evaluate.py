"""Evaluation: class-map restriction, metrics, restore on another device count, domains, LODO layout."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lfi_jax import evaluate as ev
from lfi_jax.config import load_config_file, set_key
from lfi_jax.data.lodo import make_lodo_layout
from lfi_jax.eval import metrics as em
from lfi_jax.eval import predict as ep
from lfi_jax.run import load_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "model.depth": 2,
    "model.hidden_size": 32,
    "model.num_heads": 2,
    "model.mlp_dim": 64,
    "model.gate_hidden": 2,
    "data.options.num_train": 128,
    "data.options.num_test": 32,
    "batch_size": 8,
    "eval_batch_size": 32,
    "log_every": 1,
    "total_steps": 3,
    "checkpoint_every": 0,
    "async_checkpointing": False,
}


def tiny_config(arg="ivit,runlocal", **extra):
    c = load_config_file("demo", arg)
    for k, v in {**TINY, **extra}.items():
        set_key(c, k, v)
    return c


def trained_run(tmp_path_factory):
    """A tiny I-ViT trained 3 steps on the 8 fake devices (mesh (-1, 1)), once per session
    (test_visualize uses it too). Returns (workdir, final metrics)."""
    import jax

    from lfi_jax.train import train_and_evaluate

    assert len(jax.devices()) == 8
    wd = tmp_path_factory.getbasetemp() / "shared_tiny_ivit"
    final_file = wd / "final.json"
    if not final_file.exists():
        final = train_and_evaluate(tiny_config(), str(wd))
        final_file.write_text(json.dumps({k: v for k, v in final.items() if isinstance(v, (int, float, bool))}))
    return str(wd), json.loads(final_file.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def run8(trained):
    return load_run(trained[0])


def _env():
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --------------------------------------------------------------------------- class maps


def test_restrict_logits_by_hand():
    logits = np.array([[1.0, 2.0, 0.0, -1.0], [0.0, 0.0, 3.0, 3.0]])
    groups = [[0, 1], [2], [3, 2]]
    lse = em.restrict_logits(logits, groups, "logsumexp")
    want = np.array(
        [
            [math.log(math.e + math.e**2), 0.0, math.log(math.exp(-1) + 1)],
            [math.log(2.0), 3.0, math.log(2 * math.e**3)],
        ]
    )
    np.testing.assert_allclose(lse, want, rtol=1e-12)
    np.testing.assert_allclose(em.restrict_logits(logits, groups, "max"), [[2.0, 0.0, 0.0], [0.0, 3.0, 3.0]])
    # logsumexp pooling = the probability mass of each group, renormalised over the groups
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    mass = np.stack([p[:, [0, 1]].sum(1), p[:, 2], p[:, [2, 3]].sum(1)], 1)
    np.testing.assert_allclose(em.softmax(lse), mass / mass.sum(1, keepdims=True), rtol=1e-12)


def test_resolve_class_map_names_indices_and_errors():
    src = ["cat", "dog", "tabby", "wolf"]
    cm = {"feline": ["cat", "tabby"], "canine": ["dog", 3], "bird": ["cat"]}
    assert em.resolve_class_map(cm, ["canine", "feline"], src, 4) == [[1, 3], [0, 2]]
    with pytest.raises(ValueError, match="horse"):
        em.resolve_class_map(cm, ["canine", "horse"], src, 4)
    with pytest.raises(ValueError, match="lion"):
        em.resolve_class_map({"feline": ["lion"]}, ["feline"], src, 4)
    with pytest.raises(ValueError, match="index 7"):
        em.resolve_class_map({"feline": [7]}, ["feline"], src, 4)


def test_read_class_map(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"a": ["x", "y"], "b": "z"}))
    assert em.read_class_map(str(p)) == {"a": ["x", "y"], "b": ["z"]}
    assert em.read_class_map('{"a": [0]}') == {"a": [0]}
    with pytest.raises(ValueError, match="non-empty list"):
        em.read_class_map('{"a": []}')
    with pytest.raises(FileNotFoundError, match="nope.json"):
        em.read_class_map(str(tmp_path / "nope.json"))


def test_metrics_by_hand():
    # 4 examples, 3 classes
    scores = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]]))
    labels = np.array([0, 1, 1, 1])
    m = em.classification_metrics(scores, labels, ["a", "b", "c"], n_bins=10)
    assert m["top1"] == 0.5
    assert m["confusion"] == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert m["per_class"]["b"] == {"count": 3, "accuracy": pytest.approx(1 / 3)}
    assert m["per_class"]["c"]["accuracy"] is None
    # confidences 0.7 (right, bin 7), 0.6 (right, bin 6), 0.5 (wrong, bin 5), 0.6 (wrong, bin 6)
    want_ece = 0.25 * abs(1 - 0.7) + 0.5 * abs(0.5 - 0.6) + 0.25 * abs(0 - 0.5)
    assert m["ece"] == pytest.approx(want_ece)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.4, 0.2])))
    assert m["mean_per_class_accuracy"] == pytest.approx((1 + 1 / 3) / 2)


# --------------------------------------------------------------------------- restore anywhere


def test_evaluate_cli_restores_on_one_device(trained, run8, tmp_path):
    wd, final = trained
    out = tmp_path / "e.json"
    r = subprocess.run(
        [sys.executable, "-m", "lfi_jax.evaluate", "--workdir", wd, "--split", "test_iid", "--out", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["devices"] == 1 and rec["step"] == 3 and rec["count"] == 32
    # the trainer's own evaluation on 8 devices
    assert rec["top1"] == pytest.approx(final["test_iid/accuracy"], abs=1e-9)
    assert sum(map(sum, rec["confusion"])) == 32
    assert "top-1" in r.stdout and "confusion" in r.stdout
    # the same checkpoint restored here on all 8 devices gives the same predictions
    assert run8.mesh.size == 8 and run8.step == 3
    pred = ep.predict(run8, ep.eval_data_config(run8.config), "test_iid", progress=False)
    acc = float((pred.logits.argmax(1) == pred.labels).mean())
    assert acc == pytest.approx(rec["top1"])
    assert np.asarray(rec["confusion"]).trace() == int(round(acc * 32))


def test_missing_checkpoint_step_is_named(trained):
    wd, _ = trained
    with pytest.raises(ValueError, match="step 99"):
        load_run(wd, step=99)


# --------------------------------------------------------------------------- domains + class map


def _write_parity_folder(root, split, n):
    from lfi_jax.data.sources import get_source

    src = get_source("shortcut_digits", split, {"spurious_p": 0.0, "canvas": 48, "seed": 0, "num_test": n})
    for i in range(n):
        ex = src[i]
        cls = "even" if ex["label"] % 2 == 0 else "odd"
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ex["image"]).save(d / f"{i:04d}.png")


def test_domains_table_with_parity_class_map(trained, run8, tmp_path):
    wd, _ = trained
    for dom, split in (("iid", "test_iid"), ("shifted", "test_shifted")):
        _write_parity_folder(tmp_path / "digits" / dom, split, 32)
    cmap = tmp_path / "parity.json"
    cmap.write_text(json.dumps({"even": ["0", "2", "4", "6", "8"], "odd": ["1", "3", "5", "7", "9"]}))
    out = tmp_path / "table.md"
    rc = ev.main(["domains", "--workdirs", f"vit={wd}", f"ivit={wd}", "--domains",
                  f"iid=imagefolder:{tmp_path}/digits/iid", f"shifted=imagefolder:{tmp_path}/digits/shifted",
                  "--split", "test", "--class_map", str(cmap), "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    rows = [l for l in text.splitlines() if l.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[:4]] == ["domain", "iid", "shifted", "**mean**"]
    res = json.loads((tmp_path / "table.json").read_text())
    # independent: the model's logits on the same images, parity by probability mass
    run = run8
    for dom, split in (("iid", "test_iid"), ("shifted", "test_shifted")):
        cfg = ep.eval_data_config(run.config)
        cfg.options.spurious_p = 0.0
        pred = ep.predict(run, cfg, split, progress=False)
        p = np.exp(pred.logits - pred.logits.max(1, keepdims=True))
        odd_mass = p[:, 1::2].sum(1)
        even_mass = p[:, 0::2].sum(1)
        pred_odd = odd_mass > even_mass
        acc = float((pred_odd == (pred.labels % 2 == 1)).mean())
        got = res["results"]["ivit"][dom]
        assert got["top1"] == pytest.approx(acc)
        assert got["class_names"] == ["even", "odd"] and got["count"] == 32
        assert f"{100 * acc:.2f}" in text


def test_unmapped_data_class_is_named(trained, run8, tmp_path):
    wd, _ = trained
    _write_parity_folder(tmp_path / "d", "test_iid", 8)
    rec_err = None
    try:
        ev.evaluate_run(wd, data=f"imagefolder:{tmp_path}/d", split="test", class_map={"even": ["0"]}, run=run8)
    except ValueError as e:
        rec_err = str(e)
    assert rec_err is not None and "odd" in rec_err
    with pytest.raises(ValueError, match="class_map"):
        ev.evaluate_run(wd, data=f"imagefolder:{tmp_path}/d", split="test", run=run8)


# --------------------------------------------------------------------------- leave-one-domain-out


def test_lodo_layout(tmp_path):
    from lfi_jax.data.sources import get_source

    root = tmp_path / "PACS"
    img = np.zeros((4, 4, 3), np.uint8)
    for dom in ("art", "photo", "sketch"):
        for cls in ("dog", "horse"):
            (root / dom / cls).mkdir(parents=True)
            for k in range(2):
                Image.fromarray(img).save(root / dom / cls / f"pic_{k}.png")
    out = tmp_path / "lodo" / "sketch"
    assert ev.main(["lodo-layout", "--root", str(root), "--held_out", "sketch", "--out", str(out)]) == 0
    train = get_source(f"imagefolder:{out}", "train")
    test = get_source(f"imagefolder:{out}", "test")
    assert train.class_names == test.class_names == ["dog", "horse"]
    assert len(train) == 8 and len(test) == 4
    assert train.example_id(0) == "dog/art__pic_0.png"
    assert all("sketch__" in test.example_id(i) for i in range(4))
    target = (root / "sketch" / "dog" / "pic_1.png").resolve()
    assert os.path.realpath(out / "test" / "dog" / "sketch__pic_1.png") == str(target)
    # idempotent; a different held-out domain in the same place is refused
    assert make_lodo_layout(str(root), "sketch", str(out)) == str(out)
    with pytest.raises(ValueError, match="another layout"):
        make_lodo_layout(str(root), "art", str(out))
    with pytest.raises(ValueError, match="cartoon"):
        make_lodo_layout(str(root), "cartoon", str(tmp_path / "x"))


def test_pacs_vlcs_configs():
    from lfi_jax.config import validate

    for name, arg, classes in (("pacs", "art_painting,vit", 7), ("vlcs", "VOC2007,ivit,S/16", 5)):
        c = load_config_file(name, arg)
        c.teacher.store = "/some/store"
        validate(c)
        assert c.model.num_classes == classes and c.data.eval_splits == ("test",)
    with pytest.raises(ValueError, match="mars"):
        load_config_file("pacs", "mars,ivit")
    # the training domains' images over batch 64, 50 epochs
    assert load_config_file("pacs", "sketch").total_steps == 50 * ((2048 + 2344 + 1670) // 64)
