"""The Pallas kernel under a sharded jit: per shard, inside `jax.shard_map`.

XLA's partitioner cannot split the Pallas custom call, so under a sharded jit it would
gather the whole batch onto every device (or fail). When a mesh is in context
(`jax.sharding.get_abstract_mesh()`: set by the trainer's steps, which trace under
`jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`, or by a caller's `jax.set_mesh`), the
kernel runs per shard inside `jax.shard_map`: the batch (q, q2, k, v, o, key_mask dim 0;
agt_cls dim 0) over the batch axes (`lfi_jax.sharding.batch_axes`: every axis but "tensor")
and the heads (q, q2, k, v, o dim 2; agt_cls dim 1; every gate tensor's leading H dim) over
"tensor". The gate's gradient is summed over the batch shards by the shard_map transpose.
A dimension that does not divide is not split over those axes: the batch over the longest
prefix of the batch axes (of size > 1) whose product divides B, the heads over "tensor"
only if H divides by its size. The axes left unsplit hold the whole dimension on every
device (correct, redundant work) and a warning is logged. Axes that are already manual (a
caller's shard_map) are left alone. Without a mesh, or with every free axis of size 1, the
kernel is called directly, exactly as on one device.
"""

from __future__ import annotations

import logging

import jax
from jax.sharding import PartitionSpec as P

from lfi_jax.ops.pallas.attention import interaction_attention_pallas
from lfi_jax.ops.reference import GateParams
from lfi_jax.sharding import batch_axes

log = logging.getLogger(__name__)


def shard_plan(batch: int, heads: int):
    """How the kernel is split over the mesh in context (see the module docstring).

    Returns None (call the kernel directly) or (mesh, manual axes, batch axes, head axis):
    the abstract mesh, the axes the shard_map makes manual (every axis not manual already),
    the tuple of axes the batch is split over (possibly empty) and "tensor" or None.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    manual = set(mesh.manual_axes)
    free = tuple(a for a in mesh.axis_names if a not in manual)
    if not any(mesh.shape[a] > 1 for a in free):
        return None
    split, size, unsplit = [], 1, []
    for a in batch_axes(mesh):
        if a in manual or mesh.shape[a] == 1:
            continue
        if unsplit or batch % (size * mesh.shape[a]):
            unsplit.append(f"{a}={mesh.shape[a]}")
            continue
        split.append(a)
        size *= mesh.shape[a]
    head_axis = None
    if "tensor" in free and mesh.shape["tensor"] > 1:
        if heads % mesh.shape["tensor"] == 0:
            head_axis = "tensor"
        else:
            log.warning(
                "interaction_attention(impl='pallas'): %d heads do not divide by the tensor axis size %d; "
                "every tensor shard computes all heads", heads, mesh.shape["tensor"],
            )
    if unsplit:
        log.warning(
            "interaction_attention(impl='pallas'): batch %d is split over %s only (product %d); not over %s, "
            "whose devices compute the same rows", batch, tuple(split), size, ", ".join(unsplit),
        )
    return mesh, frozenset(free), tuple(split), head_axis


def sharded_pallas(q, q2, k, v, gate: GateParams | None, *, key_mask=None, **kwargs):
    """`interaction_attention_pallas`, per shard when a mesh is in context."""
    plan = shard_plan(q.shape[0], q.shape[2])
    if plan is None:
        return interaction_attention_pallas(q, q2, k, v, gate, key_mask=key_mask, **kwargs)
    mesh, manual, batch, head = plan
    b = batch or None
    x_spec = P(b, None, head, None)  # q, q2, k, v, o: [B, N, H, d]
    out_specs = (x_spec, P(b, head, None))  # agt_cls: [B, H, Nk]

    def fn(q, q2, k, v, gate, key_mask):
        return interaction_attention_pallas(q, q2, k, v, gate, key_mask=key_mask, **kwargs)

    gate_spec = None if gate is None else jax.tree.map(lambda _: P(head), gate)
    mask_spec = None if key_mask is None else P(b, None)
    # check_vma=False: the kernels' out_shape structs carry no varying-axes annotation. The
    # outputs are genuinely split as out_specs say (or identical across unsplit axes).
    sharded = jax.shard_map(
        fn, mesh=mesh, in_specs=(x_spec,) * 4 + (gate_spec, mask_spec), out_specs=out_specs,
        axis_names=manual, check_vma=False,
    )
    return sharded(q, q2, k, v, gate, key_mask)
