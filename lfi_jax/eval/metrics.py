"""Classification metrics in numpy (float64): top-1, per-class accuracy, confusion, ECE, NLL,
and the reduction of a model's logits onto another label space through a class map.

Everything here works on plain arrays, so the trainer's evaluator, `lfi_jax.evaluate` and the
tests share one definition of each number.

Class maps. A model trained on one label space is scored on another with a JSON object
{target class: [source classes]} (source classes by name, as the training source names them,
or by index). The score of a target class is the log-sum-exp of its source classes' logits
(default, `reduce="logsumexp"`): the softmax over targets is then exactly the model's
probability mass on each group, renormalised over the mapped classes, which keeps the
calibration numbers meaningful. `reduce="max"` takes the largest logit instead. Source
classes mapped to no target are ignored. Every class of the evaluated data must have a
mapping (an unmapped one is an error naming it); keys for classes the data lacks are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("lfi_jax.eval")

ECE_BINS = 15
REDUCES = ("logsumexp", "max")


# --------------------------------------------------------------------------- metrics


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows whose highest score is at the label."""
    return float((np.asarray(scores).argmax(-1) == np.asarray(labels)).mean())


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[float, list[dict]]:
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


def classification_metrics(
    scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], n_bins: int = ECE_BINS
) -> dict[str, Any]:
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
        "top1": top1(scores, labels),
        "mean_per_class_accuracy": float(np.mean(present)),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "class_names": list(class_names),
        "ece": ece,
        "ece_bins": n_bins,
        "calibration": bins,
        "nll": nll,
    }


def align_labels(
    labels: np.ndarray, data_names: Sequence[str], train_names: Sequence[str] | None, num_classes: int, where: str
) -> tuple[np.ndarray, list[str]]:
    """Labels of the evaluated data in the model's label space (by class name where known)."""
    if train_names is not None and len(train_names) == num_classes:
        index = {c: i for i, c in enumerate(train_names)}
        unknown = [c for c in data_names if c not in index]
        if unknown:
            raise ValueError(
                f"{where}: classes {unknown} are not among the model's {num_classes} classes; "
                "pass --class_map to map label spaces"
            )
        lut = np.asarray([index[c] for c in data_names], np.int64)
        return lut[np.asarray(labels)], list(train_names)
    if len(data_names) != num_classes:
        raise ValueError(f"{where}: the model has {num_classes} classes, the data {len(data_names)}; pass --class_map")
    return np.asarray(labels), list(data_names)


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
    class_map: Mapping[str, Sequence],
    target_classes: Sequence[str],
    source_classes: Sequence[str] | None,
    num_source: int,
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
                known = (
                    f"known: {list(source_classes)[:20]}"
                    if source_classes
                    else "the training class names are unavailable; use indices"
                )
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


def score(
    logits: np.ndarray,
    labels: np.ndarray,
    data_names: Sequence[str],
    num_classes: int,
    *,
    class_map: Mapping[str, Sequence] | None = None,
    reduce: str = "logsumexp",
    train_names: Sequence[str] | None = None,
    where: str = "",
) -> dict[str, Any]:
    """Metrics of a model's [n, num_classes] logits on data labelled in `data_names`: in the
    model's label space (classes matched by name where the training names are known), or in
    the class map's."""
    if class_map is not None:
        groups = resolve_class_map(class_map, data_names, train_names, num_classes)
        scores = restrict_logits(logits, groups, reduce)
        m = classification_metrics(scores, labels, data_names)
        m["class_map"] = {t: [int(i) for i in g] for t, g in zip(data_names, groups)}
        m["reduce"] = reduce
        return m
    labels, names = align_labels(labels, data_names, train_names, num_classes, where)
    return classification_metrics(logits, labels, names)
