"""Table 2 analogue: ViT vs I-ViT at 100 / 50 / 10 / 1 % of the training data
(`config.data.data_ratio`, a class-stratified nested subset)."""

from __future__ import annotations

from lfi_jax.experiments.base import MODEL_NAMES, Experiment, GridOptions, Group, model_cells
from lfi_jax.experiments.plots import lines_by_model
from lfi_jax.experiments.tables import fmt_stat, grid_table, split_name

RATIOS = (1.0, 0.5, 0.1, 0.01)


def grid(opts: GridOptions):
    ratios = opts.ratios or RATIOS
    return [
        c for r in ratios for c in model_cells(("vit", "ivit"), {"data.data_ratio": float(r)}, {"data_ratio": float(r)})
    ]


def pivot(summary: list[Group], keys: list[str]) -> str:
    """The paper's Table 2 layout: models as rows, ratios as columns, per split."""
    ratios = sorted({g.labels["data_ratio"] for g in summary}, reverse=True)
    models = [m for m in ("vit", "ivit") if any(g.labels["model"] == m for g in summary)]
    find = {(g.labels["model"], g.labels["data_ratio"]): g for g in summary}
    out = []
    for k in keys:
        out.append(f"{split_name(k)} top-1 (%):\n")
        out.append("| model | " + " | ".join(f"{100 * r:g} %" for r in ratios) + " |")
        out.append("|---|" + "---|" * len(ratios))
        for m in models:
            cells = [fmt_stat(find[(m, r)].stats[k]) if (m, r) in find else "" for r in ratios]
            out.append(f"| {MODEL_NAMES[m]} | " + " | ".join(cells) + " |")
        if len(models) == 2:
            gains = []
            for r in ratios:
                if ("vit", r) in find and ("ivit", r) in find:
                    gains.append(
                        f"{100 * (find[('ivit', r)].stats[k]['mean'] - find[('vit', r)].stats[k]['mean']):+.1f}"
                    )
                else:
                    gains.append("")
            out.append("| I-ViT − ViT | " + " | ".join(gains) + " |")
        out.append("")
    return "\n".join(out)


def table(summary: list[Group], keys: list[str]) -> str:
    return grid_table(summary, keys) + "\n\n" + pivot(summary, keys)


def plot(summary: list[Group], keys: list[str]):
    fig, ax = lines_by_model(summary, keys, "data_ratio", x=lambda r: 100 * r)
    ax.set_xscale("log")
    ticks = sorted({100 * g.labels["data_ratio"] for g in summary})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g} %" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training data")
    return fig


EXPERIMENT = Experiment("data_ratio", "Table 2 analogue: accuracy vs training-data ratio", grid, table, plot)
