"""The experiment runner: a grid of training runs, then a Markdown table and a figure.

    python -m lfi_jax.experiments data_ratio    [--out DIR] [--budget full|small] [--seeds N]
    python -m lfi_jax.experiments ablation      ...
    python -m lfi_jax.experiments teacher_noise ...
    python -m lfi_jax.experiments spurious_p    ...
    python -m lfi_jax.experiments seeds --config configs/demo.py:ivit,shortcut --seeds 3

Experiments (each grid point is trained for every seed 0..N-1):
  data_ratio     Table 2: ViT vs I-ViT at 1 / 10 / 50 / 100 % of the training data
                 (`config.data.data_ratio`, a class-stratified nested subset).
  ablation       Table 3: the five rows vit, iq_gc, ic_only, iq_ic, ivit (`config.ABLATIONS`).
  teacher_noise  I-ViT's accuracy against the quality of its teacher: the oracle degraded by
                 blur / shift / uniform mixing (`config.teacher.noise`), with ViT as reference.
  spurious_p     ViT vs I-ViT in the clean / shortcut / hard regimes (SPEC section 4).
  seeds          any config (--config) over N seeds.

The base config is `configs/demo.py` (the embedded benchmark; clean regime, except for
spurious_p which sweeps it) unless `--config FILE[:ARG]` names another one, e.g.
`configs/tinyimagenet.py:B/16` on a GPU box; the grid then overrides the model switches
(`set_ablation`), `data.data_ratio` or `teacher.noise` of that config.

Every cell trains in its own workdir under `--workdir` (default runs/experiments), named by a
hash of its full config, so cells shared between experiments (ViT on all the data is a cell of
data_ratio, ablation and teacher_noise) run once, and re-running an experiment only trains
what is missing: a cell is finished when it holds the checkpoint of step `total_steps`; an
unfinished one resumes from its latest checkpoint. With `teacher.auto = "oracle"` the oracle
teacher store is built once per (data, grid, noise) under WORKDIR/teachers and shared.

Outputs (atomically written) in `--out` (default docs/experiments): NAME.md (the table, mean
and spread over seeds, with the budget and the wall time), NAME.png and NAME.json (every
cell's numbers).

Budgets: `full` (default) uses the config as written (the demo: 800 steps of batch 64, the
same budget as the main job; 4-5 minutes per cell on 2 CPU cores, see docs/experiments.md);
`small` trains each demo cell for 300 steps (batch 64, evaluation every 50 steps on 500 test
images per split) for quick looks: at that budget the from-scratch ViT is still on its loss
plateau. On a config other than the demo, `small` divides total_steps, warmup, eval and
checkpoint intervals by 10.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from lfi_jax.config import ABLATIONS, load_config_file, set_ablation, set_key
from lfi_jax.data.shortcut_digits import SPURIOUS_PRESETS as REGIMES
from lfi_jax.fileio import atomic_write, save_figure, write_json_atomic

DEMO = "demo"
DEFAULT_WORKDIR = os.path.join("workdirs", "experiments")
DEFAULT_OUT = os.path.join("docs", "experiments")

RATIOS = (1.0, 0.5, 0.1, 0.01)
# (kind, level): kind "none" is the exact oracle; levels in teacher cells / mixing weight.
NOISE_LEVELS = (
    ("none", 0.0),
    ("blur", 1.0),
    ("blur", 2.0),
    ("blur", 4.0),
    ("shift", 1.0),
    ("shift", 2.0),
    ("uniform", 0.5),
    ("uniform", 0.9),
)
ABLATION_NAMES = {
    "vit": "ViT",
    "iq_gc": "IQ + GC (no teacher)",
    "ic_only": "IC on the original queries",
    "iq_ic": "IQ + IC (no gate)",
    "ivit": "I-ViT (IQ + IC + GC)",
}
MODEL_NAMES = {"vit": "ViT", "ivit": "I-ViT"}

# Budgets for the demo config: dotted key -> value.
DEMO_BUDGETS: dict[str, dict[str, Any]] = {
    "small": {
        "total_steps": 300,
        "optim.warmup_steps": 30,
        "eval_every": 50,
        "log_every": 50,
        "checkpoint_every": 100,
        "data.options.num_test": 500,
    },
    "full": {},
}


# --------------------------------------------------------------------------- config edits


def parse_config_spec(spec: str) -> tuple[str, str | None]:
    """'configs/demo.py:ivit,clean' -> ('configs/demo.py', 'ivit,clean')."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def is_demo(path: str) -> bool:
    return os.path.splitext(os.path.basename(path))[0] == DEMO


def budget_overrides(config, budget: str, demo: bool) -> dict[str, Any]:
    if budget not in DEMO_BUDGETS:
        raise ValueError(f"--budget={budget!r}; expected one of {sorted(DEMO_BUDGETS)}")
    if demo or budget == "full":
        return dict(DEMO_BUDGETS[budget]) if demo else {}
    scale = lambda v: max(1, int(v) // 10) if int(v) else 0  # noqa: E731
    return {
        "total_steps": scale(config.total_steps),
        "optim.warmup_steps": scale(config.optim.warmup_steps),
        "eval_every": scale(config.eval_every),
        "checkpoint_every": scale(config.checkpoint_every),
    }


# --------------------------------------------------------------------------- the grid


@dataclasses.dataclass
class Cell:
    """One training run: labels (for the table) and the config edits that define it."""

    labels: dict[str, Any]
    edits: dict[str, Any]  # dotted key -> value; "ablation" -> a Table 3 row name
    seed: int = 0

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels.items()) + f" seed={self.seed}"


def _model_cells(models, extra: dict[str, Any], labels: dict[str, Any]) -> list[Cell]:
    return [Cell({"model": m, **labels}, {"ablation": m, **extra}) for m in models]


def grid_data_ratio(args) -> list[Cell]:
    ratios = args.ratios or RATIOS
    return [c for r in ratios for c in _model_cells(("vit", "ivit"), {"data.data_ratio": float(r)}, {"data_ratio": float(r)})]


def grid_ablation(args) -> list[Cell]:
    return [Cell({"model": m}, {"ablation": m}) for m in ABLATIONS]


def grid_teacher_noise(args) -> list[Cell]:
    cells = [Cell({"model": "vit", "noise": "none", "level": 0.0}, {"ablation": "vit"})]
    levels = [("none", 0.0)] + list(args.noise) if args.noise else NOISE_LEVELS
    for kind, level in levels:
        edits = {"ablation": "ivit", "teacher.noise.blur": 0.0, "teacher.noise.shift": 0.0, "teacher.noise.uniform": 0.0}
        if kind != "none":
            edits[f"teacher.noise.{kind}"] = float(level)
        cells.append(Cell({"model": "ivit", "noise": kind, "level": float(level)}, edits))
    return cells


def grid_spurious_p(args) -> list[Cell]:
    return [
        c
        for regime, p in REGIMES.items()
        if not args.regimes or regime in args.regimes
        for c in _model_cells(("vit", "ivit"), {"data.options.spurious_p": p}, {"regime": regime, "spurious_p": p})
    ]


def grid_seeds(args) -> list[Cell]:
    return [Cell({}, {})]


@dataclasses.dataclass(frozen=True)
class Experiment:
    grid: Callable
    default_arg: str  # the demo config's argument
    title: str
    needs_teacher_oracle: bool = False
    needs_shortcut_digits: bool = False


EXPERIMENTS = {
    "data_ratio": Experiment(grid_data_ratio, "ivit,clean", "Table 2 analogue: accuracy vs training-data ratio"),
    "ablation": Experiment(grid_ablation, "ivit,clean", "Table 3 analogue: ablations of IQ, IC and GC"),
    "teacher_noise": Experiment(
        grid_teacher_noise, "ivit,clean", "I-ViT accuracy vs teacher quality (oracle teacher with noise)", needs_teacher_oracle=True
    ),
    "spurious_p": Experiment(
        grid_spurious_p, "ivit,clean", "ViT vs I-ViT across the spurious-background regimes", needs_shortcut_digits=True
    ),
    "seeds": Experiment(grid_seeds, "ivit,clean", "one config over several seeds"),
}


def cell_config(base_path: str, base_arg: str | None, cell: Cell, budget: dict[str, Any], sets: dict[str, Any]):
    config = load_config_file(base_path, base_arg)
    for k, v in budget.items():
        set_key(config, k, v)
    edits = dict(cell.edits)
    ablation = edits.pop("ablation", None)
    if ablation is not None:
        set_ablation(config, ablation)
    for k, v in edits.items():
        set_key(config, k, v)
    for k, v in sets.items():
        set_key(config, k, v)
    config.seed = int(cell.seed)
    config.name = f"{os.path.splitext(os.path.basename(base_path))[0]}-{config_label(config)}"
    return config


