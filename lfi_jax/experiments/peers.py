"""The peers on the same benchmark, beside ViT and I-ViT, in the shortcut and hard regimes:

  rrr                  "right for the right reasons" (Ross et al., 2017): the plain ViT with a
                       penalty on the input gradients of its summed log-probabilities outside
                       the teacher's mask (the same oracle maps, upsampled from the student grid
                       to pixels; `loss.rrr_weight`, one row per weight of `RRR_WEIGHTS`).
  attention_transfer   the attention-transfer family: the ordinary ViT's CLS attention
                       supervised by the teacher (Table 3's ablation row `ic_only`, "IC on the
                       original queries").

The plain ViT reads the teacher maps only with `model.interaction_constraint` on, so an RRR row
is the `ic_only` architecture with `loss.align_weight = 0` (its model and forward are the
plain ViT's; the maps feed only the penalty).
"""

from __future__ import annotations

from lfi_jax.data.shortcut_digits import SPURIOUS_PRESETS as REGIMES
from lfi_jax.experiments.base import Cell, Experiment, GridOptions, Group
from lfi_jax.experiments.plots import grouped_bars
from lfi_jax.experiments.spurious_p import check as check_shortcut_source
from lfi_jax.experiments.tables import grid_table
from lfi_jax.experiments.teacher_noise import check as check_oracle_teacher

RRR_WEIGHTS = (0.1, 1.0, 10.0)
PEER_REGIMES = ("shortcut", "hard")
METHOD_NAMES = {
    "vit": "ViT",
    "ivit": "I-ViT",
    "attention_transfer": "attention transfer: ViT CLS attention supervised (ablation ic_only)",
    "rrr": "RRR (Ross et al., 2017): ViT + input-gradient penalty",
}


def rrr_edits(weight: float) -> dict:
    """The config edits of an RRR row: the plain ViT's model reading the teacher, no alignment."""
    return {"ablation": "ic_only", "loss.align_weight": 0.0, "loss.rrr_weight": float(weight)}


def method_cells(regime: str, weights=RRR_WEIGHTS) -> list[Cell]:
    p = REGIMES[regime]
    base = {"regime": regime, "spurious_p": p}
    sp = {"data.options.spurious_p": p}
    cells = [
        Cell({**base, "method": "vit", "rrr_weight": 0.0}, {"ablation": "vit", **sp}),
        Cell({**base, "method": "ivit", "rrr_weight": 0.0}, {"ablation": "ivit", **sp}),
        Cell({**base, "method": "attention_transfer", "rrr_weight": 0.0}, {"ablation": "ic_only", **sp}),
    ]
    cells += [Cell({**base, "method": "rrr", "rrr_weight": float(w)}, {**rrr_edits(w), **sp}) for w in weights]
    return cells


def grid(opts: GridOptions) -> list[Cell]:
    weights = opts.rrr_weights or RRR_WEIGHTS
    return [c for r in (opts.regimes or PEER_REGIMES) for c in method_cells(r, weights)]


def check(config, sets) -> None:
    check_shortcut_source(config, sets)
    check_oracle_teacher(config, sets)


def row_name(g: Group) -> str:
    m = g.labels["method"]
    return METHOD_NAMES[m] + (f", weight {g.labels['rrr_weight']:g}" if m == "rrr" else "")


def table(summary: list[Group], keys: list[str]) -> str:
    return grid_table(summary, keys, head=["regime", "method"], labels=lambda g: [g.labels["regime"], row_name(g)])


def plot(summary: list[Group], keys: list[str]):
    short = {"vit": "ViT", "ivit": "I-ViT", "attention_transfer": "att. transfer\n(ic_only)", "rrr": "RRR"}
    names = [
        short[g.labels["method"]]
        + (f" {g.labels['rrr_weight']:g}" if g.labels["method"] == "rrr" else "")
        + f"\n{g.labels['regime']}"
        for g in summary
    ]
    return grouped_bars(summary, keys, names)


EXPERIMENT = Experiment(
    "peers",
    "Peers on the shortcut-digits benchmark: RRR and attention transfer beside ViT and I-ViT",
    grid,
    table,
    plot,
    default_arg="ivit,shortcut",
    check=check,
)
