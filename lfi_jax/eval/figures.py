"""What every figure shares: one colour and one short label per model (a row of Table 3), the
chance line, and the convergence panel (accuracy against step, one line per run)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODEL_COLORS = {
    "vit": "tab:blue",
    "ivit": "tab:red",
    "iq_gc": "tab:green",
    "ic_only": "tab:orange",
    "iq_ic": "tab:purple",
}
MODEL_LABELS = {"vit": "ViT", "ivit": "I-ViT", "iq_gc": "IQ+GC", "ic_only": "IC only", "iq_ic": "IQ+IC"}
SPLIT_STYLES = ("-", "--", ":", "-.")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    return plt


def model_color(model: str) -> str | None:
    return MODEL_COLORS.get(model)


def model_label(model: str) -> str:
    return MODEL_LABELS.get(model, model)


def mark_chance(ax, level: float, *, label: str = "chance") -> None:
    """A dotted gray line at `level` (in the axis' units) with a small label at the left."""
    ax.axhline(level, color="gray", lw=0.8, ls=":", zorder=0)
    ax.text(0.01, level, label, transform=ax.get_yaxis_transform(), ha="left", va="bottom", fontsize=7, color="gray")


def draw_curve(ax, steps: Sequence[int], values: Sequence[float], *, scale: float = 1.0, **kw) -> None:
    """One convergence curve (values times `scale`, e.g. 100 for %)."""
    ax.plot(list(steps), [scale * v for v in values], "-o", ms=3, **kw)


def color_for(name: str) -> str | None:
    """The model colour of a run named by its model key or label ("ivit", "I-ViT"), else None
    (matplotlib's cycle)."""
    key = (
        name if name in MODEL_COLORS else next((k for k, v in MODEL_LABELS.items() if v.lower() == name.lower()), None)
    )
    return MODEL_COLORS.get(key) if key else None
