"""The main job: ViT vs I-ViT on the embedded "shortcut digits" benchmark (SPEC section 4).

    python -m lfi_jax.demo --workdir=runs/demo [--seeds=3] [--regime=shortcut] [--models=vit,ivit]
        [--set KEY=VALUE ...]
    python -m lfi_jax.demo --task=detection --workdir=DIR ...   (DETR vs I-DETR: lfi_jax.demo_detection)

A preset of the experiment runner (lfi_jax.experiments): one cell per model and seed on
`configs/demo.py` (seed s also draws the data with seed s), trained in WORKDIR/<model>_<regime>_seed<s>
with the oracle teacher store built once per seed and shared by the models
(WORKDIR/teacher_<regime>_seed<s>).
Then prints a table of test_iid / test_shifted top-1 per model and the step at which each
model first reached the ViT's final test_iid accuracy (same seed), and writes
WORKDIR/results.json and WORKDIR/convergence.png. Finished runs are not redone: re-running
only fills what is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from lfi_jax import demo_detection
from lfi_jax.cli import parse_sets, run_cli
from lfi_jax.config import ABLATIONS
from lfi_jax.data.shortcut_digits import SPURIOUS_PRESETS as REGIMES
from lfi_jax.eval.curves import first_step_reaching, load_curve
from lfi_jax.eval.figures import draw_curve, mark_chance, model_color, model_label, pyplot
from lfi_jax.experiments.base import Cell, CellResult, Experiment, GridOptions, Group, stats
from lfi_jax.experiments.runner import prepare, run_cells, summarise
from lfi_jax.fileio import save_figure, write_json_atomic
from lfi_jax.metrics import setup_logging

MODELS = ("vit", "ivit")
SPLITS = ("test_iid", "test_shifted")
TARGET_KEY = "test_iid/accuracy"


def demo_experiment(models: Sequence[str], regime: str) -> Experiment:
    """The main job as an experiment: the models (rows of Table 3) in one regime."""

    def grid(opts: GridOptions) -> list[Cell]:
        return [Cell({"model": m, "regime": regime}, {"ablation": m}) for m in models]

    def seeds(cells: Sequence[Cell], n: int) -> list[Cell]:  # seed by seed; the data follows the seed
        return [Cell(c.labels, {**c.edits, "data.options.seed": s}, seed=s) for s in range(n) for c in cells]

    return Experiment(
        "demo", f"shortcut digits, regime {regime}", grid, table, plot, default_arg=f"ivit,{regime}", seeds=seeds
    )


def run_dirname(cell: Cell, config) -> str:
    return f"{cell.labels['model']}_{cell.labels['regime']}_seed{cell.seed}"


def teacher_dirname(cell: Cell) -> str:
    """One oracle store per regime and seed (the data follows the seed), shared by the models."""
    return f"teacher_{cell.labels['regime']}_seed{cell.seed}"


def steps_to_target(summary: Sequence[Group]) -> dict[str, list[int | None]]:
    """Per model, per run: the first step at which its test_iid accuracy reached the ViT's
    final test_iid accuracy of the same seed (None: never, or no ViT run)."""
    vit_final = {r.seed: r.metrics[TARGET_KEY] for g in summary if g.labels["model"] == "vit" for r in g.results}
    out = {}
    for g in summary:
        steps = []
        for r in g.results:
            target = vit_final.get(r.seed)
            steps.append(None if target is None else first_step_reaching(*load_curve(r.workdir, TARGET_KEY), target))
        out[g.labels["model"]] = steps
    return out


def summarise_models(summary: Sequence[Group]) -> dict[str, dict[str, Any]]:
    """results.json's summary: per model the mean, sample std and values of each split's
    top-1 and of the wall time, and the steps to the ViT's final test_iid accuracy."""
    steps = steps_to_target(summary)
    out = {}
    for g in summary:
        walls = [r.wall_s for r in g.results if r.wall_s is not None] or [0.0]
        entry = {k: g.stats[k] for k in (f"{s}/accuracy" for s in SPLITS)}
        entry["wall_s"] = stats(walls)
        out[g.labels["model"]] = {k: {f: v[f] for f in ("mean", "std", "values")} for k, v in entry.items()}
        out[g.labels["model"]]["steps_to_vit_final_iid"] = steps[g.labels["model"]]
    return out


def _mean_std(s: dict[str, Any]) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if len(s["values"]) > 1 else f"{s['mean']:.3f}"


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | test_iid top-1 | test_shifted top-1 | steps to ViT's final test_iid | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for model, e in summary.items():
        steps = ", ".join("never" if s is None else str(s) for s in e["steps_to_vit_final_iid"])
        iid, shifted = _mean_std(e["test_iid/accuracy"]), _mean_std(e["test_shifted/accuracy"])
        lines.append(f"| {model} | {iid} | {shifted} | {steps} | {e['wall_s']['mean']:.0f} |")
    return "\n".join(lines)


