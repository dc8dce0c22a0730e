"""Image classification with ViT / I-ViT: cross-entropy + the CLS-row alignment loss (SPEC
section 2), top-1 accuracy per eval split. The trainer's `Task` for `config.task = "classification"`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lfi_jax.data.pipeline import make_eval_iterator, make_train_iterator
from lfi_jax.data.sources import get_source
from lfi_jax.losses import (
    ALIGN_REDUCE,
    ALIGN_ROWS,
    alignment_loss,
    cross_entropy,
    input_gradients,
    object_rows_alignment_loss,
    rrr_penalty,
)
from lfi_jax.models.config import ModelConfig, model_config
from lfi_jax.models.convert import build_model  # fresh, or from init.hf / init.timm
from lfi_jax.models.vit import ViT
from lfi_jax.tasks import Task

EVAL_KEYS = ("image", "label", "valid")


def new_model(mcfg: ModelConfig, seed: int) -> ViT:
    return ViT(mcfg, rngs=nnx.Rngs(seed))


def load_model(config: ml_collections.ConfigDict, mcfg: ModelConfig, seed: int) -> ViT | None:
    """The model initialised from `config.init.hf` / `config.init.timm`, or None for a fresh one."""
    if not (config.init.hf or config.init.timm):
        return None
    return build_model(config, mcfg, seed=seed)


def loss_switches(config) -> tuple[float, str, str, float]:
    """(rrr_weight, align_reduce, align_rows, rrr_threshold) of `config.loss`, with the defaults
    of configs written before these keys (0 = no RRR penalty, "per_layer", "cls", 0)."""
    lc = config.loss
    reduce, rows = str(lc.get("align_reduce", "per_layer")), str(lc.get("align_rows", "cls"))
    if reduce not in ALIGN_REDUCE:
        raise ValueError(f"config.loss.align_reduce={reduce!r}; expected one of {ALIGN_REDUCE}")
    if rows not in ALIGN_ROWS:
        raise ValueError(f"config.loss.align_rows={rows!r}; expected one of {ALIGN_ROWS}")
    return float(lc.get("rrr_weight", 0.0)), reduce, rows, float(lc.get("rrr_threshold", 0.0))


def loss(model: ViT, batch, config) -> tuple[Any, dict[str, Any]]:
    rrr_weight, reduce, rows, threshold = loss_switches(config)
    want_rows = rows == "cls_and_object" and model.cfg.interaction_constraint
    if rrr_weight and "teacher" not in batch:
        raise ValueError(
            "config.loss.rrr_weight > 0 reads the teacher maps, which the pipeline supplies only with "
            "model.interaction_constraint on: for the plain ViT set it with loss.align_weight=0"
        )

    def forward(images):
        return model(images, attn_rows=want_rows)

    if rrr_weight:
        (logits, aux), grads = input_gradients(forward, batch["image"].astype(jnp.float32))
        rrr = rrr_penalty(grads, batch["teacher"], model.cfg.grid, batch["teacher_mask"], threshold=threshold)
    else:
        logits, aux = forward(batch["image"])
        rrr = jnp.zeros((), jnp.float32)
    task = cross_entropy(logits, batch["label"], label_smoothing=config.loss.label_smoothing)
    kw = dict(direction=config.loss.align_direction, eps=config.loss.align_eps, reduce=reduce)
    if want_rows:
        attn = aux["attn_rows"]  # [B, L, N, N] head-mean rows; row 0 is the CLS query's
        align = alignment_loss(attn[:, :, None, 0, :], batch["teacher"], batch["teacher_mask"], **kw)
        align = align + object_rows_alignment_loss(attn, batch["teacher"], batch["teacher_mask"], **kw)
    elif model.cfg.interaction_constraint:
        align = alignment_loss(aux["cls_attn"], batch["teacher"], batch["teacher_mask"], **kw)
    else:
        align = jnp.zeros((), jnp.float32)
    total = task + config.loss.align_weight * align
    metrics = {"task_loss": task, "align_loss": align}
    if rrr_weight:
        total = total + rrr_weight * rrr
        metrics["rrr_loss"] = rrr
    acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    return total, {**metrics, "train_accuracy": acc}


def eval_step(model: ViT, batch) -> dict[str, Any]:
    logits, _ = model(batch["image"])
    return {"pred": jnp.argmax(logits, -1).astype(jnp.int32), "label": batch["label"], "valid": batch["valid"]}


def evaluate(config, split: str, outputs: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """Top-1 accuracy over the valid rows of one pass over `split`."""
    correct = count = 0
    for out in outputs:
        valid = np.asarray(out["valid"]) > 0
        correct += int(np.sum((np.asarray(out["pred"]) == np.asarray(out["label"])) & valid))
        count += int(np.sum(valid))
    return {f"{split}/accuracy": correct / max(count, 1), f"{split}/count": count}


def train_iterator(config, mcfg: ModelConfig, teacher, *, seed: int, process_index: int = 0, process_count: int = 1):
    return make_train_iterator(
        config.data,
        teacher,
        global_batch_size=config.batch_size,
        patch_size=mcfg.patch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )


class _Keys:
    """A re-iterable view of an eval iterable keeping only the leaves the eval step reads."""

    def __init__(self, it, keys):
        self._it, self._keys = it, keys

    def __iter__(self):
        for batch in self._it:
            yield {k: batch[k] for k in self._keys}


def eval_iterator(config, mcfg: ModelConfig, split: str, *, process_index: int = 0, process_count: int = 1):
    teacher = ml_collections.ConfigDict(config.teacher.to_dict())
    teacher.store = ""  # evaluation reads no teacher maps
    it = make_eval_iterator(
        config.data,
        teacher,
        split,
        global_batch_size=config.eval_batch_size,
        patch_size=mcfg.patch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return _Keys(it, EVAL_KEYS)


def source(config, split: str):
    """The data source of `split` as the pipeline opens it (the train split with `data.data_ratio`)."""
    opts = config.data.options.to_dict()
    if split == config.data.train_split and float(config.data.data_ratio) != 1.0:
        opts["data_ratio"] = float(config.data.data_ratio)
    return get_source(config.data.source, split, opts)


TASK = Task(
    name="classification",
    model_config=model_config,
    new_model=new_model,
    load_model=load_model,
    loss=loss,
    eval_step=eval_step,
    evaluate=evaluate,
    train_iterator=train_iterator,
    eval_iterator=eval_iterator,
    source=source,
    summary_keys=("accuracy",),
)
