"""Meshes and shardings: the mesh from config, parameter specs by rules, batch specs.

Axes: `data` (pure data parallel), `fsdp` (data parallel + parameters and optimizer state
sharded), optionally `tensor`. Batches are split over every axis but `tensor`. A parameter
is sharded over `fsdp` along its largest dimension divisible by the axis size (classic FSDP),
unless it is smaller than `fsdp_min_size` elements, in which case it is replicated.

With a `tensor` axis of size > 1, the transformer's matrices are split Megatron-style by
path rules (`TENSOR_RULES`): the q / k / v / interaction-query projections and the MLP's first
layer by their output features (whole heads per device), the attention output and the MLP's
second layer by their input features, the gate's per-head tensors by head. FSDP then takes
the largest remaining divisible dimension. Optimizer moments mirror the parameter paths, so
the same rules shard them. Activations are not constrained inside the model: XLA propagates
the batch sharding of the inputs through the residual stream (see docs/performance.md).

The same config runs on 1 device or many: every axis of size 1 (or a parameter too small or
not divisible) simply means "replicated", and `-1` in `config.mesh.shape` takes the rest.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")

# (regex searched in the "/"-joined parameter path, dimension split over `tensor`).
# First match wins; a dimension not divisible by the axis size leaves the tensor replicated
# over `tensor`.
TENSOR_RULES: tuple[tuple[str, int], ...] = (
    (r"attention/(query|key|value|interaction_query)/(kernel|bias)(/|$)", -1),  # column-parallel
    (r"attention/output/dense/kernel(/|$)", 0),  # row-parallel
    (r"intermediate/dense/(kernel|bias)(/|$)", -1),  # column-parallel
    (r"layer/\d+/output/dense/kernel(/|$)", 0),  # row-parallel
    (r"attention/gate/(w1|b1|w2|b2)(/|$)", 0),  # [H, ...]: whole heads
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int, axes: Sequence[str] = ()) -> tuple[int, ...]:
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh.shape {tuple(shape)} has more than one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"config.mesh.shape {tuple(shape)} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"config.mesh.shape {tuple(shape)} (axes {tuple(axes)}) needs {math.prod(shape)} devices, "
            f"{num_devices} are available"
        )
    return tuple(shape)


def request_cpu_devices(n: int) -> int:
    """Split the host's CPU backend into `n` XLA devices (`jax_num_cpu_devices`), the
    `config.mesh.cpu_devices` of a run; 0 leaves JAX's default (one).

    Why: XLA runs one device's small ops one after another, each split over the cores with a
    hand-off per op; at the embedded benchmark's size that leaves a 2-core host's second core
    idle for much of a step. Several CPU devices, each with its share of the batch under the
    usual data-parallel mesh, keep the cores busy (4 devices: about 1.5x the demo step). Only
    the CPU backend is affected (a GPU or TPU run is not). JAX reads the value when its
    backends start: once they have, a different `n` cannot apply, and the run goes on with
    the devices there are (logged). A count set outside the config (`JAX_NUM_CPU_DEVICES`,
    `jax.config`, `--xla_force_host_platform_device_count` in XLA_FLAGS, as launchers and
    tests do) wins over it. Returns the count in effect: `n` once applied, otherwise the one
    JAX started with or was given (-1: JAX's default or XLA_FLAGS).
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"config.mesh.cpu_devices={n} must be >= 0 (0 = JAX's default)")
    current = int(jax.config.jax_num_cpu_devices)
    if n == 0 or current == n:
        return current
    if current > 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        # Chosen outside the config (JAX_NUM_CPU_DEVICES, jax.config, XLA_FLAGS: a launcher, a
        # test, the user): that choice stands.
        log.info("config.mesh.cpu_devices=%d left aside: the CPU device count was set outside the config", n)
        return current
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends have started
        have = len(jax.devices("cpu"))
        if have != n:
            log.warning(
                "config.mesh.cpu_devices=%d not applied: JAX's backends had started with %d CPU "
                "device(s) (set it before the first JAX operation)", n, have)
        return have
    return n


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    axes = tuple(mesh_cfg.axes)
    shape = resolve_mesh_shape(mesh_cfg.shape, len(devices), axes)
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def batch_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in mesh.axis_names if a != "tensor")


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _tensor_dim(path: str, shape: Sequence[int], n: int) -> int | None:
    for pattern, dim in TENSOR_RULES:
        if re.search(pattern, path):
            if not shape:
                return None
            dim = dim % len(shape)
            return dim if shape[dim] % n == 0 else None
    return None


def param_spec(shape: Sequence[int], mesh, *, fsdp_min_size: int = 2**16, path: str = "") -> P:
    """The PartitionSpec of one parameter (or optimizer moment) of `shape` at `path`."""
    spec: list[Any] = [None] * len(shape)
    if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 and path:
        t = _tensor_dim(path, shape, mesh.shape["tensor"])
        if t is not None:
            spec[t] = "tensor"
    if "fsdp" in mesh.axis_names:
        n = mesh.shape["fsdp"]
        if n > 1 and math.prod(shape) >= fsdp_min_size:
            # Largest free dimension divisible by the fsdp size (ties: the last one).
            best = None
            for i, s in enumerate(shape):
                if spec[i] is None and s % n == 0 and (best is None or s >= shape[best]):
                    best = i
            if best is not None:
                spec[best] = "fsdp"
    return P(*spec) if any(a is not None for a in spec) else P()


def path_str(path) -> str:
    """A pytree key path as "/"-joined names ('encoder/layer/3/attention/query/kernel'), the
    trailing "value" of an nnx Variable dropped: the one parameter-path formatter of the
    sharding rules and the optimizer's freeze patterns."""
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
        parts.append(str(key))
    if parts and parts[-1] == "value":  # the leaf inside an nnx Variable
        parts.pop()
    return "/".join(parts)


def tree_shardings(tree: Any, mesh, *, fsdp_min_size: int = 2**16):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params or optimizer state)."""

    def one(path, x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, param_spec(shape, mesh, fsdp_min_size=fsdp_min_size, path=path_str(path)))

    return jax.tree_util.tree_map_with_path(one, tree)


def bytes_per_device(tree: Any, shardings: Any | None = None) -> int:
    """The largest number of bytes any one device holds of `tree` (arrays, or
    ShapeDtypeStructs with `shardings` / their own `.sharding`)."""
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings) if shardings is not None else [x.sharding for x in leaves]
    per_device: dict[Any, int] = {}
    for x, s in zip(leaves, shards, strict=True):
        item = np.dtype(x.dtype).itemsize
        for dev, index in s.devices_indices_map(tuple(x.shape)).items():
            n = math.prod(
                (sl.stop if sl.stop is not None else dim) - (sl.start or 0) for sl, dim in zip(index, x.shape)
            )
            per_device[dev] = per_device.get(dev, 0) + n * item
    return max(per_device.values(), default=0)


def describe(tree: Any, shardings: Any) -> dict[str, str]:
    """{"/"-joined path: spec} for every sharded (not fully replicated) leaf: for logs and tests."""
    out = {}
    for (path, _), s in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings), strict=True):
        if any(a is not None for a in s.spec):
            out[path_str(path)] = str(s.spec)
    return out


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's share of a batch -> global arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }
