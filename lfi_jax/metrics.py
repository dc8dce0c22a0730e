"""Metrics: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from lfi_jax.fileio import atomic_write


def setup_logging(level: int = logging.INFO) -> None:
    """Our progress messages at `level` on stderr; library chatter (orbax, absl) at WARNING."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    ours = logging.getLogger("lfi_jax")
    ours.setLevel(level)
    if not any(getattr(h, "_lfi", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._lfi = True
        ours.addHandler(handler)
        ours.propagate = False


def format_eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class MetricWriter:
    """Appends {"step": s, **metrics} lines; only the writing process (process 0) writes."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a core dependency
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update(
            {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "dtype") else v) for k, v in metrics.items()}
        )
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the restored checkpoint (they will be redone)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [line for line in read_metrics(self.path) if line["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a torn last line, e.g. after a crash, is skipped)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
