"""Transparent huge pages for the buffers XLA's CPU runtime maps on every step (Linux, glibc).

XLA's CPU client allocates each execution's temporaries as one block (156 MB for the main
job's ViT step at batch 128) and frees it afterwards. A block that large is above glibc
malloc's mmap threshold, so every step maps fresh memory and touches it page by page: 40,000
page faults a step, about a quarter of the ViT step's time on a 2-core machine
(docs/performance.md, "Page faults"). Where the kernel offers transparent huge pages on request
(`/sys/kernel/mm/transparent_hugepage/enabled` = madvise, the common default), glibc >= 2.35
asks for them with the tunable `glibc.malloc.hugetlb=1`: 2 MB pages, 17x fewer faults.

The tunable is read when a process starts, so the command-line entry points
(`lfi_jax.cli.run_cli`) re-execute themselves once, with the same arguments, with it added to
GLIBC_TUNABLES (`maybe_reexec`). Nothing else changes: same interpreter, same PID, same
environment otherwise. `LFI_JAX_HUGEPAGES=0` turns this off; a process that already has the
tunable (or runs where it cannot help) is left alone.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
ENV = "GLIBC_TUNABLES"
SWITCH = "LFI_JAX_HUGEPAGES"  # "0": never re-execute
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str:
    try:
        with open(_THP) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def _glibc_at_least(major: int, minor: int) -> bool:
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        have = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return have >= (major, minor)


def active(environ=None) -> bool:
    """Whether this process runs with the tunable (it was started with it)."""
    env = os.environ if environ is None else environ
    return TUNABLE in env.get(ENV, "").split(":")


def should_reexec(environ=None) -> bool:
    """True where re-executing with the tunable would give XLA's buffers huge pages."""
    env = os.environ if environ is None else environ
    if env.get(SWITCH, "1") == "0" or active(env):
        return False
    if sys.platform != "linux" or not getattr(sys, "orig_argv", None):
        return False
    return _thp_mode() == "madvise" and _glibc_at_least(2, 35)


def tuned_environ(environ=None) -> dict[str, str]:
    """`environ` with the tunable appended to GLIBC_TUNABLES (other tunables kept)."""
    env = dict(os.environ if environ is None else environ)
    old = env.get(ENV, "")
    env[ENV] = f"{old}:{TUNABLE}" if old else TUNABLE
    return env


def maybe_reexec() -> None:
    """Re-executes this process (same interpreter and arguments) with the tunable, where
    `should_reexec()`; returns otherwise. Call before any work: the process image is replaced."""
    if not should_reexec():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), tuned_environ())


def describe() -> str:
    """One line for benchmark headers: whether huge pages serve the large buffers."""
    mode = _thp_mode() or "unknown"
    return f"transparent huge pages: {mode}; {TUNABLE}: {'on' if active() else 'off'}"


__all__ = ["SWITCH", "TUNABLE", "active", "describe", "maybe_reexec", "should_reexec", "tuned_environ"]
