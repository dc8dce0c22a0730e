"""The experiment runner's types: a cell (one training run), its result, a group of cells over
seeds, and an `Experiment`, which carries its own grid, table and plot functions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

ABLATION_NAMES = {
    "vit": "ViT",
    "iq_gc": "IQ + GC (no teacher)",
    "ic_only": "IC on the original queries",
    "iq_ic": "IQ + IC (no gate)",
    "ivit": "I-ViT (IQ + IC + GC)",
}
MODEL_NAMES = {"vit": "ViT", "ivit": "I-ViT"}


@dataclasses.dataclass
class Cell:
    """One training run: labels (for the table) and the config edits that define it."""

    labels: dict[str, Any]
    edits: dict[str, Any]  # dotted key -> value; "ablation" -> a Table 3 row name
    seed: int = 0

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels.items()) + f" seed={self.seed}"


@dataclasses.dataclass
class CellResult:
    """A finished cell: its eval accuracies (`metrics`), every final scalar the trainer
    reported (`final`: losses, counts, step), and its training wall time (None if unknown)."""

    labels: dict[str, Any]
    seed: int
    workdir: str
    metrics: dict[str, float]
    wall_s: float | None
    final: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "seed": self.seed,
            "workdir": self.workdir,
            "metrics": self.metrics,
            "wall_s": self.wall_s,
        }


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (ddof=1 where n > 1, else 0), min, max, n and the values."""
    a = np.asarray(values, np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(len(a)),
        "values": a.tolist(),
    }


@dataclasses.dataclass
class Group:
    """The cells of one grid point over seeds: `stats[key]` per metric key, summed wall time."""

    labels: dict[str, Any]
    seeds: list[int]
    stats: dict[str, dict[str, Any]]
    wall_s: float
    results: list[CellResult]

    def to_json(self) -> dict[str, Any]:
        return {"labels": self.labels, "seeds": self.seeds, "stats": self.stats, "wall_s": self.wall_s}


class GridOptions(NamedTuple):
    """Command-line choices a grid may read (None: the experiment's default)."""

    ratios: tuple[float, ...] | None = None
    noise: tuple[tuple[str, float], ...] | None = None
    regimes: tuple[str, ...] | None = None
    rrr_weights: tuple[float, ...] | None = None


def no_requirements(config, sets: dict[str, Any]) -> None:
    """The default `Experiment.check`: any base config will do."""


def expand_seeds(cells: Sequence[Cell], seeds: int) -> list[Cell]:
    """Every cell for seeds 0..seeds-1, grid point by grid point."""
    return [dataclasses.replace(c, seed=s) for c in cells for s in range(seeds)]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment: its grid, its table and its figure.

    grid(options) -> the cells of one seed; table(summary, keys) -> Markdown; plot(summary,
    keys) -> a matplotlib figure (the runner adds the title and the chance line and saves it);
    check(base_config, sets) raises ValueError when the base config cannot run it.
    `default_arg` is the argument of configs/demo.py it runs on by default (None: the
    experiment needs --config).
    """

    name: str
    title: str
    grid: Callable[[GridOptions], list[Cell]]
    table: Callable[[list[Group], list[str]], str]
    plot: Callable[[list[Group], list[str]], Any]
    default_arg: str | None = "ivit,clean"
    check: Callable[[Any, dict[str, Any]], None] = no_requirements
    seeds: Callable[[Sequence[Cell], int], list[Cell]] = expand_seeds


def model_cells(models: Sequence[str], extra: dict[str, Any], labels: dict[str, Any]) -> list[Cell]:
    """One cell per Table 3 row in `models`, each with the config edits `extra`."""
    return [Cell({"model": m, **labels}, {"ablation": m, **extra}) for m in models]
