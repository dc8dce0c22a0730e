"""I-ViT's accuracy against the quality of its teacher: the oracle degraded by blur / shift /
uniform mixing (`config.teacher.noise`), with ViT as reference."""

from __future__ import annotations

from lfi_jax.data.shortcut_digits import SPURIOUS_PRESETS as REGIMES
from lfi_jax.eval.figures import model_color, pyplot
from lfi_jax.experiments.base import Cell, Experiment, GridOptions, Group
from lfi_jax.experiments.plots import errbar, split_styles
from lfi_jax.experiments.tables import grid_table

NOISE_KINDS = ("blur", "shift", "uniform")
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


def grid(opts: GridOptions):
    """The curve in the base config's regime, or in the one regime `opts.regimes` names (e.g.
    `--regimes shortcut`: the cells then set data.options.spurious_p and carry a regime label)."""
    regime: dict = {}
    edits0: dict = {}
    if opts.regimes:
        if len(opts.regimes) != 1:
            raise ValueError(f"teacher_noise takes one regime, got --regimes {','.join(opts.regimes)}")
        (name,) = opts.regimes
        regime, edits0 = {"regime": name}, {"data.options.spurious_p": REGIMES[name]}
    cells = [Cell({**regime, "model": "vit", "noise": "none", "level": 0.0}, {"ablation": "vit", **edits0})]
    levels = [("none", 0.0)] + list(opts.noise) if opts.noise else NOISE_LEVELS
    for kind, level in levels:
        edits = {"ablation": "ivit", **edits0, **{f"teacher.noise.{k}": 0.0 for k in NOISE_KINDS}}
        if kind != "none":
            edits[f"teacher.noise.{kind}"] = float(level)
        cells.append(Cell({**regime, "model": "ivit", "noise": kind, "level": float(level)}, edits))
    return cells


def check(config, sets) -> None:
    if not (config.teacher.auto == "oracle" or "teacher.auto" in sets):
        raise ValueError(
            "experiment teacher_noise varies the oracle teacher's noise: the config needs teacher.auto='oracle'"
        )


def check_levels(noise) -> None:
    for kind, level in noise or ():
        if kind not in NOISE_KINDS or not level > 0:
            raise ValueError(f"noise level {kind}={level}: expected blur|shift|uniform with a level > 0")


def table(summary: list[Group], keys: list[str]) -> str:
    return grid_table(summary, keys)


def plot(summary: list[Group], keys: list[str]):
    plt = pyplot()
    styles = split_styles(keys)
    kinds = [k for k in NOISE_KINDS if any(g.labels["noise"] == k for g in summary)]
    fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(4.2 * max(len(kinds), 1), 3.6), sharey=True, squeeze=False)
    base = next((g for g in summary if g.labels["model"] == "ivit" and g.labels["noise"] == "none"), None)
    vit = next((g for g in summary if g.labels["model"] == "vit"), None)
    for ax, kind in zip(axes[0], kinds):
        gs = sorted([g for g in summary if g.labels["noise"] == kind], key=lambda g: g.labels["level"])
        if base is not None:
            gs = [base] + gs
        xs = [g.labels["level"] for g in gs]
        for k in keys:
            errbar(ax, xs, gs, k, color=model_color("ivit"), ls=styles[k], label=f"I-ViT {k.split('/')[0]}")
            if vit is not None:
                ax.axhline(
                    100 * vit.stats[k]["mean"],
                    color=model_color("vit"),
                    ls=styles[k],
                    lw=1,
                    label=f"ViT {k.split('/')[0]}",
                )
        ax.set_xlabel(f"teacher {kind} ({'mixing weight' if kind == 'uniform' else 'cells'})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    return fig


EXPERIMENT = Experiment(
    "teacher_noise", "I-ViT accuracy vs teacher quality (oracle teacher with noise)", grid, table, plot, check=check
)
