"""lfi_jax.hostmem: the entry points' re-execution with glibc's huge-page tunable."""

import os
import subprocess
import sys

import pytest

from lfi_jax import hostmem

CHILD = """
import os, sys
from lfi_jax.cli import run_cli
def main(args):
    print("TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""), "ARGS=" + ",".join(args), "PID=%d" % os.getpid())
run_cli(main)
"""


def test_tuned_environ_keeps_other_tunables():
    env = hostmem.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["X"] == "1"
    assert hostmem.tuned_environ({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert hostmem.active(env) and not hostmem.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


def test_no_reexec_when_switched_off_or_already_tuned():
    assert not hostmem.should_reexec({"LFI_JAX_HUGEPAGES": "0"})
    assert not hostmem.should_reexec({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


def _child(env):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "a", "--b=1"], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout.strip()


def test_entry_point_reexecutes_once_with_the_same_arguments():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LFI_JAX_HUGEPAGES")}
    if not hostmem.should_reexec(env):
        pytest.skip("this machine offers no transparent huge pages on request (or no glibc >= 2.35)")
    line = _child(env)
    assert "TUNABLES=glibc.malloc.hugetlb=1" in line and "ARGS=a,--b=1" in line, line
    off = _child(dict(env, LFI_JAX_HUGEPAGES="0"))
    assert off.startswith("TUNABLES= ") and "ARGS=a,--b=1" in off, off
