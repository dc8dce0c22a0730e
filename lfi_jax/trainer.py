"""The trainer's static parts and pure steps, for any `lfi_jax.tasks.Task`.

The model is split once (`nnx.split`) into a graph definition and a parameter state; the
train step is a pure function of (state, batch) jitted with explicit shardings over the mesh,
donating the state. The steps trace under the mesh's abstract mesh
(`jax.sharding.use_abstract_mesh`), so ops that need it (the Pallas attention, which runs per
shard in a `jax.shard_map`) find it. The train state is a dict
{"step": int32 [], "params": the model's nnx.Param state, "opt_state": optax state}.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from lfi_jax import sharding as shd
from lfi_jax.checkpoint import abstract_like
from lfi_jax.optim import make_optimizer
from lfi_jax.tasks import Task
from lfi_jax.tasks.registry import get_task


@dataclasses.dataclass
class Trainer:
    """Holds the static parts (task, graph, optimizer, mesh, shardings) and the jitted steps."""

    config: ml_collections.ConfigDict
    mcfg: Any
    mesh: Any
    graphdef: Any
    tx: Any
    lr_fn: Callable
    trainable: Any
    state_shardings: Any
    train_step: Callable
    eval_step: Callable
    task: Task | None = None

    def abstract_state(self, state_shapes):
        return abstract_like(state_shapes, self.state_shardings)


def under_mesh(mesh):
    """Traces the decorated step with `mesh` as the abstract mesh in context: the Pallas
    attention reads it (`jax.sharding.get_abstract_mesh`) to run per shard in a shard_map.
    Unlike `jax.set_mesh` around the calls, this holds for every caller of the jitted step
    (`.lower()` included) and leaves eagerly created arrays alone."""

    def wrap(fn):
        if mesh is None:
            return fn

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args, **kwargs)

        return inner

    return wrap


def make_train_step(task: Task, graphdef, tx, lr_fn, trainable, config, mesh):
    accum = int(config.optim.grad_accum_steps)

    def loss_fn(params, batch):
        return task.loss(nnx.merge(graphdef, params), batch, config)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    bspec = shd.batch_axes(mesh)

    def micro_batches(batch):
        # Microbatch a takes rows a, a + accum, ...: each device's rows stay on that device.
        def split(x):
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            spec = jax.sharding.PartitionSpec(None, bspec, *([None] * (x.ndim - 2)))
            return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

        return jax.tree.map(split, batch)

    @under_mesh(mesh)
    def step(state, batch):
        params = state["params"]
        if accum == 1:
            (loss, aux), grads = grad_fn(params, batch)
        else:
            mbs = micro_batches(batch)

            def body(carry, mb):
                g_acc, l_acc, a_acc = carry
                (l, a), g = grad_fn(params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, jax.tree.map(jnp.add, a_acc, a)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            aux_shapes = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], mbs))[1]
            aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes)
            (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), aux0), mbs)
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss = loss / accum
            aux = jax.tree.map(lambda a: a / accum, aux)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates)
        trainable_grads = jax.tree.map(lambda g, m: g if m else jnp.zeros((), g.dtype), grads, trainable)
        metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(trainable_grads), lr=lr_fn(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


def make_eval_step(task: Task, graphdef, mesh=None):
    @under_mesh(mesh)
    def step(params, batch):
        return task.eval_step(nnx.merge(graphdef, params), batch)

    return step


def abstract_params(task: Task, mcfg, *, seed: int = 0):
    """(graphdef, abstract parameter state) of the task's model, without allocating."""
    model = nnx.eval_shape(lambda: task.new_model(mcfg, seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def param_shardings(config, abs_params, mesh):
    return shd.tree_shardings(abs_params, mesh, fsdp_min_size=int(config.mesh.fsdp_min_size))


def create_trainer(config, mcfg, mesh, *, seed: int, task: Task | None = None):
    """Builds the model abstractly, derives shardings, and returns
    (trainer, init_state_fn, state_shapes). `task` defaults to the one `config.task` names."""
    task = get_task(config) if task is None else task
    graphdef, abs_params = abstract_params(task, mcfg, seed=seed)
    tx, lr_fn, trainable = make_optimizer(config.optim, config.total_steps, abs_params)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    state_shapes = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abs_params,
        "opt_state": abs_opt,
    }
    state_shardings = {
        "step": shd.replicated(mesh),
        "params": param_shardings(config, abs_params, mesh),
        "opt_state": param_shardings(config, abs_opt, mesh),
    }
    bsh = shd.batch_sharding(mesh)  # a prefix sharding for every batch leaf
    train_step = jax.jit(
        make_train_step(task, graphdef, tx, lr_fn, trainable, config, mesh),
        in_shardings=(state_shardings, bsh),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        make_eval_step(task, graphdef, mesh),
        in_shardings=(state_shardings["params"], bsh),
        out_shardings=shd.replicated(mesh),
    )
    trainer = Trainer(config, mcfg, mesh, graphdef, tx, lr_fn, trainable, state_shardings, train_step, eval_step, task)

    def init_state():
        model = task.load_model(config, mcfg, seed)
        if model is not None:
            params = jax.device_put(nnx.state(model, nnx.Param), state_shardings["params"])
        else:
            params = jax.jit(
                lambda: nnx.state(task.new_model(mcfg, seed), nnx.Param),
                out_shardings=state_shardings["params"],
            )()
        opt_state = jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), state_shardings["step"])
        return {"step": step, "params": params, "opt_state": opt_state}

    return trainer, init_state, state_shapes


def eval_outputs(trainer: Trainer, params, batches: Iterable[dict[str, Any]]):
    """The eval step's outputs (numpy, replicated: the global batch on every process) per batch."""
    for batch in batches:
        yield jax.device_get(trainer.eval_step(params, shd.global_batch(batch, trainer.mesh)))


def evaluate_splits(trainer: Trainer, params, config, splits=None) -> dict[str, float]:
    """The task's metrics on each eval split (default `config.data.eval_splits`)."""
    task = trainer.task
    out: dict[str, float] = {}
    for split in config.data.eval_splits if splits is None else splits:
        batches = task.eval_iterator(
            config, trainer.mcfg, split, process_index=jax.process_index(), process_count=jax.process_count()
        )
        out.update(task.evaluate(config, split, eval_outputs(trainer, params, batches)))
    return out
