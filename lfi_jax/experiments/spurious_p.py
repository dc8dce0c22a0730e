"""ViT vs I-ViT in the clean / shortcut / hard regimes (SPEC section 4)."""

from __future__ import annotations

from lfi_jax.data.shortcut_digits import SPURIOUS_PRESETS as REGIMES
from lfi_jax.experiments.base import Experiment, GridOptions, Group, model_cells
from lfi_jax.experiments.plots import lines_by_model
from lfi_jax.experiments.tables import grid_table


def grid(opts: GridOptions):
    return [
        c
        for regime, p in REGIMES.items()
        if not opts.regimes or regime in opts.regimes
        for c in model_cells(("vit", "ivit"), {"data.options.spurious_p": p}, {"regime": regime, "spurious_p": p})
    ]


def check(config, sets) -> None:
    if config.data.source != "shortcut_digits":
        raise ValueError(
            f"experiment spurious_p sweeps data.options.spurious_p and needs data.source=shortcut_digits, "
            f"not {config.data.source!r}"
        )


def check_regimes(regimes) -> None:
    for r in regimes or ():
        if r not in REGIMES:
            raise ValueError(f"regime {r!r}: expected one of {sorted(REGIMES)}")


def table(summary: list[Group], keys: list[str]) -> str:
    return grid_table(summary, keys)


def plot(summary: list[Group], keys: list[str]):
    fig, ax = lines_by_model(summary, keys, "spurious_p")
    ax.set_xlabel("spurious_p (background = label probability)")
    return fig


EXPERIMENT = Experiment(
    "spurious_p", "ViT vs I-ViT across the spurious-background regimes", grid, table, plot, check=check
)
