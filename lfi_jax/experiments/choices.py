"""Which choice of the method matters, in the shortcut regime (or --regimes): each row changes
one setting of the I-ViT from the main job's defaults; ViT rows as the reference.

  align_weight    `loss.align_weight` 3 (default 1)
  gate_init       the gate bias `model.gate_bias_init`: the demo's (4, -4) (the fused map
                  starts on the supervised C_agt) against (0, 0) (half-half, the library's
                  from-scratch default) and (-4, 4) (starts on C_vfm, the pretrained default)
  augmentation    `data.augment.random_resized_crop` off (on by default), for ViT and I-ViT
  align_reduce    `loss.align_reduce = "layer_mean"`: KL of the layer-averaged map (default
                  "per_layer": the KL of each layer's map averaged over layers, SPEC)
"""

from __future__ import annotations

from lfi_jax.data.shortcut_digits import SPURIOUS_PRESETS as REGIMES
from lfi_jax.experiments.base import Cell, Experiment, GridOptions, Group
from lfi_jax.experiments.plots import grouped_bars
from lfi_jax.experiments.spurious_p import check as check_shortcut_source
from lfi_jax.experiments.tables import grid_table
from lfi_jax.experiments.teacher_noise import check as check_oracle_teacher

NO_AUG = {"data.augment.random_resized_crop": False, "data.augment.hflip": False}
# (model, choice, value shown, config edits)
CHOICES = (
    ("vit", "default", "", {}),
    ("vit", "augmentation", "off", NO_AUG),
    ("ivit", "default", "weight 1, gate (4, -4), augmentation on, per_layer", {}),
    ("ivit", "align_weight", "3", {"loss.align_weight": 3.0}),
    ("ivit", "gate_init", "(0, 0)", {"model.gate_bias_init": (0.0, 0.0)}),
    ("ivit", "gate_init", "(-4, 4)", {"model.gate_bias_init": (-4.0, 4.0)}),
    ("ivit", "augmentation", "off", NO_AUG),
    ("ivit", "align_reduce", "layer_mean", {"loss.align_reduce": "layer_mean"}),
)
DEFAULT_REGIMES = ("shortcut",)


def grid(opts: GridOptions) -> list[Cell]:
    cells = []
    for regime in opts.regimes or DEFAULT_REGIMES:
        p = REGIMES[regime]
        for model, choice, value, edits in CHOICES:
            labels = {"regime": regime, "model": model, "choice": choice, "value": value}
            cells.append(Cell(labels, {"ablation": model, "data.options.spurious_p": p, **edits}))
    return cells


def check(config, sets) -> None:
    check_shortcut_source(config, sets)
    check_oracle_teacher(config, sets)


def table(summary: list[Group], keys: list[str]) -> str:
    return grid_table(
        summary,
        keys,
        head=["regime", "model", "choice", "value"],
        labels=lambda g: [g.labels["regime"], {"vit": "ViT", "ivit": "I-ViT"}[g.labels["model"]],
                          g.labels["choice"], g.labels["value"]],
    )


def plot(summary: list[Group], keys: list[str]):
    names = [
        f"{'ViT' if g.labels['model'] == 'vit' else 'I-ViT'}\n{g.labels['choice']}"
        + (f"\n{g.labels['value']}" if g.labels["choice"] != "default" else "")
        for g in summary
    ]
    return grouped_bars(summary, keys, names)


EXPERIMENT = Experiment(
    "choices", "Which choice matters: one I-ViT setting changed per row", grid, table, plot,
    default_arg="ivit,shortcut", check=check,
)
