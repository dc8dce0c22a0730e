"""Throughput of the train input pipeline on shortcut digits (examples/s), as a table.

    python bench/data_pipeline.py                      # batch 128, workers 0 and 2
    python bench/data_pipeline.py --workers 0 2 4 8 --threads 1 2

Builds an oracle teacher store (7x7 grid, like the main job's) for the train split in a
temporary directory, then times `make_train_iterator` after a warm-up (worker start-up is
not counted). Rows: the bare source (rendering only), the pipeline without a teacher, and the
pipeline with the teacher joined, for each worker / thread count asked for. "examples per
CPU-second" (in-process rows) divides by this process's CPU time, a figure that holds up
better than wall-clock rates on a shared machine; the load average is printed alongside.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
from ml_collections import ConfigDict

from lfi_jax.config import base_config
from lfi_jax.data.pipeline import make_train_iterator
from lfi_jax.data.sources import get_source
from lfi_jax.teacher import oracle
from lfi_jax.teacher.store import StoreWriter


def build_store(path: str, options: dict, grid: int) -> str:

    src = get_source("shortcut_digits", "train", options)
    opts = {"grid": grid}
    manifest = {"data": "shortcut_digits", "split": "train", **oracle.provenance(opts)}
    manifest.pop("grid", None)
    writer = StoreWriter(path, manifest, num_examples=len(src), shard_size=1024)
    for k in writer.missing_shards():
        writer.write_shard(k, oracle.export_backend(src, list(writer.shard_range(k)), opts))
        print(f"  store shard {k + 1}/{writer.num_shards}", file=sys.stderr, flush=True)
    writer.finalize()
    return path


def time_source(options: dict, n: int) -> tuple[float, float]:
    src = get_source("shortcut_digits", "train", options)
    src[0]
    t, c = time.perf_counter(), time.process_time()
    for i in range(n):
        src[i % len(src)]
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def time_iterator(data: ConfigDict, store: str, *, batch: int, batches: int, warmup: int) -> tuple[float, float]:
    """(examples/s wall clock, examples per CPU-second of this process: its threads, not workers)."""
    teacher = ConfigDict(dict(store=store, allow_missing=False))
    it = make_train_iterator(data, teacher, global_batch_size=batch, patch_size=6, seed=0)
    for _ in range(warmup):
        next(it)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t)
    cpu_rate = batches * batch / (time.process_time() - c)
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return rate, cpu_rate


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=20, help="timed batches per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-train", type=int, default=4096)
    p.add_argument("--grid", type=int, default=7, help="teacher grid")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    args = p.parse_args(argv)

    load0 = _load()
    options = {"num_train": args.num_train}
    data = base_config().data
    data.options = ConfigDict(options)
    rows = [("source only (render, 1 thread)", "-", "-", *time_source(options, 2000))]
    with tempfile.TemporaryDirectory() as tmp:
        print("building the oracle teacher store ...", file=sys.stderr, flush=True)
        store = build_store(os.path.join(tmp, "teacher"), options, args.grid)
        for with_teacher in (False, True):
            for workers in args.workers:
                for threads in args.threads:
                    d = ConfigDict(data.to_dict())
                    d.num_workers = workers
                    d.num_threads = threads
                    label = "pipeline + teacher" if with_teacher else "pipeline, no teacher"
                    print(f"timing {label}, workers={workers}, threads={threads} ...", file=sys.stderr, flush=True)
                    rate, cpu_rate = time_iterator(
                        d, store if with_teacher else "", batch=args.batch, batches=args.batches, warmup=args.warmup
                    )
                    rows.append((label, str(workers), str(threads), rate, cpu_rate if workers == 0 else None))

    print(
        f"\nshortcut digits, 48 px, batch {args.batch}, augment: random resized crop; "
        f"teacher: oracle {args.grid}x{args.grid} -> 8x8; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()})\n"
    )
    print(f"load average before / after: {load0} / {_load()}\n")
    print("| configuration | workers | threads | examples/s (wall) | ms / batch | examples per CPU-second |")
    print("|---|---|---|---|---|---|")
    for label, workers, threads, rate, cpu_rate in rows:
        ms = f"{1000 * args.batch / rate:.1f}" if workers != "-" else "-"
        cpu = f"{cpu_rate:,.0f}" if cpu_rate else "-"
        print(f"| {label} | {workers} | {threads} | {rate:,.0f} | {ms} | {cpu} |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
