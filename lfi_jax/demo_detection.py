"""The detection main job: DETR vs I-DETR on the embedded `shortcut_digits_det` benchmark.

    python -m lfi_jax.demo --task=detection --workdir=runs/det_demo [--seeds=3]
        [--models=detr,idetr,idetr_shuffled] [--runlocal] [--set KEY=VALUE ...]

Per seed s: the dense oracle teacher store of the train split is built once in
WORKDIR/teacher_seed<s> (data drawn with seed s) and shared by the models that read a
teacher, and the backbone is pretrained once on the train split's digit crops into
WORKDIR/backbone_seed<s>-<hash>.safetensors (`lfi_jax.pretrain_backbone`, the stand-in for DETR's
ImageNet backbone; `--set backbone_pretrain.steps=0` trains everything from scratch) and shared,
frozen, by every model of the seed; each model trains `configs/detection_demo.py:<model>` in WORKDIR/<model>_seed<s>.
A model name ending in `_shuffled` is the teacher-shuffled control: it reads
WORKDIR/teacher_seed<s>_shuffled<k>, a copy of the store whose maps are permuted across the
images (a derangement drawn with `teacher.shuffle_seed` k), so the maps keep their statistics
but no longer point at the image's objects. Then prints a table of val AP / AP50 per model
(mean ± sample std over seeds) and each model's gain over DETR on the same seeds, and writes
WORKDIR/results.json. Finished runs are not redone: re-running only fills what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lfi_jax import train
from lfi_jax.cli import parse_sets
from lfi_jax.config import load_config_file, set_key
from lfi_jax.data.sources import get_source
from lfi_jax.experiments.base import stats
from lfi_jax.experiments.runner import checkpoint_complete
from lfi_jax.fileio import write_json_atomic
from lfi_jax.metrics import read_metrics, setup_logging
from lfi_jax.pretrain_backbone import pretrain_backbone
from lfi_jax.teacher.export import export_store
from lfi_jax.teacher.store import MANIFEST, StoreWriter, TeacherStore

CONFIG = "detection_demo"
MODELS = ("detr", "idetr")
ROWS = ("detr", "idetr", "iq_gc", "ic_only", "iq_ic")  # configs/detection_demo.py MODELS
SPLIT = "val"
METRICS = ("AP", "AP50")
SHUFFLED = "_shuffled"
STORE_KEYS = ("backend", "data", "split", "data_options", "data_identity", "class_names", "teacher")


def log(msg: str) -> None:
    print(f"[demo detection] {msg}", flush=True)


def model_config(model: str, seed: int, *, runlocal: bool = False, sets: dict[str, Any] | None = None,
                 config_file: str = CONFIG):
    """The config of one run: `configs/<config_file>.py:<model>` (default detection_demo; any
    config with the same arguments: model[,shuffled][,runlocal]) with seed s for the model and
    the data, then `sets` applied."""
    base, shuffled = (model[: -len(SHUFFLED)], True) if model.endswith(SHUFFLED) else (model, False)
    arg = ",".join([base] + (["shuffled"] if shuffled else []) + (["runlocal"] if runlocal else []))
    config = load_config_file(config_file, arg)
    for k, v in (sets or {}).items():
        set_key(config, k, v)
    config.seed = int(seed)
    config.data.options.seed = int(seed)
    return config


def shuffle_store(src: str, out: str, seed: int) -> TeacherStore:
    """A copy of the store at `src` whose maps are permuted across its examples: example i gets
    the map of example perm[i], perm a derangement drawn with `seed` (nobody keeps its own map).
    The data identity is the source store's (it fits the same data); the teacher record says
    `shuffled: {seed, source}`."""
    if os.path.exists(os.path.join(out, MANIFEST)):
        return TeacherStore(out)
    store = TeacherStore(src)
    ids = store.ids()
    n = len(ids)
    if n < 2:
        raise ValueError(f"teacher store {src}: {n} example(s), nothing to shuffle")
    rng = np.random.default_rng([int(seed), n])
    perm = rng.permutation(n)
    while (perm == np.arange(n)).any():  # a derangement: rejection, ~e draws on average
        perm = rng.permutation(n)
    m = store.manifest
    manifest = {k: m[k] for k in STORE_KEYS if k in m}
    manifest["teacher"] = {**dict(m.get("teacher") or {}), "shuffled": {"seed": int(seed), "source": src}}
    shard_size = int(m.get("shard_size", 1024))
    writer = StoreWriter(out, manifest, num_examples=n, shard_size=shard_size)
    for i in range(writer.num_shards):
        if not writer.shard_done(i):
            writer.write_shard(i, [(ids[j], store[ids[perm[j]]]) for j in writer.shard_range(i)])
    writer.finalize()
    store.close()
    return TeacherStore(out)


def ensure_teacher(config, workdir: str, seed: int) -> str:
    """The oracle_dense store of the train split for `seed` (built once), or its shuffled copy."""
    path = os.path.join(workdir, f"teacher_seed{seed}")
    if not os.path.exists(os.path.join(path, MANIFEST)):
        log(f"building the oracle_dense teacher store in {path}")
        opts = config.data.options.to_dict()
        source = get_source(config.data.source, config.data.train_split, opts)
        export_store(source, path, "oracle_dense", data_spec=config.data.source, progress=False,
                     grid=config.teacher.grid)
    if not config.teacher.get("shuffle", False):
        return path
    k = int(config.teacher.shuffle_seed)
    shuffled = os.path.join(workdir, f"teacher_seed{seed}_shuffled{k}")
    if not os.path.exists(os.path.join(shuffled, MANIFEST)):
        log(f"writing the teacher-shuffled copy of {path} in {shuffled}")
    shuffle_store(path, shuffled, k)
    return shuffled


def finished(run_dir: str, config, keys: Sequence[str] | None = None) -> dict[str, Any] | None:
    """What a finished run logged at its last step (its checkpoint there and every metric key of
    `keys`, default val/AP and val/AP50), else None."""
    total = int(config.total_steps)
    if not checkpoint_complete(run_dir, total) or not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return None
    out: dict[str, Any] = {}
    for row in read_metrics(run_dir):
        if row["step"] == total:
            out.update(row)
    keys = [f"{SPLIT}/{m}" for m in METRICS] if keys is None else keys
    return out if all(k in out for k in keys) else None


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per model: stats of each metric and of the wall time; per model but DETR: its gain over
    DETR, per seed (the same seeds) and its stats."""
    summary: dict[str, Any] = {}
    for model, rs in runs.items():
        entry = {m: stats([r[f"{SPLIT}/{m}"] for r in rs]) for m in METRICS}
        entry["wall_s"] = stats([r["wall_s"] for r in rs if r.get("wall_s") is not None] or [0.0])
        entry["seeds"] = [r["seed"] for r in rs]
        summary[model] = entry
    base = {r["seed"]: r for r in runs.get("detr", [])}
    for model, rs in runs.items():
        if model == "detr" or not base:
            continue
        pairs = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
        if pairs:
            summary[model]["gain_over_detr"] = {
                m: stats([r[f"{SPLIT}/{m}"] - b[f"{SPLIT}/{m}"] for r, b in pairs]) for m in METRICS
            }
    return summary


def _ms(s: dict[str, Any]) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def format_table(summary: dict[str, Any]) -> str:
    lines = ["| model | val AP | val AP50 | AP gain over DETR | AP50 gain over DETR | wall (s) |",
             "|---|---|---|---|---|---|"]
    for model, e in summary.items():
        g = e.get("gain_over_detr")
        gains = [_ms(g[m]) if g else "" for m in METRICS]
        lines.append(f"| {model} | {_ms(e['AP'])} | {_ms(e['AP50'])} | {gains[0]} | {gains[1]} | "
                     f"{e['wall_s']['mean']:.0f} |")
    return "\n".join(lines)


def attach_backbone(config, workdir: str, seed: int) -> str | None:
    """When the config asks the demo to pretrain the backbone (`backbone_pretrain.steps` > 0 and
    no `init.backbone` given): point the run at WORKDIR/backbone_seed<s>-<hash of what it depends
    on>.safetensors (`init.backbone`; frozen through `optim.freeze` with `backbone_pretrain.freeze`)
    and return that path (the file is built by `ensure_backbone`); else None, config untouched."""
    bp = config.get("backbone_pretrain")
    if bp is None or int(bp.steps) <= 0 or config.init.get("backbone", ""):
        return None
    key = {"backbone": config.model.backbone.to_dict(), "pretrain": bp.to_dict(), "data": config.data.source,
           "options": config.data.options.to_dict(), "classes": int(config.model.num_classes)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    path = os.path.join(workdir, f"backbone_seed{seed}-{digest}.safetensors")
    config.init.backbone = path
    if bp.get("freeze", True):
        config.optim.freeze = tuple(config.optim.freeze) + (r"^backbone/",)
    return path


def ensure_backbone(config, path: str) -> str:
    """The pretrained backbone file `path`, trained (`lfi_jax.pretrain_backbone`) if missing."""
    if not os.path.exists(path):
        log(f"seed {config.seed}: pretraining the backbone on the train split's box crops into {path}")
        pretrain_backbone(config, path, log=log)
    return path


def run_detection_demo(workdir: str, *, seeds: int = 1, models: Sequence[str] = MODELS, runlocal: bool = False,
                       sets: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains what is missing, writes WORKDIR/results.json, prints the table; returns the payload."""
    if seeds < 1:
        raise ValueError(f"--seeds={seeds} must be >= 1")
    unknown = [m for m in models if m.removesuffix(SHUFFLED) not in ROWS]
    if unknown or not models:
        raise ValueError(f"--models: unknown {unknown or models}; expected some of {list(ROWS)}, each optionally "
                         f"with the suffix {SHUFFLED!r} (the teacher-shuffled control)")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    for seed in range(seeds):
        for model in models:
            config = model_config(model, seed, runlocal=runlocal, sets=sets)
            backbone = attach_backbone(config, workdir, seed)
            run_dir = os.path.join(workdir, f"{model}_seed{seed}")
            final = finished(run_dir, config)
            wall = None
            if final is not None:
                log(f"{model} seed {seed}: finished earlier in {run_dir}")
            else:
                if config.model.interaction_constraint:
                    config.teacher.store = ensure_teacher(config, workdir, seed)
                if backbone is not None:
                    ensure_backbone(config, backbone)
                log(f"{model} seed {seed}: training {config.total_steps} steps in {run_dir}")
                t = time.time()
                final = train.train_and_evaluate(config, run_dir)
                wall = time.time() - t
                if final.get("preempted"):
                    raise SystemExit(f"{model} seed {seed}: stopped by SIGTERM at step {final.get('step')}; "
                                     "re-run to resume")
                info = {"model": model, "seed": seed, "wall_s": wall}
                write_json_atomic(os.path.join(run_dir, "demo_run.json"), info)
            if wall is None and os.path.exists(os.path.join(run_dir, "demo_run.json")):
                with open(os.path.join(run_dir, "demo_run.json")) as f:
                    wall = json.load(f).get("wall_s")
            row = {k: v for k, v in final.items() if isinstance(v, (int, float, str, bool))}
            runs[model].append({**row, "seed": seed, "wall_s": wall, "workdir": run_dir})
            log(f"{model} seed {seed}: " + ", ".join(f"{m} {row[f'{SPLIT}/{m}']:.4f}" for m in METRICS))
    summary = summarise(runs)
    c0 = model_config(models[0], 0, runlocal=runlocal, sets=sets)
    budget = (f"{c0.total_steps} steps x batch {c0.batch_size}, {c0.data.options.num_train} train / "
              f"{c0.data.options.num_val} {SPLIT} images of {c0.data.options.canvas} px")
    payload = {
        "task": "detection",
        "benchmark": "shortcut_digits_det",
        "split": SPLIT,
        "seeds": seeds,
        "budget": budget,
        "runlocal": runlocal,
        "sets": dict(sets or {}),
        # "<model>/<metric>": the mean over seeds, e.g. "idetr/AP50"
        "results": {f"{m}/{k}": summary[m][k]["mean"] for m in summary for k in METRICS},
        "summary": summary,
        "runs": runs,
        "wall_s": time.time() - t0,
    }
    write_json_atomic(os.path.join(workdir, "results.json"), payload, indent=2)
    print(f"\nshortcut_digits_det, {budget}, {seeds} seed(s) (total {time.time() - t0:.0f} s)\n")
    print(format_table(summary))
    print(f"\nwrote {workdir}/results.json")
    return payload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.demo --task=detection",
                                description="DETR vs I-DETR on the embedded detection benchmark.")
    p.add_argument("--workdir", default="runs/det_demo", help="Output directory.")
    p.add_argument("--seeds", type=int, default=1, help="Number of seeds (0..seeds-1).")
    p.add_argument("--models", default=",".join(MODELS),
                   help="Models, comma-separated: detr, idetr, iq_gc, ic_only, iq_ic; the suffix _shuffled "
                        "(e.g. idetr_shuffled) reads the teacher-shuffled store.")
    p.add_argument("--runlocal", action="store_true", help="A few steps of a tiny model (smoke test).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Config override for every run, e.g. --set total_steps=200 (repeatable).")
    return p


def main(argv: Sequence[str]) -> int:
    """The command line after `--task=detection` (run through `lfi_jax.demo.main`)."""
    a = build_parser().parse_args(list(argv))
    setup_logging()
    models = [m for m in a.models.split(",") if m]
    run_detection_demo(a.workdir, seeds=a.seeds, models=models, runlocal=a.runlocal, sets=parse_sets(a.set))
    return 0


__all__ = [
    "MODELS", "ROWS", "attach_backbone", "ensure_backbone", "ensure_teacher", "finished", "format_table", "main",
    "model_config", "run_detection_demo", "shuffle_store", "summarise",
]
