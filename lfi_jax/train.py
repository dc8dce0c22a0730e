"""The trainer: pure train/eval steps over state pytrees, the loop, metrics, checkpoints.

    python -m lfi_jax.train --config=configs/demo.py:ivit --workdir=runs/ivit \
        [--config.total_steps=500 ...]

The model is split once (`nnx.split`) into a graph definition and a parameter state; the
train step is a pure function of (state, batch) jitted with explicit shardings over a mesh of
all devices, donating the state. The steps trace under the mesh's abstract mesh
(`jax.sharding.use_abstract_mesh`), so ops that need it (the Pallas attention, which runs per
shard in a `jax.shard_map`) find it. Training resumes automatically from the latest checkpoint in
WORKDIR/checkpoints; SIGTERM saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lfi_jax import sharding as shd
from lfi_jax.checkpoint import Checkpointer, abstract_like
from lfi_jax.config import model_config, validate
from lfi_jax.losses import alignment_loss, cross_entropy
from lfi_jax.metrics import MetricWriter, format_eta, setup_logging
from lfi_jax.models.vit import ModelConfig, ViT
from lfi_jax.optim import make_optimizer

log = logging.getLogger("lfi_jax.train")


# --------------------------------------------------------------------------- model + state


def build_model(config: ml_collections.ConfigDict, mcfg: ModelConfig, *, seed: int) -> ViT:
    """A fresh model, or one initialised from a Hugging Face / timm ViT checkpoint."""
    if config.init.hf or config.init.timm:
        from lfi_jax.models import convert
        from lfi_jax.models.ivit import PRETRAINED_GATE_BIAS, ivit_from_vit

        if config.init.hf:
            vit, _ = convert.load_hf_vit(config.init.hf, image_size=mcfg.image_size, num_classes=mcfg.num_classes)
        else:
            vit, _ = convert.load_timm_vit(config.init.timm, image_size=mcfg.image_size, num_classes=mcfg.num_classes)
        if mcfg.interaction_queries:
            bias = mcfg.gate_bias_init if tuple(mcfg.gate_bias_init) != (0.0, 0.0) else PRETRAINED_GATE_BIAS
            return ivit_from_vit(vit, dataclasses.replace(mcfg, gate_bias_init=tuple(bias)), seed=seed)
        return ivit_from_vit(vit, mcfg, seed=seed)  # same architecture: copies every tensor
    return ViT(mcfg, rngs=nnx.Rngs(seed))


@dataclasses.dataclass
class Trainer:
    """Holds the static parts (graph, optimizer, mesh, shardings) and the jitted steps."""

    config: ml_collections.ConfigDict
    mcfg: ModelConfig
    mesh: Any
    graphdef: Any
    tx: Any
    lr_fn: Callable
    trainable: Any
    state_shardings: Any
    train_step: Callable
    eval_step: Callable

    def abstract_state(self, state_shapes):
        return abstract_like(state_shapes, self.state_shardings)


def _loss_fn(params, graphdef, batch, config, mcfg):
    model = nnx.merge(graphdef, params)
    logits, aux = model(batch["image"])
    task = cross_entropy(logits, batch["label"], label_smoothing=config.loss.label_smoothing)
    if mcfg.interaction_constraint:
        align = alignment_loss(
            aux["cls_attn"],
            batch["teacher"],
            batch["teacher_mask"],
            direction=config.loss.align_direction,
            eps=config.loss.align_eps,
        )
    else:
        align = jnp.zeros((), jnp.float32)
    total = task + config.loss.align_weight * align
    acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    return total, {"task_loss": task, "align_loss": align, "train_accuracy": acc}


def make_train_step(graphdef, tx, lr_fn, trainable, config, mcfg, mesh):
    accum = int(config.optim.grad_accum_steps)
    grad_fn = jax.value_and_grad(functools.partial(_loss_fn, graphdef=graphdef, config=config, mcfg=mcfg), has_aux=True)
    bspec = shd.batch_axes(mesh)

    def micro_batches(batch):
        # Microbatch a takes rows a, a + accum, ...: each device's rows stay on that device.
        def split(x):
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            spec = jax.sharding.PartitionSpec(None, bspec, *([None] * (x.ndim - 2)))
            return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

        return jax.tree.map(split, batch)

    @_under_mesh(mesh)
    def step(state, batch):
        params = state["params"]
        if accum == 1:
            (loss, aux), grads = grad_fn(params, batch=batch)
        else:
            def body(carry, mb):
                g_acc, l_acc, a_acc = carry
                (l, a), g = grad_fn(params, batch=mb)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, jax.tree.map(jnp.add, a_acc, a)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            aux0 = {k: jnp.zeros((), jnp.float32) for k in ("task_loss", "align_loss", "train_accuracy")}
            (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), aux0), micro_batches(batch))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss = loss / accum
            aux = jax.tree.map(lambda a: a / accum, aux)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates)
        trainable_grads = jax.tree.map(lambda g, m: g if m else jnp.zeros((), g.dtype), grads, trainable)
        metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(trainable_grads), lr=lr_fn(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


def _under_mesh(mesh):
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


def make_eval_step(graphdef, mesh=None):
    @_under_mesh(mesh)
    def step(params, batch):
        model = nnx.merge(graphdef, params)
        logits, _ = model(batch["image"])
        valid = batch["valid"]
        pred = jnp.argmax(logits, -1)
        correct = (pred == batch["label"]).astype(jnp.float32) * valid
        return {"correct": jnp.sum(correct), "count": jnp.sum(valid), "logits": logits, "pred": pred}

    return step


def create_trainer(config, mcfg: ModelConfig, mesh, *, seed: int):
    """Builds the model abstractly, derives shardings, and returns (trainer, init_state_fn)."""
    abstract_model = nnx.eval_shape(lambda: ViT(mcfg, rngs=nnx.Rngs(seed)))
    graphdef, abs_params = nnx.split(abstract_model, nnx.Param)
    tx, lr_fn, trainable = make_optimizer(config.optim, config.total_steps, abs_params)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    min_size = int(config.mesh.fsdp_min_size)
    state_shapes = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abs_params,
        "opt_state": abs_opt,
    }
    state_shardings = {
        "step": shd.replicated(mesh),
        "params": shd.tree_shardings(abs_params, mesh, fsdp_min_size=min_size),
        "opt_state": shd.tree_shardings(abs_opt, mesh, fsdp_min_size=min_size),
    }
    bsh = shd.batch_sharding(mesh)  # a prefix sharding for every batch leaf
    train_step = jax.jit(
        make_train_step(graphdef, tx, lr_fn, trainable, config, mcfg, mesh),
        in_shardings=(state_shardings, bsh),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        make_eval_step(graphdef, mesh),
        in_shardings=(state_shardings["params"], bsh),
        out_shardings=shd.replicated(mesh),
    )
    trainer = Trainer(config, mcfg, mesh, graphdef, tx, lr_fn, trainable, state_shardings, train_step, eval_step)

    def init_state():
        if config.init.hf or config.init.timm:
            params = nnx.state(build_model(config, mcfg, seed=seed), nnx.Param)
            params = jax.device_put(params, state_shardings["params"])
        else:
            params = jax.jit(
                lambda: nnx.state(ViT(mcfg, rngs=nnx.Rngs(seed)), nnx.Param),
                out_shardings=state_shardings["params"],
            )()
        opt_state = jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), state_shardings["step"])
        return {"step": step, "params": params, "opt_state": opt_state}

    return trainer, init_state, state_shapes


# --------------------------------------------------------------------------- teacher + data


def build_auto_teacher(config, out: str, *, log_fn: Callable[[str], None] | None = None) -> None:
    """Export the teacher `config.teacher` describes (backend `teacher.auto`, default oracle;
    its grid and noise, noise drawn with `config.seed`) for the train split into `out`,
    unless a complete store is already there."""
    if os.path.exists(os.path.join(out, "manifest.json")):
        return
    from lfi_jax.data.sources import get_source
    from lfi_jax.teacher.export import export_store

    t = config.teacher
    backend = t.auto or "oracle"
    (log_fn or log.info)(f"building the {backend} teacher store for {config.data.source}/{config.data.train_split} in {out}")
    source = get_source(config.data.source, config.data.train_split, config.data.options.to_dict())
    export_store(
        source,
        out,
        backend=backend,
        grid=int(t.grid),
        blur=float(t.noise.blur),
        shift=float(t.noise.shift),
        uniform=float(t.noise.uniform),
        seed=int(config.seed),
        data_spec=config.data.source,
    )


def prepare_teacher(config, workdir: str) -> ml_collections.ConfigDict:
    """The teacher config the pipeline sees; builds the oracle store first if asked to."""
    teacher = ml_collections.ConfigDict(config.teacher.to_dict())
    if not config.model.interaction_constraint:
        teacher.store = ""  # nothing reads the teacher: do not load (or build) it
        return teacher
    if teacher.store or not teacher.auto:
        return teacher
    out = os.path.join(workdir, "teacher", config.data.train_split)
    if jax.process_index() == 0:
        build_auto_teacher(config, out)
    _barrier("teacher_store")
    teacher.store = out
    return teacher


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _eval_teacher_cfg(teacher_cfg):
    t = ml_collections.ConfigDict(teacher_cfg.to_dict())
    t.store = ""
    return t


def evaluate_splits(trainer: Trainer, params, config, teacher_cfg, splits=None) -> dict[str, float]:
    from lfi_jax.data.pipeline import make_eval_iterator

    out = {}
    for split in splits if splits is not None else config.data.eval_splits:
        it = make_eval_iterator(
            config.data,
            _eval_teacher_cfg(teacher_cfg),
            split,
            global_batch_size=config.eval_batch_size,
            patch_size=trainer.mcfg.patch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        correct = count = 0.0
        for batch in it:
            batch = {k: batch[k] for k in ("image", "label", "valid")}
            r = trainer.eval_step(params, shd.global_batch(batch, trainer.mesh))
            correct += float(r["correct"])
            count += float(r["count"])
        out[f"{split}/accuracy"] = correct / max(count, 1.0)
        out[f"{split}/count"] = int(count)
    return out


# --------------------------------------------------------------------------- the loop


class _Preemption:
    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading_main():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per `config` in `workdir` (resuming if a checkpoint is there); returns the final
    metrics (including eval accuracies)."""
    from lfi_jax.data.pipeline import make_train_iterator

    validate(config)
    mcfg = model_config(config)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = shd.make_mesh(config.mesh)
    if config.batch_size % (mesh.size if mesh.size else 1):
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {mesh.size} devices")
    if config.eval_batch_size % (mesh.size if mesh.size else 1):  # fail now, not at the first evaluation
        raise ValueError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by the {mesh.size} devices")
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    teacher_cfg = prepare_teacher(config, workdir)
    if mcfg.interaction_constraint and not teacher_cfg.store:
        raise ValueError("config.model.interaction_constraint is on but config.teacher.store is empty")

    trainer, init_state, state_shapes = create_trainer(config, mcfg, mesh, seed=int(config.seed))
    train_iter = make_train_iterator(
        config.data,
        teacher_cfg,
        global_batch_size=config.batch_size,
        patch_size=mcfg.patch_size,
        seed=int(config.seed),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing)
    )
    writer = MetricWriter(workdir, enabled=is_main)
    start = 0
    if ckpt.latest_step() is not None:
        start, state = ckpt.restore(trainer.abstract_state(state_shapes), train_iter)
        writer.truncate_after(start)
        log.info("resumed from step %d in %s", start, workdir)
    else:
        state = init_state()
        if is_main:
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_shapes["params"]))
            n_train = sum(
                int(np.prod(x.shape)) for x, m in zip(jax.tree.leaves(state_shapes["params"]), jax.tree.leaves(trainer.trainable)) if m
            )
            log.info("model: %s parameters (%s trainable), mesh %s", f"{n_params:,}", f"{n_train:,}", dict(mesh.shape))

    total = int(config.total_steps)
    final: dict[str, Any] = {}
    if start >= total:  # already finished: report the final evaluation again
        final.update(evaluate_splits(trainer, state["params"], config, teacher_cfg))
    t_last, n_last, t_start = time.time(), start, time.time()
    with contextlib.ExitStack() as cleanup, _Preemption() as preempt:
        # On any exit: async checkpoint writes finish (nothing saved is lost), prefetch threads stop.
        cleanup.callback(getattr(train_iter, "close", lambda: None))
        cleanup.callback(writer.close)
        cleanup.callback(ckpt.close)
        step = start
        while step < total:
            batch = next(train_iter)
            state, metrics = trainer.train_step(state, shd.global_batch(batch, mesh))
            step += 1
            is_last = step == total
            if (config.log_every and step % config.log_every == 0) or is_last:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                m["examples_per_sec"] = (step - n_last) * config.batch_size / max(now - t_last, 1e-9)
                t_last, n_last = now, step
                writer.write(step, m)
                if is_main:
                    eta = (now - t_start) / max(step - start, 1) * (total - step)
                    print(
                        f"[{config.get('name', 'train')}] step {step}/{total} loss {m['loss']:.4f} "
                        f"(task {m['task_loss']:.4f} align {m['align_loss']:.4f}) "
                        f"{m['examples_per_sec']:.0f} ex/s ETA {format_eta(eta)}",
                        file=sys.stderr,
                        flush=True,
                    )
                final.update(m)
            if (config.eval_every and step % config.eval_every == 0) or is_last:
                ev = evaluate_splits(trainer, state["params"], config, teacher_cfg)
                writer.write(step, ev)
                final.update(ev)
                if is_main:
                    print(f"[{config.get('name', 'train')}] step {step} " + " ".join(f"{k} {v:.4f}" for k, v in ev.items() if k.endswith("accuracy")), file=sys.stderr, flush=True)
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or is_last or preempt.requested:
                ckpt.save(step, state, train_iter, force=True)
            if preempt.requested:
                log.warning("stopped at step %d after SIGTERM; checkpoint saved", step)
                break
    final["step"] = step
    final["preempted"] = bool(preempt.requested)
    return final


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    flags_ = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:arg]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        setup_logging()
        config = flags_.config
        from lfi_jax.distributed import maybe_initialize

        maybe_initialize(config.distributed)
        result = train_and_evaluate(config, flags_.workdir)
        if jax.process_index() == 0:
            print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, bool, str))}))

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
