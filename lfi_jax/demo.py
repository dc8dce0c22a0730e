"""The main job: ViT vs I-ViT on the embedded "shortcut digits" benchmark (SPEC section 4).

    python -m lfi_jax.demo --workdir=runs/demo [--seeds=3] [--regime=shortcut]

Builds the oracle teacher store once, trains each model with `configs/demo.py`, then prints
a table of test_iid / test_shifted top-1 per model and the step at which each model first
reached the ViT's final test_iid accuracy, and writes WORKDIR/results.json and
WORKDIR/convergence.png. Finished runs are not redone: re-running only fills what is missing.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from lfi_jax.config import load_config_file, set_key
from lfi_jax.fileio import save_figure, write_json_atomic
from lfi_jax.metrics import read_metrics, setup_logging

MODELS = ("vit", "ivit")


def run_one(model: str, regime: str, seed: int, workdir: str, teacher_dir: str, overrides: dict) -> dict:
    from lfi_jax.train import train_and_evaluate

    config = load_config_file("demo", f"{model},{regime}")
    config.seed = seed
    config.data.options.seed = seed
    if config.model.interaction_constraint:
        config.teacher.store = teacher_dir
        config.teacher.auto = ""
    for key, value in overrides.items():
        set_key(config, key, value)
    run_dir = os.path.join(workdir, f"{model}_{regime}_seed{seed}")
    t0 = time.time()
    result = train_and_evaluate(config, run_dir)
    result["wall_s"] = time.time() - t0
    result["workdir"] = run_dir
    return result


def build_teacher(regime: str, seed: int, teacher_dir: str, overrides: dict) -> None:
    """The oracle store of one seed's training split, shared by every model of that seed."""
    from lfi_jax.train import build_auto_teacher

    config = load_config_file("demo", f"ivit,{regime}")
    config.seed = seed
    config.data.options.seed = seed
    for key, value in overrides.items():
        if key.startswith("data.") or key.startswith("teacher."):
            set_key(config, key, value)
    build_auto_teacher(config, teacher_dir, log_fn=lambda msg: print(msg, file=sys.stderr, flush=True))


def first_step_reaching(rows: list[dict], key: str, target: float) -> int | None:
    for r in rows:
        if key in r and r[key] >= target - 1e-9:
            return int(r["step"])
    return None


