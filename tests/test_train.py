"""The trainer end to end on the embedded benchmark (tiny sizes)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lfi_jax import sharding as shd
from lfi_jax.config import load_config_file, model_config
from lfi_jax.metrics import read_metrics
from lfi_jax.train import create_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.depth=2",
    "--config.model.hidden_size=32",
    "--config.model.num_heads=2",
    "--config.model.mlp_dim=64",
    "--config.model.gate_hidden=2",
    "--config.data.options.num_train=128",
    "--config.data.options.num_test=32",
    "--config.eval_batch_size=32",
    "--config.batch_size=8",
    "--config.log_every=1",
]


def _env(tmp_path):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_cmd(workdir, *extra):
    return [sys.executable, "-m", "lfi_jax.train", "--config=configs/demo.py:ivit,runlocal", f"--workdir={workdir}", *TINY, *extra]


def _final_loss(workdir, step):
    rows = [r for r in read_metrics(str(workdir)) if r["step"] == step and "loss" in r]
    assert rows, f"no loss logged at step {step} in {workdir}"
    return rows[-1]["loss"]


@pytest.mark.slow
def test_sigkill_after_checkpoint_resumes_bitwise(tmp_path):
    env = _env(tmp_path)
    steps = ["--config.total_steps=8", "--config.checkpoint_every=3", "--config.async_checkpointing=False"]
    teacher = tmp_path / "teacher"
    # The teacher store is shared by both runs (built once by the first).
    ref = subprocess.run(_train_cmd(tmp_path / "ref", *steps), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_loss = _final_loss(tmp_path / "ref", 8)

    work = tmp_path / "killed"
    # Slow each step down a little so the kill lands between checkpoints 3 and 6.
    proc = subprocess.Popen(_train_cmd(work, *steps), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    ckpt3 = work / "checkpoints" / "3"
    while time.time() < deadline and proc.poll() is None:
        if ckpt3.is_dir() and not any(p.name.endswith("tmp") for p in (work / "checkpoints").iterdir()):
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    proc.kill()
    proc.wait(timeout=60)
    assert killed, "the run finished before it could be killed: " + (proc.stdout.read()[-2000:] if proc.stdout else "")
    resumed = subprocess.run(_train_cmd(work, *steps), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert _final_loss(work, 8) == ref_loss  # bitwise
    del teacher


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    env = _env(tmp_path)
    work = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(work, "--config.total_steps=100000", "--config.checkpoint_every=0"),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "step 2/" in line or not line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 2 <= steps[-1] < 100000
    result = json.loads(out.strip().splitlines()[-1])
    assert result["preempted"] is True


def test_unknown_config_key_fails_naming_it(tmp_path):
    r = subprocess.run(
        _train_cmd(tmp_path / "w", "--config.optim.learning_rate=0.1"),
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert r.returncode != 0
    assert "learning_rate" in r.stderr


def _tiny_config(accum):
    c = load_config_file("demo", "ivit,runlocal")
    c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.mlp_dim = 2, 32, 2, 64
    c.optim.grad_accum_steps = accum
    c.optim.grad_clip_norm = 0.0
    c.batch_size = 8
    return c


def _batch(c, seed=0, mask=(1, 1, 0, 1, 1, 1, 1, 0)):
    g = (c.data.image_size // c.model.patch_size) ** 2
    rng = np.random.default_rng(seed)
    t = rng.random((c.batch_size, g)).astype(np.float32)
    return {
        "image": rng.standard_normal((c.batch_size, c.data.image_size, c.data.image_size, 3)).astype(np.float32),
        "label": rng.integers(0, 10, c.batch_size).astype(np.int32),
        "teacher": t / t.sum(-1, keepdims=True),
        "teacher_mask": np.array(mask, np.float32),
    }


def test_grad_accumulation_matches_full_batch():
    out = {}
    for accum in (1, 2):
        c = _tiny_config(accum)
        mesh = shd.make_mesh(c.mesh, devices=jax.devices()[:1])
        trainer, init, _ = create_trainer(c, model_config(c), mesh, seed=0)
        state = init()
        batch = _batch(c, mask=(1,) * 8)  # equal micro-batch sizes: the means agree exactly
        state, metrics = trainer.train_step(state, shd.global_batch(batch, mesh))
        out[accum] = (state, metrics)
    (s1, m1), (s2, m2) = out[1], out[2]
    for key in ("loss", "task_loss", "align_loss", "grad_norm"):
        np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, err_msg=key)
    assert float(m1["align_loss"]) > 0
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_frozen_parameters_do_not_move():
    c = _tiny_config(1)
    c.optim.freeze = (".*",)
    c.optim.trainable = (r".*interaction_query.*", r".*/gate/.*", r"^classifier/.*")
    c.optim.warmup_steps = 0
    mesh = shd.make_mesh(c.mesh, devices=jax.devices()[:1])
    trainer, init, _ = create_trainer(c, model_config(c), mesh, seed=0)
    state = init()
    before = jax.tree.map(np.asarray, state["params"])
    state, _ = trainer.train_step(state, shd.global_batch(_batch(c), mesh))
    after = state["params"]
    moved = {}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        from lfi_jax.optim import path_str

        moved[path_str(path)] = bool(np.any(np.asarray(b) != a))
    assert moved["encoder/layer/0/attention/interaction_query/kernel"]
    assert moved["encoder/layer/1/attention/gate/w2"]
    assert not moved["encoder/layer/0/attention/query/kernel"]
    assert not moved["embeddings/position_embeddings"]
    assert not moved["encoder/layer/1/intermediate/dense/kernel"]


def test_main_job_runs_both_models_and_reuses_finished_runs(tmp_path):
    """`python -m lfi_jax.demo` at a tiny size: table, results.json, convergence.png; a second
    call trains nothing; another regime in the same workdir gets its own runs and teacher."""
    out = tmp_path / "demo"
    sets = ["total_steps=3", "batch_size=8", "eval_every=0", "log_every=1", "checkpoint_every=0", "eval_batch_size=32",
            "data.options.num_train=64", "data.options.num_test=32", "model.depth=1", "model.hidden_size=32",
            "model.num_heads=2", "model.mlp_dim=64"]
    cmd = [sys.executable, "-m", "lfi_jax.demo", f"--workdir={out}"] + [f"--set={s}" for s in sets]
    r = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| vit |" in r.stdout and "| ivit |" in r.stdout, r.stdout
    res = json.load(open(out / "results.json"))
    assert res["regime"] == "shortcut" and set(res["summary"]) == {"vit", "ivit"}
    for model in ("vit", "ivit"):
        rows = [m for m in read_metrics(str(out / f"{model}_shortcut_seed0")) if "test_shifted/accuracy" in m]
        assert rows[-1]["step"] == 3 and res["summary"][model]["test_shifted/accuracy"]["values"] == [rows[-1]["test_shifted/accuracy"]]
    assert (out / "convergence.png").stat().st_size > 10_000
    r = subprocess.run(cmd + ["--models=ivit"], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and "step 1/3" not in r.stderr, r.stderr[-3000:]
    mtime = os.path.getmtime(out / "ivit_shortcut_seed0" / "metrics.jsonl")
    r = subprocess.run(cmd + ["--models=ivit", "--regime=clean"], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "teacher_clean_seed0" / "manifest.json").exists() and (out / "ivit_clean_seed0").is_dir()
    assert os.path.getmtime(out / "ivit_shortcut_seed0" / "metrics.jsonl") == mtime
