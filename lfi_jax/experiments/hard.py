"""The hard regime (spurious_p 0.9), where the plain method has not escaped the shortcut: ViT
and I-ViT beside two variants of the I-ViT.

  object_rows    `loss.align_rows = "cls_and_object"`: the teacher also supervises the
                 interaction queries of the patch tokens that cover the object (their
                 head- and query-mean C_agt row, `lfi_jax.losses.object_rows_alignment_loss`),
                 added to the CLS row's term
  align_weight   `loss.align_weight` 3 (default 1)
"""

from __future__ import annotations

from lfi_jax.data.shortcut_digits import SPURIOUS_PRESETS as REGIMES
from lfi_jax.experiments.base import Cell, Experiment, GridOptions, Group
from lfi_jax.experiments.plots import grouped_bars
from lfi_jax.experiments.spurious_p import check as check_shortcut_source
from lfi_jax.experiments.tables import grid_table
from lfi_jax.experiments.teacher_noise import check as check_oracle_teacher

VARIANTS = (
    ("vit", "ViT", {"ablation": "vit"}),
    ("ivit", "I-ViT (CLS row, weight 1)", {"ablation": "ivit"}),
    ("object_rows", "I-ViT + object patch rows (align_rows=cls_and_object)",
     {"ablation": "ivit", "loss.align_rows": "cls_and_object"}),
    ("align_weight", "I-ViT, align_weight 3", {"ablation": "ivit", "loss.align_weight": 3.0}),
)


def grid(opts: GridOptions) -> list[Cell]:
    return [
        Cell({"regime": r, "variant": name}, {**edits, "data.options.spurious_p": REGIMES[r]})
        for r in (opts.regimes or ("hard",))
        for name, _, edits in VARIANTS
    ]


def check(config, sets) -> None:
    check_shortcut_source(config, sets)
    check_oracle_teacher(config, sets)


NAMES = {name: text for name, text, _ in VARIANTS}


def table(summary: list[Group], keys: list[str]) -> str:
    return grid_table(summary, keys, head=["regime", "variant"],
                      labels=lambda g: [g.labels["regime"], NAMES[g.labels["variant"]]])


def plot(summary: list[Group], keys: list[str]):
    short = {"vit": "ViT", "ivit": "I-ViT", "object_rows": "I-ViT\n+obj rows", "align_weight": "I-ViT\nweight 3"}
    return grouped_bars(summary, keys, [short[g.labels["variant"]] for g in summary])


EXPERIMENT = Experiment(
    "hard", "Hard regime: I-ViT variants (object patch rows, alignment weight 3)", grid, table, plot,
    default_arg="ivit,hard", check=check,
)
