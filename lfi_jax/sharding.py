"""Meshes and shardings: the mesh from config, parameter specs by rules, batch specs.

Axes: `data` (pure data parallel), `fsdp` (data parallel + parameters and optimizer state
sharded), optionally `tensor`. Batches are split over every axis but `tensor`. A parameter
is sharded over `fsdp` along its largest dimension divisible by the axis size (classic FSDP),
unless it is smaller than `fsdp_min_size` elements, in which case it is replicated.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


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


def param_spec(shape: Sequence[int], mesh, *, fsdp_min_size: int = 2**16) -> P:
    if "fsdp" not in mesh.axis_names:
        return P()
    n = mesh.shape["fsdp"]
    if n == 1 or math.prod(shape) < fsdp_min_size:
        return P()
    # Largest dimension divisible by the fsdp size (ties: the last one).
    best = None
    for i, s in enumerate(shape):
        if s % n == 0 and (best is None or s >= shape[best]):
            best = i
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def tree_shardings(tree: Any, mesh, *, fsdp_min_size: int = 2**16):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params or optimizer state)."""

    def one(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, param_spec(shape, mesh, fsdp_min_size=fsdp_min_size))

    return jax.tree.map(one, tree)


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's share of a batch -> global arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }
