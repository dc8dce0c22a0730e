"""The training loop, one for every task, and its command line.

    python -m lfi_jax.train --config=configs/demo.py:ivit --workdir=runs/ivit \
        [--config.total_steps=500 ...]

`config.task` (default "classification") selects the `lfi_jax.tasks.Task`; the steps, the
shardings and the optimizer are built by `lfi_jax.trainer`. Training resumes automatically
from the latest checkpoint in WORKDIR/checkpoints; SIGTERM saves a checkpoint and exits
cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lfi_jax import sharding as shd
from lfi_jax.checkpoint import Checkpointer
from lfi_jax.cli import add_config_flags, add_debug_flag, config_from_args, run_cli
from lfi_jax.distributed import maybe_initialize
from lfi_jax.errors import UserError
from lfi_jax.fileio import write_json_atomic
from lfi_jax.metrics import MetricWriter, format_eta, setup_logging
from lfi_jax.run import RUN_INFO_FILE, check_resume, record_config
from lfi_jax.tasks.registry import get_task
from lfi_jax.teacher.resolve import resolve_teacher
from lfi_jax.trainer import Trainer, create_trainer, evaluate_splits
from lfi_jax.validate import check_teacher, validate_for_training

log = logging.getLogger("lfi_jax.train")


# --------------------------------------------------------------------------- teacher


def resolve_store(config, workdir: str) -> str | None:
    """The teacher store this run reads (None: none), built first when `teacher.auto` asks for
    it: by process 0, the others wait at a barrier (`lfi_jax.teacher.resolve.resolve_teacher`)."""
    is_main = jax.process_index() == 0
    choice = resolve_teacher(config, workdir=workdir, build=is_main)
    if jax.process_count() > 1 and choice.auto:
        multihost_utils.sync_global_devices("teacher_store")
        if not is_main:
            choice = resolve_teacher(config, workdir=workdir, build=False)
    if choice.active and not choice.ready:
        raise UserError(f"teacher store {choice.store} is not ready ({choice.reason})")
    return choice.store


# --------------------------------------------------------------------------- the loop


class _Preemption:
    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading_main():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def _progress(config, text: str) -> None:
    if jax.process_index() == 0:
        print(f"[{config.get('name', 'train')}] {text}", file=sys.stderr, flush=True)


def _write_run_info(workdir: str, config, source, teacher_store: str | None, lines: list[str]) -> None:
    if jax.process_index() != 0:
        return
    info = dict(
        task=get_task(config).name,
        name=config.get("name", "train"),
        data=dict(
            source=config.data.source,
            train_split=config.data.train_split,
            num_examples=len(source),
            class_names=[str(c) for c in (getattr(source, "class_names", None) or [])],
        ),
        teacher_store=teacher_store or None,
        startup=lines,
    )
    write_json_atomic(os.path.join(workdir, RUN_INFO_FILE), info, indent=2)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per `config` in `workdir` (resuming if a checkpoint is there); returns the final
    metrics (including the evaluations' metrics).

    Start-up, before anything is written to the workdir (apart from an oracle teacher store the
    config asks to build): the run's identity against a run already in `workdir`
    (`lfi_jax.run.check_resume`), `lfi_jax.validate.validate_for_training` (the config, batch
    sizes against devices, classes, every eval split's first example), the teacher store
    against the data, and the restore of the checkpoint to resume from. Only then config.json
    (and config_history.jsonl on a changed resume) and run_info.json."""
    task = get_task(config)
    mcfg = task.model_config(config)
    changes = check_resume(workdir, config)
    shd.request_cpu_devices(config.mesh.get("cpu_devices", 0))
    mesh = shd.make_mesh(config.mesh)
    source = task.source(config, config.data.train_split)
    report = validate_for_training(  # before a store is built
        config, mesh, source, teacher=False, open_source=lambda spec, split, options: task.source(config, split)
    )
    store = resolve_store(config, workdir)  # may build the oracle store the config asks for
    teacher_path, missing = check_teacher(config, source, store)
    report = dataclasses.replace(report, teacher=teacher_path, teacher_missing=missing)
    lines = report.lines()
    teacher_cfg = ml_collections.ConfigDict(config.teacher.to_dict())
    teacher_cfg.store = store or ""
    is_main = jax.process_index() == 0

    trainer, init_state, state_shapes = create_trainer(config, mcfg, mesh, seed=int(config.seed), task=task)
    procs = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = task.train_iterator(config, mcfg, teacher_cfg, seed=int(config.seed), **procs)
    # Created by every process at the same point (orbax synchronises them). A resumed run is
    # restored before anything else is written: a checkpoint that does not fit leaves it as it was.
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing))
    start, state, resuming = 0, None, ckpt.latest_step() is not None
    try:
        if resuming:
            start, state = ckpt.restore(trainer.abstract_state(state_shapes), train_iter)
    except BaseException:
        ckpt.close()
        raise
    record_config(workdir, config, changes, step=start if resuming else None)
    _write_run_info(workdir, config, source, store, lines)
    if is_main:
        for line in lines:
            log.info("%s", line)
    writer = MetricWriter(workdir, enabled=is_main)
    if resuming:
        writer.truncate_after(start)
        log.info("resumed from step %d in %s", start, workdir)
    else:
        state = init_state()
        if is_main:
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_shapes["params"]))
            n_train = sum(
                int(np.prod(x.shape))
                for x, m in zip(jax.tree.leaves(state_shapes["params"]), jax.tree.leaves(trainer.trainable))
                if m
            )
            log.info("model: %s parameters (%s trainable), mesh %s", f"{n_params:,}", f"{n_train:,}", dict(mesh.shape))
    return _loop(config, trainer, state, start, train_iter, ckpt, writer)


