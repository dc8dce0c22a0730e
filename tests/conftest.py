"""Test setup: 8 fake CPU devices so sharding code runs without accelerators; XLA's CPU backend
without LLVM's optimisations (these programs are tiny: compiling dominates, and skips ~3x
faster at level 0; the numerics are IEEE either way). A level set in XLA_FLAGS wins, and the
flag reaches the test's subprocesses through the environment."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
