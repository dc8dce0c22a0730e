"""Interaction attention (SPEC section 1): one signature, several implementations.

    o, agt_cls = interaction_attention(q, q2, k, v, gate, impl="xla")

q, q2, k, v: [B, N, H, d]. q are the original queries, q2 the interaction queries.
gate: the per-head Gated Control Network, a dict of arrays
    hidden gate (gate_hidden = G > 0): w1 [H, 2, G], b1 [H, G], w2 [H, G, 2], b2 [H, 2]
    linear gate (gate_hidden = 0):     w2 [H, 2, 2], b2 [H, 2]      (no w1 / b1)
    None: no gated control, C_f = (C_agt + C_vfm) / 2 (ablation "GC off").
Returns o [B, N, H, d] (dtype of v) and agt_cls [B, H, N] (float32): row 0 (the CLS
query) of C_agt over all N keys.

Softmaxes and gates are computed in float32 whatever the input dtype.

impl:
  "xla"     materialises C_vfm, C_agt, the gate activations and C_f ([B, H, N, N] each).
  "chunked" the same numbers, query block by query block under `jax.checkpoint`, so the
            extra memory is O(block * N) per head instead of O(N^2), forward and backward.
  "pallas"  the fused kernel (lfi_jax.ops.pallas), where available.
  "auto"    pallas on GPU/TPU, chunked on CPU.

Sharding. XLA's partitioner cannot split the Pallas custom call, so under a sharded jit it
would gather the whole batch onto every device (or fail). When a mesh is in context
(`jax.sharding.get_abstract_mesh()`: set by the trainer's steps, which trace under
`jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`, or by a caller's `jax.set_mesh`),
"pallas" runs per shard inside `jax.shard_map`: the batch (q, q2, k, v, o dim 0; agt_cls
dim 0) over the batch axes (`lfi_jax.sharding.batch_axes`: every axis but "tensor") and
the heads (q, q2, k, v, o dim 2; agt_cls dim 1; every gate tensor's leading H dim) over
"tensor". The gate's gradient is summed over the batch shards by the shard_map transpose.
A dimension that does not divide is not split over those axes: the batch over the longest
prefix of the batch axes (of size > 1) whose product divides B, the heads over "tensor"
only if H divides by its size. The axes left unsplit hold the whole dimension on every
device (correct, redundant work) and a warning is logged. Axes that are already manual (a
caller's shard_map) are left alone. Without a mesh, or with every free axis of size 1, the
kernel is called directly, exactly as on one device. The other implementations are plain
jnp and are partitioned by XLA itself.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lfi_jax.sharding import batch_axes

log = logging.getLogger(__name__)

Gate = Mapping[str, jax.Array] | None

IMPLS = ("xla", "chunked", "pallas", "auto")


def gate_hidden_size(gate: Gate) -> int:
    """G of a gate dict (0 for the linear gate)."""
    if gate is None or "w1" not in gate:
        return 0
    return int(gate["w1"].shape[-1])


def apply_gate(c_agt: jax.Array, c_vfm: jax.Array, gate: Gate, n_keys: int) -> jax.Array:
    """Fused map C_f (Eqs. 5-6) for maps laid out [..., H, q, k] (float32).

    The gate is pointwise per head and entry: z = [N * C_agt, N * C_vfm] (N = number of
    keys, so a uniform row reads 1 at any resolution).
    """
    if gate is None:
        return 0.5 * (c_agt + c_vfm)
    f32 = jnp.float32
    za = c_agt * n_keys
    zv = c_vfm * n_keys

    def per_head(x):  # [H] -> [H, 1, 1], broadcasts against [..., H, q, k]
        return x.astype(f32)[:, None, None]

    w2 = gate["w2"].astype(f32)
    b2 = gate["b2"].astype(f32)
    if "w1" in gate:
        w1 = gate["w1"].astype(f32)  # [H, 2, G]
        b1 = gate["b1"].astype(f32)  # [H, G]
        g_out0 = jnp.broadcast_to(per_head(b2[:, 0]), za.shape)
        g_out1 = jnp.broadcast_to(per_head(b2[:, 1]), za.shape)
        # Loop over the (small) hidden width so no [..., G] tensor is ever formed.
        for j in range(w1.shape[-1]):
            u = za * per_head(w1[:, 0, j]) + zv * per_head(w1[:, 1, j])
            u = jax.nn.gelu(u + per_head(b1[:, j]), approximate=False)
            g_out0 = g_out0 + u * per_head(w2[:, j, 0])
            g_out1 = g_out1 + u * per_head(w2[:, j, 1])
    else:
        # Linear gate: w2 [H, 2, 2] maps z (2) -> logits (2).
        g_out0 = za * per_head(w2[:, 0, 0]) + zv * per_head(w2[:, 1, 0])
        g_out0 = g_out0 + per_head(b2[:, 0])
        g_out1 = za * per_head(w2[:, 0, 1]) + zv * per_head(w2[:, 1, 1])
        g_out1 = g_out1 + per_head(b2[:, 1])
    g1 = jax.nn.sigmoid(g_out0)
    g2 = jax.nn.sigmoid(g_out1)
    return g1 * c_agt + g2 * c_vfm


def _check(q, q2, k, v, gate):
    if q.ndim != 4:
        raise ValueError(f"interaction_attention: q must be [B, N, H, d], got shape {q.shape}")
    for name, x in (("q2", q2), ("k", k), ("v", v)):
        if x.shape[0] != q.shape[0] or x.shape[2:] != q.shape[2:]:
            raise ValueError(
                f"interaction_attention: {name} has shape {x.shape}, incompatible with q {q.shape}"
            )
    if q2.shape[1] != q.shape[1]:
        raise ValueError(f"interaction_attention: q2 has {q2.shape[1]} queries, q has {q.shape[1]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"interaction_attention: k has {k.shape[1]} keys, v has {v.shape[1]}")
    if gate is not None:
        heads = q.shape[2]
        for key in ("w2", "b2") + (("w1", "b1") if "w1" in gate else ()):
            if key not in gate:
                raise ValueError(f"interaction_attention: gate is missing {key!r}")
            if gate[key].shape[0] != heads:
                raise ValueError(
                    f"interaction_attention: gate[{key!r}] has {gate[key].shape[0]} heads, q has {heads}"
                )


def _logits(qx, k, scale):
    # [B, n, H, d] x [B, N, H, d] -> [B, H, n, N] in float32
    return jnp.einsum("bqhd,bkhd->bhqk", qx, k, preferred_element_type=jnp.float32) * scale


def _block(q, q2, k, v, gate):
    """The whole computation for a block of queries (all keys). Returns o, C_agt (f32)."""
    n_keys = k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    c_vfm = jax.nn.softmax(_logits(q, k, scale), axis=-1)
    c_agt = jax.nn.softmax(_logits(q2, k, scale), axis=-1)
    c_f = apply_gate(c_agt, c_vfm, gate, n_keys)
    o = jnp.einsum("bhqk,bkhd->bqhd", c_f.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.astype(v.dtype), c_agt


def _xla(q, q2, k, v, gate):
    o, c_agt = _block(q, q2, k, v, gate)
    return o, c_agt[:, :, 0, :]


def default_block_q(n: int) -> int:
    """Query rows per chunk: 128 up to N=2048, then halved so one block's [block_q, N] maps
    stay near 2^18 entries per head (64 at N=3137; docs/performance.md)."""
    return int(min(128, max(16, 2 ** math.floor(math.log2(262144 / n)))))


def _chunked(q, q2, k, v, gate, block_q: int | None = None):
    b, n, h, d = q.shape
    block_q = block_q or default_block_q(n)
    # The CLS row only needs one query: computed on its own, it costs O(N).
    scale = 1.0 / math.sqrt(d)
    agt_cls = jax.nn.softmax(_logits(q2[:, :1], k, scale), axis=-1)[:, :, 0, :]
    if n <= block_q:
        o, _ = jax.checkpoint(_block)(q, q2, k, v, gate)
        return o, agt_cls
    n_blocks = -(-n // block_q)
    pad = n_blocks * block_q - n

    def to_blocks(x):
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(b, n_blocks, block_q, h, d).swapaxes(0, 1)

    @jax.checkpoint
    def body(blocks):
        qb, q2b = blocks
        ob, _ = _block(qb, q2b, k, v, gate)
        return ob

    o = jax.lax.map(body, (to_blocks(q), to_blocks(q2)))  # [nb, B, bq, H, d]
    o = o.swapaxes(0, 1).reshape(b, n_blocks * block_q, h, d)[:, :n]
    return o, agt_cls


def default_impl() -> str:
    return "chunked" if jax.default_backend() == "cpu" else "pallas"


def interaction_attention(q, q2, k, v, gate: Gate, *, impl: str = "xla", block_q: int | None = None):
    """Interaction attention, SPEC section 1. See the module docstring."""
    _check(q, q2, k, v, gate)
    if impl == "auto":
        impl = default_impl()
    if impl == "xla":
        return _xla(q, q2, k, v, gate)
    if impl == "chunked":
        return _chunked(q, q2, k, v, gate, block_q=block_q)
    if impl == "pallas":
        return _pallas(q, q2, k, v, gate, block_q=block_q)
    raise ValueError(f"interaction_attention: unknown impl {impl!r}; expected one of {IMPLS}")


def shard_plan(batch: int, heads: int):
    """How "pallas" is split over the mesh in context (see the module docstring).

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


