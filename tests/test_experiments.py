"""The experiment runner on a tiny budget: every experiment writes its table, figure and JSON."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from lfi_jax import experiments as ex
from lfi_jax.cli import run_cli
from lfi_jax.config import ABLATIONS, load_config_file, set_key

TINY_SETS = [
    "model.depth=2",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.mlp_dim=64",
    "model.gate_hidden=2",
    "data.options.num_train=128",
    "data.options.num_test=16",
    "batch_size=8",
    "eval_batch_size=16",
    "total_steps=2",
    "eval_every=0",
    "log_every=1",
    "checkpoint_every=0",
    "async_checkpointing=False",
]


def fake_accuracy(cfg) -> float:
    """A deterministic stand-in accuracy of a config (what the fake trainer reports)."""
    m, d, n = cfg["model"], cfg["data"], cfg["teacher"]["noise"]
    key = (m["interaction_queries"], m["interaction_constraint"], m["gated_control"], d["data_ratio"],
           d["options"].get("spurious_p"), n["blur"], n["shift"], n["uniform"], cfg["seed"])
    return (sum(ord(ch) * (i + 1) for i, ch in enumerate(repr(key))) % 997) / 997


@pytest.fixture
def fake_train(monkeypatch):
    """Replaces training by a quick stand-in that validates the config and writes what a
    finished run leaves behind (config.json, metrics.jsonl, the final checkpoint directory)."""
    import lfi_jax.train
    from lfi_jax.config import validate

    calls = []

    def train_and_evaluate(config, workdir):
        validate(config)
        os.makedirs(os.path.join(workdir, "checkpoints", str(config.total_steps)), exist_ok=True)
        open(os.path.join(workdir, "checkpoints", str(config.total_steps), "commit_success.txt"), "w").close()
        cfg = json.loads(config.to_json_best_effort())
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg, f)
        acc = fake_accuracy(cfg)
        final = {f"{s}/accuracy": acc / (i + 1) for i, s in enumerate(config.data.eval_splits)}
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": config.total_steps, **final}) + "\n")
        calls.append(workdir)
        return dict(final, step=config.total_steps, preempted=False)

    monkeypatch.setattr(lfi_jax.train, "train_and_evaluate", train_and_evaluate)
    return calls


def _run(name, tmp_path, *extra, tiny=True):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    argv = [name, "--config", "configs/demo.py:ivit,runlocal", "--workdir", runs, "--out", out, "--budget", "full"]
    for s in TINY_SETS if tiny else ():
        argv += ["--set", s]
    assert ex.main(argv + list(extra)) == 0
    with open(os.path.join(out, f"{name}.json")) as f:
        payload = json.load(f)
    with open(os.path.join(out, f"{name}.md")) as f:
        md = f.read()
    with Image.open(os.path.join(out, f"{name}.png")) as im:
        size = im.size
        assert np.asarray(im.convert("L")).std() > 5  # something is drawn
    return payload, md, size


def _table_rows(md):
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines[1:]]  # without the header


def _cfg(cell):
    with open(os.path.join(cell["workdir"], "config.json")) as f:
        return json.load(f)


def _pct(x):
    return f"{100 * x:.1f}"


def test_ablation_rows(fake_train, tmp_path):
    payload, md, size = _run("ablation", tmp_path)
    rows = _table_rows(md)
    assert [r[0] for r in rows] == [ex.ABLATION_NAMES[m] for m in ("vit", "iq_gc", "ic_only", "iq_ic", "ivit")]
    assert [r[1:4] for r in rows] == [["", "", ""], ["✓", "", "✓"], ["", "✓", ""], ["✓", "✓", ""], ["✓", "✓", "✓"]]
    for row, cell in zip(rows, payload["cells"]):
        cfg = _cfg(cell)
        m = cfg["model"]
        iq, ic, gc = ABLATIONS[cell["labels"]["model"]]
        assert (m["interaction_queries"], m["interaction_constraint"], m["gated_control"]) == (iq, ic, gc)
        assert (m["depth"], m["hidden_size"]) == (2, 32)  # --set reached every cell
        assert row[4] == _pct(fake_accuracy(cfg)) and row[5] == _pct(fake_accuracy(cfg) / 2)
        if ic:  # the shared oracle store of the train split, built once
            assert os.path.isfile(os.path.join(cfg["teacher"]["store"], "manifest.json"))
    ic_cells = [c for c in payload["cells"] if _cfg(c)["model"]["interaction_constraint"]]
    assert len({_cfg(c)["teacher"]["store"] for c in ic_cells}) == 1
    assert size == (1100, 440)


def test_data_ratio_table_pivot_and_resume(fake_train, tmp_path, capsys):
    payload, md, size = _run("data_ratio", tmp_path)
    rows = _table_rows(md)
    want = [(m, f"{p} %") for p in ("100", "50", "10", "1") for m in ("ViT", "I-ViT")]
    assert [(r[0], r[1]) for r in rows[:8]] == want
    assert md.count("| I-ViT − ViT |") == 2  # one pivot per eval split
    for cell in payload["cells"]:
        assert _cfg(cell)["data"]["data_ratio"] == cell["labels"]["data_ratio"]
    assert size == (660, 440) and len(fake_train) == 8
    # a re-run trains nothing: every cell holds its final checkpoint
    capsys.readouterr()
    _run("data_ratio", tmp_path)
    assert len(fake_train) == 8 and capsys.readouterr().err.count("finished earlier") == 8
    # the ablation shares ViT and I-ViT at 100 %: only its three other rows are trained
    _run("ablation", tmp_path)
    assert len(fake_train) == 11


def test_teacher_noise_rows_and_stores(fake_train, tmp_path):
    payload, md, size = _run("teacher_noise", tmp_path)
    rows = _table_rows(md)
    want = [("ViT", "none", "0.0")] + [("I-ViT", k, f"{v:.1f}") for k, v in ex.NOISE_LEVELS]
    assert [(r[0], r[1], r[2]) for r in rows] == want
    for cell in payload["cells"]:
        cfg = _cfg(cell)
        if cell["labels"]["model"] == "ivit":
            with open(os.path.join(cfg["teacher"]["store"], "manifest.json")) as f:
                noise = json.load(f)["teacher"]["noise"]
            want_noise = {"blur": 0.0, "shift": 0.0, "uniform": 0.0}
            if cell["labels"]["noise"] != "none":
                want_noise[cell["labels"]["noise"]] = cell["labels"]["level"]
            assert noise == want_noise == cfg["teacher"]["noise"]
    assert size == (int(4.2 * 3 * 110), int(3.6 * 110))


def test_spurious_p_rows(fake_train, tmp_path):
    payload, md, size = _run("spurious_p", tmp_path)
    rows = _table_rows(md)
    regimes = (("clean", "0.0"), ("shortcut", "0.7"), ("hard", "0.9"))
    assert [(r[0], r[1], r[2]) for r in rows] == [(m, reg, p) for reg, p in regimes for m in ("ViT", "I-ViT")]
    for cell in payload["cells"]:
        assert _cfg(cell)["data"]["options"]["spurious_p"] == cell["labels"]["spurious_p"]
    assert size == (660, 440)


def test_seeds_mean_and_spread(fake_train, tmp_path):
    payload, md, size = _run("seeds", tmp_path, "--seeds", "3")
    assert [c["seed"] for c in payload["cells"]] == [0, 1, 2]
    vals = [fake_accuracy(_cfg(c)) for c in payload["cells"]]
    rows = _table_rows(md)
    assert len(rows) == 1 and rows[0][-2] == "3"
    assert rows[0][0] == f"{100 * np.mean(vals):.1f} ± {100 * np.std(vals, ddof=1):.1f}"
    assert [_cfg(c)["seed"] for c in payload["cells"]] == [0, 1, 2]


def test_real_training_end_to_end(tmp_path, capsys):
    """A real cell (I-ViT with its oracle store) through the CLI, then a resume."""
    from lfi_jax.metrics import read_metrics

    payload, md, _ = _run("seeds", tmp_path)
    cell = payload["cells"][0]
    assert _cfg(cell)["model"]["interaction_constraint"] and len(payload["cells"]) == 1
    with open(os.path.join(_cfg(cell)["teacher"]["store"], "manifest.json")) as f:
        assert json.load(f)["count"] == 128
    for cell in payload["cells"]:
        rows = [r for r in read_metrics(cell["workdir"]) if r["step"] == 2 and "test_iid/accuracy" in r]
        assert rows[-1]["test_iid/accuracy"] == cell["metrics"]["test_iid/accuracy"]
        assert os.path.isdir(os.path.join(cell["workdir"], "checkpoints", "2"))
        assert cell["wall_s"] > 0
    capsys.readouterr()
    payload2, md2, _ = _run("seeds", tmp_path)
    assert capsys.readouterr().err.count("finished earlier") == 1
    assert [c["metrics"] for c in payload2["cells"]] == [c["metrics"] for c in payload["cells"]]


def test_set_key_and_errors(tmp_path):
    c = load_config_file("demo", "ivit,runlocal")
    set_key(c, "total_steps", "7")
    set_key(c, "optim.lr", 1)
    set_key(c, "data.options.scale_range", "(0.3, 0.5)")
    assert c.total_steps == 7 and isinstance(c.optim.lr, float) and c.data.options.scale_range == (0.3, 0.5)
    with pytest.raises(KeyError, match="optim.learning_rate"):
        set_key(c, "optim.learning_rate", 0.1)
    # a user error: one `error:` line and exit code 2 (the command-line convention of lfi_jax.cli)
    argv = ["spurious_p", "--config", "configs/tinyimagenet.py:S/16,runlocal", "--workdir", str(tmp_path)]
    assert run_cli(ex.main, argv, exit=False) == 2
    with pytest.raises(ValueError, match="seeds experiment needs --config"):
        ex.run_experiment(ex.EXPERIMENTS["seeds"], workdir=str(tmp_path), out=str(tmp_path))


def test_budgets():
    demo = load_config_file("demo", "ivit")
    assert ex.budget_overrides(demo, "small", True)["total_steps"] == 300
    assert ex.budget_overrides(demo, "full", True) == {}
    tin = load_config_file("tinyimagenet", "B/16,ivit")
    small = ex.budget_overrides(tin, "small", False)
    assert small["total_steps"] == tin.total_steps // 10 and small["eval_every"] == tin.eval_every // 10


# --------------------------------------------------------------------------- detection (Tables 6 and 7)

DET_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP_mask", "AP50_mask", "AP75_mask")


def fake_ap(cfg, key) -> float:
    """A deterministic stand-in COCO metric of a dense-prediction config."""
    m, t = cfg["model"], cfg["teacher"]
    ident = (cfg["task"], m["interaction_queries"], m["interaction_constraint"], t.get("shuffle"), cfg["seed"], key)
    return (sum(ord(ch) * (i + 1) for i, ch in enumerate(repr(ident))) % 991) / 991


@pytest.fixture
def fake_det_train(monkeypatch):
    """Training replaced by a stand-in that writes what a finished detection run leaves behind
    (config.json, metrics.jsonl with val/AP..., the final checkpoint directory)."""
    import lfi_jax.train

    calls = []

    def train_and_evaluate(config, workdir):
        if config.model.interaction_constraint:  # the runner built the dense teacher store first
            assert os.path.exists(os.path.join(config.teacher.store, "manifest.json"))
        step_dir = os.path.join(workdir, "checkpoints", str(config.total_steps))
        os.makedirs(step_dir, exist_ok=True)
        open(os.path.join(step_dir, "commit_success.txt"), "w").close()
        cfg = json.loads(config.to_json_best_effort())
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg, f)
        final = {f"val/{k}": fake_ap(cfg, k) for k in DET_KEYS}
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": config.total_steps, **final}) + "\n")
        calls.append(cfg)
        return dict(final, step=config.total_steps, preempted=False)

    monkeypatch.setattr(lfi_jax.train, "train_and_evaluate", train_and_evaluate)
    return calls


def test_detection_tables_with_and_without_the_dense_teacher(fake_det_train, tmp_path, capsys):
    from lfi_jax.config import CONFIG_DIR
    from lfi_jax.experiments import detection as det

    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    argv = ["detection", "--config", "runlocal", "--seeds", "2", "--workdir", runs, "--out", out]
    assert ex.main(argv) == 0
    payload = json.load(open(os.path.join(out, "detection.json")))
    md = open(os.path.join(out, "detection.md")).read()
    with Image.open(os.path.join(out, "detection.png")) as im:
        assert np.asarray(im.convert("L")).std() > 5
    ran = [g for g in det.GROUPS if os.path.exists(os.path.join(CONFIG_DIR, f"{g.config_file}.py"))]
    assert "detection" in payload["groups"]
    for g in det.GROUPS:
        if g not in ran:  # a config not written yet: the group says it was skipped
            assert g.name in payload["skipped"] and "does not exist" in payload["skipped"][g.name]
    assert len(fake_det_train) == 2 * sum(len(g.rows) for g in det.GROUPS if g.name in payload["groups"])
    # the detection rows: DETR (no teacher), I-DETR (teacher), I-DETR with the shuffled store
    det_cfgs = [c for c in fake_det_train if c["name"].startswith("digits-det-")]
    shuffled = [c for c in det_cfgs if c["teacher"].get("shuffle")]
    assert shuffled and all("_shuffled0" in c["teacher"]["store"] for c in shuffled)
    plain = [c for c in det_cfgs if c["model"]["interaction_constraint"] and not c["teacher"].get("shuffle")]
    assert plain and all(os.path.basename(c["teacher"]["store"]) in ("teacher_seed0", "teacher_seed1") for c in plain)
    assert [c["seed"] for c in fake_det_train[:2]] == [0, 1]  # seeds for model and data
    assert all(c["data"]["options"]["seed"] == c["seed"] for c in fake_det_train)
    # the table: AP etc. in %, mean ± sample std over the two seeds (by hand), gains paired by seed
    group = payload["groups"]["detection"]
    cells = group["cells"]
    rows = _table_rows(md.split("## ")[1].split("Gain over")[0])
    assert [r[0] for r in rows] == ["DETR (no C_vlm)", "I-DETR (C_vlm)", "I-DETR, C_vlm shuffled across images"]
    for row, model in zip(rows, ("detr", "idetr", "idetr_shuffled")):
        cfgs = [_cfg(c) for c in cells if c["labels"]["model"] == model]
        for j, k in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
            vals = [fake_ap(c, k) for c in cfgs]
            assert row[1 + j] == f"{100 * np.mean(vals):.1f} ± {100 * np.std(vals, ddof=1):.1f}", (model, k)
        assert row[7] == "2"
    base = {c["seed"]: fake_ap(_cfg(c), "AP50") for c in cells if c["labels"]["model"] == "detr"}
    diff = [fake_ap(_cfg(c), "AP50") - base[c["seed"]] for c in cells if c["labels"]["model"] == "idetr"]
    np.testing.assert_allclose(group["gains"]["idetr"]["val/AP50"]["values"], diff, atol=1e-12)
    if "segmentation" in payload["groups"]:
        assert "AP mask" in md.split("instance segmentation")[1].splitlines()[4]
    # re-running trains nothing
    n = len(fake_det_train)
    capsys.readouterr()
    assert ex.main(argv) == 0
    assert len(fake_det_train) == n and "finished earlier" in capsys.readouterr().err
    # bad input: one error line, exit code 2
    assert run_cli(ex.main, ["detection", "--regimes", "nope", "--workdir", runs, "--out", out], exit=False) == 2
    assert run_cli(ex.main, ["detection", "--config", "configs/demo.py", "--workdir", runs], exit=False) == 2
