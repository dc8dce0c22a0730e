"""Train-step scaling: time and memory per device against the device count, and accelerator
throughput.

    python bench/scaling.py                          # CPU: 1, 2, 4, 8 fake devices, DP and FSDP
    python bench/scaling.py --devices 1,8 --no-write
    python bench/scaling.py --mode throughput        # GPU / TPU: ViT-B/16 and I-ViT-B/16, img/s and MFU

`--mode cpu` (default) runs the trainer's jitted train step (`lfi_jax.train.create_trainer`,
the demo I-ViT with its alignment loss) on N fake CPU devices (`jax_num_cpu_devices`) that
share this machine's cores, at a fixed global batch: the work per step is the same for every
N, so the step time shows the overhead of partitioning and collectives, not a speedup. For
each N and strategy (`dp`: mesh data=N; `fsdp`: mesh fsdp=N with every parameter of >= 1024
elements sharded) it reports the compile time, the median step time, the bytes of parameters +
optimizer state each device holds, and the per-device temporaries of the compiled step
(`memory_analysis().temp_size_in_bytes`). Unless --no-write, the table goes into the
"## Scaling" section of docs/performance.md (between its table markers).

`--mode throughput` runs ViT-B/16 and I-ViT-B/16 (bfloat16 compute, float32 parameters, the
alignment loss on a synthetic teacher for the I-ViT) data-parallel over all local devices and
reports images/s and MFU: 3 x forward FLOPs per image (2 x `lfi_jax.models.flops.macs`
["total"], i.e. the paper's count plus the gate) x images/s over the devices' peak dense
bf16 FLOP/s (a table of known devices, or --peak-tflops). It runs anywhere but means
something only on an accelerator; `--variant S/16 --image-size 64` makes it small enough
for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "performance.md")
SECTION = "## Scaling"
START, END = "<!-- scaling-table:start -->", "<!-- scaling-table:end -->"

# Peak dense bfloat16 TFLOP/s per device (vendor figures, no sparsity).
PEAK_TFLOPS = {
    "H100": 989.0,  # SXM; the PCIe card is 756
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def _peak(device_kind: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def _demo_config(model: str):
    from lfi_jax.config import load_config_file

    c = load_config_file("demo", f"{model},runlocal")
    c.optim.warmup_steps = 0
    return c


def _batch(c, batch: int, seed: int = 0):
    import numpy as np

    g = (c.data.image_size // c.model.patch_size) ** 2
    rng = np.random.default_rng(seed)
    t = rng.random((batch, g)).astype(np.float32)
    return {
        "image": rng.standard_normal((batch, c.data.image_size, c.data.image_size, 3)).astype(np.float32),
        "label": rng.integers(0, c.model.num_classes, batch).astype(np.int32),
        "teacher": t / t.sum(-1, keepdims=True),
        "teacher_mask": np.ones((batch,), np.float32),
    }


def _measure(c, devices, batch, steps: int, warmup: int):
    """(compile s, median step s, param+opt bytes per device, temp bytes per device, losses)."""
    import jax

    from lfi_jax import sharding as shd
    from lfi_jax.config import model_config
    from lfi_jax.train import create_trainer

    mesh = shd.make_mesh(c.mesh, devices=devices)
    trainer, init, shapes = create_trainer(c, model_config(c), mesh, seed=0)
    state = init()
    gbatch = shd.global_batch(batch, mesh)
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
    held = shd.bytes_per_device({"params": state["params"], "opt_state": state["opt_state"]})
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, gbatch)
        loss = float(metrics["loss"])  # waits for the step
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss)
    del state
    jax.clear_caches()
    return compile_s, statistics.median(times), held, temp, losses


def _fmt_mb(b: float) -> str:
    return f"{b / 2**20:.2f}"


def run_cpu(args) -> str:
    import jax

    counts = [int(x) for x in args.devices.split(",")]
    if max(counts) > len(jax.devices()):
        raise SystemExit(f"--devices asks for {max(counts)} devices, {len(jax.devices())} exist")
    rows = [
        "| devices | strategy | mesh (data, fsdp) | compile s | step ms | params + opt MB / device | temporaries MB / device |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    base = None
    for n in counts:
        for strategy in ("dp", "fsdp"):
            if n == 1 and strategy == "fsdp":
                continue
            c = _demo_config(args.model)
            c.batch_size = args.global_batch
            c.mesh.shape = (n, 1) if strategy == "dp" else (1, n)
            c.mesh.fsdp_min_size = 1024
            if c.batch_size % n:
                continue
            batch = _batch(c, c.batch_size)
            compile_s, step_s, held, temp, losses = _measure(c, jax.devices()[:n], batch, args.steps, args.warmup)
            if base is None:
                base = losses
            drift = max(abs(a - b) for a, b in zip(losses, base))
            row = (f"| {n} | {strategy if n > 1 else '-'} | {tuple(c.mesh.shape)} | {compile_s:.1f} | "
                   f"{step_s * 1e3:.1f} | {_fmt_mb(held)} | {_fmt_mb(temp)} |")
            rows.append(row)
            print(row + f"  (loss drift vs 1 device {drift:.1e})", file=sys.stderr, flush=True)
    cmd = "python bench/scaling.py " + " ".join(shlex.quote(a) for a in (args.argv or []))
    head = (f"`{cmd.strip()}` on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
            f"jax {jax.__version__}, demo `{args.model}` model, global batch {args.global_batch}, "
            f"median of {args.steps} steps after {args.warmup}:")
    return "\n".join([head, "", *rows])


def run_throughput(args) -> str:
    import jax
    import ml_collections

    from lfi_jax.config import PAPER_FREEZE, PAPER_TRAINABLE, base_config, model_fields
    from lfi_jax.models.flops import macs
    from lfi_jax.models.vit import ModelConfig

    devices = jax.local_devices()
    kind = devices[0].device_kind
    peak = _peak(kind, args.peak_tflops)
    rows = ["| model | devices | global batch | step ms | img/s | img/s / device | GFLOPs / img (fwd) | MFU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("vit", "ivit"):
        c = base_config()
        c.model = ml_collections.ConfigDict(model_fields(
            args.variant, image_size=args.image_size, num_classes=1000, dtype=args.dtype, attn_impl=args.attn_impl,
            remat=args.remat,
        ))
        c.data.image_size = args.image_size
        if name == "ivit":
            c.model.interaction_queries = True
            c.model.interaction_constraint = True
            c.model.gated_control = True
        if args.freeze:
            c.optim.freeze, c.optim.trainable = PAPER_FREEZE, PAPER_TRAINABLE
        c.batch_size = args.batch_per_device * len(devices)
        c.mesh.shape = (-1, 1)
        mcfg = ModelConfig(**{**c.model.to_dict(), "gate_bias_init": tuple(c.model.gate_bias_init)})
        flops = 2.0 * macs(mcfg)["total"]
        _, step_s, _, _, _ = _measure(c, devices, _batch(c, c.batch_size), args.steps, args.warmup)
        ips = c.batch_size / step_s
        mfu = 3 * flops * ips / (peak * len(devices)) if peak else None
        row = (f"| {'I-ViT' if name == 'ivit' else 'ViT'}-{args.variant} @{args.image_size} | {len(devices)} | "
               f"{c.batch_size} | {step_s * 1e3:.1f} | {ips:.1f} | {ips / len(devices):.1f} | {flops / 1e9:.2f} | "
               f"{f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} |")
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    peak_text = f"peak {peak / 1e12:.0f} TFLOP/s per device" if peak else "peak unknown (pass --peak-tflops)"
    head = (f"{kind} x {len(devices)} ({jax.default_backend()}), jax {jax.__version__}, {args.dtype} compute, "
            f"attn_impl={args.attn_impl}, {'paper freeze' if args.freeze else 'all parameters trained'}, "
            f"{peak_text}:")
    return "\n".join([head, "", *rows])


def write_table(path: str, table: str) -> None:
    """Replaces the text between the table markers of the Scaling section (creating the
    section at the end of the file if it is missing); the rest of the file is untouched."""
    text = open(path).read() if os.path.exists(path) else "# Performance\n"
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + block + text[b:]
    elif SECTION in text:
        i = text.index(SECTION) + len(SECTION)
        text = text[:i] + "\n\n" + block + text[i:]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("cpu", "throughput"), default="cpu")
    p.add_argument("--devices", default="1,2,4,8", help="cpu mode: device counts")
    p.add_argument("--model", default="ivit", help="cpu mode: the demo config's model (vit | ivit | ...)")
    p.add_argument("--global-batch", type=int, default=32, help="cpu mode: fixed global batch")
    p.add_argument("--variant", default="B/16", help="throughput mode: ViT variant")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-per-device", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attn-impl", default="xla")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--freeze", action="store_true", help="train only what the paper trains")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s per device (MFU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.argv = argv

    if args.mode == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        jax.config.update("jax_num_cpu_devices", max(int(x) for x in args.devices.split(",")))
        table = run_cpu(args)
    else:
        table = run_throughput(args)
    print(table)
    if args.mode == "cpu" and not args.no_write:
        write_table(DOC, table)
        print(f"wrote the table into {DOC} ({SECTION})", file=sys.stderr)


if __name__ == "__main__":
    main()
