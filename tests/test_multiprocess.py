"""Multi-process training over loopback: real `python -m lfi_jax.train` processes, each with
its own fake CPU devices; the launchers; the distributed start-up settings."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from lfi_jax.distributed import initialize_kwargs
from lfi_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
TINY = [
    "--config.model.depth=2",
    "--config.model.hidden_size=32",
    "--config.model.num_heads=2",
    "--config.model.mlp_dim=64",
    "--config.model.gate_hidden=2",
    "--config.data.options.num_train=128",
    "--config.data.options.num_test=32",
    "--config.data.eval_splits=('test_iid',)",
    "--config.eval_batch_size=32",
    "--config.batch_size=8",
    "--config.log_every=1",
]


def _env(cache_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LFI_", "JAX_", "XLA_", "SLURM_", "TPU_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        # Compile time dominates these runs; the cheapest backend optimisation keeps them short.
        XLA_FLAGS="--xla_backend_optimization_level=0",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train(workdir, *extra, config="configs/demo.py:ivit,runlocal"):
    return [sys.executable, "-m", "lfi_jax.train", f"--config={config}", f"--workdir={workdir}", *TINY, *extra]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def _check(proc, what):
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one_process_with_four_devices(tmp_path):
    cache = tmp_path / "jax_cache"
    run = ["--config.total_steps=4", "--config.checkpoint_every=2", "--config.mesh.shape=(2,4)",
           "--config.mesh.fsdp_min_size=64"]

    # 1 process x 8 devices (FSDP 2 x 4): the reference; it also builds the teacher store.
    ref = tmp_path / "one_process"
    r = subprocess.run(_train(ref, *run), cwd=REPO, env=_env(cache, JAX_NUM_CPU_DEVICES=8),
                       capture_output=True, text=True, timeout=600)
    _check(r, "1 process x 8 devices")
    ref_losses = _losses(ref)
    assert sorted(ref_losses) == [1, 2, 3, 4]
    store = f"--config.teacher.store={ref / 'teacher' / 'train'}"

    # 2 processes x 4 devices through the loopback launcher: the same global mesh.
    mp = tmp_path / "two_processes"
    r = subprocess.run(
        ["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "--cpu-devices", "4", "--grace", "5", "2", "--",
         *_train(mp, *run, store)],
        cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=600,
    )
    _check(r, "2 processes x 4 devices")
    assert "process 1 of 2: 4 local devices, 8 global" in r.stdout
    mp_losses = _losses(mp)
    assert sorted(mp_losses) == [1, 2, 3, 4]
    for s in ref_losses:
        assert mp_losses[s] == pytest.approx(ref_losses[s], rel=1e-5), (s, mp_losses, ref_losses)
    # Only process 0 reports; every process wrote its part of each checkpoint.
    progress = [line for line in r.stdout.splitlines() if "step 4/4" in line]
    assert progress and all(line.startswith("[0] ") for line in progress), progress
    final = [line for line in r.stdout.splitlines() if line.endswith("}") and '"step": 4' in line]
    assert len(final) == 1 and final[0].startswith("[0] ")
    for step in (2, 4):
        d = mp / "checkpoints" / str(step)
        assert (d / "data" / "process_0-of-2.json").exists() and (d / "data" / "process_1-of-2.json").exists()
        assert (d / "state" / "ocdbt.process_0").is_dir() and (d / "state" / "ocdbt.process_1").is_dir()

    # Resume the 2-process run from its step-2 checkpoint on 1 process with 4 devices.
    res = tmp_path / "resumed"
    shutil.copytree(mp, res)
    shutil.rmtree(res / "checkpoints" / "4")
    r = subprocess.run(
        _train(res, "--config.total_steps=4", "--config.checkpoint_every=2", "--config.mesh.shape=(1,4)",
               "--config.mesh.fsdp_min_size=64", store),
        cwd=REPO, env=_env(cache, JAX_NUM_CPU_DEVICES=4), capture_output=True, text=True, timeout=600,
    )
    _check(r, "resume on 1 process x 4 devices")
    assert "resumed from step 2" in r.stderr
    assert "continuing the global stream at batch 2" in r.stderr
    res_losses = _losses(res)
    assert sorted(res_losses) == [1, 2, 3, 4]  # rows after step 2 were redone, not duplicated
    for s in (3, 4):  # the same batches, the same state: the same losses
        assert res_losses[s] == pytest.approx(ref_losses[s], rel=1e-5), (s, res_losses, ref_losses)


@pytest.mark.slow
def test_a_killed_process_makes_the_others_exit_within_the_heartbeat_timeout(tmp_path):
    heartbeat = 5
    port = _free_port()
    procs, logs = [], []
    try:
        for pid in range(2):
            log = open(tmp_path / f"process_{pid}.log", "w+")
            logs.append(log)
            env = _env(tmp_path / "jax_cache", JAX_NUM_CPU_DEVICES=2, LFI_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       LFI_NUM_PROCESSES=2, LFI_PROCESS_ID=pid)
            cmd = _train(tmp_path / "w", "--config.total_steps=100000", "--config.checkpoint_every=0",
                         f"--config.distributed.heartbeat_timeout={heartbeat}",
                         "--config.distributed.initialization_timeout=120", config="configs/demo.py:vit,runlocal")
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 400
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if "step 2/100000" in (tmp_path / "process_0.log").read_text():
                break
            time.sleep(0.2)
        assert all(p.poll() is None for p in procs), (tmp_path / "process_0.log").read_text()[-3000:]
        assert time.time() < deadline, "training did not reach step 2"
        procs[1].kill()
        killed = time.time()
        procs[0].wait(timeout=heartbeat + 120)
        waited = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for log in logs:
            log.close()
    out = (tmp_path / "process_0.log").read_text()
    assert procs[0].returncode != 0
    assert "another task died" in out or "stopped sending heartbeats" in out, out[-3000:]
    assert waited < heartbeat + 60, f"process 0 took {waited:.0f} s to notice (heartbeat timeout {heartbeat} s)"


def test_a_missing_peer_fails_start_up_within_the_initialization_timeout(tmp_path):
    code = (
        "import ml_collections\n"
        "from lfi_jax.distributed import maybe_initialize\n"
        "maybe_initialize(ml_collections.ConfigDict(dict(coordinator_address='', num_processes=0, process_id=-1,"
        " initialization_timeout=3, heartbeat_timeout=5)))\n"
        "print('initialized')\n"
    )
    env = _env(tmp_path / "jax_cache", LFI_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", LFI_NUM_PROCESSES=2,
               LFI_PROCESS_ID=0)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "initialized" not in r.stdout
    assert "DEADLINE_EXCEEDED" in r.stderr or "Deadline Exceeded" in r.stderr, r.stderr[-2000:]
    assert time.time() - t0 < 60


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- launchers


def _launcher(*args, timeout=60, **kw):
    return subprocess.run(["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **kw)


def test_local_launcher_sets_the_environment_of_each_process():
    script = ("import json, os; "
              "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(('LFI_', 'JAX_'))}))")
    r = _launcher("--cpu-devices", "3", "3", "--", sys.executable, "-c", script)
    assert r.returncode == 0, r.stderr
    rows = {}
    for line in r.stdout.splitlines():
        tag, _, payload = line.partition(" ")
        rows[tag] = json.loads(payload)
    assert sorted(rows) == ["[0]", "[1]", "[2]"]
    addrs = {row["LFI_COORDINATOR_ADDRESS"] for row in rows.values()}
    assert len(addrs) == 1 and addrs.pop().startswith("127.0.0.1:")
    for tag, row in rows.items():
        assert row["LFI_PROCESS_ID"] == tag.strip("[]") and row["LFI_NUM_PROCESSES"] == "3"
        assert row["JAX_NUM_CPU_DEVICES"] == "3" and row["JAX_PLATFORMS"] == "cpu"


def test_local_launcher_stops_everyone_when_one_process_fails(tmp_path):
    script = (
        "import os, sys, time\n"
        "i = int(os.environ['LFI_PROCESS_ID'])\n"
        f"open(os.path.join({str(tmp_path)!r}, f'pid{{i}}'), 'w').write(str(os.getpid()))\n"
        "if i == 1:\n"
        "    time.sleep(1); sys.exit(7)\n"
        "time.sleep(120)\n"
    )
    t0 = time.time()
    r = _launcher("--grace", "2", "3", "--", sys.executable, "-c", script)
    assert r.returncode == 7, (r.stdout, r.stderr)
    assert time.time() - t0 < 60
    assert "process 1" in r.stderr and "exited with status 7" in r.stderr
    for i in (0, 2):
        pid = int((tmp_path / f"pid{i}").read_text())
        assert not _alive(pid), f"process {i} (pid {pid}) still runs"


def test_local_launcher_forwards_sigterm(tmp_path):
    script = (
        "import os, time\n"
        f"open(os.path.join({str(tmp_path)!r}, 'pid' + os.environ['LFI_PROCESS_ID']), 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    p = subprocess.Popen(["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "--grace", "2", "2", "--",
                          sys.executable, "-c", script],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not all((tmp_path / f"pid{i}").exists() for i in range(2)):
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    for i in range(2):
        assert not _alive(int((tmp_path / f"pid{i}").read_text()))


def _alive(pid):
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def test_local_launcher_dry_run_and_usage_errors():
    r = _launcher("--dry-run", "--cpu-devices", "4", "2", "--", "python", "-m", "lfi_jax.train", "--workdir=/tmp/a b")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        words = shlex.split(line)
        assert words[0] == "env" and words[-4:] == ["python", "-m", "lfi_jax.train", "--workdir=/tmp/a b"]
        env = dict(w.split("=", 1) for w in words[1:-4])
        assert env["LFI_PROCESS_ID"] == str(i) and env["LFI_NUM_PROCESSES"] == "2"
        assert env["LFI_COORDINATOR_ADDRESS"].startswith("127.0.0.1:") and env["JAX_NUM_CPU_DEVICES"] == "4"
    for bad in (["0", "--", "true"], ["2", "true"], ["--bogus", "2", "--", "true"], ["--port", "x", "2", "--", "true"]):
        r = _launcher(*bad)
        assert r.returncode == 2 and "local_multiprocess.sh:" in r.stderr, (bad, r.stderr)


def _dry(script, *args, env=None):
    r = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.strip().splitlines()]


def _remote(words):
    (cmd,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
    check = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, (cmd, check.stderr)
    return cmd


def test_tpu_vm_dry_runs_print_well_formed_gcloud_commands():
    opts = ["--dry-run", "--name", "lfi-v4", "--zone", "us-central2-b", "--type", "v4-32", "--project", "proj"]
    (create,) = _dry("tpu_vm.sh", *opts, "--spot", "create")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lfi-v4"]
    assert {"--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-32", "--spot"} <= set(create)

    archive, scp, install = _dry("tpu_vm.sh", *opts, "setup")
    assert archive[0] == "git" and "archive" in archive and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert "pip install" in _remote(install) and "--worker=all" in install

    train_args = ["--config=configs/demo.py:ivit", "--workdir=/mnt/lfi-runs/demo v4",
                  "--config.data.eval_splits=('test_iid',)"]
    (train,) = _dry("tpu_vm.sh", *opts, "train", "--", *train_args)
    assert train[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lfi-v4"] and "--worker=all" in train
    lex = shlex.shlex(_remote(train), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    words = list(lex)
    i = words.index("lfi_jax.train")
    assert words[i - 1] == "-m" and "LFI_DISTRIBUTED=auto" in words[:i]
    assert words[i + 1:words.index(">", i)] == train_args

    (logs,) = _dry("tpu_vm.sh", *opts, "logs", "3")
    assert "--worker=3" in logs and "tail" in _remote(logs)
    (stop,) = _dry("tpu_vm.sh", *opts, "stop")
    assert "kill -TERM" in _remote(stop)
    (delete,) = _dry("tpu_vm.sh", *opts, "delete")
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "lfi-v4"] and "--quiet" in delete
    r = subprocess.run(
        ["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "--dry-run", "frobnicate"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_slurm_dry_run_prints_one_task_per_node_srun():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(GPUS_PER_NODE="4", SLURM_JOB_NUM_NODES="2")
    lines = _dry("slurm_gpu.sbatch", "--dry-run", "--config=configs/demo.py:ivit", "--workdir=/shared/run 1", env=env)
    exports = dict(w[1].split("=", 1) for w in lines if w[0] == "export")
    assert exports["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    (srun,) = [w for w in lines if w[0] == "srun"]
    assert {"--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"} <= set(srun)
    assert srun[-5:] == ["python", "-m", "lfi_jax.train", "--config=configs/demo.py:ivit", "--workdir=/shared/run 1"]
    with open(os.path.join(LAUNCH, "slurm_gpu.sbatch")) as f:
        directives = [line for line in f if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1\n" in directives


# --------------------------------------------------------------------------- start-up settings


def _dist(**kw):
    base = dict(coordinator_address="", num_processes=0, process_id=-1, initialization_timeout=30, heartbeat_timeout=7)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_initialize_kwargs_explicit_from_env_binds_to_the_given_address():
    env = {"LFI_COORDINATOR_ADDRESS": "127.0.0.1:4567", "LFI_NUM_PROCESSES": "2", "LFI_PROCESS_ID": "1"}
    kw = initialize_kwargs(_dist(), env)
    assert kw == dict(coordinator_address="127.0.0.1:4567", num_processes=2, process_id=1,
                      coordinator_bind_address="127.0.0.1:4567", cluster_detection_method="deactivate",
                      initialization_timeout=30, heartbeat_timeout_seconds=7, shutdown_timeout_seconds=300)
    # Config values win over the environment; a bind address may be given separately.
    kw = initialize_kwargs(_dist(process_id=0, num_processes=4), dict(env, LFI_COORDINATOR_BIND_ADDRESS="0.0.0.0:4567"))
    assert (kw["process_id"], kw["num_processes"], kw["coordinator_bind_address"]) == (0, 4, "0.0.0.0:4567")


def test_initialize_kwargs_single_process_and_auto_detection():
    assert initialize_kwargs(_dist(), {}) is None
    slurm = dict(SLURM_JOB_ID="9", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0")
    assert initialize_kwargs(_dist(), dict(slurm, SLURM_NTASKS="1")) is None
    kw = initialize_kwargs(_dist(), slurm)
    assert kw == dict(initialization_timeout=30, heartbeat_timeout_seconds=7, shutdown_timeout_seconds=300)
    # One task per node with 8 GPUs: all of them, not just GPU SLURM_LOCALID.
    kw = initialize_kwargs(_dist(), dict(slurm, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8"))
    assert kw["local_device_ids"] == list(range(8))
    assert "local_device_ids" not in initialize_kwargs(
        _dist(), dict(slurm, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8", JAX_LOCAL_DEVICE_IDS="0,1"))
    assert initialize_kwargs(_dist(), {"TPU_WORKER_HOSTNAMES": "a,b"}) is not None
    assert initialize_kwargs(_dist(), {"LFI_DISTRIBUTED": "auto"}) is not None
    assert initialize_kwargs(_dist(), {"LFI_DISTRIBUTED": "gcetpu"})["cluster_detection_method"] == "gcetpu"
    assert initialize_kwargs(_dist(), dict(slurm, LFI_DISTRIBUTED="off")) is None


def test_initialize_kwargs_errors_name_the_setting():
    with pytest.raises(ValueError, match="LFI_NUM_PROCESSES"):
        initialize_kwargs(_dist(), {"LFI_COORDINATOR_ADDRESS": "127.0.0.1:4567"})
    with pytest.raises(ValueError, match="HOST:PORT"):
        initialize_kwargs(_dist(coordinator_address="localhost"), {})
    with pytest.raises(ValueError, match="not below the process count"):
        initialize_kwargs(_dist(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), {})
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        initialize_kwargs(_dist(heartbeat_timeout=0), {})
    with pytest.raises(ValueError, match="LFI_PROCESS_ID"):
        initialize_kwargs(
            _dist(), {"LFI_COORDINATOR_ADDRESS": "127.0.0.1:4567", "LFI_NUM_PROCESSES": "2", "LFI_PROCESS_ID": "x"}
        )
