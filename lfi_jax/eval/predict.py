"""Predictions of a restored run over one pass of an eval split.

`predict(run, data_cfg, split)` returns every example's logits in source order (a
`Predictions`), whatever the device count: the batch is a multiple of the mesh size and the
padded rows of the last batch are dropped by their `valid` flag. `run` is a restored run
(`lfi_jax.run.Run`: config, mcfg, mesh, graphdef, params).

`make_predict_step` is the jitted forward pass used for it: (params, batch) -> logits, label,
valid and index, replicated; like the trainer's eval step it traces under the mesh's abstract
mesh, so the Pallas attention finds the mesh to run per shard.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from lfi_jax import sharding as shd
from lfi_jax.data.pipeline import make_eval_iterator
from lfi_jax.data.sources import get_source

log = logging.getLogger("lfi_jax.eval")

BATCH_KEYS = ("image", "label", "valid", "index")


@dataclasses.dataclass
class Predictions:
    """Logits [n, C] float32 and labels [n] of every example of `source`, in source order."""

    logits: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: Any


def eval_data_config(config, data: str | None = None, options: Mapping[str, Any] | None = None):
    """config.data with the source replaced by `data` (options inherited only for the same source)."""
    d = ml_collections.ConfigDict(config.data.to_dict())
    if data and data != config.data.source:
        d.source = data
        d.options = ml_collections.ConfigDict(dict(options or {}))
    elif options:
        opts = d.options.to_dict()
        opts.update(options)
        d.options = ml_collections.ConfigDict(opts)
    d.data_ratio = 1.0
    return d


def make_predict_step(graphdef, mesh, params_shardings):
    """A jitted (params, batch) -> {"logits" float32, "label", "valid", "index"}, replicated."""

    def fn(params, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            logits, _ = nnx.merge(graphdef, params)(batch["image"])
        return {
            "logits": logits.astype(np.float32),
            "label": batch["label"],
            "valid": batch["valid"],
            "index": batch["index"],
        }

    return jax.jit(fn, in_shardings=(params_shardings, shd.batch_sharding(mesh)), out_shardings=shd.replicated(mesh))


def predict_batches(
    step, params, batches: Iterable[dict], mesh, n: int, num_classes: int, *, progress=None
) -> tuple[np.ndarray, np.ndarray]:
    """Runs `step` over `batches` (with an "index" per example) and puts each valid row's
    logits and label at its index; every one of the `n` examples must be seen."""
    logits = np.zeros((n, num_classes), np.float32)
    labels = np.full((n,), -1, np.int64)
    seen = np.zeros((n,), bool)
    for b, batch in enumerate(batches):
        out = jax.device_get(step(params, shd.global_batch({k: batch[k] for k in BATCH_KEYS}, mesh)))
        keep = out["valid"] > 0
        idx = out["index"][keep]
        logits[idx] = out["logits"][keep]
        labels[idx] = out["label"][keep]
        seen[idx] = True
        if progress is not None:
            progress(b + 1)
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} of {n} examples were not evaluated")
    return logits, labels


def eval_batch_size(requested: int, devices: int) -> int:
    """`requested` rounded up to a multiple of the device count."""
    return max(devices, int(math.ceil(int(requested) / devices)) * devices)


def predict(run, data_cfg, split: str, *, batch_size: int | None = None, progress: bool = True) -> Predictions:
    """Logits of every example of (data_cfg.source, split), in source order."""
    bs = eval_batch_size(batch_size or run.config.eval_batch_size, run.mesh.size)
    source = get_source(data_cfg.source, split, data_cfg.options.to_dict())
    n = len(source)
    it = make_eval_iterator(
        data_cfg,
        ml_collections.ConfigDict(dict(store="")),
        split,
        global_batch_size=bs,
        patch_size=run.mcfg.patch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        return_index=True,
    )
    step = make_predict_step(run.graphdef, run.mesh, jax.tree.map(lambda x: x.sharding, run.params))
    nb = math.ceil(n / bs)
    report = functools.partial(_report, f"{data_cfg.source}/{split}", nb) if progress else None
    try:
        logits, labels = predict_batches(step, run.params, it, run.mesh, n, run.mcfg.num_classes, progress=report)
    except RuntimeError as e:
        raise RuntimeError(f"{data_cfg.source}/{split}: {e}") from None
    return Predictions(logits, labels, list(source.class_names), source)


def _report(where: str, nb: int, b: int) -> None:
    if b % max(1, nb // 10) == 0:
        print(f"[evaluate] {where}: batch {b}/{nb}", file=sys.stderr, flush=True)


def train_class_names(config) -> list[str] | None:
    """The class names of the run's training source, or None where it cannot be opened."""
    try:
        opts = config.data.options.to_dict()
        opts.pop("data_ratio", None)
        return list(get_source(config.data.source, config.data.train_split, opts).class_names)
    except (FileNotFoundError, ValueError, ImportError) as e:
        log.warning("training class names unavailable (%s); classes are matched by index", e)
        return None
