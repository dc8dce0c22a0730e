"""Running an experiment: every cell of its grid trained (or found finished), grouped over
seeds, then its table, figure and JSON written."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from lfi_jax import train
from lfi_jax.checkpoint import Checkpointer
from lfi_jax.config import load_config_file
from lfi_jax.experiments.base import Cell, CellResult, Experiment, GridOptions, Group, stats
from lfi_jax.experiments.cells import (
    DEMO_CONFIG,
    budget_overrides,
    canonical,
    cell_config,
    cell_dirname,
    ensure_teacher,
    is_demo,
    parse_config_spec,
)
from lfi_jax.experiments.plots import finish
from lfi_jax.fileio import atomic_write, save_figure, write_json_atomic
from lfi_jax.metrics import format_eta, read_metrics

DEFAULT_WORKDIR = os.path.join("workdirs", "experiments")
DEFAULT_OUT = os.path.join("docs", "experiments")


def log(msg: str) -> None:
    print(f"[experiments] {msg}", file=sys.stderr, flush=True)


def metric_keys(config) -> list[str]:
    return [f"{s}/accuracy" for s in config.data.eval_splits]


def checkpoint_complete(workdir: str, step: int) -> bool:
    """Whether WORKDIR holds the completely written checkpoint of `step`."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return False
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    try:
        return ckpt.is_complete(step)
    finally:
        ckpt.close()


def finished_final(workdir: str, config) -> dict[str, Any] | None:
    """Everything a finished cell (checkpoint at total_steps, every eval split's accuracy
    logged at that step) reported at its last step, else None."""
    total = int(config.total_steps)
    if not checkpoint_complete(workdir, total) or not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return None
    out: dict[str, Any] = {}
    for row in read_metrics(workdir):
        if row["step"] == total:
            out.update(row)
    if not all(k in out for k in metric_keys(config)):
        return None
    out.update(step=total, preempted=False)
    return out


def accuracies(final: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in final.items() if k.endswith("/accuracy")}


def finished_metrics(workdir: str, config) -> dict[str, float] | None:
    """The final eval accuracies of a finished cell, else None."""
    final = finished_final(workdir, config)
    return None if final is None else accuracies(final)


def _fmt_metrics(m: dict[str, float]) -> str:
    return " ".join(f"{k.replace('/accuracy', '')} {v:.4f}" for k, v in sorted(m.items()))


def run_cells(
    cells: Sequence[Cell],
    configs: Sequence,
    workdir_root: str,
    dirname: Callable[[Cell, Any], str] | None = None,
    teacher_dir: Callable[[Cell], str] | None = None,
) -> list[CellResult]:
    """Trains every unfinished cell in WORKDIR_ROOT/<dirname(cell, config)> (default: named by
    the config), its automatic teacher store in WORKDIR_ROOT/<teacher_dir(cell)> (default:
    shared by data, grid and noise under WORKDIR_ROOT/teachers); returns one result per cell,
    in order."""
    results = []
    t0 = time.time()
    trained = 0
    for i, (cell, config) in enumerate(zip(cells, configs)):
        wd = os.path.join(workdir_root, dirname(cell, config) if dirname else cell_dirname(config))
        tag = f"cell {i + 1}/{len(cells)} [{cell.describe()}]"
        final = finished_final(wd, config)
        info_path = os.path.join(wd, "cell.json")
        if final is not None:
            wall = None
            if os.path.exists(info_path):
                with open(info_path) as f:
                    wall = json.load(f).get("wall_s")
            log(f"{tag}: finished earlier in {wd}, " + _fmt_metrics(accuracies(final)))
        else:
            store_dir = os.path.join(workdir_root, teacher_dir(cell)) if teacher_dir else None
            ensure_teacher(config, workdir_root, log, store_dir)
            log(f"{tag}: training {config.total_steps} steps in {wd}")
            t = time.time()
            final = train.train_and_evaluate(config, wd)
            wall = time.time() - t
            if final.get("preempted"):
                raise SystemExit(f"{tag}: stopped by SIGTERM at step {final.get('step')}; re-run to resume")
            final = {k: v for k, v in final.items() if isinstance(v, (int, float, str, bool))}
            write_json_atomic(
                info_path, {"labels": cell.labels, "seed": cell.seed, "wall_s": wall, "metrics": accuracies(final)}
            )
            trained += 1
            rest = len(cells) - i - 1
            eta = (time.time() - t0) / trained * rest if rest else 0.0
            log(
                f"{tag}: done in {wall:.0f} s, "
                + _fmt_metrics(accuracies(final))
                + (f"; at most {rest} cells left, ETA {format_eta(eta)}" if rest else "")
            )
        results.append(CellResult(cell.labels, cell.seed, wd, accuracies(final), wall, final))
    return results


