"""Evaluation of a trained run: accuracy, per-class accuracy, confusion, calibration.

    python -m lfi_jax.evaluate --workdir W [--data SPEC] [--split SPLIT] [--step N]
        [--class_map JSON] [--reduce logsumexp|max] [--out FILE.json]

Restores the latest (or `--step`) checkpoint of W onto whatever devices exist (the config is
W/config.json; the mesh keeps its axes, and falls back to pure data parallel where the saved
shape does not fit), runs one pass over SPEC/SPLIT (default: the run's own source and first
eval split) and writes W/eval/<split>.json (or --out) plus a readable table on stdout:
top-1, per-class accuracy, the confusion matrix (rows: true class, columns: predicted),
the expected calibration error (15 equal-width confidence bins) and the NLL.

Cross-domain / zero-shot (Tables 4-5):

    python -m lfi_jax.evaluate domains --workdirs vit=W1 ivit=W2 \
        --domains art=imagefolder:PACS/art_painting sketch=imagefolder:PACS/sketch \
        [--class_map map.json] [--split test] [--out table.md]

evaluates every model on every domain (`NAME=SPEC[@SPLIT]`) and prints one table, one row
per domain, the models side by side.

Class maps. A model trained on one label space is scored on another with a JSON object
{target class: [source classes]} (source classes by name, as the training source names them,
or by index). The score of a target class is the log-sum-exp of its source classes' logits
(default, `--reduce logsumexp`): the softmax over targets is then exactly the model's
probability mass on each group, renormalised over the mapped classes, which keeps the
calibration numbers meaningful. `--reduce max` takes the largest logit instead. Source
classes mapped to no target are ignored. Every class of the evaluated data must have a
mapping (an unmapped one is an error naming it); keys for classes the data lacks are ignored.

Leave-one-domain-out (configs/pacs.py, configs/vlcs.py) trains on an image-folder layout
with the held-out domain as the test split:

    python -m lfi_jax.evaluate lodo-layout --root PACS --held_out sketch --out data/pacs_lodo/sketch

builds it from symlinks (DIR/train/<class>/<domain>__<file>: the other domains,
DIR/test/<class>/sketch__<file>).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lfi_jax.config import parse_value
from lfi_jax.fileio import atomic_write, write_json_atomic

log = logging.getLogger("lfi_jax.evaluate")

ECE_BINS = 15
REDUCES = ("logsumexp", "max")


# --------------------------------------------------------------------------- restoring a run


@dataclasses.dataclass
class Run:
    """A restored training run: its config, model pieces and parameters."""

    workdir: str
    config: Any  # ml_collections.ConfigDict
    mcfg: Any  # ModelConfig
    mesh: Any
    graphdef: Any
    params: Any
    step: int

    def model(self):
        """The nnx model with the restored parameters (for code that wants modules)."""
        from flax import nnx

        return nnx.merge(self.graphdef, self.params)


def load_config(workdir: str):
    """W/config.json as a ConfigDict (lists where the original had tuples)."""
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return ml_collections.ConfigDict(raw)


def eval_mesh(config, devices=None):
    """The config's mesh on the available devices, else pure data parallel over them."""
    import jax

    from lfi_jax import sharding as shd

    devices = list(jax.devices() if devices is None else devices)
    try:
        return shd.make_mesh(config.mesh, devices)
    except ValueError as e:
        axes = tuple(config.mesh.axes)
        fallback = type(config.mesh)(dict(axes=axes, shape=(-1,) + (1,) * (len(axes) - 1)))
        log.info("mesh %s does not fit %d devices (%s); using %s", tuple(config.mesh.shape), len(devices), e, fallback.shape)
        return shd.make_mesh(fallback, devices)


def load_run(workdir: str, *, step: int | None = None, devices=None) -> Run:
    """Restores W's checkpoint (latest, or `step`) onto `devices` (default: all)."""
    import jax

    from lfi_jax.checkpoint import Checkpointer
    from lfi_jax.config import model_config
    from lfi_jax.train import create_trainer

    config = load_config(workdir)
    mcfg = model_config(config)
    mesh = eval_mesh(config, devices)
    trainer, _, state_shapes = create_trainer(config, mcfg, mesh, seed=int(config.seed))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir} ({ckpt_dir} does not exist)")
    ckpt = Checkpointer(ckpt_dir, keep=max(int(config.keep_checkpoints), 1), async_save=False)
    try:
        steps = sorted(ckpt.manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {ckpt_dir}")
        if step is not None and step not in steps:
            raise ValueError(f"{ckpt_dir} has no checkpoint of step {step} (it has {steps})")
        restored_step, state = ckpt.restore(trainer.abstract_state(state_shapes), step=step)
    finally:
        ckpt.close()
    params = state["params"]
    del state
    jax.block_until_ready(params)
    return Run(os.path.abspath(workdir), config, mcfg, mesh, trainer.graphdef, params, int(restored_step))


# --------------------------------------------------------------------------- data + predictions


def eval_data_config(config, data: str | None = None, options: Mapping[str, Any] | None = None):
    """config.data with the source replaced by `data` (options inherited only for the same source)."""
    import ml_collections

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


def _predict_fn(run: Run):
    import jax
    from flax import nnx

    from lfi_jax import sharding as shd

    rep = shd.replicated(run.mesh)

    def fn(params, batch):
        model = nnx.merge(run.graphdef, params)
        logits, _ = model(batch["image"])
        return {"logits": logits.astype(np.float32), "label": batch["label"], "valid": batch["valid"], "index": batch["index"]}

    return jax.jit(fn, in_shardings=(jax.tree.map(lambda x: x.sharding, run.params), shd.batch_sharding(run.mesh)), out_shardings=rep)


def predict(run: Run, data_cfg, split: str, *, batch_size: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Logits of every example of (data_cfg.source, split), in source order.

    Returns {"logits" [n, C] float32, "labels" [n] int, "class_names", "source"}.
    """
    import jax
    import ml_collections

    from lfi_jax import sharding as shd
    from lfi_jax.data.pipeline import make_eval_iterator
    from lfi_jax.data.sources import get_source

    nd = run.mesh.size
    bs = int(batch_size or run.config.eval_batch_size)
    bs = max(nd, int(math.ceil(bs / nd)) * nd)  # a multiple of the device count
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
    fn = _predict_fn(run)
    logits = np.zeros((n, run.mcfg.num_classes), np.float32)
    labels = np.full((n,), -1, np.int64)
    seen = np.zeros((n,), bool)
    nb = math.ceil(n / bs)
    for b, batch in enumerate(it):
        out = jax.device_get(fn(run.params, shd.global_batch({k: batch[k] for k in ("image", "label", "valid", "index")}, run.mesh)))
        keep = out["valid"] > 0
        idx = out["index"][keep]
        logits[idx] = out["logits"][keep]
        labels[idx] = out["label"][keep]
        seen[idx] = True
        if progress and (b + 1) % max(1, nb // 10) == 0:
            print(f"[evaluate] {data_cfg.source}/{split}: batch {b + 1}/{nb}", file=sys.stderr, flush=True)
    if not seen.all():
        raise RuntimeError(f"{data_cfg.source}/{split}: {int((~seen).sum())} of {n} examples were not evaluated")
    return {"logits": logits, "labels": labels, "class_names": list(source.class_names), "source": source}


def train_class_names(config) -> list[str] | None:
    """The class names of the run's training source, or None where it cannot be opened."""
    from lfi_jax.data.sources import get_source

    try:
        opts = config.data.options.to_dict()
        opts.pop("data_ratio", None)
        return list(get_source(config.data.source, config.data.train_split, opts).class_names)
    except (FileNotFoundError, ValueError, ImportError) as e:
        log.warning("training class names unavailable (%s); classes are matched by index", e)
        return None


# --------------------------------------------------------------------------- class maps


def read_class_map(text_or_path: str) -> dict[str, list]:
    """A class map from a JSON file path or an inline JSON object."""
    s = text_or_path.strip()
    where = "--class_map"
    if not s.startswith("{"):
        where = s
        if not os.path.isfile(s):
            raise FileNotFoundError(f"class map file not found: {s}")
        with open(s) as f:
            s = f.read()
    try:
        m = json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"class map {where}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not m:
        raise ValueError(f"class map {where}: expected a non-empty JSON object {{target: [source classes]}}")
    out = {}
    for k, v in m.items():
        v = [v] if isinstance(v, (str, int)) else v
        if not isinstance(v, list) or not v or not all(isinstance(x, (str, int)) for x in v):
            raise ValueError(f"class map {where}: target {k!r} must map to a non-empty list of class names or indices")
        out[str(k)] = v
    return out


def resolve_class_map(
    class_map: Mapping[str, Sequence], target_classes: Sequence[str], source_classes: Sequence[str] | None, num_source: int
) -> list[list[int]]:
    """For each target class (in order) the source-class indices it gathers."""
    missing = [t for t in target_classes if t not in class_map]
    if missing:
        raise ValueError(f"class map has no entry for the data's classes {missing} (it maps {sorted(class_map)})")
    extra = sorted(set(class_map) - set(target_classes))
    if extra:
        log.info("class map entries for classes the data does not have (ignored): %s", extra)
    index = {c: i for i, c in enumerate(source_classes or [])}
    groups = []
    for t in target_classes:
        idx = []
        for s in class_map[t]:
            if isinstance(s, int):
                if not 0 <= s < num_source:
                    raise ValueError(f"class map: target {t!r}: source class index {s} outside [0, {num_source})")
                idx.append(s)
            elif s in index:
                idx.append(index[s])
            else:
                known = f"known: {list(source_classes)[:20]}" if source_classes else "the training class names are unavailable; use indices"
                raise ValueError(f"class map: target {t!r}: unknown source class {s!r} ({known})")
        groups.append(sorted(set(idx)))
    return groups


def restrict_logits(logits: np.ndarray, groups: Sequence[Sequence[int]], reduce: str = "logsumexp") -> np.ndarray:
    """[n, C] source logits -> [n, T] target scores (log-sum-exp or max over each group)."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce={reduce!r}; expected one of {REDUCES}")
    x = np.asarray(logits, np.float64)
    out = np.empty((x.shape[0], len(groups)), np.float64)
    for t, g in enumerate(groups):
        sub = x[:, list(g)]
        if reduce == "max":
            out[:, t] = sub.max(1)
        else:
            m = sub.max(1, keepdims=True)
            out[:, t] = (m + np.log(np.exp(sub - m).sum(1, keepdims=True)))[:, 0]
    return out


# --------------------------------------------------------------------------- metrics


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """ECE over `n_bins` equal-width bins of the top-class confidence: sum_b |B|/n |acc - conf|.

    Bin b holds confidences in (b/n_bins, (b+1)/n_bins] (the first also holds 0).
    """
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    n = len(labels)
    ece, table = 0.0, []
    for b in range(n_bins):
        sel = bins == b
        k = int(sel.sum())
        if k == 0:
            continue
        acc, c = float(correct[sel].mean()), float(conf[sel].mean())
        ece += k / n * abs(acc - c)
        table.append({"bin": [b / n_bins, (b + 1) / n_bins], "count": k, "accuracy": acc, "confidence": c})
    return float(ece), table


def classification_metrics(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Top-1, per-class accuracy, confusion matrix, ECE and NLL of [n, C] scores (logits)."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.int64)
    n, c = scores.shape
    if len(class_names) != c:
        raise ValueError(f"{c} score columns but {len(class_names)} class names")
    if n == 0:
        raise ValueError("no examples to evaluate")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels outside [0, {c})")
    pred = scores.argmax(1)
    probs = softmax(scores)
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {}
    for i, name in enumerate(class_names):
        k = int(confusion[i].sum())
        per_class[name] = {"count": k, "accuracy": (float(confusion[i, i] / k) if k else None)}
    ece, bins = expected_calibration_error(probs, labels, n_bins)
    nll = float(-np.mean(np.log(np.maximum(probs[np.arange(n), labels], 1e-300))))
    present = [v["accuracy"] for v in per_class.values() if v["accuracy"] is not None]
    return {
        "count": int(n),
        "top1": float((pred == labels).mean()),
        "mean_per_class_accuracy": float(np.mean(present)),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "class_names": list(class_names),
        "ece": ece,
        "ece_bins": n_bins,
        "calibration": bins,
        "nll": nll,
    }


def align_labels(pred: dict[str, Any], train_names: Sequence[str] | None, num_classes: int, where: str) -> tuple[np.ndarray, list[str]]:
    """Labels of the evaluated data in the model's label space (by class name where known)."""
    data_names = pred["class_names"]
    if train_names is not None and len(train_names) == num_classes:
        index = {c: i for i, c in enumerate(train_names)}
        unknown = [c for c in data_names if c not in index]
        if unknown:
            raise ValueError(
                f"{where}: classes {unknown} are not among the model's {num_classes} classes; pass --class_map to map label spaces"
            )
        lut = np.asarray([index[c] for c in data_names], np.int64)
        return lut[pred["labels"]], list(train_names)
    if len(data_names) != num_classes:
        raise ValueError(f"{where}: the model has {num_classes} classes, the data {len(data_names)}; pass --class_map")
    return pred["labels"], list(data_names)


def score(run: Run, pred: dict[str, Any], *, class_map: Mapping[str, Sequence] | None = None, reduce: str = "logsumexp",
          train_names: Sequence[str] | None = None, where: str = "") -> dict[str, Any]:
    """Metrics of predictions, in the model's label space or a class map's."""
    if class_map is not None:
        names = train_names if train_names is not None else None
        groups = resolve_class_map(class_map, pred["class_names"], names, run.mcfg.num_classes)
        scores = restrict_logits(pred["logits"], groups, reduce)
        m = classification_metrics(scores, pred["labels"], pred["class_names"])
        m["class_map"] = {t: [int(i) for i in g] for t, g in zip(pred["class_names"], groups)}
        m["reduce"] = reduce
        return m
    labels, names = align_labels(pred, train_names, run.mcfg.num_classes, where)
    return classification_metrics(pred["logits"], labels, names)


# --------------------------------------------------------------------------- reports


def format_report(m: dict[str, Any], title: str = "") -> str:
    lines = []
    if title:
        lines += [title, ""]
    lines.append(f"top-1 {100 * m['top1']:.2f} %   mean per-class {100 * m['mean_per_class_accuracy']:.2f} %   "
                 f"ECE {100 * m['ece']:.2f} %   NLL {m['nll']:.4f}   n = {m['count']}")
    lines.append("")
    w = max(8, max(len(c) for c in m["class_names"]) + 1)
    lines.append(f"{'class':<{w}} {'count':>6} {'top-1 %':>8}")
    for name in m["class_names"]:
        pc = m["per_class"][name]
        acc = "-" if pc["accuracy"] is None else f"{100 * pc['accuracy']:.1f}"
        lines.append(f"{name:<{w}} {pc['count']:>6} {acc:>8}")
    c = len(m["class_names"])
    if c <= 20:
        lines += ["", "confusion (rows: true, columns: predicted)"]
        cw = max(5, len(str(max(max(r) for r in m["confusion"]))) + 1)
        short = [n[: cw - 1] for n in m["class_names"]]
        lines.append(" " * w + "".join(f"{s:>{cw}}" for s in short))
        for name, row in zip(m["class_names"], m["confusion"]):
            lines.append(f"{name:<{w}}" + "".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--data_option {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = parse_value(v)
    return out


def evaluate_run(
    workdir: str,
    *,
    data: str | None = None,
    split: str | None = None,
    step: int | None = None,
    class_map: Mapping[str, Sequence] | None = None,
    reduce: str = "logsumexp",
    options: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    out: str | None = None,
    devices=None,
    run: Run | None = None,
) -> dict[str, Any]:
    """Evaluates W on one split; writes W/eval/<split>.json (or `out`); returns the record."""
    run = run or load_run(workdir, step=step, devices=devices)
    data_cfg = eval_data_config(run.config, data, options)
    split = split or run.config.data.eval_splits[0]
    where = f"{data_cfg.source}/{split}"
    pred = predict(run, data_cfg, split, batch_size=batch_size)
    names = train_class_names(run.config)
    metrics = score(run, pred, class_map=class_map, reduce=reduce, train_names=names, where=where)
    record = {
        "workdir": run.workdir,
        "step": run.step,
        "data": data_cfg.source,
        "data_options": data_cfg.options.to_dict(),
        "split": split,
        "devices": int(run.mesh.size),
        **metrics,
    }
    path = out or os.path.join(workdir, "eval", f"{split}.json")
    import jax

    if jax.process_index() == 0:
        write_json_atomic(path, record)
    record["path"] = path
    return record


# --------------------------------------------------------------------------- domains


def parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{what} {item!r}: expected NAME=VALUE")
        if name in out:
            raise ValueError(f"{what}: name {name!r} given twice")
        out[name] = value
    return out


def parse_domain(value: str, default_split: str | None) -> tuple[str, str | None]:
    """'imagefolder:PACS/sketch@test' -> ('imagefolder:PACS/sketch', 'test')."""
    spec, sep, split = value.rpartition("@")
    if sep and spec and "/" not in split:
        return spec, split
    return value, default_split


def evaluate_domains(
    workdirs: Mapping[str, str],
    domains: Mapping[str, str],
    *,
    split: str | None = "test",
    class_map: Mapping[str, Sequence] | None = None,
    reduce: str = "logsumexp",
    batch_size: int | None = None,
    devices=None,
) -> dict[str, Any]:
    """Every model on every domain; returns {"models", "domains", "results"[model][domain]}."""
    results: dict[str, dict[str, Any]] = {}
    for mname, wd in workdirs.items():
        run = load_run(wd, devices=devices)
        names = train_class_names(run.config)
        results[mname] = {}
        for dname, value in domains.items():
            spec, dsplit = parse_domain(value, split)
            data_cfg = eval_data_config(run.config, spec)
            dsplit = dsplit or run.config.data.eval_splits[0]
            print(f"[evaluate] {mname} on {dname} ({spec}/{dsplit})", file=sys.stderr, flush=True)
            pred = predict(run, data_cfg, dsplit, batch_size=batch_size, progress=False)
            m = score(run, pred, class_map=class_map, reduce=reduce, train_names=names, where=f"{dname} ({spec}/{dsplit})")
            m.update(data=spec, split=dsplit, step=run.step, workdir=run.workdir)
            results[mname][dname] = m
        del run
    return {"models": list(workdirs), "domains": list(domains), "results": results,
            "class_map": dict(class_map) if class_map else None, "reduce": reduce if class_map else None}


def domains_table(res: dict[str, Any], metric: str = "top1") -> str:
    """Markdown: one row per domain, one column per model (top-1 %), the last-minus-first
    difference when there are two models, and the mean over domains."""
    models, domains = res["models"], res["domains"]
    two = len(models) == 2
    head = ["domain"] + [f"{m} {metric} (%)" for m in models] + ([f"{models[1]} − {models[0]}"] if two else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means = {m: [] for m in models}
    for d in domains:
        vals = [100 * res["results"][m][d][metric] for m in models]
        for m, v in zip(models, vals):
            means[m].append(v)
        row = [d] + [f"{v:.2f}" for v in vals] + ([f"{vals[1] - vals[0]:+.2f}"] if two else [])
        lines.append("| " + " | ".join(row) + " |")
    mv = [float(np.mean(means[m])) for m in models]
    lines.append("| **mean** | " + " | ".join(f"{v:.2f}" for v in mv) + (f" | {mv[1] - mv[0]:+.2f}" if two else "") + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- leave-one-domain-out layout


def make_lodo_layout(root: str, held_out: str, out: str, domains: Sequence[str] | None = None) -> str:
    """OUT/train/<class>/<domain>__<file> (every domain but `held_out`) and OUT/test/<class>/
    <held_out>__<file>, as symlinks into ROOT/<domain>/<class>/<file>. Built in a temporary
    directory and renamed into place; an existing complete layout is kept."""
    from lfi_jax.data.sources import _is_image

    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"domain root not found: {root}")
    all_domains = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    domains = list(domains) if domains else all_domains
    if held_out not in domains:
        raise ValueError(f"held-out domain {held_out!r} is not a directory of {root} (domains: {all_domains})")
    for d in domains:
        if not os.path.isdir(os.path.join(root, d)):
            raise FileNotFoundError(f"domain directory not found: {os.path.join(root, d)}")
    marker = os.path.join(out, "layout.json")
    desc = {"root": root, "held_out": held_out, "train_domains": [d for d in domains if d != held_out]}
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == desc:
                return out
        raise ValueError(f"{out} holds another layout ({marker}); remove it or choose another --out")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", suffix=".tmp", dir=parent)
    counts: dict[str, int] = {}
    for d in domains:
        split = "test" if d == held_out else "train"
        droot = os.path.join(root, d)
        for c in sorted(x for x in os.listdir(droot) if os.path.isdir(os.path.join(droot, x)) and not x.startswith(".")):
            os.makedirs(os.path.join(tmp, split, c), exist_ok=True)
            for f in sorted(os.listdir(os.path.join(droot, c))):
                if _is_image(f):
                    os.symlink(os.path.join(droot, c, f), os.path.join(tmp, split, c, f"{d}__{f}"))
                    counts[d] = counts.get(d, 0) + 1
    for d in domains:
        if not counts.get(d):
            raise ValueError(f"domain {d!r}: no images under {os.path.join(root, d)}/<class>/")
    with open(os.path.join(tmp, "layout.json"), "w") as f:
        json.dump(desc, f, indent=1)
    os.replace(tmp, out)
    log.info("leave-one-domain-out layout in %s: %s", out, counts)
    return out


# --------------------------------------------------------------------------- CLI


def _main_single(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.evaluate", description="Evaluate a training run on one split.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", default=None, help="data source spec (default: the run's own)")
    p.add_argument("--split", default=None, help="split (default: the run's first eval split)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--class_map", default=None, help="JSON file or inline JSON {target: [source classes]}")
    p.add_argument("--reduce", default="logsumexp", choices=REDUCES)
    p.add_argument("--data_option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--out", default=None, help="output JSON (default W/eval/<split>.json)")
    a = p.parse_args(argv)
    cm = read_class_map(a.class_map) if a.class_map else None
    rec = evaluate_run(a.workdir, data=a.data, split=a.split, step=a.step, class_map=cm, reduce=a.reduce,
                       options=parse_options(a.data_option), batch_size=a.batch_size, out=a.out)
    print(format_report(rec, f"{rec['workdir']} step {rec['step']} on {rec['data']}/{rec['split']} ({rec['devices']} devices)"))
    print(f"\nwrote {rec['path']}")
    return 0


def _main_domains(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.evaluate domains", description="Models x domains table.")
    p.add_argument("--workdirs", nargs="+", required=True, metavar="NAME=W")
    p.add_argument("--domains", nargs="+", required=True, metavar="NAME=SPEC[@SPLIT]")
    p.add_argument("--split", default=None, help="split for domains without @SPLIT (default: the run's first eval split; "
                   "any name works for a flat imagefolder)")
    p.add_argument("--class_map", default=None)
    p.add_argument("--reduce", default="logsumexp", choices=REDUCES)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--out", default=None, help="Markdown table path (the JSON goes beside it)")
    a = p.parse_args(argv)
    cm = read_class_map(a.class_map) if a.class_map else None
    res = evaluate_domains(parse_pairs(a.workdirs, "--workdirs"), parse_pairs(a.domains, "--domains"), split=a.split,
                           class_map=cm, reduce=a.reduce, batch_size=a.batch_size)
    table = domains_table(res)
    ece = domains_table(res, "ece")
    text = table + "\n\nExpected calibration error (%):\n\n" + ece + "\n"
    print(text)
    if a.out:
        cmd = "python -m lfi_jax.evaluate domains " + " ".join(argv)
        steps = ", ".join(f"{m} step {next(iter(res['results'][m].values()))['step']}" for m in res["models"])
        atomic_write(a.out, f"Command: `{cmd}`\n\nCheckpoints: {steps}. Top-1 (%):\n\n" + text)
        write_json_atomic(os.path.splitext(a.out)[0] + ".json", res)
        print(f"wrote {a.out} and {os.path.splitext(a.out)[0]}.json")
    return 0


def _main_lodo(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.evaluate lodo-layout",
                                description="Leave-one-domain-out image-folder layout from ROOT/<domain>/<class>/<file>.")
    p.add_argument("--root", required=True)
    p.add_argument("--held_out", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--domains", nargs="*", default=None, help="the domains to use (default: every directory of ROOT)")
    a = p.parse_args(argv)
    out = make_lodo_layout(a.root, a.held_out, a.out, a.domains)
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from lfi_jax.metrics import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        if argv and argv[0] == "domains":
            return _main_domains(argv[1:])
        if argv and argv[0] == "lodo-layout":
            return _main_lodo(argv[1:])
        return _main_single(argv)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