# --------------------------------------------------------------------------- identities


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def config_hash(config) -> str:
    """A hash of everything that changes the trained model (not the name, the teacher store
    path, logging, evaluation or checkpoint intervals)."""
    d = json.loads(config.to_json_best_effort())
    for k in ("name", "log_every", "eval_every", "eval_batch_size", "checkpoint_every", "keep_checkpoints", "async_checkpointing"):
        d.pop(k, None)
    d.get("teacher", {}).pop("store", None)
    d.get("data", {}).pop("num_workers", None)
    return hashlib.sha256(_canonical(d).encode()).hexdigest()[:10]


def config_label(config) -> str:
    """A readable name of what a cell varies: model row, regime, data ratio, teacher noise."""
    m = config.model
    row = next((k for k, v in ABLATIONS.items() if v == (bool(m.interaction_queries), bool(m.interaction_constraint),
                                                          bool(m.gated_control) and bool(m.interaction_queries))), None)
    if row is None:
        row = next((k for k, v in ABLATIONS.items() if v[:2] == (bool(m.interaction_queries), bool(m.interaction_constraint))), "model")
    parts = [row]
    sp = config.data.options.get("spurious_p", None)
    if sp is not None:
        parts.append(f"p{float(sp):g}")
    if float(config.data.data_ratio) != 1.0:
        parts.append(f"r{float(config.data.data_ratio):g}")
    if m.interaction_constraint:
        parts += [f"{k}{float(config.teacher.noise[k]):g}" for k in ("blur", "shift", "uniform") if float(config.teacher.noise[k])]
    parts.append(f"s{int(config.seed)}")
    return "_".join(parts)


def cell_dirname(cell: Cell, config) -> str:
    """Determined by the config alone, so experiments share identical cells."""
    return f"{config_label(config)}-{config_hash(config)}"


def teacher_key(config) -> dict[str, Any]:
    opts = config.data.options.to_dict()
    noise = {k: float(config.teacher.noise[k]) for k in ("blur", "shift", "uniform")}
    return {
        "source": config.data.source,
        "split": config.data.train_split,
        "options": opts,
        "grid": int(config.teacher.grid),
        "noise": noise,
        "seed": int(config.seed) if any(noise.values()) else 0,
    }


def ensure_teacher(config, root: str, log: Callable[[str], None]) -> None:
    """For an oracle-teacher cell with IC on: build (once) and point at the shared store."""
    if not config.model.interaction_constraint or config.teacher.store or config.teacher.auto != "oracle":
        return
    from lfi_jax.train import build_auto_teacher

    key = teacher_key(config)
    path = os.path.join(root, "teachers", hashlib.sha256(_canonical(key).encode()).hexdigest()[:10])
    if not os.path.exists(os.path.join(path, "manifest.json")):
        write_json_atomic(os.path.join(path, "key.json"), key, indent=1, sort_keys=True)
        build_store = config.copy_and_resolve_references()
        build_store.seed = key["seed"]  # noise-free maps do not depend on the seed: one store for all seeds
        build_auto_teacher(build_store, path, log_fn=log)
    config.teacher.store = path
    config.teacher.auto = ""


def metric_keys(config) -> list[str]:
    return [f"{s}/accuracy" for s in config.data.eval_splits]


def finished_metrics(workdir: str, config) -> dict[str, float] | None:
    """The final eval metrics of a finished cell (checkpoint at total_steps), else None."""
    total = int(config.total_steps)
    if not os.path.isfile(os.path.join(workdir, "checkpoints", str(total), "commit_success.txt")) and not os.path.isdir(
        os.path.join(workdir, "checkpoints", str(total), "state")
    ):
        return None
    from lfi_jax.metrics import read_metrics

    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return None
    out = {}
    for row in read_metrics(workdir):
        if row["step"] == total:
            out.update({k: v for k, v in row.items() if k.endswith("/accuracy")})
    return out if all(k in out for k in metric_keys(config)) else None


# --------------------------------------------------------------------------- running


def _log(msg: str) -> None:
    print(f"[experiments] {msg}", file=sys.stderr, flush=True)


