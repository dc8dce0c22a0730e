"""Table 6 and Table 7 analogues on the embedded detection benchmark (`shortcut_digits_det`):
each dense-prediction model with and without the teacher's dense map C_vlm, over seeds.

    python -m lfi_jax.experiments detection [--seeds 3] [--budget full|small]
        [--regimes detection,segmentation,conddetr] [--config runlocal] [--set KEY=VALUE ...]

Row groups (`--regimes` selects some; default all three):
  detection     Table 6, detection: configs/detection_demo.py, rows detr (no teacher), idetr
                (interaction queries + the dense alignment to C_vlm + gated control) and
                idetr,shuffled (the control: the same maps permuted across the training images).
  segmentation  Table 6, instance segmentation: configs/segmentation_demo.py, rows detr and
                idetr (DETR's mask head; box AP and mask AP).
  conddetr      Table 7, few-shot Conditional-DETR: configs/conddetr_demo.py, rows conddetr
                and iconddetr.
A group whose config file does not exist, or whose task is not registered, is skipped with a
message saying so (in the log and in the table).

Every run is `lfi_jax.demo_detection.model_config(row, seed, config_file=...)`: the group's
config with the seed for the model and the data, the budget and the --set overrides. The
dense oracle teacher store (and its shuffled copy) is built once per group, data and seed by
`lfi_jax.demo_detection.ensure_teacher` under WORKDIR/<group>/teachers-<hash of the data>,
beside the pretrained, frozen backbone of a config with `backbone_pretrain` (detection_demo.py;
`lfi_jax.demo_detection.ensure_backbone`),
and each run trains in WORKDIR/<group>/<row>_seed<s>-<hash of its config>; finished runs are
not redone. `--budget full` (default) trains the configs as written (detection: 4000 steps, about 2-3
minutes per run on 2 CPU cores), `small` divides the step counts by 10, and
`--config runlocal` takes each config's `runlocal` variant (a few steps of a tiny model: a
smoke test).

Outputs in `--out` (default docs/experiments): detection.md (one table per group: AP, AP50,
AP75, APs, APm, APl in %, mean ± sample std over seeds, plus mask AP for segmentation; then each
row's gain over the group's first row, per seed paired), detection.png (AP and AP50 per row)
and detection.json (every run's numbers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from lfi_jax import demo_detection as dd
from lfi_jax import train
from lfi_jax.config import CONFIG_DIR
from lfi_jax.experiments.base import Cell, CellResult, GridOptions, Group, stats
from lfi_jax.experiments.cells import budget_overrides, canonical, config_hash
from lfi_jax.experiments.plots import finish, grouped_bars
from lfi_jax.experiments.runner import DEFAULT_OUT, DEFAULT_WORKDIR, summarise
from lfi_jax.experiments.tables import fmt_stat
from lfi_jax.fileio import atomic_write, save_figure, write_json_atomic
from lfi_jax.tasks.registry import get_task

BOX = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MASK = ("AP_mask", "AP50_mask", "AP75_mask")
TEACHER_KEYS = ("source", "train_split", "options")  # config.data keys that fix the teacher store


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """One table: a config file (configs/<config_file>.py), its rows (model arguments, the
    suffix `_shuffled` = the teacher-shuffled control) and the metrics it reports."""

    name: str
    title: str
    config_file: str
    rows: tuple[str, ...]
    metrics: tuple[str, ...] = BOX
    row_names: tuple[tuple[str, str], ...] = ()

    def label(self, row: str) -> str:
        return dict(self.row_names).get(row, row)


GROUPS = (
    RowGroup("detection", "Table 6 analogue, detection (DETR vs I-DETR)", "detection_demo",
             ("detr", "idetr", "idetr_shuffled"), BOX,
             (("detr", "DETR (no C_vlm)"), ("idetr", "I-DETR (C_vlm)"),
              ("idetr_shuffled", "I-DETR, C_vlm shuffled across images"))),
    RowGroup("segmentation", "Table 6 analogue, instance segmentation (DETR vs I-DETR, mask head)",
             "segmentation_demo", ("detr", "idetr"), BOX + MASK,
             (("detr", "DETR (no C_vlm)"), ("idetr", "I-DETR (C_vlm)"))),
    RowGroup("conddetr", "Table 7 analogue, few-shot Conditional-DETR", "conddetr_demo",
             ("conddetr", "iconddetr"), BOX,
             (("conddetr", "Conditional-DETR (no C_vlm)"), ("iconddetr", "I-Conditional-DETR (C_vlm)"))),
)
GROUP_NAMES = tuple(g.name for g in GROUPS)
DEFAULT_SEEDS = 3


def log(msg: str) -> None:
    print(f"[experiments detection] {msg}", file=sys.stderr, flush=True)


def select_groups(names: Sequence[str] | None) -> list[RowGroup]:
    if not names:
        return list(GROUPS)
    unknown = [n for n in names if n not in GROUP_NAMES]
    if unknown:
        raise ValueError(f"--regimes {','.join(unknown)}: the detection experiment's row groups are "
                         f"{', '.join(GROUP_NAMES)}")
    return [g for g in GROUPS if g.name in names]


def unavailable(group: RowGroup) -> str | None:
    """Why a group cannot run here (its config file or its task is missing), else None."""
    path = os.path.join(CONFIG_DIR, f"{group.config_file}.py")
    if not os.path.exists(path):
        return f"{path} does not exist"
    try:
        config = dd.model_config(group.rows[0], 0, runlocal=True, config_file=group.config_file)
        get_task(config)
    except (ValueError, KeyError, ImportError) as e:
        return f"configs/{group.config_file}.py: {e}"
    return None


def run_config(group: RowGroup, row: str, seed: int, *, budget: str, runlocal: bool, sets: dict[str, Any]):
    """A run's config: the group's config, the budget's step counts, then --set."""
    probe = dd.model_config(row, seed, runlocal=runlocal, config_file=group.config_file)
    edits = budget_overrides(probe, budget, demo=False)
    return dd.model_config(row, seed, runlocal=runlocal, sets={**edits, **sets}, config_file=group.config_file)


