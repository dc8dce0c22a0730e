"""Any config (--config) over N seeds: its mean and spread."""

from __future__ import annotations

from lfi_jax.experiments.base import Cell, Experiment, GridOptions, Group
from lfi_jax.experiments.plots import grouped_bars
from lfi_jax.experiments.tables import grid_table


def grid(opts: GridOptions):
    return [Cell({}, {})]


def table(summary: list[Group], keys: list[str]) -> str:
    return grid_table(summary, keys)


def plot(summary: list[Group], keys: list[str]):
    return grouped_bars(summary, keys, [", ".join(f"{v}" for v in g.labels.values()) or "config" for g in summary])


EXPERIMENT = Experiment("seeds", "one config over several seeds", grid, table, plot, default_arg=None)
