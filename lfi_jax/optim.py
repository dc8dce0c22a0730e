"""Optimizer: AdamW with warmup + cosine, constant or step-decay lr, gradient clipping, and
freeze patterns."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from lfi_jax.sharding import path_str


def trainable_mask(params: Any, freeze=(), trainable=()) -> Any:
    """True where a parameter is updated. A path matching a `freeze` regex is frozen unless
    it also matches a `trainable` regex. Paths look like 'encoder/layer/3/attention/query/kernel'."""
    freeze_re = [re.compile(p) for p in freeze]
    train_re = [re.compile(p) for p in trainable]

    def one(path, _):
        s = path_str(path)
        frozen = any(r.search(s) for r in freeze_re)
        return (not frozen) or any(r.search(s) for r in train_re)

    return jax.tree_util.tree_map_with_path(one, params)


def schedule(optim_cfg, total_steps: int):
    peak = optim_cfg.lr
    warmup = min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0))
    if optim_cfg.schedule in ("constant", "step"):
        after = optax.constant_schedule(peak)
        if optim_cfg.schedule == "step":  # DETR's drop: x drop_factor at each of drop_steps
            factor = float(optim_cfg.get("drop_factor", 0.1))
            drops = {int(s) - warmup: factor for s in optim_cfg.drop_steps}
            after = optax.piecewise_constant_schedule(peak, drops)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), after], [warmup]
        ) if warmup else after
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=peak * optim_cfg.min_lr_ratio,
    )


def make_optimizer(optim_cfg, total_steps: int, params: Any):
    """(optax transformation, lr schedule, trainable mask)."""
    lr = schedule(optim_cfg, total_steps)
    mask = trainable_mask(params, optim_cfg.freeze, optim_cfg.trainable)
    # No weight decay on biases, norms, embeddings-as-tokens and gate biases (ndim < 2).
    decay_mask = jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)
    parts = []
    if optim_cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
    parts.append(
        optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=optim_cfg.weight_decay, mask=decay_mask)
    )
    tx = optax.chain(*parts)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx, lr, mask


__all__ = ["make_optimizer", "path_str", "schedule", "trainable_mask"]