def curves(run_dir: str, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in read_metrics(run_dir) if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def summarise(results: dict[str, list[dict]]) -> dict:
    """Mean and sample std per model, plus the convergence step vs the ViT's final test_iid accuracy."""
    out = {}
    vit_final = {r["seed"]: r["test_iid/accuracy"] for r in results.get("vit", [])}
    for model, runs in results.items():
        entry = {}
        for key in ("test_iid/accuracy", "test_shifted/accuracy", "wall_s"):
            vals = np.array([r[key] for r in runs], np.float64)
            std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0  # sample std, as in the experiment tables
            entry[key] = {"mean": float(vals.mean()), "std": std, "values": vals.tolist()}
        steps = []
        for r in runs:
            target = vit_final.get(r["seed"])
            rows = read_metrics(r["workdir"])
            steps.append(first_step_reaching(rows, "test_iid/accuracy", target) if target is not None else None)
        entry["steps_to_vit_final_iid"] = steps
        out[model] = entry
    return out


def format_table(summary: dict) -> str:
    lines = [
        "| model | test_iid top-1 | test_shifted top-1 | steps to ViT's final test_iid | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for model, e in summary.items():
        def ms(k):
            m, s = e[k]["mean"], e[k]["std"]
            return f"{m:.3f} ± {s:.3f}" if len(e[k]["values"]) > 1 else f"{m:.3f}"

        steps = ", ".join("never" if s is None else str(s) for s in e["steps_to_vit_final_iid"])
        lines.append(f"| {model} | {ms('test_iid/accuracy')} | {ms('test_shifted/accuracy')} | {steps} | {e['wall_s']['mean']:.0f} |")
    return "\n".join(lines)


LABELS = {"vit": "ViT", "ivit": "I-ViT", "iq_gc": "IQ+GC", "ic_only": "IC only", "iq_ic": "IQ+IC"}
COLORS = {"vit": "tab:blue", "ivit": "tab:red", "iq_gc": "tab:green", "ic_only": "tab:orange", "iq_ic": "tab:purple"}


def plot(results: dict[str, list[dict]], path: str, title: str, spurious_p: float, num_classes: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    chance = 1.0 / num_classes
    for ax, split in zip(axes, ("test_iid", "test_shifted")):
        for model, runs in results.items():
            for i, r in enumerate(runs):
                steps, acc = curves(r["workdir"], f"{split}/accuracy")
                ax.plot(steps, acc, "-o", ms=3, color=COLORS.get(model), alpha=0.8,
                        label=LABELS.get(model, model) if i == 0 else None)
        ax.axhline(chance, color="gray", ls=":", lw=1)
        ax.text(0.01, chance, "chance", transform=ax.get_yaxis_transform(), ha="left", va="top", fontsize=8, color="gray")
        if split == "test_iid" and spurious_p > 0:
            # What a model that reads only the background scores on test_iid.
            bg = spurious_p + (1 - spurious_p) * chance
            ax.axhline(bg, color="gray", ls="--", lw=1)
            ax.text(0.99, bg, "background only", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=8, color="gray")
        ax.set_title(split)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv=None):
    from absl import app, flags

    flags.DEFINE_string("workdir", "runs/demo", "Output directory.")
    flags.DEFINE_integer("seeds", 1, "Number of seeds (0..seeds-1).")
    flags.DEFINE_enum("regime", "shortcut", ["clean", "shortcut", "hard"], "spurious_p regime (SPEC section 4).")
    flags.DEFINE_list("models", list(MODELS), "Models to train (rows of Table 3: vit, ivit, iq_gc, ic_only, iq_ic).")
    flags.DEFINE_multi_string("set", [], "Config override for every run, e.g. --set total_steps=200.")
    FLAGS = flags.FLAGS

    def _main(argv):
        setup_logging()
        overrides = dict(s.split("=", 1) for s in FLAGS.set)
        os.makedirs(FLAGS.workdir, exist_ok=True)
        results: dict[str, list[dict]] = {m: [] for m in FLAGS.models}
        t0 = time.time()
        for seed in range(FLAGS.seeds):
            teacher_dir = os.path.join(FLAGS.workdir, f"teacher_{FLAGS.regime}_seed{seed}")
            if any(load_config_file("demo", m).model.interaction_constraint for m in FLAGS.models):
                build_teacher(FLAGS.regime, seed, teacher_dir, overrides)
            for model in FLAGS.models:
                print(f"== {model} (regime {FLAGS.regime}, seed {seed})", file=sys.stderr, flush=True)
                r = run_one(model, FLAGS.regime, seed, FLAGS.workdir, teacher_dir, overrides)
                r["seed"] = seed
                results[model].append(r)
        summary = summarise(results)
        title = f"shortcut digits, regime {FLAGS.regime}, {FLAGS.seeds} seed(s)"
        from lfi_jax.data.shortcut_digits import SPURIOUS_PRESETS

        plot(results, os.path.join(FLAGS.workdir, "convergence.png"), title, SPURIOUS_PRESETS[FLAGS.regime])
        payload = {"regime": FLAGS.regime, "seeds": FLAGS.seeds, "summary": summary,
                   "runs": {m: [{k: v for k, v in r.items() if isinstance(v, (int, float, str, bool))} for r in rs]
                            for m, rs in results.items()},
                   "wall_s": time.time() - t0}
        write_json_atomic(os.path.join(FLAGS.workdir, "results.json"), payload, indent=2)
        print(f"\n{title} (total {time.time() - t0:.0f} s)\n")
        print(format_table(summary))
        print(f"\nwrote {FLAGS.workdir}/results.json and {FLAGS.workdir}/convergence.png")

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