def _loop(config, trainer: Trainer, state, start: int, train_iter, ckpt: Checkpointer, writer: MetricWriter):
    total = int(config.total_steps)
    final: dict[str, Any] = {}
    if start >= total:  # already finished: report the final evaluation again
        final.update(evaluate_splits(trainer, state["params"], config))
    summary = tuple(trainer.task.summary_keys)
    t_last, n_last, t_start = time.time(), start, time.time()
    with contextlib.ExitStack() as cleanup, _Preemption() as preempt:
        # On any exit: async checkpoint writes finish (nothing saved is lost), prefetch threads stop.
        cleanup.callback(getattr(train_iter, "close", lambda: None))
        cleanup.callback(writer.close)
        cleanup.callback(ckpt.close)
        step = start
        while step < total:
            batch = next(train_iter)
            state, metrics = trainer.train_step(state, shd.global_batch(batch, trainer.mesh))
            step += 1
            is_last = step == total
            if (config.log_every and step % config.log_every == 0) or is_last:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                m["examples_per_sec"] = (step - n_last) * config.batch_size / max(now - t_last, 1e-9)
                t_last, n_last = now, step
                writer.write(step, m)
                eta = (now - t_start) / max(step - start, 1) * (total - step)
                parts = " ".join(f"{k[: -len('_loss')]} {v:.4f}" for k, v in m.items() if k.endswith("_loss"))
                speed = f"{m['examples_per_sec']:.0f} ex/s ETA {format_eta(eta)}"
                _progress(config, f"step {step}/{total} loss {m['loss']:.4f} ({parts}) {speed}")
                final.update(m)
            evaluate_now = bool(config.eval_every and step % config.eval_every == 0) or is_last
            # A checkpoint before every evaluation: an evaluation that fails loses no training.
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or evaluate_now or preempt.requested:
                ckpt.save(step, state, train_iter, force=True)
            if evaluate_now:
                ev = evaluate_splits(trainer, state["params"], config)
                writer.write(step, ev)
                final.update(ev)
                shown = " ".join(f"{k} {v:.4f}" for k, v in ev.items() if k.rsplit("/", 1)[-1] in summary)
                _progress(config, f"step {step} {shown}")
            if preempt.requested:
                log.warning("stopped at step %d after SIGTERM; checkpoint saved", step)
                break
    final["step"] = step
    final["preempted"] = bool(preempt.requested)
    return final


# --------------------------------------------------------------------------- command line

# Overrides that change what a run is (not how long or how often it logs): when given on the
# command line without --config.name, the config file's name no longer describes the run.
_IDENTITY_PREFIXES = ("model", "data.source", "data.train_split", "data.options", "data.image_size", "teacher", "task")


def run_name(config, overrides: list[str], workdir: str) -> str:
    """The name shown in progress lines and recorded in config.json: `--config.name` if given;
    else, when the command line changes the model, the data or the teacher, the config's name
    with the workdir's name (`demo-ivit-shortcut@shapes_ivit`); else the config's name."""
    keys = [o.split("=", 1)[0] for o in overrides]
    name = str(config.get("name", "train"))
    if "name" in keys:
        return name
    if any(k == p or k.startswith(p + ".") for k in keys for p in _IDENTITY_PREFIXES):
        return f"{name}@{os.path.basename(os.path.normpath(workdir))}"
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfi_jax.train", description=__doc__.split("\n\n")[0])
    add_config_flags(parser)
    parser.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and logs")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    setup_logging()
    config = config_from_args(args)
    overrides = list(getattr(args, "config_overrides", None) or [])
    name = run_name(config, overrides, args.workdir)
    if name != config.get("name", "train"):
        log.info("run name %s (config %s with --config.%s)", name, config.name, ", --config.".join(overrides))
        config.name = name
    shd.request_cpu_devices(config.mesh.get("cpu_devices", 0))  # before JAX's backends start
    maybe_initialize(config.distributed)
    result = train_and_evaluate(config, args.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, bool, str))}))
    return 0


if __name__ == "__main__":
    run_cli(main)