def table(summary: list[Group], keys: list[str]) -> str:
    return format_table(summarise_models(summary))


def plot(summary: list[Group], keys: list[str], spurious_p: float = 0.0, num_classes: int = 10):
    """Test accuracy against step, one panel per split, one colour per model, every seed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    chance = 1.0 / num_classes
    for ax, split in zip(axes, SPLITS):
        for g in summary:
            m = g.labels["model"]
            for i, r in enumerate(g.results):
                draw_curve(
                    ax,
                    *load_curve(r.workdir, f"{split}/accuracy"),
                    color=model_color(m),
                    alpha=0.8,
                    label=model_label(m) if i == 0 else None,
                )
        mark_chance(ax, chance)
        if split == "test_iid" and spurious_p > 0:
            # What a model that reads only the background scores on test_iid.
            bg = spurious_p + (1 - spurious_p) * chance
            ax.axhline(bg, color="gray", ls="--", lw=1)
            ax.text(
                0.99,
                bg,
                "background only",
                transform=ax.get_yaxis_transform(),
                ha="right",
                va="bottom",
                fontsize=8,
                color="gray",
            )
        ax.set_title(split)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy")
    axes[0].legend()
    return fig


def run_demo(
    workdir: str,
    *,
    seeds: int = 1,
    regime: str = "shortcut",
    models: Sequence[str] = MODELS,
    sets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains what is missing, writes WORKDIR/results.json and convergence.png, returns the payload."""
    if regime not in REGIMES:
        raise ValueError(f"--regime={regime!r}; expected one of {sorted(REGIMES)}")
    unknown = [m for m in models if m not in ABLATIONS]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; expected rows of Table 3: {sorted(ABLATIONS)}")
    exp = demo_experiment(models, regime)
    _, _, _, cells, configs = prepare(exp, config=None, budget="full", seeds=seeds, sets=dict(sets or {}))
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    results: list[CellResult] = run_cells(cells, configs, workdir, dirname=run_dirname, teacher_dir=teacher_dirname)
    keys = [f"{s}/accuracy" for s in SPLITS]
    groups = summarise(results, keys)
    summary = summarise_models(groups)
    title = f"shortcut digits, regime {regime}, {seeds} seed(s)"
    fig = plot(groups, keys, REGIMES[regime], int(configs[0].model.num_classes))
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, os.path.join(workdir, "convergence.png"), dpi=120)
    runs = {
        g.labels["model"]: [{**r.final, "wall_s": r.wall_s, "workdir": r.workdir, "seed": r.seed} for r in g.results]
        for g in groups
    }
    payload = {
        "regime": regime,
        "seeds": seeds,
        "summary": summary,
        "runs": {
            m: [{k: v for k, v in r.items() if isinstance(v, (int, float, str, bool))} for r in rs]
            for m, rs in runs.items()
        },
        "wall_s": time.time() - t0,
    }
    write_json_atomic(os.path.join(workdir, "results.json"), payload, indent=2)
    print(f"\n{title} (total {time.time() - t0:.0f} s)\n")
    print(format_table(summary))
    print(f"\nwrote {workdir}/results.json and {workdir}/convergence.png")
    return payload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.demo", description="ViT vs I-ViT on the embedded benchmark.")
    p.add_argument(
        "--task",
        default="classification",
        choices=("classification", "detection"),
        help="detection: DETR vs I-DETR (python -m lfi_jax.demo --task=detection --help).",
    )
    p.add_argument("--workdir", default="runs/demo", help="Output directory.")
    p.add_argument("--seeds", type=int, default=1, help="Number of seeds (0..seeds-1).")
    p.add_argument("--regime", default="shortcut", choices=sorted(REGIMES), help="spurious_p regime (SPEC section 4).")
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help="Models to train, comma-separated (rows of Table 3: vit, ivit, iq_gc, ic_only, iq_ic).",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Config override for every run, e.g. --set total_steps=200 (repeatable).",
    )
    return p


def _main(argv: list[str]) -> int:
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", default="classification", choices=("classification", "detection"))
    t, argv = task.parse_known_args(argv)
    if t.task == "detection":  # DETR vs I-DETR (lfi_jax.demo_detection)
        return demo_detection.main(argv)
    a = build_parser().parse_args(argv)
    setup_logging()
    models = [m for m in a.models.split(",") if m]
    run_demo(a.workdir, seeds=a.seeds, regime=a.regime, models=models, sets=parse_sets(a.set))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (2 with one `error:` line for a user error)."""
    return run_cli(_main, argv, exit=False)


if __name__ == "__main__":
    sys.exit(main())
