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
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from lfi_jax import sharding as shd
from lfi_jax.checkpoint import Checkpointer
from lfi_jax.cli import add_config_flags, add_debug_flag, config_from_args, run_cli
from lfi_jax.config import validate
from lfi_jax.distributed import maybe_initialize
from lfi_jax.errors import UserError
from lfi_jax.fileio import write_json_atomic
from lfi_jax.metrics import MetricWriter, format_eta, setup_logging
from lfi_jax.run import RUN_INFO_FILE, check_resume, record_config
from lfi_jax.tasks.classification import build_model  # noqa: F401  (importable here as before)
from lfi_jax.tasks.registry import get_task
from lfi_jax.trainer import Trainer, create_trainer, evaluate_splits  # noqa: F401  (importable here as before)

log = logging.getLogger("lfi_jax.train")


# --------------------------------------------------------------------------- teacher + data


def build_auto_teacher(config, out: str, *, log_fn: Callable[[str], None] | None = None) -> None:
    """Export the teacher `config.teacher` describes (backend `teacher.auto`, default oracle;
    its grid and noise, noise drawn with `config.seed`) for the train split into `out`,
    unless a complete store is already there."""
    if os.path.exists(os.path.join(out, "manifest.json")):
        return
    from lfi_jax.data.sources import get_source
    from lfi_jax.teacher.export import export_store

    t = config.teacher
    backend = t.auto or "oracle"
    where = f"{config.data.source}/{config.data.train_split}"
    (log_fn or log.info)(f"building the {backend} teacher store for {where} in {out}")
    source = get_source(config.data.source, config.data.train_split, config.data.options.to_dict())
    export_store(
        source,
        out,
        backend=backend,
        grid=int(t.grid),
        blur=float(t.noise.blur),
        shift=float(t.noise.shift),
        uniform=float(t.noise.uniform),
        seed=int(config.seed),
        data_spec=config.data.source,
    )


def prepare_teacher(config, workdir: str) -> ml_collections.ConfigDict:
    """The teacher config the pipeline sees; builds the oracle store first if asked to."""
    teacher = ml_collections.ConfigDict(config.teacher.to_dict())
    if not config.model.interaction_constraint:
        teacher.store = ""  # nothing reads the teacher: do not load (or build) it
        return teacher
    if teacher.store or not teacher.auto:
        return teacher
    out = os.path.join(workdir, "teacher", config.data.train_split)
    if jax.process_index() == 0:
        build_auto_teacher(config, out)
    _barrier("teacher_store")
    teacher.store = out
    return teacher


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


def _startup_checks(config, mesh, source, store) -> list[str]:
    """Start-up checks made before anything is written (placeholder of the config validator's
    `validate_for_training`): batch sizes against the devices on the batch axes. Returns the
    start-up log's lines about the data."""
    n = int(np.prod([mesh.shape[a] for a in shd.batch_axes(mesh)])) if mesh.shape else 1
    accum = int(config.optim.grad_accum_steps)
    micro = int(config.batch_size) // accum
    if micro % n:
        raise UserError(
            f"config.batch_size={config.batch_size} / config.optim.grad_accum_steps={accum} = {micro} examples per "
            f"micro-batch is not divisible by the {n} devices on the batch axes {shd.batch_axes(mesh)}"
        )
    if int(config.eval_batch_size) % n:  # fail now, not at the first evaluation
        raise UserError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by the {n} devices")
    classes = list(getattr(source, "class_names", None) or [])
    return [
        f"data: {config.data.source} split {config.data.train_split} ({len(source):,} examples), "
        f"{len(classes)} classes",
        f"eval splits: {', '.join(config.data.eval_splits) or 'none'}",
    ]


def _write_run_info(workdir: str, config, source, teacher_store: str, lines: list[str]) -> None:
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

    Start-up (before anything is written to the workdir, apart from an oracle teacher store
    the config asks to build): the config's checks, the run's identity against a run already
    in `workdir` (`lfi_jax.run.check_resume`), batch sizes against devices, the data and the
    teacher store. Then config.json (and config_history.jsonl on a changed resume)."""
    validate(config)
    task = get_task(config)
    mcfg = task.model_config(config)
    changes = check_resume(workdir, config)
    mesh = shd.make_mesh(config.mesh)
    source = task.source(config, config.data.train_split)
    lines = _startup_checks(config, mesh, source, None)
    teacher_cfg = prepare_teacher(config, workdir)  # may build the oracle store the config asks for
    if mcfg.interaction_constraint and not teacher_cfg.store:
        raise UserError("config.model.interaction_constraint is on but config.teacher.store is empty")
    lines.append(f"teacher store: {teacher_cfg.store or 'none'}")
    is_main = jax.process_index() == 0

    trainer, init_state, state_shapes = create_trainer(config, mcfg, mesh, seed=int(config.seed), task=task)
    procs = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = task.train_iterator(config, mcfg, teacher_cfg, seed=int(config.seed), **procs)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    start, state, resuming = 0, None, False
    if os.path.isdir(ckpt_dir):  # restore before writing anything: a misfit leaves the run as it was
        reader = Checkpointer(ckpt_dir, read_only=True)
        try:
            resuming = bool(reader.complete_steps())
            if resuming:
                start, state = reader.restore(trainer.abstract_state(state_shapes), train_iter)
        finally:
            reader.close()
    os.makedirs(workdir, exist_ok=True)
    record_config(workdir, config, changes, step=start if resuming else None)
    _write_run_info(workdir, config, source, teacher_cfg.store, lines)
    if is_main:
        for line in lines:
            log.info("%s", line)
    ckpt = Checkpointer(ckpt_dir, keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing))
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
    maybe_initialize(config.distributed)
    result = train_and_evaluate(config, args.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, bool, str))}))
    return 0


if __name__ == "__main__":
    run_cli(main)