def run_cells(cells: list[Cell], configs: list, workdir_root: str) -> list[dict[str, Any]]:
    """Trains every unfinished cell; returns one result dict per cell (same order)."""
    from lfi_jax.metrics import format_eta

    results = []
    t0 = time.time()
    trained = 0
    for i, (cell, config) in enumerate(zip(cells, configs)):
        wd = os.path.join(workdir_root, cell_dirname(cell, config))
        tag = f"cell {i + 1}/{len(cells)} [{cell.describe()}]"
        metrics = finished_metrics(wd, config)
        info_path = os.path.join(wd, "cell.json")
        if metrics is not None:
            wall = None
            if os.path.exists(info_path):
                with open(info_path) as f:
                    wall = json.load(f).get("wall_s")
            _log(f"{tag}: finished earlier in {wd}, " + _fmt_metrics(metrics))
        else:
            ensure_teacher(config, workdir_root, _log)
            _log(f"{tag}: training {config.total_steps} steps in {wd}")
            from lfi_jax.train import train_and_evaluate

            t = time.time()
            final = train_and_evaluate(config, wd)
            wall = time.time() - t
            if final.get("preempted"):
                raise SystemExit(f"{tag}: stopped by SIGTERM at step {final.get('step')}; re-run to resume")
            metrics = {k: float(v) for k, v in final.items() if k.endswith("/accuracy")}
            atomic_write(info_path, json.dumps({"labels": cell.labels, "seed": cell.seed, "wall_s": wall, "metrics": metrics}, indent=1))
            trained += 1
            rest = len(cells) - i - 1
            eta = (time.time() - t0) / trained * rest if rest else 0.0
            _log(f"{tag}: done in {wall:.0f} s, " + _fmt_metrics(metrics) + (f"; at most {rest} cells left, ETA {format_eta(eta)}" if rest else ""))
        results.append({"labels": cell.labels, "seed": cell.seed, "workdir": wd, "metrics": metrics, "wall_s": wall})
    return results


def _fmt_metrics(m: dict[str, float]) -> str:
    return " ".join(f"{k.replace('/accuracy', '')} {v:.4f}" for k, v in sorted(m.items()))


# --------------------------------------------------------------------------- summaries


