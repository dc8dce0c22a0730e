"""Test setup: 8 fake CPU devices so sharding code runs without accelerators; XLA's CPU backend
at optimisation level 0 (no LLVM optimisation passes: these programs are tiny and compiling
dominates; ~22% less CPU for the train-step and detection tests). Results may differ from
level 2 in the last bit (FMA contraction), within every tolerance here. A level given in
XLA_FLAGS wins; the flag reaches the tests' subprocesses through the environment."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
