"""The training loop's examples/s against the bare jitted train step's, at the demo size, side
by side in one run (issue: the loop must be within 5 % of the step).

    python bench/loop.py [--models vit,ivit] [--steps 100] [--log_every 10] [--cpu_devices N]
        [--thread_nice 0,10]

For each model: `lfi_jax.train.train_and_evaluate` on configs/demo.py:<model> for --steps steps
(the real input pipeline, augmentation and teacher maps; evaluation only at the end on 64 test
images), its examples/s read from the progress records of metrics.jsonl (the first interval,
which holds the compilation, left out); then the same config's jitted step alone on one fixed
device batch (`lfi_jax.trainer.create_trainer`), after a compile step, on the same mesh (the
config's `mesh.cpu_devices` CPU devices unless --cpu_devices says otherwise), timed once
before and once after the loop (the mean is reported, so a drift of the machine's load
between the two hits both columns alike). --thread_nice takes a comma-separated list of
`data.thread_nice` values (default: the config's) and runs the loop once per value, so the
priority of the input thread is compared within one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import add_hugepages_flag, use_hugepages  # noqa: E402
from lfi_jax import (
    hostmem,  # noqa: E402
    train,  # noqa: E402
)
from lfi_jax import sharding as shd  # noqa: E402
from lfi_jax.config import load_config_file  # noqa: E402
from lfi_jax.data import pipeline  # noqa: E402
from lfi_jax.metrics import read_metrics  # noqa: E402
from lfi_jax.models.config import model_config  # noqa: E402
from lfi_jax.tasks import classification  # noqa: E402
from lfi_jax.trainer import create_trainer  # noqa: E402


def demo_config(model: str, steps: int, log_every: int):
    c = load_config_file("demo", model)
    c.total_steps = steps
    c.log_every = log_every
    c.eval_every = 0
    c.checkpoint_every = 0
    c.optim.warmup_steps = min(int(c.optim.warmup_steps), max(steps // 2, 1))
    c.data.options.num_test = 64
    c.eval_batch_size = 64
    return c


def warm_cache(config) -> None:
    """One epoch of the train iterator (no teacher), which renders every train image into the
    pipeline's in-memory cache (`data.cache_mb`) as the main job's first epoch does: the timed
    loop then sees the later epochs' input cost."""
    mcfg = model_config(config)
    teacher = config.teacher.copy_and_resolve_references()
    teacher.store = ""  # the cache holds images only: no teacher maps needed to fill it
    it = pipeline.make_train_iterator(
        config.data, teacher, global_batch_size=config.batch_size, patch_size=mcfg.patch_size, seed=int(config.seed)
    )
    n = len(classification.source(config, config.data.train_split))
    for _ in range(-(-n // config.batch_size)):
        next(it)


def loop_rate(config) -> float:
    with tempfile.TemporaryDirectory() as wd:
        train.train_and_evaluate(config, wd)
        rates = [r["examples_per_sec"] for r in read_metrics(wd) if "examples_per_sec" in r]
    if len(rates) < 2:
        raise SystemExit("--steps / --log_every leave fewer than two progress intervals")
    return float(np.mean(rates[1:]))


def bare_rate(config, steps: int) -> float:
    mcfg = model_config(config)
    mesh = shd.make_mesh(config.mesh)
    trainer, init, _ = create_trainer(config, mcfg, mesh, seed=0)
    state = init()
    rng = np.random.default_rng(0)
    b, g = config.batch_size, mcfg.grid[0] * mcfg.grid[1]
    t = rng.random((b, g)).astype(np.float32)
    batch = {
        "image": rng.standard_normal((b, mcfg.image_size, mcfg.image_size, 3)).astype(np.float32),
        "label": rng.integers(0, mcfg.num_classes, b).astype(np.int32),
        "teacher": t / t.sum(-1, keepdims=True),
        "teacher_mask": np.ones(b, np.float32),
    }
    gb = shd.global_batch(batch, mesh)
    state, m = trainer.train_step(state, gb)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = trainer.train_step(state, gb)
    jax.block_until_ready(m)
    return b * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit,ivit")
    p.add_argument("--steps", type=int, default=100, help="training steps of the loop (and of the bare step)")
    p.add_argument("--log_every", type=int, default=10)
    add_hugepages_flag(p)
    p.add_argument("--cold", dest="warm", action="store_false",
                   help="leave the image cache empty (the first epoch's cost) instead of filling it first")
    p.add_argument("--cpu_devices", type=int, default=None,
                   help="CPU devices of the run (default: configs/demo.py's mesh.cpu_devices)")
    p.add_argument("--thread_nice", default="",
                   help="comma-separated data.thread_nice values, one loop each (default: the config's)")
    args = p.parse_args()
    use_hugepages(args)
    rows = []
    for model in args.models.split(","):
        config = demo_config(model, args.steps, args.log_every)
        if args.cpu_devices is not None:
            config.mesh.cpu_devices = args.cpu_devices
        shd.request_cpu_devices(config.mesh.cpu_devices)  # before the first JAX operation
        if args.warm:
            warm_cache(config)
        nices = [int(v) for v in args.thread_nice.split(",")] if args.thread_nice else [config.data.thread_nice]
        before = bare_rate(config, args.steps)
        loops = []
        for nice in nices:
            config.data.thread_nice = nice
            loops.append(loop_rate(config))
        bare = (before + bare_rate(config, args.steps)) / 2
        rows += [(model, nice, loop, bare) for nice, loop in zip(nices, loops)]
    devices = f"{jax.device_count()} {jax.default_backend()} device(s)"
    cache = "image cache filled first (later epochs)" if args.warm else "image cache empty (first epoch)"
    print(f"demo size, batch {config.batch_size}, {args.steps} steps, {devices}; {hostmem.describe()}; {cache}")
    print("| model | data.thread_nice | loop (ex/s) | bare step (ex/s) | loop / step |")
    print("|---|---|---|---|---|")
    for model, nice, loop, bare in rows:
        print(f"| {model} | {nice} | {loop:.0f} | {bare:.0f} | {loop / bare:.2f} |")


if __name__ == "__main__":
    main()
