"""Test setup: 8 fake CPU devices so sharding code runs without accelerators; XLA's CPU backend
at optimisation level 0 (no LLVM optimisation passes: these programs are tiny and compiling
dominates; ~22% less CPU for the train-step and detection tests). Results may differ from
level 2 in the last bit (FMA contraction), within every tolerance here. A level given in
XLA_FLAGS wins; the flag reaches the tests' subprocesses through the environment. The
subprocesses also get `lfi_jax.hostmem`'s tunable up front, so a command-line entry point they
start does not re-execute itself (same behaviour, one interpreter start less)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()

from lfi_jax import hostmem  # noqa: E402

if hostmem.should_reexec():
    os.environ.update(hostmem.tuned_environ())

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
