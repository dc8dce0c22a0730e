"""Figure pieces shared by the experiments: error bars over seeds, accuracy against a swept
value (one line per model and split), grouped bars; colours and labels from lfi_jax.eval.figures."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lfi_jax.eval.figures import SPLIT_STYLES, mark_chance, model_color, model_label, pyplot
from lfi_jax.experiments.base import Group


def split_styles(keys: Sequence[str]) -> dict[str, str]:
    return dict(zip(keys, SPLIT_STYLES))


def errbar(ax, xs, groups: Sequence[Group], key: str, **kw) -> None:
    """Mean top-1 (%) of each group at xs, with the sample std as error bars where nonzero."""
    m = [100 * g.stats[key]["mean"] for g in groups]
    s = [100 * g.stats[key]["std"] for g in groups]
    ax.errorbar(xs, m, yerr=s if any(s) else None, marker="o", ms=4, capsize=3, **kw)


def lines_by_model(
    summary: list[Group],
    keys: list[str],
    xkey: str,
    *,
    x: Callable[[float], float] = float,
    models: Sequence[str] = ("vit", "ivit"),
):
    """Top-1 (%) against labels[xkey], one line per model and eval split."""
    plt = pyplot()
    styles = split_styles(keys)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        gs = sorted([g for g in summary if g.labels["model"] == m], key=lambda g: g.labels[xkey])
        if not gs:
            continue
        xs = [x(g.labels[xkey]) for g in gs]
        for k in keys:
            errbar(ax, xs, gs, k, color=model_color(m), ls=styles[k], label=f"{model_label(m)} {k.split('/')[0]}")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, ax


def grouped_bars(summary: list[Group], keys: list[str], names: Sequence[str]):
    """One group of bars per grid point (one bar per eval split, each seed as a dot)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(summary) + 2), 4))
    width = 0.8 / max(len(keys), 1)
    x = np.arange(len(summary))
    for j, k in enumerate(keys):
        off = (j - (len(keys) - 1) / 2) * width
        m = [100 * g.stats[k]["mean"] for g in summary]
        s = [100 * g.stats[k]["std"] for g in summary]
        ax.bar(x + off, m, width, yerr=s if any(s) else None, capsize=3, label=k.split("/")[0])
        for xi, g in zip(x, summary):
            vals = [100 * v for v in g.stats[k]["values"]]
            ax.plot([xi + off] * len(vals), vals, "k.", ms=3)
    ax.set_xticks(x)
    ax.set_xticklabels(list(names), fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig


def finish(fig, title: str, chance: float | None) -> None:
    """The chance line (in %) on every panel, the title, a tight layout."""
    if chance:
        for ax in fig.axes:
            mark_chance(ax, 100 * chance)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
