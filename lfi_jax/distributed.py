"""Multi-process start-up: `jax.distributed.initialize` from config, flags or environment."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def maybe_initialize(dist_cfg) -> None:
    """Initialises JAX's distributed runtime when this is a multi-process job.

    Explicit settings (config.distributed.* or LFI_COORDINATOR_ADDRESS / LFI_NUM_PROCESSES /
    LFI_PROCESS_ID) win; otherwise JAX's own auto-detection runs on TPU VMs and under SLURM.
    A single process with nothing configured does nothing.
    """
    addr = dist_cfg.coordinator_address or os.environ.get("LFI_COORDINATOR_ADDRESS", "")
    nproc = int(dist_cfg.num_processes or os.environ.get("LFI_NUM_PROCESSES", 0) or 0)
    pid = int(dist_cfg.process_id if dist_cfg.process_id >= 0 else os.environ.get("LFI_PROCESS_ID", -1))
    kwargs = dict(initialization_timeout=int(dist_cfg.initialization_timeout))
    if addr:
        if nproc <= 0 or pid < 0:
            raise ValueError(
                "config.distributed.coordinator_address is set but num_processes / process_id are not "
                "(set config.distributed.num_processes and config.distributed.process_id, or LFI_NUM_PROCESSES / LFI_PROCESS_ID)"
            )
        log.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)", addr, nproc, pid)
        jax.distributed.initialize(addr, num_processes=nproc, process_id=pid, **kwargs)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(**kwargs)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        jax.distributed.initialize(**kwargs)
