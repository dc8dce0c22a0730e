"""Table 3 analogue: the five rows vit, iq_gc, ic_only, iq_ic, ivit (`config.ABLATIONS`)."""

from __future__ import annotations

from lfi_jax.config import ABLATIONS
from lfi_jax.experiments.base import ABLATION_NAMES, Cell, Experiment, GridOptions, Group
from lfi_jax.experiments.plots import grouped_bars
from lfi_jax.experiments.tables import grid_table


def grid(opts: GridOptions):
    return [Cell({"model": m}, {"ablation": m}) for m in ABLATIONS]


def _row(g: Group) -> list[str]:
    m = g.labels["model"]
    return [ABLATION_NAMES[m]] + ["✓" if x else "" for x in ABLATIONS[m]]


def table(summary: list[Group], keys: list[str]) -> str:
    return grid_table(summary, keys, head=["row", "IQ", "IC", "GC"], labels=_row)


def plot(summary: list[Group], keys: list[str]):
    return grouped_bars(summary, keys, [ABLATION_NAMES[g.labels["model"]].replace(" (", "\n(") for g in summary])


EXPERIMENT = Experiment("ablation", "Table 3 analogue: ablations of IQ, IC and GC", grid, table, plot)