def summarise(results: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Groups cells by labels (over seeds): mean, std (ddof=1 where n > 1), min, max."""
    groups: dict[str, dict[str, Any]] = {}
    for r in results:
        gk = _canonical(r["labels"])
        g = groups.setdefault(gk, {"labels": r["labels"], "values": {k: [] for k in keys}, "seeds": [], "wall_s": []})
        g["seeds"].append(r["seed"])
        if r["wall_s"] is not None:
            g["wall_s"].append(r["wall_s"])
        for k in keys:
            g["values"][k].append(float(r["metrics"][k]))
    out = []
    for g in groups.values():
        stats = {}
        for k, vals in g["values"].items():
            a = np.asarray(vals, np.float64)
            stats[k] = {
                "mean": float(a.mean()),
                "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                "min": float(a.min()),
                "max": float(a.max()),
                "n": int(len(a)),
                "values": a.tolist(),
            }
        out.append({"labels": g["labels"], "seeds": g["seeds"], "stats": stats, "wall_s": float(sum(g["wall_s"]))})
    return out


def fmt_stat(s: dict[str, Any]) -> str:
    if s["n"] > 1:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
    return f"{100 * s['mean']:.1f}"


def _label(labels: dict[str, Any], key: str) -> str:
    v = labels[key]
    if key == "model":
        return ABLATION_NAMES.get(v, v) if len(labels) == 1 else MODEL_NAMES.get(v, ABLATION_NAMES.get(v, v))
    if key == "data_ratio":
        return f"{100 * v:g} %"
    return str(v)


def markdown_table(name: str, summary: list[dict[str, Any]], keys: list[str]) -> str:
    """One row per grid point: its labels, then each split's top-1 (%) as mean ± std."""
    label_keys = list(summary[0]["labels"]) if summary else []
    head = [k.replace("_", " ") for k in label_keys]
    if name == "ablation":
        head = ["row", "IQ", "IC", "GC"]
    cols = head + [f"{k.replace('/accuracy', '')} top-1 (%)" for k in keys] + ["seeds", "wall (s)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for g in summary:
        if name == "ablation":
            m = g["labels"]["model"]
            iq, ic, gc = ABLATIONS[m]
            lab = [ABLATION_NAMES[m]] + ["✓" if x else "" for x in (iq, ic, gc)]
        else:
            lab = [_label(g["labels"], k) for k in label_keys]
        vals = [fmt_stat(g["stats"][k]) for k in keys]
        lines.append("| " + " | ".join(lab + vals + [str(len(g["seeds"])), f"{g['wall_s']:.0f}"]) + " |")
    if name == "data_ratio":
        lines += ["", pivot_data_ratio(summary, keys)]
    return "\n".join(lines)


def pivot_data_ratio(summary: list[dict[str, Any]], keys: list[str]) -> str:
    """The paper's Table 2 layout: models as rows, ratios as columns, per split."""
    ratios = sorted({g["labels"]["data_ratio"] for g in summary}, reverse=True)
    models = [m for m in ("vit", "ivit") if any(g["labels"]["model"] == m for g in summary)]
    find = {(g["labels"]["model"], g["labels"]["data_ratio"]): g for g in summary}
    out = []
    for k in keys:
        out.append(f"{k.replace('/accuracy', '')} top-1 (%):\n")
        out.append("| model | " + " | ".join(f"{100 * r:g} %" for r in ratios) + " |")
        out.append("|---|" + "---|" * len(ratios))
        for m in models:
            out.append(f"| {MODEL_NAMES[m]} | " + " | ".join(fmt_stat(find[(m, r)]["stats"][k]) if (m, r) in find else "" for r in ratios) + " |")
        if len(models) == 2:
            gains = []
            for r in ratios:
                if ("vit", r) in find and ("ivit", r) in find:
                    gains.append(f"{100 * (find[('ivit', r)]['stats'][k]['mean'] - find[('vit', r)]['stats'][k]['mean']):+.1f}")
                else:
                    gains.append("")
            out.append("| I-ViT − ViT | " + " | ".join(gains) + " |")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- figures


def plot(name: str, summary: list[dict[str, Any]], keys: list[str], path: str, title: str, chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split_style = {k: ls for k, ls in zip(keys, ("-", "--", ":", "-."))}
    colors = {"vit": "tab:blue", "ivit": "tab:red", "iq_gc": "tab:green", "ic_only": "tab:purple", "iq_ic": "tab:orange"}

    def errbar(ax, xs, gs, k, **kw):
        m = [100 * g["stats"][k]["mean"] for g in gs]
        s = [100 * g["stats"][k]["std"] for g in gs]
        ax.errorbar(xs, m, yerr=s if any(s) else None, marker="o", ms=4, capsize=3, **kw)

    if name == "teacher_noise":
        kinds = [k for k in ("blur", "shift", "uniform") if any(g["labels"]["noise"] == k for g in summary)]
        fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(4.2 * max(len(kinds), 1), 3.6), sharey=True, squeeze=False)
        base = next((g for g in summary if g["labels"]["model"] == "ivit" and g["labels"]["noise"] == "none"), None)
        vit = next((g for g in summary if g["labels"]["model"] == "vit"), None)
        for ax, kind in zip(axes[0], kinds):
            gs = sorted([g for g in summary if g["labels"]["noise"] == kind], key=lambda g: g["labels"]["level"])
            if base is not None:
                gs = [base] + gs
            xs = [g["labels"]["level"] for g in gs]
            for k in keys:
                errbar(ax, xs, gs, k, color="tab:red", ls=split_style[k], label=f"I-ViT {k.split('/')[0]}")
                if vit is not None:
                    ax.axhline(100 * vit["stats"][k]["mean"], color="tab:blue", ls=split_style[k], lw=1, label=f"ViT {k.split('/')[0]}")
            ax.set_xlabel(f"teacher {kind} ({'mixing weight' if kind == 'uniform' else 'cells'})")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("top-1 accuracy (%)")
        axes[0][-1].legend(fontsize=7)
    elif name in ("data_ratio", "spurious_p"):
        xkey = "data_ratio" if name == "data_ratio" else "spurious_p"
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in ("vit", "ivit"):
            gs = sorted([g for g in summary if g["labels"]["model"] == m], key=lambda g: g["labels"][xkey])
            if not gs:
                continue
            xs = [100 * g["labels"][xkey] if name == "data_ratio" else g["labels"][xkey] for g in gs]
            for k in keys:
                errbar(ax, xs, gs, k, color=colors[m], ls=split_style[k], label=f"{MODEL_NAMES[m]} {k.split('/')[0]}")
        if name == "data_ratio":
            ax.set_xscale("log")
            ticks = sorted({100 * g["labels"]["data_ratio"] for g in summary})
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g} %" for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("training data")
        else:
            ax.set_xlabel("spurious_p (background = label probability)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:  # ablation, seeds: grouped bars
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(summary) + 2), 4))
        if name == "ablation":
            names = [ABLATION_NAMES[g["labels"]["model"]].replace(" (", "\n(") for g in summary]
        else:
            names = [", ".join(f"{v}" for v in g["labels"].values()) or "config" for g in summary]
        width = 0.8 / max(len(keys), 1)
        x = np.arange(len(summary))
        for j, k in enumerate(keys):
            m = [100 * g["stats"][k]["mean"] for g in summary]
            s = [100 * g["stats"][k]["std"] for g in summary]
            ax.bar(x + (j - (len(keys) - 1) / 2) * width, m, width, yerr=s if any(s) else None, capsize=3, label=k.split("/")[0])
            for xi, g in zip(x, summary):
                vals = [100 * v for v in g["stats"][k]["values"]]
                ax.plot([xi + (j - (len(keys) - 1) / 2) * width] * len(vals), vals, "k.", ms=3)
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    if chance:
        for ax in fig.axes:
            ax.axhline(100 * chance, color="gray", lw=0.8, ls=":", zorder=0)
        fig.axes[0].annotate("chance", (0.01, 100 * chance), xycoords=("axes fraction", "data"), fontsize=7, color="gray",
                             va="bottom")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------- entry point