def summarise(results: Sequence[CellResult], keys: Sequence[str]) -> list[Group]:
    """Groups cells by labels (over seeds), in first-seen order: stats per key, summed wall time."""
    groups: dict[str, list[CellResult]] = {}
    for r in results:
        groups.setdefault(canonical(r.labels), []).append(r)
    return [
        Group(
            rs[0].labels,
            [r.seed for r in rs],
            {k: stats([float(r.metrics[k]) for r in rs]) for k in keys},
            float(sum(r.wall_s for r in rs if r.wall_s is not None)),
            rs,
        )
        for rs in groups.values()
    ]


def prepare(
    exp: Experiment,
    *,
    config: str | None,
    budget: str,
    seeds: int,
    sets: dict[str, Any],
    options: GridOptions = GridOptions(),
) -> tuple[str, str | None, dict[str, Any], list[Cell], list]:
    """(base path, base arg, budget edits, cells, their configs) of an experiment."""
    if seeds < 1:
        raise ValueError(f"--seeds={seeds} must be >= 1")
    if config:
        base_path, base_arg = parse_config_spec(config)
    elif exp.default_arg is None:
        raise ValueError(f"the {exp.name} experiment needs --config FILE[:ARG]")
    else:
        base_path, base_arg = DEMO_CONFIG, exp.default_arg
    probe = load_config_file(base_path, base_arg)
    exp.check(probe, sets)
    budget_edits = budget_overrides(probe, budget, is_demo(base_path))
    cells = exp.seeds(exp.grid(options), seeds)
    configs = [cell_config(base_path, base_arg, c, budget_edits, sets) for c in cells]
    return base_path, base_arg, budget_edits, cells, configs


def run_experiment(
    exp: Experiment,
    *,
    config: str | None = None,
    budget: str = "full",
    seeds: int = 1,
    workdir: str = DEFAULT_WORKDIR,
    out: str = DEFAULT_OUT,
    sets: dict[str, Any] | None = None,
    options: GridOptions = GridOptions(),
    command: str = "",
) -> dict[str, Any]:
    """Runs (or completes) `exp`; writes OUT/NAME.{md,png,json}; returns the payload."""
    sets = dict(sets or {})
    base_path, base_arg, budget_edits, cells, configs = prepare(
        exp, config=config, budget=budget, seeds=seeds, sets=sets, options=options
    )
    keys = metric_keys(configs[0])
    log(
        f"{exp.name}: {len(cells)} cells ({len(cells) // seeds} grid points x {seeds} seed(s)), budget {budget}, "
        f"workdirs under {workdir}"
    )
    t0 = time.time()
    results = run_cells(cells, configs, workdir)
    elapsed = time.time() - t0
    summary = summarise(results, keys)
    cell_wall = sum(r.wall_s or 0.0 for r in results)
    c0 = configs[0]
    budget_text = (
        f"budget `{budget}`: {c0.total_steps} steps x batch {c0.batch_size} per cell, "
        f"model D={c0.model.hidden_size} depth {c0.model.depth} heads {c0.model.num_heads} patch {c0.model.patch_size} "
        f"at {c0.data.image_size} px, {seeds} seed(s); eval splits {', '.join(c0.data.eval_splits)}"
    )
    spec = f"{base_path}{':' + base_arg if base_arg else ''}"
    regimes = f", regimes {','.join(options.regimes)}" if options.regimes else ""
    title = f"{exp.title} (base config {os.path.basename(base_path)}{':' + base_arg if base_arg else ''}{regimes})"
    md = "\n".join(
        [
            f"# {title}",
            "",
            f"Command: `{command or 'python -m lfi_jax.experiments ' + exp.name}`",
            "",
            f"{budget_text}. Training wall time summed over cells: {cell_wall:.0f} s "
            f"(this invocation: {elapsed:.0f} s).",
            "",
            "Top-1 accuracy in %, mean ± sample std over seeds (a single number: one seed).",
            "",
            exp.table(summary, keys),
            "",
        ]
    )
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, f"{exp.name}.md"), md)
    fig = exp.plot(summary, keys)
    finish(fig, title, 1.0 / max(int(c0.model.num_classes), 1))
    save_figure(fig, os.path.join(out, f"{exp.name}.png"))
    payload = {
        "experiment": exp.name,
        "config": spec,
        "budget": budget,
        "budget_overrides": budget_edits,
        "sets": dict(sets),
        "seeds": seeds,
        "command": command,
        "cells": [r.to_json() for r in results],
        "summary": [g.to_json() for g in summary],
        "cell_wall_s": cell_wall,
        "elapsed_s": elapsed,
    }
    write_json_atomic(os.path.join(out, f"{exp.name}.json"), payload, default=str)
    print(md)
    log(f"wrote {os.path.join(out, exp.name)}.md, .png and .json")
    return payload
