"""Multi-process start-up: `jax.distributed.initialize` from config, flags or environment.

Three ways a process learns it is part of a multi-process job, in this order:

1. Explicit: `config.distributed.coordinator_address` / `num_processes` / `process_id` (flags
   `--config.distributed.*`), or the environment `LFI_COORDINATOR_ADDRESS`, `LFI_NUM_PROCESSES`,
   `LFI_PROCESS_ID` (what `launch/local_multiprocess.sh` sets). Config values win over the
   environment. Process 0 hosts the coordinator, bound to exactly the address given (not to all
   interfaces) unless `LFI_COORDINATOR_BIND_ADDRESS` (or `config.distributed.
   coordinator_bind_address`, where the config has it) says otherwise. JAX's cluster
   auto-detection is switched off, so every local device stays visible.
2. Auto-detected: under SLURM with more than one task, on a Cloud TPU VM slice (TPU worker
   environment variables), or under Open MPI with more than one rank, JAX's own detection
   fills in the coordinator, process count and id. `LFI_DISTRIBUTED=auto` forces this (e.g. on a
   TPU VM whose environment carries no marker; `launch/tpu_vm.sh` sets it), `LFI_DISTRIBUTED=
   <method>` picks a JAX detection method (`slurm`, `gcetpu`, `ompi`, `mpi4py`, ...), and
   `LFI_DISTRIBUTED=off` never initialises.
3. Otherwise, a single process: nothing happens.

The timeouts come from `config.distributed.initialization_timeout` (how long to wait for all
processes to connect) and `config.distributed.heartbeat_timeout` (how long a silent peer is
tolerated before every other process is told the job failed and exits); `shutdown_timeout`
where the config has it. Under SLURM with one task per node, every GPU of the node is made
visible to that task (JAX's detection alone would give it only GPU `SLURM_LOCALID`).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import jax

log = logging.getLogger(__name__)

ENV_ADDRESS = "LFI_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "LFI_NUM_PROCESSES"
ENV_PROCESS_ID = "LFI_PROCESS_ID"
ENV_BIND_ADDRESS = "LFI_COORDINATOR_BIND_ADDRESS"
ENV_MODE = "LFI_DISTRIBUTED"

_TPU_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={value!r} is not an integer") from None


def _check_address(addr: str, what: str) -> str:
    if not re.fullmatch(r"\[?[^\s\[\]]+\]?:\d{1,5}", addr) or not 0 < int(addr.rsplit(":", 1)[1]) < 65536:
        raise ValueError(f"{what}={addr!r}: expected HOST:PORT (e.g. 127.0.0.1:12345)")
    return addr


def _tasks_per_node(environ: Mapping[str, str]) -> int | None:
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        m = re.match(r"(\d+)", environ.get(key, ""))
        if m:
            return int(m.group(1))
    return None


def initialize_kwargs(dist_cfg: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments for `jax.distributed.initialize` in this process's situation, or
    None for a single-process run. Pure: reads only `dist_cfg` and `environ`."""
    environ = os.environ if environ is None else environ
    def timeout(key: str, default: int) -> int:
        return _int(_get(dist_cfg, key, default), f"config.distributed.{key}")

    timeouts = dict(
        initialization_timeout=timeout("initialization_timeout", 300),
        heartbeat_timeout_seconds=timeout("heartbeat_timeout", 100),
        shutdown_timeout_seconds=timeout("shutdown_timeout", 300),
    )
    config_keys = {"heartbeat_timeout_seconds": "heartbeat_timeout", "shutdown_timeout_seconds": "shutdown_timeout"}
    for key, value in timeouts.items():
        if value <= 0:
            raise ValueError(f"config.distributed.{config_keys.get(key, key)}={value} must be > 0 (seconds)")

    mode = (_get(dist_cfg, "mode", "") or environ.get(ENV_MODE, "")).strip().lower()
    addr = _get(dist_cfg, "coordinator_address", "") or environ.get(ENV_ADDRESS, "")
    if mode == "off":
        return None
    if addr:
        what = "config.distributed.coordinator_address" if _get(dist_cfg, "coordinator_address", "") else ENV_ADDRESS
        _check_address(addr, what)
        nproc_cfg = _int(_get(dist_cfg, "num_processes", 0), "config.distributed.num_processes")
        nproc = nproc_cfg or _int(environ.get(ENV_NUM_PROCESSES, 0) or 0, ENV_NUM_PROCESSES)
        pid_cfg = _int(_get(dist_cfg, "process_id", -1), "config.distributed.process_id")
        pid = pid_cfg if pid_cfg >= 0 else _int(environ.get(ENV_PROCESS_ID, -1) or -1, ENV_PROCESS_ID)
        if nproc <= 0 or pid < 0:
            raise ValueError(
                f"a coordinator address is set ({what}={addr}) but the process count / id are not: set "
                f"config.distributed.num_processes and config.distributed.process_id, "
                f"or {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}"
            )
        if pid >= nproc:
            raise ValueError(
                f"process id {pid} is not below the process count {nproc} "
                f"({ENV_PROCESS_ID} / config.distributed.process_id)"
            )
        bind = _get(dist_cfg, "coordinator_bind_address", "") or environ.get(ENV_BIND_ADDRESS, "") or addr
        _check_address(bind, "coordinator bind address")
        return dict(
            coordinator_address=addr,
            num_processes=nproc,
            process_id=pid,
            coordinator_bind_address=bind,
            cluster_detection_method="deactivate",
            **timeouts,
        )
    if mode and mode != "auto":
        return dict(cluster_detection_method=mode, **timeouts)
    slurm = all(k in environ for k in _SLURM_VARS) and _int(environ.get("SLURM_NTASKS", "1"), "SLURM_NTASKS") > 1
    tpu = any(environ.get(k) for k in _TPU_MARKERS)
    ompi = _int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1, "OMPI_COMM_WORLD_SIZE") > 1
    if not (mode == "auto" or slurm or tpu or ompi):
        return None
    kwargs: dict[str, Any] = dict(timeouts)
    if slurm and not environ.get("JAX_LOCAL_DEVICE_IDS") and _tasks_per_node(environ) == 1:
        gpus = re.match(r"(\d+)", environ.get("SLURM_GPUS_ON_NODE", ""))
        if gpus and int(gpus.group(1)) > 1:
            kwargs["local_device_ids"] = list(range(int(gpus.group(1))))
    return kwargs


def maybe_initialize(dist_cfg) -> bool:
    """Initialises JAX's distributed runtime when this is a multi-process job (see the module
    docstring); returns whether it did. Must run before anything touches a JAX device."""
    kwargs = initialize_kwargs(dist_cfg)
    if kwargs is None:
        return False
    shown = {k: v for k, v in kwargs.items() if k != "cluster_detection_method"}
    log.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v}" for k, v in shown.items()))
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # name what we tried: the raw errors rarely say it
        raise RuntimeError(
            f"jax.distributed.initialize failed ({', '.join(f'{k}={v}' for k, v in shown.items())}): {e}. "
            "Check that every process was started, that the coordinator address is reachable from all of "
            "them, and config.distributed.initialization_timeout."
        ) from e
    log.info(
        "process %d of %d: %d local devices, %d global (%s)",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend(),
    )
    return True
