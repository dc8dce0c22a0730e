"""The input pipeline's threads at a lower scheduling priority than XLA's (`data.thread_nice`).

On a small CPU host the training step keeps every core busy, and a data thread at the same
priority preempts XLA's workers in the middle of an op; the other workers then wait for the
preempted one at the op's end. At a higher nice value the data thread runs mostly in the gaps
between ops (at the demo size with 4 CPU devices, `bench/loop.py`: loop / bare step
0.87-0.95 at the same priority, 0.94-1.04 at nice +10, on a noisy 2-core host).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)
_local = threading.local()


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (at most 19), once per thread.

    Linux applies `setpriority(PRIO_PROCESS, tid)` to that one thread. Elsewhere, or where
    the call is refused, the thread keeps its priority (logged once). nice <= 0: nothing.
    """
    if nice <= 0 or getattr(_local, "done", False):
        return
    _local.done = True
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + int(nice)))
    except OSError as e:
        log.info("data.thread_nice=%d not applied to thread %d: %s", nice, tid, e)


__all__ = ["lower_thread_priority"]
