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

Class maps (`--class_map`, `--reduce`): a model trained on one label space scored on another;
see `lfi_jax.eval.metrics`. The metrics are in `lfi_jax.eval.metrics`, the prediction pass in
`lfi_jax.eval.predict`, the layout builder in `lfi_jax.data.lodo`; this module is the command
line and the reports.

Leave-one-domain-out (configs/pacs.py, configs/vlcs.py) trains on an image-folder layout
with the held-out domain as the test split:

    python -m lfi_jax.evaluate lodo-layout --root PACS --held_out sketch --out data/pacs_lodo/sketch

builds it from symlinks (DIR/train/<class>/<domain>__<file>: the other domains,
DIR/test/<class>/sketch__<file>).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lfi_jax.cli import run_cli
from lfi_jax.config import parse_value
from lfi_jax.data.lodo import make_lodo_layout
from lfi_jax.eval.metrics import REDUCES, read_class_map, score
from lfi_jax.eval.predict import eval_data_config, predict, train_class_names
from lfi_jax.fileio import atomic_write, write_json_atomic
from lfi_jax.metrics import setup_logging
from lfi_jax.run import Run, load_run

log = logging.getLogger("lfi_jax.evaluate")


# --------------------------------------------------------------------------- reports


def format_report(m: dict[str, Any], title: str = "") -> str:
    lines = []
    if title:
        lines += [title, ""]
    lines.append(
        f"top-1 {100 * m['top1']:.2f} %   mean per-class {100 * m['mean_per_class_accuracy']:.2f} %   "
        f"ECE {100 * m['ece']:.2f} %   NLL {m['nll']:.4f}   n = {m['count']}"
    )
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
    metrics = score(
        pred.logits,
        pred.labels,
        pred.class_names,
        run.mcfg.num_classes,
        class_map=class_map,
        reduce=reduce,
        train_names=names,
        where=where,
    )
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
            m = score(
                pred.logits,
                pred.labels,
                pred.class_names,
                run.mcfg.num_classes,
                class_map=class_map,
                reduce=reduce,
                train_names=names,
                where=f"{dname} ({spec}/{dsplit})",
            )
            m.update(data=spec, split=dsplit, step=run.step, workdir=run.workdir)
            results[mname][dname] = m
        del run
    return {
        "models": list(workdirs),
        "domains": list(domains),
        "results": results,
        "class_map": dict(class_map) if class_map else None,
        "reduce": reduce if class_map else None,
    }


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
    lines.append(
        "| **mean** | " + " | ".join(f"{v:.2f}" for v in mv) + (f" | {mv[1] - mv[0]:+.2f}" if two else "") + " |"
    )
    return "\n".join(lines)


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
    rec = evaluate_run(
        a.workdir,
        data=a.data,
        split=a.split,
        step=a.step,
        class_map=cm,
        reduce=a.reduce,
        options=parse_options(a.data_option),
        batch_size=a.batch_size,
        out=a.out,
    )
    print(
        format_report(
            rec, f"{rec['workdir']} step {rec['step']} on {rec['data']}/{rec['split']} ({rec['devices']} devices)"
        )
    )
    print(f"\nwrote {rec['path']}")
    return 0


def _main_domains(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.evaluate domains", description="Models x domains table.")
    p.add_argument("--workdirs", nargs="+", required=True, metavar="NAME=W")
    p.add_argument("--domains", nargs="+", required=True, metavar="NAME=SPEC[@SPLIT]")
    p.add_argument(
        "--split",
        default=None,
        help="split for domains without @SPLIT (default: the run's first eval split; "
        "any name works for a flat imagefolder)",
    )
    p.add_argument("--class_map", default=None)
    p.add_argument("--reduce", default="logsumexp", choices=REDUCES)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--out", default=None, help="Markdown table path (the JSON goes beside it)")
    a = p.parse_args(argv)
    cm = read_class_map(a.class_map) if a.class_map else None
    res = evaluate_domains(
        parse_pairs(a.workdirs, "--workdirs"),
        parse_pairs(a.domains, "--domains"),
        split=a.split,
        class_map=cm,
        reduce=a.reduce,
        batch_size=a.batch_size,
    )
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
    p = argparse.ArgumentParser(
        prog="python -m lfi_jax.evaluate lodo-layout",
        description="Leave-one-domain-out image-folder layout from ROOT/<domain>/<class>/<file>.",
    )
    p.add_argument("--root", required=True)
    p.add_argument("--held_out", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--domains", nargs="*", default=None, help="the domains to use (default: every directory of ROOT)")
    a = p.parse_args(argv)
    out = make_lodo_layout(a.root, a.held_out, a.out, a.domains)
    print(out)
    return 0


def _main(argv: list[str]) -> int:
    setup_logging()
    if argv and argv[0] == "domains":
        return _main_domains(argv[1:])
    if argv and argv[0] == "lodo-layout":
        return _main_lodo(argv[1:])
    return _main_single(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (2 with one `error:` line for a user error)."""
    return run_cli(_main, argv, exit=False)


if __name__ == "__main__":
    sys.exit(main())