def _pallas(q, q2, k, v, gate, block_q=None):
    from lfi_jax.ops.pallas import interaction_attention_pallas

    kwargs = {} if block_q is None else {"block_q": block_q}
    plan = shard_plan(q.shape[0], q.shape[2])
    if plan is None:
        return interaction_attention_pallas(q, q2, k, v, gate, **kwargs)
    mesh, manual, batch, head = plan
    b = batch or None
    x_spec = P(b, None, head, None)  # q, q2, k, v, o: [B, N, H, d]
    out_specs = (x_spec, P(b, head, None))  # agt_cls: [B, H, N]
    if gate is None:
        fn = lambda q, q2, k, v: interaction_attention_pallas(q, q2, k, v, None, **kwargs)  # noqa: E731
        args, in_specs = (q, q2, k, v), (x_spec,) * 4
    else:
        gate = {key: gate[key] for key in gate}
        fn = lambda q, q2, k, v, g: interaction_attention_pallas(q, q2, k, v, g, **kwargs)  # noqa: E731
        args, in_specs = (q, q2, k, v, gate), (x_spec,) * 4 + ({key: P(head) for key in gate},)
    # check_vma=False: the kernels' out_shape structs carry no varying-axes annotation. The
    # outputs are genuinely split as out_specs say (or identical across unsplit axes).
    sharded = jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual, check_vma=False
    )
    return sharded(*args)


def dot_product_attention_with_cls(q, k, v):
    """Plain softmax attention; returns (o [B, N, H, d], cls row of C_vfm [B, H, N] f32).

    Used where interaction queries are off (the plain ViT, ablation "IQ off").
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    c = jax.nn.softmax(_logits(q, k, scale), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", c.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.astype(v.dtype), c[:, :, 0, :]
