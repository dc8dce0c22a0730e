"""The detection main job (`python -m lfi_jax.demo --task=detection`), the teacher-shuffled
control store, and resume after SIGKILL for the detection task."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("array_record")

from test_train import REPO, _env, _final_loss, run_killed_before_save  # noqa: E402

from lfi_jax.data.sources import get_source  # noqa: E402
from lfi_jax.demo_detection import format_table, model_config, shuffle_store, summarise  # noqa: E402
from lfi_jax.teacher.export import export_store  # noqa: E402
from lfi_jax.teacher.provenance import check_compatible  # noqa: E402
from lfi_jax.teacher.store import TeacherStore  # noqa: E402


def _store(tmp_path, config, name="teacher"):
    src = get_source(config.data.source, "train", config.data.options.to_dict())
    out = str(tmp_path / name)
    export_store(src, out, "oracle_dense", data_spec=config.data.source, progress=False, grid=config.teacher.grid)
    return src, out


def test_shuffled_store_is_a_seeded_derangement_of_the_maps(tmp_path):
    config = model_config("idetr_shuffled", 0, runlocal=True)
    assert config.teacher.shuffle and config.model.interaction_constraint
    src, path = _store(tmp_path, config)
    orig = TeacherStore(path)
    a = shuffle_store(path, str(tmp_path / "s1"), seed=3)
    b = shuffle_store(path, str(tmp_path / "s2"), seed=3)
    c = shuffle_store(path, str(tmp_path / "s3"), seed=4)
    ids = orig.ids()
    assert a.ids() == ids and len(ids) == 16
    maps = {i: np.asarray(orig[i].map) for i in ids}
    # every image gets exactly one other image's map (a permutation without fixed points)
    taken = []
    for i in ids:
        m = np.asarray(a[i].map)
        same = [j for j in ids if np.array_equal(maps[j], m)]
        assert same and i not in same, i
        taken.append(same[0])
        np.testing.assert_array_equal(m, np.asarray(b[i].map))  # seeded
    assert sorted(taken) == sorted(ids)
    assert any(not np.array_equal(np.asarray(a[i].map), np.asarray(c[i].map)) for i in ids)
    # it still fits the data (the trainer's compatibility check) and records what it is
    assert check_compatible(a, src) == []
    assert a.manifest["teacher"]["shuffled"] == {"seed": 3, "source": path}


def test_summary_gains_are_per_seed_differences():
    runs = {
        "detr": [{"seed": 0, "val/AP": 0.2, "val/AP50": 0.5, "wall_s": 10.0},
                 {"seed": 1, "val/AP": 0.3, "val/AP50": 0.6, "wall_s": 12.0}],
        "idetr": [{"seed": 0, "val/AP": 0.25, "val/AP50": 0.7, "wall_s": 11.0},
                  {"seed": 1, "val/AP": 0.31, "val/AP50": 0.6, "wall_s": 13.0}],
    }
    s = summarise(runs)
    np.testing.assert_allclose(s["idetr"]["gain_over_detr"]["AP"]["values"], [0.05, 0.01], atol=1e-12)
    np.testing.assert_allclose(s["idetr"]["gain_over_detr"]["AP50"]["mean"], 0.1, atol=1e-12)
    np.testing.assert_allclose(s["idetr"]["gain_over_detr"]["AP50"]["std"], np.sqrt(0.02), atol=1e-12)
    assert "gain_over_detr" not in s["detr"] and s["detr"]["wall_s"]["mean"] == 11.0
    table = format_table(s)
    assert "| detr | 0.250 ± 0.071 | 0.550 ± 0.071 |" in table and "| idetr |" in table


def test_main_job_runlocal_through_the_cli(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "lfi_jax.demo", "--task=detection", f"--workdir={out}", "--runlocal",
           "--models=idetr_shuffled", "--set=total_steps=2", "--set=checkpoint_every=0"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert "| idetr_shuffled |" in r.stdout, r.stdout
    res = json.load(open(out / "results.json"))
    assert res["task"] == "detection" and set(res["results"]) == {"idetr_shuffled/AP", "idetr_shuffled/AP50"}
    (run,) = res["runs"]["idetr_shuffled"]
    assert run["step"] == 2 and res["results"]["idetr_shuffled/AP50"] == run["val/AP50"]
    assert (out / "teacher_seed0" / "manifest.json").exists()
    assert (out / "teacher_seed0_shuffled0" / "manifest.json").exists()
    # the backbone is pretrained once per seed, named in the run's config and frozen
    assert "backbone pretraining: val crop accuracy" in r.stdout, r.stdout[-2000:]
    saved = json.load(open(out / "idetr_shuffled_seed0" / "config.json"))
    (backbone,) = out.glob("backbone_seed0-*.safetensors")
    assert saved["init"]["backbone"] == str(backbone)
    assert "^backbone/" in saved["optim"]["freeze"]
    # finished runs are not redone
    r = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "finished earlier" in r.stdout, r.stdout[-2000:]
    bad = subprocess.run(cmd[:3] + ["--models=detrx"], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "detrx" in bad.stderr


def _train_cmd(workdir, store, *extra):
    return [sys.executable, "-m", "lfi_jax.train", "--config=configs/detection_demo.py:idetr,runlocal",
            f"--workdir={workdir}", f"--config.teacher.store={store}", "--config.total_steps=8",
            "--config.checkpoint_every=3", "--config.async_checkpointing=False", *extra]


@pytest.mark.slow
def test_detection_sigkill_after_checkpoint_resumes_bitwise(tmp_path):
    """As tests/test_train.py's classification check: a run killed after its step-3 checkpoint
    and resumed ends with the uninterrupted run's step-8 loss, bit for bit (the I-DETR with the
    dense teacher: model, optimizer, data and teacher join all resume)."""
    env = _env(tmp_path)
    _, store = _store(tmp_path, model_config("idetr", 0, runlocal=True))
    ref = subprocess.run(_train_cmd(tmp_path / "ref", store), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_loss = _final_loss(tmp_path / "ref", 8)

    work = tmp_path / "killed"
    killed = run_killed_before_save(_train_cmd(work, store), 6, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    resumed = subprocess.run(_train_cmd(work, store), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert _final_loss(work, 8) == ref_loss  # bitwise
