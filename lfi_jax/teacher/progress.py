"""Progress on stderr: log lines and a one-line progress bar that never swallows them.

The bar redraws itself after a carriage return; `log_line` (and the bar's `close`, called when
the work ends or fails) first ends an unfinished bar line, so a message or an error printed
afterwards starts on its own line instead of being glued to the bar.
"""

from __future__ import annotations

import sys
import time

_open_bar: list[bool] = [False]  # whether a bar line is on screen without its newline


def end_bar_line() -> None:
    if _open_bar[0]:
        sys.stderr.write("\n")
        sys.stderr.flush()
        _open_bar[0] = False


def log_line(msg: str) -> None:
    """One line on stderr (after ending an open progress-bar line)."""
    end_bar_line()
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


class Progress:
    """A one-line progress bar on stderr with items/s and ETA."""

    def __init__(self, total: int, label: str = "llava", unit: str = "img"):
        self.total, self.done, self.label, self.unit = int(total), 0, label, unit
        self.t0 = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += int(n)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 30
        fill = int(width * self.done / max(self.total, 1))
        sys.stderr.write(
            f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
            f"{rate:.2f} {self.unit}/s ETA {eta:.0f}s"
        )
        _open_bar[0] = True
        if self.done >= self.total:
            end_bar_line()
        sys.stderr.flush()

    def close(self) -> None:
        end_bar_line()


__all__ = ["Progress", "end_bar_line", "log_line"]
