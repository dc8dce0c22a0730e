"""What the trainer needs to know about a task: a typed `Task` of function references.

The trainer (`lfi_jax.trainer`, looped by `lfi_jax.train.train_and_evaluate`) is one loop for
every task. A task (classification today; detection next) supplies only these functions;
the trainer owns the mesh, the shardings, the optimizer, gradient accumulation, jitting
(explicit shardings, donated state), checkpoints, metrics.jsonl and SIGTERM handling.

The config boundary selects a task by name: `config.task` ("classification" when absent),
looked up in `lfi_jax.tasks.registry.TASKS`. Everywhere past that boundary the `Task`
object itself is passed around.

The protocol (`config` is the run's ml_collections ConfigDict, `mcfg` the task's typed
model config, batches are dicts of numpy arrays whose leading axis is the global batch):

model_config(config) -> mcfg
    The typed model config of `config` (unknown keys are errors naming the key).

new_model(mcfg, seed) -> nnx.Module
    A freshly initialised model. Must be traceable: the trainer calls it under
    `nnx.eval_shape` for the abstract model (graph definition, parameter shapes, shardings,
    without allocating) and under `jax.jit` with the parameters' shardings as outputs for a
    fresh start. All of the model's state must be `nnx.Param` (frozen statistics such as a
    frozen BatchNorm's are Params the optimizer's freeze patterns leave alone).

load_model(config, mcfg, seed) -> nnx.Module | None
    A concrete model initialised from the checkpoint the config names (e.g. `init.hf` /
    `init.timm`), or None when it names none (then `new_model` is used). The result must
    have exactly the abstract model's parameter tree.

loss(model, batch, config) -> (loss, aux)
    The scalar training loss of one (micro-)batch and a flat dict of scalar metrics
    (logged as they are: e.g. "task_loss", "align_loss", "train_accuracy"). Metrics named
    "*_loss" are shown in the progress line. Traced inside the jitted train step; with
    gradient accumulation the loss and every aux metric are averaged over micro-batches.

eval_step(model, batch) -> outputs
    Per-batch outputs (a dict of arrays) of one eval batch; jitted with replicated outputs,
    so every process gets the global batch's outputs (as numpy) for the evaluator.
    Batches from `eval_iterator` carry a "valid" mask [B] (0 on padding rows).

evaluate(config, split, outputs) -> metrics
    Accumulates the eval-step outputs of one pass over `split` (an iterable of dicts of
    numpy arrays, in batch order) into metrics whose keys name the split,
    e.g. {"test_iid/accuracy": 0.93, "test_iid/count": 256}. It may open the split's source
    itself (ground truth for COCO evaluation, say).

train_iterator(config, mcfg, teacher, *, seed, process_index, process_count) -> iterator
    The endless train iterator of this process's share of every global batch; checkpointable
    (`get_state` / `set_state`, a grain iterator). `teacher` is `config.teacher` with `store`
    resolved to the store in use ("" = none).

eval_iterator(config, mcfg, split, *, process_index, process_count) -> iterable
    One pass over `split` with `config.eval_batch_size` global batches (last one padded,
    "valid" = 0 there); each `iter()` starts a fresh pass.

source(config, split) -> DataSource
    The random-access source of `split` (`len`, `class_names`, `example_id`, items): the
    trainer's start-up checks and log read it (class count against the model, the teacher
    store against the data) before anything is written.

summary_keys: tuple of metric names (without the split prefix) printed in the progress
    line after an evaluation, e.g. ("accuracy",) or ("AP", "AP50").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

Batch = Mapping[str, Any]  # leaf name -> array with the batch on axis 0
Metrics = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Task:
    """A task for the trainer, run loader and evaluators (see the module docstring)."""

    name: str
    model_config: Callable[[Any], Any]
    new_model: Callable[[Any, int], Any]
    load_model: Callable[[Any, Any, int], Any | None]
    loss: Callable[[Any, Batch, Any], tuple[Any, dict[str, Any]]]
    eval_step: Callable[[Any, Batch], dict[str, Any]]
    evaluate: Callable[[Any, str, Iterable[dict[str, Any]]], Metrics]
    train_iterator: Callable[..., Iterator[dict[str, Any]]]
    eval_iterator: Callable[..., Iterable[dict[str, Any]]]
    source: Callable[[Any, str], Any]
    summary_keys: tuple[str, ...] = ()


__all__ = ["Batch", "Metrics", "Task"]
