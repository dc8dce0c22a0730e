"""The Pallas interaction attention under a sharded jit (8 fake CPU devices, interpret mode).

XLA cannot partition the Pallas custom call, so with a mesh in context the op runs the kernel
per shard in a `jax.shard_map` (batch over the batch axes, heads over "tensor"). Here: outputs
and gradients (q, q2, k, v, every gate tensor) under data x fsdp and data x fsdp x tensor
meshes equal the single-device `impl="xla"` result; the traced program contains the
shard_map with the expected specs (the check fails if the wrapping is missing), also inside
the trainer's train step; without a mesh nothing is wrapped; the split falls back per
dimension when the batch or head count does not divide.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from reference_math import random_attention_inputs

from lfi_jax import sharding as shd
from lfi_jax.ops import GateParams, interaction_attention
from lfi_jax.ops.pallas.sharded import shard_plan

B, N, H, D, G = 8, 37, 4, 16, 3
TOL = 2e-5  # max |x - ref| / max |ref|, float32 (pallas vs xla agree to ~1e-6)


def _mesh(axes, shape):
    devices = jax.devices()[: int(np.prod(shape))]
    return shd.make_mesh(types.SimpleNamespace(axes=axes, shape=shape), devices=devices)


def _inputs(kind, seed=0):
    """Inputs, and fixed weights for a scalar loss with cotangents on both outputs."""
    return random_attention_inputs(np.random.default_rng(seed), B, N, H, D, kind, hidden=G)


def _fn(impl, weights):
    wo, wc = weights

    def loss(q, q2, k, v, gate):
        o, cls = interaction_attention(q, q2, k, v, gate, impl=impl)
        return jnp.sum(o * wo) + jnp.sum(cls * wc), (o, cls)

    def run(q, q2, k, v, gate):
        (value, outs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, q2, k, v, gate)
        return outs, value, grads

    return run


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _shard_maps(jaxpr):
    """Every shard_map equation in a (closed) jaxpr, nested ones included."""
    found = []
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            found.append(eqn)
        for val in eqn.params.values():
            for sub in val if isinstance(val, (tuple, list)) else (val,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    found.extend(_shard_maps(sub))
    return found


def _specs(eqn):
    return tuple(eqn.params["in_specs"]), tuple(eqn.params["out_specs"])


@pytest.fixture(scope="module")
def reference():
    """Single-device, unsharded, impl="xla": outputs, loss and gradients per gate kind."""
    cache = {}

    def get(kind):
        if kind not in cache:
            args, weights = _inputs(kind)
            cache[kind] = jax.device_get(jax.jit(_fn("xla", weights))(*args))
        return cache[kind]

    return get


MESHES = [
    pytest.param(("data", "fsdp"), (4, 2), "hidden", id="data4-fsdp2-hidden"),
    pytest.param(("data", "fsdp", "tensor"), (2, 2, 2), "linear", id="data2-fsdp2-tensor2-linear"),
    pytest.param(("data", "fsdp", "tensor"), (2, 2, 2), "none", id="data2-fsdp2-tensor2-nogate"),
]


@pytest.mark.parametrize("axes, shape, kind", MESHES)
def test_sharded_pallas_matches_unsharded_xla(axes, shape, kind, reference):
    mesh = _mesh(axes, shape)
    args, weights = _inputs(kind)
    head = "tensor" if "tensor" in axes else None
    batch = shd.batch_axes(mesh)
    x_sh = NamedSharding(mesh, P(batch, None, head, None))
    g_sh = None if kind == "none" else {key: NamedSharding(mesh, P(head)) for key in args[4]}
    run = jax.jit(_fn("pallas", weights), in_shardings=(x_sh,) * 4 + (g_sh,))
    args = jax.device_put(args, (x_sh,) * 4 + (g_sh,))
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(run)(*args)
        (o, cls), value, grads = run(*args)

    # The wrapping: a shard_map around the pallas call (forward; the backward's is its
    # transpose), the batch over the batch axes, heads over "tensor", the gate by head.
    eqns = _shard_maps(jaxpr)
    assert eqns, "the pallas call is not wrapped in a shard_map"
    x_spec = P(batch, None, head, None)
    in_specs, out_specs = _specs(eqns[0])
    assert in_specs[:4] == (x_spec,) * 4
    assert x_spec in out_specs and P(batch, head, None) in out_specs
    if kind != "none":
        assert in_specs[4 : 4 + len(args[4])] == (P(head),) * len(args[4])
    for eqn in eqns:
        assert "pallas_call" in str(eqn.params["jaxpr"])
    assert o.sharding.spec[0] == batch or tuple(o.sharding.spec[0]) == tuple(batch)

    (o_r, cls_r), value_r, grads_r = reference(kind)
    errors = {"o": _rel_err(o, o_r), "agt_cls": _rel_err(cls, cls_r), "loss": _rel_err(value, value_r)}
    for name, g, g_r in zip(("dq", "dq2", "dk", "dv"), grads[:4], grads_r[:4]):
        errors[name] = _rel_err(g, g_r)
    if kind == "none":
        assert grads[4] is None
    else:
        assert set(grads[4]) == set(grads_r[4])
        for key in grads[4]:
            errors[f"d{key}"] = _rel_err(grads[4][key], grads_r[4][key])
    bad = {name: e for name, e in errors.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad} (all: {errors})"


def test_no_mesh_no_shard_map():
    args, weights = _inputs("hidden")
    jaxpr = jax.make_jaxpr(_fn("pallas", weights))(*args)
    assert not _shard_maps(jaxpr)
    assert "pallas_call" in str(jaxpr)
    # A mesh whose axes all have size 1 is the same as none.
    with jax.set_mesh(_mesh(("data", "fsdp"), (1, 1))):
        assert not _shard_maps(jax.make_jaxpr(_fn("pallas", weights))(*args))


def test_shard_plan_falls_back_per_dimension():
    def plan(axes, shape, b, h):
        mesh = _mesh(axes, shape)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            p = shard_plan(b, h)
        return None if p is None else p[2:]

    assert plan(("data", "fsdp"), (4, 2), 8, 4) == (("data", "fsdp"), None)
    assert plan(("data", "fsdp"), (8, 1), 8, 4) == (("data",), None)  # size-1 axes are skipped
    assert plan(("data", "fsdp"), (4, 2), 4, 4) == (("data",), None)  # the longest prefix that divides
    assert plan(("data", "fsdp"), (4, 2), 6, 4) == ((), None)  # batch replicated, still wrapped
    assert plan(("data", "fsdp", "tensor"), (2, 2, 2), 8, 4) == (("data", "fsdp"), "tensor")
    assert plan(("data", "fsdp", "tensor"), (2, 1, 4), 8, 6) == (("data",), None)  # 6 heads over 4
    assert plan(("data", "fsdp"), (1, 1), 8, 4) is None


def test_uneven_batch_still_correct():
    """B=6 over data=4 x fsdp=2: nothing divides, every device computes the whole batch."""
    mesh = _mesh(("data", "fsdp"), (4, 2))
    r = np.random.default_rng(1)
    q, q2, k, v = (jnp.asarray(r.normal(size=(6, 9, 2, 8)), jnp.float32) for _ in range(4))
    gate = {"w2": jnp.asarray(r.normal(size=(2, 2, 2)), jnp.float32), "b2": jnp.zeros((2, 2), jnp.float32)}
    with jax.set_mesh(mesh):
        o, cls = jax.jit(lambda *a: interaction_attention(*a, impl="pallas"))(q, q2, k, v, gate)
    o_r, cls_r = interaction_attention(q, q2, k, v, gate, impl="xla")
    assert _rel_err(o, o_r) <= TOL and _rel_err(cls, cls_r) <= TOL


def test_trainer_step_traces_pallas_per_shard():
    """The trainer's jitted steps trace under the mesh: the model's pallas attention is wrapped."""
    from lfi_jax.checkpoint import abstract_like
    from lfi_jax.config import load_config_file, model_config
    from lfi_jax.trainer import create_trainer

    c = load_config_file("demo", "ivit,runlocal")
    c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.mlp_dim, c.model.gate_hidden = 1, 32, 2, 64, 2
    c.model.attn_impl = "pallas"
    c.batch_size = 8
    c.mesh.axes, c.mesh.shape = ("data", "fsdp", "tensor"), (2, 2, 2)
    mesh = shd.make_mesh(c.mesh)
    trainer, _, shapes = create_trainer(c, model_config(c), mesh, seed=0)
    state = abstract_like(shapes, trainer.state_shardings)
    g = (c.data.image_size // c.model.patch_size) ** 2
    s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape)))  # noqa: E731
    batch = {
        "image": s((8, c.data.image_size, c.data.image_size, 3), jnp.float32),
        "label": s((8,), jnp.int32),
        "teacher": s((8, g), jnp.float32),
        "teacher_mask": s((8,), jnp.float32),
    }
    eqns = _shard_maps(trainer.train_step.trace(state, batch).jaxpr)
    assert eqns, "the train step's pallas attention is not wrapped in a shard_map"
    for eqn in eqns:
        assert _specs(eqn)[0][0] == P(("data", "fsdp"), None, "tensor", None)
    eval_batch = {"image": batch["image"], "label": batch["label"], "valid": s((8,), jnp.float32)}
    assert _shard_maps(trainer.eval_step.trace(state["params"], eval_batch).jaxpr)


def test_sharded_masked_cross_attention_matches_xla():
    """Key mask and Nq != Nk under data=4 x fsdp=2: the mask is split with the batch."""
    mesh = _mesh(("data", "fsdp"), (4, 2))
    r = np.random.default_rng(3)
    q, q2 = (jnp.asarray(r.normal(size=(8, 9, 2, 8)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(r.normal(size=(8, 21, 2, 8)), jnp.float32) for _ in range(2))
    gate = GateParams(None, None, jnp.asarray(r.normal(size=(2, 2, 2)), jnp.float32),
                      jnp.asarray(r.normal(size=(2, 2)), jnp.float32))
    mask = jnp.asarray(r.random((8, 21)) > 0.3).at[:, 0].set(True)
    w = jnp.asarray(r.normal(size=(8, 9, 2, 8)), jnp.float32)

    def run(impl):
        def loss(q, q2, k, v, gate):
            o, cls = interaction_attention(q, q2, k, v, gate, impl=impl, key_mask=mask)
            return jnp.sum(o * w) + jnp.sum(cls), (o, cls)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))

    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(run("pallas"))(q, q2, k, v, gate)
        (value, (o, cls)), grads = run("pallas")(q, q2, k, v, gate)
    assert _shard_maps(jaxpr)
    (value_r, (o_r, cls_r)), grads_r = run("xla")(q, q2, k, v, gate)
    pairs = [(o, o_r), (cls, cls_r), (value, value_r)] + list(zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)))
    for x, ref in pairs:
        assert _rel_err(x, ref) <= TOL
