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
from lfi_jax.trainer import create_trainer

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
    config = "--config=configs/demo.py:ivit,runlocal"
    return [sys.executable, "-m", "lfi_jax.train", config, f"--workdir={workdir}", *TINY, *extra]


def _final_loss(workdir, step):
    rows = [r for r in read_metrics(str(workdir)) if r["step"] == step and "loss" in r]
    assert rows, f"no loss logged at step {step} in {workdir}"
    return rows[-1]["loss"]


# Stands in for `python -m lfi_jax.train` and SIGKILLs itself when the trainer is about to
# save checkpoint STEP: the work since the previous checkpoint is lost, as in a preemption
# with no warning. A fixed point rather than a timer: on a warm compilation cache a few tiny
# steps finish before any poll loop could notice a checkpoint and kill the process.
_KILLER = """
import os, signal, sys
from lfi_jax import checkpoint
save = checkpoint.Checkpointer.save
def dying_save(self, step, *args, **kwargs):
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, step, *args, **kwargs)
checkpoint.Checkpointer.save = dying_save
from lfi_jax.train import main
sys.exit(main(sys.argv[1:]))
"""


def run_killed_before_save(train_cmd, step, env):
    """Runs TRAIN_CMD (a `python -m lfi_jax.train ...` list) so that it dies by SIGKILL when it
    is about to save checkpoint STEP; returns the CompletedProcess."""
    assert train_cmd[1:3] == ["-m", "lfi_jax.train"], train_cmd
    return subprocess.run([train_cmd[0], "-c", _KILLER.format(step=step), *train_cmd[3:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_after_checkpoint_resumes_bitwise(tmp_path):
    env = _env(tmp_path)
    steps = ["--config.total_steps=8", "--config.checkpoint_every=3", "--config.async_checkpointing=False"]
    teacher = tmp_path / "teacher"
    # The teacher store is shared by both runs (built once by the first).
    ref = subprocess.run(
        _train_cmd(tmp_path / "ref", *steps), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_loss = _final_loss(tmp_path / "ref", 8)

    work = tmp_path / "killed"
    killed = run_killed_before_save(_train_cmd(work, *steps), 6, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
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
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: "), r.stderr[-2000:]
    assert "optim.learning_rate" in lines[-1], lines[-1]
    assert "Traceback" not in r.stderr


def test_start_up_error_is_one_line_and_leaves_no_workdir(tmp_path):
    work = tmp_path / "w"
    r = subprocess.run(
        _train_cmd(work, "--config.optim.grad_accum_steps=3"),
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: config.batch_size=8")
    assert not work.exists()


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
        assert rows[-1]["step"] == 3
        assert res["summary"][model]["test_shifted/accuracy"]["values"] == [rows[-1]["test_shifted/accuracy"]]
    assert (out / "convergence.png").stat().st_size > 10_000
    run = dict(cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    r = subprocess.run(cmd + ["--models=ivit"], **run)
    assert r.returncode == 0 and "step 1/3" not in r.stderr, r.stderr[-3000:]
    mtime = os.path.getmtime(out / "ivit_shortcut_seed0" / "metrics.jsonl")
    r = subprocess.run(cmd + ["--models=ivit", "--regime=clean"], **run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "teacher_clean_seed0" / "manifest.json").exists() and (out / "ivit_clean_seed0").is_dir()
    assert os.path.getmtime(out / "ivit_shortcut_seed0" / "metrics.jsonl") == mtime


# --------------------------------------------------------------------------- run identity and start-up


def _small_config(**sets):
    from lfi_jax.config import set_key

    c = load_config_file("demo", "ivit,runlocal")
    for key, value in dict(TINY_SETS, **sets).items():
        set_key(c, key, value)
    return c


TINY_SETS = {
    "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2, "model.mlp_dim": 64, "model.gate_hidden": 2,
    "data.options.num_train": 64, "data.options.num_test": 32, "eval_batch_size": 32, "batch_size": 8,
    "log_every": 1, "total_steps": 2, "checkpoint_every": 0, "eval_every": 0, "async_checkpointing": False,
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished 2-step run (in this process, 8 fake devices)."""
    from lfi_jax.train import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("small_run") / "run")
    result = train_and_evaluate(_small_config(), workdir)
    return workdir, result


def _copy(small_run, tmp_path):
    import shutil

    work = str(tmp_path / "run")
    shutil.copytree(small_run[0], work)
    return work


def test_resume_refuses_a_config_that_shapes_the_train_state(small_run, tmp_path):
    from lfi_jax.errors import UserError
    from lfi_jax.train import train_and_evaluate

    work = _copy(small_run, tmp_path)
    before = {n: open(os.path.join(work, n), "rb").read() for n in ("config.json", "metrics.jsonl")}
    for sets, keys in [
        ({"model.depth": 2}, ["model.depth"]),
        ({"optim.grad_clip_norm": 0.0, "data.options.spurious_p": 0.3}, ["optim.grad_clip_norm", "spurious_p"]),
        ({"seed": 1, "batch_size": 16}, ["seed", "batch_size"]),
    ]:
        with pytest.raises(UserError) as e:
            train_and_evaluate(_small_config(total_steps=4, **sets), work)
        msg = str(e.value)
        assert "\n" not in msg and work in msg and "new --workdir" in msg, msg
        for k in keys:
            assert k in msg, (k, msg)
    for n, data in before.items():  # nothing written, nothing trained
        assert open(os.path.join(work, n), "rb").read() == data, n
    assert not os.path.exists(os.path.join(work, "config_history.jsonl"))


def test_resume_records_resumable_changes(small_run, tmp_path, caplog):
    from lfi_jax.run import load_config, read_config_history
    from lfi_jax.train import train_and_evaluate

    work = _copy(small_run, tmp_path)
    with caplog.at_level("WARNING", logger="lfi_jax"):
        result = train_and_evaluate(
            _small_config(total_steps=3, **{"optim.lr": 5e-4, "loss.align_weight": 0.5, "data.thread_nice": 5}), work
        )
    assert result["step"] == 3
    history = read_config_history(work)
    assert len(history) == 1 and history[0]["step"] == 2
    assert history[0]["changes"] == {
        "data.thread_nice": {"old": 10, "new": 5},  # the input thread's priority: not the data
        "loss.align_weight": {"old": 1.0, "new": 0.5},
        "optim.lr": {"old": 4e-3, "new": 5e-4},
        "total_steps": {"old": 2, "new": 3},
    }
    assert any("config changed on resume" in r.getMessage() and "optim.lr" in r.getMessage() for r in caplog.records)
    stored = load_config(work)
    assert stored.total_steps == 3 and stored.optim.lr == 5e-4  # config.json is the run's current config
    train_and_evaluate(
        _small_config(total_steps=3, **{"optim.lr": 5e-4, "loss.align_weight": 0.5, "data.thread_nice": 5}), work
    )
    assert len(read_config_history(work)) == 1  # the same config again: nothing to record


def test_config_changes_name_keys_and_tolerate_keys_added_since():
    from lfi_jax.run import config_changes

    old = _small_config()
    new = _small_config(**{"model.depth": 3, "data.options.spurious_p": 0.5})
    stored = json.loads(old.to_json_best_effort())
    del stored["task"], stored["teacher"]["allow_missing"]  # keys the config gained after the run was made
    assert old.data.options.spurious_p != 0.5
    want = {"data.options.spurious_p": (old.data.options.spurious_p, 0.5), "model.depth": (1, 3)}
    assert config_changes(stored, new) == want
    assert config_changes(stored, old) == {}


def test_checkpoint_that_does_not_fit_is_one_line_naming_the_dir(small_run, tmp_path):
    from lfi_jax.checkpoint import CheckpointMismatch
    from lfi_jax.train import train_and_evaluate

    work = _copy(small_run, tmp_path)
    os.remove(os.path.join(work, "config.json"))  # no stored config to compare with: the checkpoint itself misfits
    with pytest.raises(CheckpointMismatch) as e:
        train_and_evaluate(_small_config(total_steps=4, **{"model.hidden_size": 64, "model.mlp_dim": 128}), work)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert os.path.join(work, "checkpoints", "2") in msg and "does not fit" in msg
    assert not os.path.exists(os.path.join(work, "config.json"))  # nothing written


def test_batch_size_against_devices_fails_before_anything_is_written(tmp_path):
    from lfi_jax.errors import UserError
    from lfi_jax.train import train_and_evaluate

    work = tmp_path / "w"
    with pytest.raises(UserError, match=r"config\.batch_size.*grad_accum_steps.*8 devices"):
        train_and_evaluate(_small_config(**{"optim.grad_accum_steps": 4}), str(work))  # micro-batch 2 on 8 devices
    with pytest.raises(UserError, match=r"config\.eval_batch_size=12 .*8 devices"):
        train_and_evaluate(_small_config(eval_batch_size=12), str(work))
    assert not work.exists()


def test_failed_evaluation_loses_no_training(tmp_path, monkeypatch):
    """An evaluation that raises (a corrupt eval image, say) comes after the checkpoint of its step."""
    import dataclasses

    from lfi_jax.checkpoint import Checkpointer
    from lfi_jax.tasks import registry
    from lfi_jax.train import train_and_evaluate

    def broken(config, split, outputs):
        raise ValueError(f"cannot decode image file of split {split}")

    task = dataclasses.replace(registry.TASKS["classification"], evaluate=broken)
    monkeypatch.setitem(registry.TASKS, "classification", task)
    work = str(tmp_path / "w")
    with pytest.raises(ValueError, match="cannot decode"):
        train_and_evaluate(_small_config(total_steps=3, eval_every=2), work)
    ckpt = Checkpointer(os.path.join(work, "checkpoints"), read_only=True)
    assert ckpt.complete_steps() == [2] and ckpt.is_complete(2) and not ckpt.is_complete(3)
    ckpt.close()


def test_startup_log_and_run_info_name_data_classes_and_teacher(small_run):
    from lfi_jax.run import RUN_INFO_FILE

    workdir, result = small_run
    info = json.load(open(os.path.join(workdir, RUN_INFO_FILE)))
    assert info["data"]["source"] == "shortcut_digits" and info["data"]["num_examples"] == 64
    assert info["data"]["class_names"] == [str(i) for i in range(10)]
    assert info["teacher_store"] == os.path.join(workdir, "teacher", "train")
    text = " | ".join(info["startup"])
    assert "10 classes" in text and "shortcut_digits" in text and "teacher store: " + info["teacher_store"] in text
    assert result["step"] == 2 and "test_shifted/accuracy" in result


def test_run_name_reflects_overrides():
    from lfi_jax.train import run_name

    c = _small_config()
    c.name = "demo-ivit-shortcut"
    assert run_name(c, ["total_steps=5", "eval_every=2"], "runs/x") == "demo-ivit-shortcut"
    assert run_name(c, ["data.source=imagefolder:/d/shapes", "model.num_classes=10"], "runs/shapes/") == (
        "demo-ivit-shortcut@shapes"
    )
    c.name = "mine"
    assert run_name(c, ["name=mine", "model.depth=2"], "runs/x") == "mine"


def test_load_run_restores_only_the_params(small_run):
    """The run loader builds no optimizer: its parameters equal the checkpoint's (read by the
    full train-state restore)."""
    from lfi_jax.checkpoint import Checkpointer
    from lfi_jax.run import load_config, load_run

    workdir, _ = small_run
    run = load_run(workdir, devices=jax.devices()[:1])
    assert run.step == 2 and run.task.name == "classification"
    config = load_config(workdir)
    mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
    trainer, _, shapes = create_trainer(config, model_config(config), mesh, seed=0)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    step, state = ckpt.restore(trainer.abstract_state(shapes))
    ckpt.close()
    assert step == 2
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(run.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="no checkpoint of step 7"):  # a UserError: exit 2 under run_cli
        load_run(workdir, step=7, devices=jax.devices()[:1])


def test_checkpointer_complete_steps_skip_unfinished_saves(small_run, tmp_path):
    from lfi_jax.checkpoint import Checkpointer, complete_steps

    work = _copy(small_run, tmp_path)
    ckpts = os.path.join(work, "checkpoints")
    os.makedirs(os.path.join(ckpts, "5.orbax-checkpoint-tmp-1234", "state"))  # a save cut short
    ckpt = Checkpointer(ckpts, read_only=True)
    assert ckpt.complete_steps() == [2] and ckpt.is_complete(2) and not ckpt.is_complete(5)
    ckpt.close()
    assert complete_steps(ckpts) == [2] and complete_steps(str(tmp_path / "none")) == []
    # Orbax's finalized marker on file systems without an atomic rename: a plain step directory
    # with commit_success.txt counts (what tests elsewhere use to fake a finished run).
    os.makedirs(os.path.join(ckpts, "9"))
    open(os.path.join(ckpts, "9", "commit_success.txt"), "w").close()
    assert complete_steps(ckpts) == [2, 9]
