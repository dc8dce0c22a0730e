"""A training run on disk: its config, its identity across resumes, and its parameters.

    run = load_run("runs/ivit")            # latest complete checkpoint, all devices
    run = load_run("runs/ivit", step=200, devices=jax.local_devices()[:1])
    model = nnx.merge(run.graphdef, run.params)

`load_run` builds only the abstract parameters (the task's model under `nnx.eval_shape`),
shards them over the run's mesh (or, when that mesh does not fit the devices here, pure data
parallel over them: `eval_mesh`), and restores just the parameters from the checkpoint (an
orbax partial restore): no optimizer, no jitted train step, no optimizer state read.

A run's identity (`check_resume`): resuming a workdir with another config refuses a change
of anything that shapes the train state or the data stream (the model, the optimizer's
structure, the data, the seed, the teacher) in one line naming the keys; keys that may change
on resume (`RESUMABLE`: steps, cadences, learning rate, loss weights, eval splits, mesh,
...) are accepted, logged and recorded in WORKDIR/config_history.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections

from lfi_jax import sharding as shd
from lfi_jax.checkpoint import Checkpointer, abstract_like
from lfi_jax.config import base_config
from lfi_jax.errors import UserError
from lfi_jax.fileio import write_json_atomic
from lfi_jax.tasks import Task
from lfi_jax.tasks.registry import DEFAULT as DEFAULT_TASK
from lfi_jax.tasks.registry import get_task
from lfi_jax.trainer import abstract_params, param_shardings

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
RUN_INFO_FILE = "run_info.json"  # what the trainer found at start: data source, classes, teacher store

# Keys (dotted) that change neither the trained model nor the batches it sees: the run's name,
# how often it logs, evaluates and checkpoints, where its teacher store lies (its content is
# checked against the data), how its input threads are scheduled.
BOOKKEEPING = (
    "name",
    "log_every",
    "eval_every",
    "eval_batch_size",
    "checkpoint_every",
    "keep_checkpoints",
    "async_checkpointing",
    "teacher.store",
    "data.num_workers",
    "data.thread_nice",
)

# Keys (dotted prefixes) that may change when a run resumes: none of them changes the train
# state's structure or the stream of training batches.
RESUMABLE = (
    *BOOKKEEPING,
    "total_steps",
    "init",  # read only by a fresh start
    "model.attn_impl",  # how attention is computed, not what
    "model.dtype",  # compute dtype (parameters stay float32)
    "model.remat",
    "data.eval_splits",
    "data.num_threads",
    "data.prefetch",
    "data.cache_mb",
    "teacher.allow_missing",
    "loss",
    "optim.lr",
    "optim.warmup_steps",
    "optim.schedule",
    "optim.min_lr_ratio",
    "optim.weight_decay",
    "optim.b1",
    "optim.b2",
    "optim.grad_accum_steps",
    "mesh",
    "distributed",
)


@dataclasses.dataclass
class Run:
    """A restored training run: its config, task, model pieces and parameters."""

    workdir: str
    config: Any  # ml_collections.ConfigDict
    mcfg: Any  # the task's model config
    mesh: Any
    graphdef: Any
    params: Any
    step: int
    task: Task | None = None


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """WORKDIR/config.json as a ConfigDict (lists where the original had tuples)."""
    path = config_path(workdir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return ml_collections.ConfigDict(raw)


def eval_mesh(config, devices=None):
    """The config's mesh on the available devices, else pure data parallel over them."""
    devices = list(jax.devices() if devices is None else devices)
    try:
        return shd.make_mesh(config.mesh, devices)
    except ValueError as e:
        axes = tuple(config.mesh.axes)
        fallback = type(config.mesh)(dict(axes=axes, shape=(-1,) + (1,) * (len(axes) - 1)))
        shape = tuple(config.mesh.shape)
        log.info("mesh %s does not fit %d devices (%s); using %s", shape, len(devices), e, fallback.shape)
        return shd.make_mesh(fallback, devices)


def load_run(workdir: str, *, step: int | None = None, devices=None, config=None) -> Run:
    """Restores the parameters of WORKDIR's checkpoint (latest complete one, or `step`) onto
    `devices` (default: all). `config` overrides WORKDIR/config.json."""
    config = load_config(workdir) if config is None else config
    task = get_task(config)
    mcfg = task.model_config(config)
    mesh = eval_mesh(config, devices)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir} ({ckpt_dir} does not exist)")
    graphdef, abs_params = abstract_params(task, mcfg, seed=int(config.seed))
    target = abstract_like(abs_params, param_shardings(config, abs_params, mesh))
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    try:
        restored_step, params = ckpt.restore_params(target, step=step)
    finally:
        ckpt.close()
    jax.block_until_ready(params)
    return Run(os.path.abspath(workdir), config, mcfg, mesh, graphdef, params, int(restored_step), task)


# --------------------------------------------------------------------------- run identity


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if not v:
                out[key] = {}
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_values(config) -> dict[str, Any]:
    """{dotted key: JSON value} of a config (tuples as lists, as config.json stores them)."""
    raw = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)
    flat = _flat(raw)
    flat.setdefault("task", DEFAULT_TASK)  # configs written before the key existed
    if not flat["task"]:
        flat["task"] = DEFAULT_TASK
    return flat


def _resumable(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUMABLE)


def config_changes(stored, new) -> dict[str, tuple[Any, Any]]:
    """{key: (stored value, new value)} for every key that differs (None = absent). A key the
    stored config lacks but whose new value is `base_config()`'s default is no change: the
    config grew a key after the run was made."""
    a, b = config_values(stored), config_values(new)
    defaults = config_values(base_config())
    out = {}
    for k in sorted(set(a) | set(b)):
        if a.get(k) == b.get(k) or (k not in a and k in defaults and b.get(k) == defaults[k]):
            continue
        out[k] = (a.get(k), b.get(k))
    return out


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(workdir: str, config) -> dict[str, tuple[Any, Any]]:
    """Compares `config` with the run already in `workdir` (its config.json), if any.

    Raises UserError (one line naming the keys) for a change of a key that shapes the train
    state or the data stream; returns the accepted changes ({} for a new run or the same config).
    """
    path = config_path(workdir)
    if not os.path.exists(path):
        return {}
    stored = load_config(workdir)
    changes = config_changes(stored, config)
    refused = {k: v for k, v in changes.items() if not _resumable(k)}
    if refused:
        listed = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in refused.items())
        raise UserError(
            f"{workdir} holds a run with another config ({path}): {listed}. These keys shape the train state "
            f"or the data, so they cannot change on resume: use a new --workdir (or the stored values)"
        )
    return changes


def record_config(workdir: str, config, changes: dict[str, tuple[Any, Any]], *, step: int | None) -> None:
    """Writes config.json (the run's current config) and, when resuming with `changes`,
    appends them to config_history.jsonl and logs them. Process 0 only."""
    if jax.process_index() != 0:
        return
    if changes:
        text = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items())
        log.warning("config changed on resume (from step %s): %s", step, text)
        row = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "step": step,
            "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
        }
        with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
    if changes or not os.path.exists(config_path(workdir)):
        write_json_atomic(config_path(workdir), json.loads(config.to_json_best_effort()), indent=2)


def read_config_history(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = [
    "BOOKKEEPING",
    "RESUMABLE",
    "RUN_INFO_FILE",
    "Run",
    "check_resume",
    "config_changes",
    "eval_mesh",
    "load_config",
    "load_run",
    "read_config_history",
    "record_config",
]
