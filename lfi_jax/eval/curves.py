"""Accuracy-against-step curves of a run (its metrics.jsonl) and the first step at which a
curve reaches a target: the convergence numbers of the main job, the experiments and Fig. 3."""

from __future__ import annotations

from collections.abc import Sequence

from lfi_jax.metrics import read_metrics

# A curve "reaches" a target it is within this of (accuracies are ratios of counts, computed
# in float64 on both sides; the tolerance only absorbs their rounding).
REACH_TOL = 1e-9


def curve_from_rows(rows: Sequence[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in metrics rows, by step; a step logged twice (a resumed
    run) keeps its last value."""
    by_step: dict[int, float] = {}
    for r in rows:
        if metric in r:
            by_step[int(r["step"])] = float(r[metric])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def load_curve(workdir: str, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in WORKDIR/metrics.jsonl; an error naming the file when it has none."""
    steps, values = curve_from_rows(read_metrics(workdir), metric)
    if not steps:
        raise ValueError(f"{workdir}/metrics.jsonl has no {metric!r} values")
    return steps, values


def first_step_reaching(
    steps: Sequence[int], values: Sequence[float], target: float, tol: float = REACH_TOL
) -> int | None:
    """The first step whose value is >= target (within `tol`), or None."""
    for s, v in zip(steps, values):
        if v >= target - tol:
            return int(s)
    return None