def run_experiment(
    name: str,
    *,
    config: str | None = None,
    budget: str = "full",
    seeds: int = 1,
    workdir: str = DEFAULT_WORKDIR,
    out: str = DEFAULT_OUT,
    sets: dict[str, Any] | None = None,
    ratios: tuple[float, ...] | None = None,
    noise: tuple[tuple[str, float], ...] | None = None,
    regimes: tuple[str, ...] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Runs (or completes) experiment `name`; writes OUT/NAME.{md,png,json}; returns the payload."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {sorted(EXPERIMENTS)}")
    if seeds < 1:
        raise ValueError(f"--seeds={seeds} must be >= 1")
    exp = EXPERIMENTS[name]
    if config:
        base_path, base_arg = parse_config_spec(config)
    else:
        if name == "seeds":
            raise ValueError("the seeds experiment needs --config FILE[:ARG]")
        base_path, base_arg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"), exp.default_arg
    demo = is_demo(base_path)
    sets = dict(sets or {})
    probe = load_config_file(base_path, base_arg)
    if exp.needs_shortcut_digits and probe.data.source != "shortcut_digits":
        raise ValueError(f"experiment {name} sweeps data.options.spurious_p and needs data.source=shortcut_digits, not {probe.data.source!r}")
    if exp.needs_teacher_oracle and not (probe.teacher.auto == "oracle" or "teacher.auto" in sets):
        raise ValueError(f"experiment {name} varies the oracle teacher's noise: the config needs teacher.auto='oracle'")
    budget_edits = budget_overrides(probe, budget, demo)
    for kind, level in noise or ():
        if kind not in ("blur", "shift", "uniform") or not level > 0:
            raise ValueError(f"noise level {kind}={level}: expected blur|shift|uniform with a level > 0")
    for r in regimes or ():
        if r not in REGIMES:
            raise ValueError(f"regime {r!r}: expected one of {sorted(REGIMES)}")
    args = argparse.Namespace(ratios=ratios, noise=noise, regimes=regimes)
    cells = [dataclasses.replace(c, seed=s) for c in exp.grid(args) for s in range(seeds)]
    configs = [cell_config(base_path, base_arg, c, budget_edits, sets) for c in cells]
    keys = metric_keys(configs[0])
    _log(f"{name}: {len(cells)} cells ({len(cells) // seeds} grid points x {seeds} seed(s)), budget {budget}, workdirs under {workdir}")
    t0 = time.time()
    results = run_cells(cells, configs, workdir)
    elapsed = time.time() - t0
    summary = summarise(results, keys)
    cell_wall = sum(r["wall_s"] or 0.0 for r in results)
    c0 = configs[0]
    budget_text = (
        f"budget `{budget}`: {c0.total_steps} steps x batch {c0.batch_size} per cell, "
        f"model D={c0.model.hidden_size} depth {c0.model.depth} heads {c0.model.num_heads} patch {c0.model.patch_size} "
        f"at {c0.data.image_size} px, {seeds} seed(s); eval splits {', '.join(c0.data.eval_splits)}"
    )
    table = markdown_table(name, summary, keys)
    title = f"{exp.title} (base config {os.path.basename(base_path)}{':' + base_arg if base_arg else ''})"
    md = "\n".join(
        [
            f"# {title}",
            "",
            f"Command: `{command or 'python -m lfi_jax.experiments ' + name}`",
            "",
            f"{budget_text}. Training wall time summed over cells: {cell_wall:.0f} s "
            f"(this invocation: {elapsed:.0f} s).",
            "",
            "Top-1 accuracy in %, mean ± sample std over seeds (a single number: one seed).",
            "",
            table,
            "",
        ]
    )
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, f"{name}.md"), md)
    plot(name, summary, keys, os.path.join(out, f"{name}.png"), title, chance=1.0 / max(int(c0.model.num_classes), 1))
    payload = {
        "experiment": name,
        "config": f"{base_path}{':' + base_arg if base_arg else ''}",
        "budget": budget,
        "budget_overrides": budget_edits,
        "sets": {k: v for k, v in sets.items()},
        "seeds": seeds,
        "command": command,
        "cells": results,
        "summary": summary,
        "cell_wall_s": cell_wall,
        "elapsed_s": elapsed,
    }
    atomic_write(os.path.join(out, f"{name}.json"), json.dumps(payload, indent=1, default=str))
    print(md)
    _log(f"wrote {os.path.join(out, name)}.md, .png and .json")
    return payload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(EXPERIMENTS), help="the experiment")
    p.add_argument("--config", default=None, help="base config FILE[:ARG] (default configs/demo.py, clean regime)")
    p.add_argument("--budget", default="full", choices=sorted(DEMO_BUDGETS), help="full (default: the config as written) or small")
    p.add_argument("--seeds", type=int, default=1, help="seeds per grid point (0..N-1)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"root of the cells' workdirs (default {DEFAULT_WORKDIR})")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"where the table, figure and JSON go (default {DEFAULT_OUT})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every cell (repeatable)")
    p.add_argument("--ratios", default=None, help="data_ratio only: comma-separated ratios (default 1,0.5,0.1,0.01)")
    p.add_argument("--noise", nargs="+", default=None, metavar="KIND=L1[,L2]",
                   help="teacher_noise only: the noise levels (default blur=1,2,4 shift=1,2 uniform=0.5,0.9)")
    p.add_argument("--regimes", default=None, help="spurious_p only: comma-separated regimes (default clean,shortcut,hard)")
    return p


def main(argv=None) -> int:
    from lfi_jax.metrics import setup_logging

    args = build_parser().parse_args(argv)
    sets = {}
    for item in args.set:
        if "=" not in item:
            print(f"--set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        k, v = item.split("=", 1)
        sets[k.strip()] = v
    ratios = tuple(float(r) for r in args.ratios.split(",")) if args.ratios else None
    noise = None
    if args.noise:
        noise = []
        for item in args.noise:
            kind, sep, levels = item.partition("=")
            if not sep:
                print(f"--noise {item!r}: expected KIND=L1[,L2]", file=sys.stderr)
                return 2
            noise += [(kind, float(v)) for v in levels.split(",") if v]
        noise = tuple(noise)
    regimes = tuple(args.regimes.split(",")) if args.regimes else None
    setup_logging()
    command = "python -m lfi_jax.experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        run_experiment(
            args.name,
            config=args.config,
            budget=args.budget,
            seeds=args.seeds,
            workdir=args.workdir,
            out=args.out,
            sets=sets,
            ratios=ratios,
            noise=noise,
            regimes=regimes,
            command=command,
        )
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        print(f"experiments: error: {e}", file=sys.stderr)
        return 1
    return 0


def _enable_compilation_cache(argv) -> None:
    """Cells of one architecture compile the same programs: cache them across cells and runs
    (WORKDIR/jax_cache). Only for the command line; a library caller keeps its own settings."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        known, _ = build_parser().parse_known_args(argv)
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(known.workdir, "jax_cache")))


if __name__ == "__main__":
    try:
        _enable_compilation_cache(sys.argv[1:])
    except SystemExit:
        pass  # argparse reports the error again in main()
    sys.exit(main())
