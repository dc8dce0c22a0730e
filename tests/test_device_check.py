"""bench/device_check.py --quick on the CPU (tiny sizes): every part runs or says why not,
one JSON and one Markdown report are written, and a failing part is reported while the
others still run."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "device_check.py"


@pytest.fixture(scope="module")
def dc():
    spec = importlib.util.spec_from_file_location("bench_device_check", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_quick_on_cpu_runs_every_part(dc, tmp_path):
    rc = dc.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "device_check.json").read_text())
    md = (tmp_path / "device_check.md").read_text()
    assert rc == 0, report
    assert set(report["parts"]) == {"a", "b", "c", "d"}
    assert report["environment"]["backend"] == "cpu" and report["environment"]["jax"]
    assert report["command"].startswith("python bench/device_check.py --quick")
    a = report["parts"]["a"]
    assert a["status"] == "ok"
    checked = [c for c in a["cases"] if c["status"] == "ok"]
    assert checked, a  # at least one kernel case compared (the rest may hit the time budget)
    for c in checked:
        assert c["max_rel_err"] <= dc.TOL["float32" if "float32" in c["case"] else "bfloat16"]
        assert {"o", "agt_cls", "dq", "dq2", "dk", "dv", "dw2", "db2"} <= set(c["errors"])
    b = report["parts"]["b"]
    assert b["status"] == "ok" and any(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 for r in b["timings"])
    assert all(r["impl"] != "pallas" for r in b["timings"])  # no interpreter timings
    c = report["parts"]["c"]
    assert c["status"] == "ok" and c["steps"][0]["status"] == "ok" and c["steps"][0]["images_per_s"] > 0
    assert report["parts"]["d"]["status"] == "skipped" and "GPU" in report["parts"]["d"]["reason"]
    for part in "abcd":
        assert f"### ({part})" in md
    assert "no NVIDIA GPU" in md


def test_a_failing_part_is_reported_and_the_others_run(dc, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(dc, "part_b", broken)
    rc = dc.main(["--quick", "--parts", "b,d", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert rc == 1
    assert report["parts"]["b"]["status"] == "fail"
    assert "simulated device failure" in report["parts"]["b"]["error"]
    assert report["parts"]["d"]["status"] == "skipped"
    assert "simulated device failure" in (tmp_path / "device_check.md").read_text()


def test_unknown_part_is_one_clear_error(dc, capsys):
    with pytest.raises(SystemExit):
        dc.main(["--parts", "a,x"])
    assert "unknown ['x']" in capsys.readouterr().err


def test_crashed_train_step_is_retried_without_autotuning(dc, tmp_path, monkeypatch):
    """A part whose process dies (as XLA's GPU autotuner has been seen to) is reported; part c
    is retried once with --xla_gpu_autotune_level=0 and the report keeps both attempts."""
    calls = []

    def fake_child(part, args, env_extra=None):
        calls.append((part, env_extra))
        if env_extra is None:
            return {"status": "fail", "error": "process exited with -6", "stderr": "CUDA_ERROR_ILLEGAL_ADDRESS"}
        return {"status": "ok", "steps": [], "seconds": 1.0}

    monkeypatch.setattr(dc, "_in_child", fake_child)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    rc = dc.main(["--quick", "--isolate", "--parts", "c", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert rc == 0
    assert [p for p, _ in calls] == ["c", "c"] and "--xla_gpu_autotune_level=0" in calls[1][1]["XLA_FLAGS"]
    c = report["parts"]["c"]
    assert c["status"] == "ok" and "autotune_level=0" in c["retried_with"]
    assert c["first_attempt"]["error"] == "process exited with -6"
