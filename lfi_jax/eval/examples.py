"""Examples for the figures: which teacher map a run's example has (the run's own store, the
oracle recomputed, or none, and why), examples drawn across classes, the model's class names."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lfi_jax.data.sources import get_source
from lfi_jax.data.transforms import transform_example
from lfi_jax.eval.predict import train_class_names
from lfi_jax.run import RUN_INFO_FILE
from lfi_jax.teacher.oracle import oracle_entry
from lfi_jax.teacher.provenance import check_compatible
from lfi_jax.teacher.resolve import resolve_teacher
from lfi_jax.teacher.store import TeacherStore


def run_store_path(run) -> str | None:
    """The run's own teacher store (`lfi_jax.teacher.resolve`: `teacher.store`, or the store
    the trainer built for an automatic teacher); None when the run reads no teacher or its
    automatic store is not there."""
    try:
        choice = resolve_teacher(run.config, workdir=run.workdir, build=False)
    except ValueError:
        return None
    return choice.store if choice.active and choice.ready else None


def _oracle_settings(prov) -> dict[str, Any]:
    t = prov.teacher
    return dict(grid=t["grid"], geometry=t["geometry"], target=t["target"], seed=t["seed"], **prov.noise)


def _covers(store: TeacherStore, data_cfg, split: str) -> bool:
    """Whether `store` holds the maps of (data_cfg's source, split) (same data, not same path)."""
    try:
        check_compatible(store, spec=data_cfg.source, split=split, options=data_cfg.options.to_dict())
    except ValueError:
        return False
    return True


class TeacherSource:
    """Per-example teacher entries for a (data, split): a store that covers it, or the oracle
    recomputed; `describe` says which (and, where there is none, why)."""

    def __init__(self, run, data_cfg, split: str, store_path: str | None = None):
        self.store = None
        self.oracle = None
        cfg = run.config
        path = store_path or run_store_path(run)
        if store_path:
            self.store = TeacherStore(store_path)
            self.describe = f"store {store_path}"
        elif path:
            store = TeacherStore(path)
            prov = store.provenance
            if _covers(store, data_cfg, split):
                self.store = store
                self.describe = f"store {path}"
            elif prov.backend == "oracle":
                self.oracle = _oracle_settings(prov)
                self.describe = f"oracle recomputed with the settings of store {path} ({self.oracle})"
            else:
                self.describe = (
                    f"none: the run's {prov.backend} store {path} covers {prov.data}/{prov.split}, "
                    f"not {data_cfg.source}/{split}"
                )
        elif cfg.model.interaction_constraint and cfg.teacher.get("auto", "") == "oracle":
            noise = {k: float(cfg.teacher.noise[k]) for k in ("blur", "shift", "uniform")}
            self.oracle = dict(grid=int(cfg.teacher.grid), seed=int(cfg.seed), **noise)
            self.describe = f"oracle recomputed ({self.oracle})"
        elif not cfg.model.interaction_constraint:
            self.describe = "none: the run reads no teacher (model.interaction_constraint is off)"
        else:
            self.describe = "none: the run's teacher store is not there"

    def get(self, example: dict):
        if self.store is not None:
            return self.store.get(example["id"])
        if self.oracle is not None and ("mask" in example or "boxes" in example):
            return oracle_entry(example, self.oracle)
        return None


def default_split(run, data_cfg) -> str:
    """The run's first eval split, unless the run's own teacher is a store that cannot be
    recomputed (a VLM's) for the run's data: then the split that store covers."""
    path = run_store_path(run)
    if path and data_cfg.source == run.config.data.source:
        prov = TeacherStore(path).provenance
        if prov.backend != "oracle" and prov.split:
            return str(prov.split)
    return str(run.config.data.eval_splits[0])


def source_labels(source) -> np.ndarray | None:
    """Every example's label, where the source can say without decoding images."""
    labels = getattr(source, "labels", None)
    return None if labels is None else np.asarray(labels())


def sample_across_classes(labels: np.ndarray | None, size: int, n: int, seed: int = 0) -> list[int]:
    """n example indices drawn round robin over the classes (in class order), each class in
    an order shuffled by `seed`; without labels, n indices drawn uniformly with `seed`."""
    rng = np.random.default_rng(seed)
    n = min(n, size)
    if labels is None:
        return sorted(int(i) for i in rng.choice(size, n, replace=False))
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(int(q.pop(0)))
    return out


def _recorded_class_names(workdir: str) -> list[str] | None:
    """The training classes the trainer recorded at start (WORKDIR/run_info.json), if any."""
    path = os.path.join(workdir, RUN_INFO_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        names = (json.load(f).get("data") or {}).get("class_names")
    return list(names) if names else None


def model_class_names(run, data_names: Sequence[str]) -> list[str]:
    """Names of the model's output classes: as the trainer recorded them, else the training
    source's, else the data's where the counts agree, else the indices."""
    c = int(run.mcfg.num_classes)
    names = _recorded_class_names(run.workdir)
    if names is None or len(names) != c:
        names = train_class_names(run.config)
    if names is not None and len(names) == c:
        return list(names)
    if len(data_names) == c:
        return list(data_names)
    return [str(i) for i in range(c)]


def load_examples(
    run, data_cfg, split: str, indices: Sequence[int], teacher: TeacherSource | None, human=None
) -> dict[str, Any]:
    """Images (raw and model input), labels, and teacher / human maps on the student grid."""
    source = get_source(data_cfg.source, split, data_cfg.options.to_dict())
    gh, gw = run.mcfg.grid
    raw, inputs, labels, ids = [], [], [], []
    tmaps, tmask, hmaps, hmask = [], [], [], []
    for i in indices:
        ex = source[int(i)]
        kw = dict(image_size=int(data_cfg.image_size), grid_hw=(gh, gw), mean=data_cfg.mean, std=data_cfg.std)
        entry = teacher.get(ex) if teacher is not None else None
        t = transform_example(ex["image"], entry, **kw)
        raw.append(ex["image"])
        inputs.append(t["image"])
        labels.append(int(ex["label"]))
        ids.append(ex["id"])
        tmaps.append(t["teacher"])
        tmask.append(float(t["teacher_mask"]))
        if human is not None:
            if ex["id"] not in human:
                raise KeyError(f"human store {human.path} has no map for example {ex['id']!r}")
            h = transform_example(ex["image"], human[ex["id"]], **kw)
            hmaps.append(h["teacher"])
            hmask.append(float(h["teacher_mask"]))
    out = {
        "raw": raw,
        "images": np.stack(inputs).astype(np.float32),
        "labels": np.asarray(labels),
        "ids": ids,
        "teacher": np.stack(tmaps).astype(np.float64),
        "teacher_mask": np.asarray(tmask),
        "class_names": list(source.class_names),
    }
    if human is not None:
        out["human"] = np.stack(hmaps).astype(np.float64)
        out["human_mask"] = np.asarray(hmask)
    return out
