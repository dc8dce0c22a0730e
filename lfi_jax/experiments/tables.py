"""Table pieces shared by the experiments: mean ± std cells and one row per grid point."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lfi_jax.experiments.base import ABLATION_NAMES, MODEL_NAMES, Group


def fmt_stat(s: dict[str, Any]) -> str:
    """Top-1 in %: "mean ± std" over seeds, or the single value."""
    if s["n"] > 1:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
    return f"{100 * s['mean']:.1f}"


def label_text(labels: dict[str, Any], key: str) -> str:
    v = labels[key]
    if key == "model":
        return ABLATION_NAMES.get(v, v) if len(labels) == 1 else MODEL_NAMES.get(v, ABLATION_NAMES.get(v, v))
    if key == "data_ratio":
        return f"{100 * v:g} %"
    return str(v)


def split_name(key: str) -> str:
    return key.replace("/accuracy", "")


def grid_table(
    summary: list[Group],
    keys: list[str],
    *,
    head: Sequence[str] | None = None,
    labels: Callable[[Group], list[str]] | None = None,
) -> str:
    """One row per grid point: its label columns (default: its labels), each split's top-1 (%)
    as mean ± std, the seed count and the summed wall time."""
    label_keys = list(summary[0].labels) if summary else []
    head = list(head) if head is not None else [k.replace("_", " ") for k in label_keys]
    labels = labels or (lambda g: [label_text(g.labels, k) for k in label_keys])
    cols = head + [f"{split_name(k)} top-1 (%)" for k in keys] + ["seeds", "wall (s)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for g in summary:
        vals = [fmt_stat(g.stats[k]) for k in keys]
        lines.append("| " + " | ".join(labels(g) + vals + [str(len(g.seeds)), f"{g.wall_s:.0f}"]) + " |")
    return "\n".join(lines)