def teacher_root(root: str, group: RowGroup, config) -> str:
    """WORKDIR/<group>/teachers-<hash of the data and the teacher grid> (seeds inside)."""
    data = {k: config.data.get(k) for k in TEACHER_KEYS}
    key = json.loads(json.dumps({"data": data, "grid": config.teacher.grid}, default=lambda v: v.to_dict()))
    return os.path.join(root, group.name, "teachers-" + hashlib.sha256(canonical(key).encode()).hexdigest()[:10])


def metric_keys(group: RowGroup, config) -> list[str]:
    split = config.data.eval_splits[0]
    return [f"{split}/{m}" for m in group.metrics]


def run_cell(group: RowGroup, cell: Cell, config, root: str) -> CellResult:
    """Trains the cell unless it finished earlier; its result (metrics of the first eval split)."""
    keys = metric_keys(group, config)
    backbone = dd.attach_backbone(config, teacher_root(root, group, config), cell.seed)
    wd = os.path.join(root, group.name, f"{cell.labels['model']}_seed{cell.seed}-{config_hash(config)}")
    info = os.path.join(wd, "cell.json")
    final = dd.finished(wd, config, keys)
    wall = None
    if final is not None:
        if os.path.exists(info):
            with open(info) as f:
                wall = json.load(f).get("wall_s")
        log(f"{cell.describe()}: finished earlier in {wd}")
    else:
        if config.model.interaction_constraint:
            config.teacher.store = dd.ensure_teacher(config, teacher_root(root, group, config), cell.seed)
        if backbone is not None:
            dd.ensure_backbone(config, backbone)
        log(f"{cell.describe()}: training {config.total_steps} steps in {wd}")
        t = time.time()
        final = train.train_and_evaluate(config, wd)
        wall = time.time() - t
        if final.get("preempted"):
            raise SystemExit(f"{cell.describe()}: stopped by SIGTERM at step {final.get('step')}; re-run to resume")
        missing = [k for k in keys if k not in final]
        if missing:
            raise ValueError(f"{wd}: the run reported no {', '.join(missing)} (config.data.eval_splits / eval_every)")
        write_json_atomic(info, {"labels": cell.labels, "seed": cell.seed, "wall_s": wall})
    metrics = {k: float(final[k]) for k in keys}
    log(f"{cell.describe()}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    scalars = {k: v for k, v in final.items() if isinstance(v, (int, float, str, bool))}
    return CellResult(dict(cell.labels), cell.seed, wd, metrics, wall, scalars)


def gains(groups: list[Group], keys: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per row but the first: stats over the shared seeds of (row - first row) per key."""
    if not groups:
        return {}
    base = {r.seed: r for r in groups[0].results}
    out = {}
    for g in groups[1:]:
        pairs = [(r, base[r.seed]) for r in g.results if r.seed in base]
        if pairs:
            out[g.labels["model"]] = {k: stats([r.metrics[k] - b.metrics[k] for r, b in pairs]) for k in keys}
    return out


def group_table(group: RowGroup, summary: list[Group], keys: Sequence[str]) -> str:
    """Rows of a group: each metric (%) as mean ± std over seeds, seeds, wall time; then gains."""
    names = [k.split("/", 1)[1].replace("_mask", " mask") for k in keys]
    lines = ["| model | " + " | ".join(names) + " | seeds | wall (s) |", "|---" * (len(keys) + 3) + "|"]
    for g in summary:
        vals = [fmt_stat(g.stats[k]) for k in keys]
        lines.append(f"| {group.label(g.labels['model'])} | " + " | ".join(vals) + f" | {len(g.seeds)} | "
                     f"{g.wall_s:.0f} |")
    gain = gains(summary, keys)
    if gain:
        first = group.label(summary[0].labels["model"])
        lines += ["", f"Gain over {first} (percentage points, paired by seed):", "",
                  "| model | " + " | ".join(names) + " |", "|---" * (len(keys) + 1) + "|"]
        for row, g in gain.items():
            lines.append(f"| {group.label(row)} | " + " | ".join(fmt_stat(g[k]) for k in keys) + " |")
    return "\n".join(lines)


def plot(tables: list[tuple[RowGroup, list[Group], list[str]]]):
    """AP and AP50 (%) per row, every group side by side."""
    summary, names, keys = [], [], ["AP", "AP50"]
    for group, groups, gkeys in tables:
        split = gkeys[0].split("/", 1)[0]
        for g in groups:
            stats_ = {k: g.stats[f"{split}/{k}"] for k in keys}
            summary.append(dataclasses.replace(g, stats=stats_))
            names.append(f"{g.labels['model']}\n{group.name}")
    fig = grouped_bars(summary, keys, names)
    fig.axes[0].set_ylabel("box AP (%)")
    finish(fig, EXPERIMENT.title, None)
    return fig


@dataclasses.dataclass(frozen=True)
class DenseExperiment:
    """The detection experiment for the command line (`lfi_jax.experiments.cli`): it runs its
    own cells (detection runs report AP, not accuracy)."""

    name: str = "detection"
    title: str = "Table 6 and 7 analogues on shortcut_digits_det: with and without C_vlm"
    default_seeds: int = DEFAULT_SEEDS

    def run(self, *, config: str | None = None, budget: str = "full", seeds: int = DEFAULT_SEEDS,
            workdir: str = DEFAULT_WORKDIR, out: str = DEFAULT_OUT, sets: dict[str, Any] | None = None,
            options: GridOptions = GridOptions(), command: str = "") -> dict[str, Any]:
        if config not in (None, "", "runlocal"):
            raise ValueError(f"--config {config!r}: the detection experiment runs its own configs; only "
                             "--config runlocal (each config's runlocal variant) is accepted")
        return run_detection_experiment(seeds=seeds, budget=budget, runlocal=config == "runlocal",
                                        groups=options.regimes, workdir=workdir, out=out, sets=sets,
                                        command=command)


def run_detection_experiment(*, seeds: int = DEFAULT_SEEDS, budget: str = "full", runlocal: bool = False,
                             groups: Sequence[str] | None = None, workdir: str = DEFAULT_WORKDIR,
                             out: str = DEFAULT_OUT, sets: dict[str, Any] | None = None,
                             command: str = "") -> dict[str, Any]:
    """Trains what is missing; writes OUT/detection.{md,png,json}; returns the payload."""
    if seeds < 1:
        raise ValueError(f"--seeds={seeds} must be >= 1")
    sets = dict(sets or {})
    chosen = select_groups(groups)
    t0 = time.time()
    tables, skipped, results_json, md_groups = [], {}, {}, []
    for group in chosen:
        why = unavailable(group)
        if why:
            skipped[group.name] = why
            log(f"{group.name}: skipped ({why})")
            md_groups += [f"## {group.title}", "", f"Skipped: {why}.", ""]
            continue
        cells = [Cell({"model": row}, {}, s) for row in group.rows for s in range(seeds)]
        configs = [run_config(group, c.labels["model"], c.seed, budget=budget, runlocal=runlocal, sets=sets)
                   for c in cells]
        keys = metric_keys(group, configs[0])
        results = [run_cell(group, c, cfg, workdir) for c, cfg in zip(cells, configs)]
        summary = summarise(results, keys)
        tables.append((group, summary, keys))
        c0 = configs[0]
        md_groups += [f"## {group.title}", "",
                      f"configs/{group.config_file}.py{':runlocal' if runlocal else ''}: {c0.total_steps} steps x "
                      f"batch {c0.batch_size}, {c0.data.options.get('num_train')} train images, eval split "
                      f"{c0.data.eval_splits[0]}.", "", group_table(group, summary, keys), ""]
        results_json[group.name] = {"summary": [g.to_json() for g in summary], "gains": gains(summary, keys),
                                    "cells": [r.to_json() for r in results], "config_file": group.config_file}
    if not tables:
        raise ValueError("detection experiment: no row group can run here (" +
                         "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ")")
    elapsed = time.time() - t0
    wall = sum(r.wall_s or 0.0 for _, s, _ in tables for g in s for r in g.results)
    md = "\n".join([f"# {EXPERIMENT.title}", "", f"Command: `{command or 'python -m lfi_jax.experiments detection'}`",
                    "", f"Budget `{budget}`{' (runlocal variants)' if runlocal else ''}, {seeds} seed(s) per row; "
                    f"training wall time summed over runs {wall:.0f} s (this invocation: {elapsed:.0f} s). COCO "
                    "AP in %, mean ± sample std over seeds (a single number: one seed).", "", *md_groups])
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "detection.md"), md)
    save_figure(plot(tables), os.path.join(out, "detection.png"))
    payload = {"experiment": "detection", "budget": budget, "runlocal": runlocal, "seeds": seeds, "sets": sets,
               "command": command, "groups": results_json, "skipped": skipped, "cell_wall_s": wall,
               "elapsed_s": elapsed}
    write_json_atomic(os.path.join(out, "detection.json"), payload, default=str)
    print(md)
    log(f"wrote {os.path.join(out, 'detection')}.md, .png and .json")
    return payload


EXPERIMENT = DenseExperiment()

__all__ = ["EXPERIMENT", "GROUPS", "DenseExperiment", "RowGroup", "group_table", "run_detection_experiment"]
