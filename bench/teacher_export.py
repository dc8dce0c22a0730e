"""Benchmark the LLaVA teacher export: images/s, peak memory, and what the hooks cost.

    python bench/teacher_export.py                          # tiny + small configs, CPU
    python bench/teacher_export.py --config real --device cuda --dtype bfloat16   # on a GPU
    python bench/teacher_export.py --config small --no-write

Configs (random weights, the llava-1.5 chat template and an in-process tokenizer; see
tests/tiny_llava.py):
  tiny   the test model: hidden 32, 2 layers, 32 px images (4x4 grid, 16 image tokens)
  small  LLaVA-1.5's 24x24 grid (336 px, 576 image tokens) with a CPU-sized model
         (hidden 256, 4 layers, 8 heads)
  real   LLaVA-1.5 7B sizes (CLIP ViT-L/14-336 + a 32-layer, 4096-wide Llama), built directly
         on the device (bf16 on a GPU); nothing is downloaded

Two measurements per config:
  1. export: `LlavaTeacher.maps` over --images random images of varied sizes at --batch, after
     one warm-up batch: images/s and peak memory (CUDA: max_memory_allocated; CPU: peak RSS,
     sampled every 0.5 ms).
  2. forward at batch 8 on one prepared batch: the peak memory a forward adds on top of what
     is resident before it, for
       sdpa          the language model on SDPA (no attention weights at all; reference)
       eager         eager attention, hooks idle (a plain eager forward)
       eager+hooks   the export's forward: each layer's weights reduced to spans x image tokens
       output_attentions   eager returning every layer's (B, H, S, S) weights (the naive way)
     On CPU each variant runs in a fresh process (RSS is per process); on CUDA in-process.
     Target: eager+hooks within 10% of eager.
On CPU torch runs --threads (default 1) intra-op threads: on a busy machine a thread pool
spinning for cores it does not get is many times slower. Prints Markdown tables; unless
--no-write they replace the block in the "## Teacher export" section of docs/performance.md
(other sections untouched).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

SECTION = "## Teacher export"
BEGIN, END = "<!-- BEGIN teacher_export -->", "<!-- END teacher_export -->"
DOC = os.path.join(ROOT, "docs", "performance.md")
VARIANTS = ("sdpa", "eager", "eager+hooks", "output_attentions")


# --------------------------------------------------------------------------- memory probes


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident set size in a thread; `peak` after the block."""

    def __init__(self, interval: float = 0.0005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = _rss_bytes()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def _mb(x: float) -> float:
    return x / 2**20


# --------------------------------------------------------------------------- models


def build(config: str, workdir: str, device: str, dtype: str):
    """-> (model_dir, model or None). tiny/small are saved; real is built on the device."""
    import tiny_llava as tl

    path = os.path.join(workdir, config)
    if config == "tiny":
        if not os.path.isdir(path):
            tl.build_tiny_llava(path)
        return path, None
    if config == "small":
        if not os.path.isdir(path):
            tl.build_tiny_llava(path, sharpen=1.0, **tl.LLAVA_SMALL)
        return path, None
    if config != "real":
        raise ValueError(f"--config {config!r}: expected tiny, small or real")
    import torch
    from transformers import LlavaForConditionalGeneration

    from lfi_jax.teacher.llava import resolve_device_dtype

    tok = tl.make_tokenizer()
    cfg = tl.llava_config(tok, **tl.LLAVA15_7B)
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    tl.save_processor(path, tok, image_size=336, patch_size=14)
    dev, tdtype, _ = resolve_device_dtype(device, dtype)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlavaForConditionalGeneration._from_config(
            cfg, attn_implementation={"text_config": "eager", "vision_config": "sdpa"}, dtype=tdtype
        )
    return path, model.eval()


def _images(n: int, lo: int, hi: int, seed: int = 0):
    r = np.random.default_rng(seed)
    return [r.integers(0, 256, (int(r.integers(lo, hi)), int(r.integers(lo, hi)), 3), dtype=np.uint8) for _ in range(n)]


def _names(n: int):
    pool = ["cat", "dog", "bird", "horse", "golden retriever", "fire truck", "zebra", "tree frog"]
    return [pool[i % len(pool)] for i in range(n)]


def _sizes(config: str):
    return (20, 60) if config == "tiny" else (200, 500)


# --------------------------------------------------------------------------- measurements


def measure_export(teacher, config: str, n: int, batch: int) -> dict:
    import torch

    lo, hi = _sizes(config)
    imgs, names = _images(n, lo, hi, seed=1), _names(n)
    teacher.batch_size = batch
    teacher.maps(imgs[:batch], names[:batch])  # warm-up
    cuda = teacher.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        teacher.maps(imgs, names)
        if cuda:
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"images_per_s": n / dt, "images_per_cpu_s": n / max(cpu, 1e-9), "seconds": dt, "images": n, "batch": batch,
           "rss_peak_mb": _mb(rss.peak), "rss_added_mb": _mb(rss.peak - rss.base)}
    if cuda:
        out["cuda_peak_mb"] = _mb(torch.cuda.max_memory_allocated())
    return out


def _variant_forward(teacher, prep, variant: str):
    if variant == "eager+hooks":
        return teacher.forward(prep, capture=True)
    if variant == "output_attentions":
        return teacher.forward(prep, capture=False, output_attentions=True)
    return teacher.forward(prep, capture=False)


def _set_impl(teacher, variant: str) -> None:
    impl = "sdpa" if variant == "sdpa" else "eager"
    teacher.model.set_attn_implementation({"text_config": impl})


def measure_forward(teacher, config: str, variant: str, batch: int = 8) -> dict:
    """Peak memory added by one forward of `variant` on a prepared batch, and its time."""
    import gc

    import torch

    lo, hi = _sizes(config)
    prep = teacher.prepare(_images(batch, lo, hi, seed=2), _names(batch))
    _set_impl(teacher, variant)
    seq = int(prep["inputs"]["input_ids"].shape[1])
    gc.collect()
    cuda = teacher.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        out = _variant_forward(teacher, prep, variant)
        if cuda:
            torch.cuda.synchronize()
    added = (torch.cuda.max_memory_allocated() - base) if cuda else (rss.peak - rss.base)
    del out
    gc.collect()
    t0 = time.perf_counter()
    out = _variant_forward(teacher, prep, variant)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    _set_impl(teacher, "eager")
    return {"variant": variant, "batch": batch, "seq": seq, "added_mb": _mb(added), "seconds": dt}


def _child(args) -> int:
    """One forward variant in this fresh process (CPU: RSS is per process)."""
    from lfi_jax.teacher.llava import LlavaTeacher

    teacher = LlavaTeacher(args.model_dir, device=args.device, dtype=args.dtype)
    print(json.dumps(measure_forward(teacher, args.child_config, args.child)))
    return 0


# --------------------------------------------------------------------------- report


def write_section(path: str, body: str) -> None:
    """Replace the marked block of the "## Teacher export" section of `path`, atomically
    (the section, or the block, is appended when missing; other sections stay as they are)."""
    text = open(path).read() if os.path.exists(path) else "# Performance\n"
    lines = text.splitlines()
    block = [BEGIN, *body.splitlines(), END]
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = lines + ([""] if lines and lines[-1].strip() else []) + [SECTION, "", *block]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        section = lines[start:end]
        if BEGIN in section and END in section:
            b, e = section.index(BEGIN), section.index(END)
            section = section[:b] + block + section[e + 1:]
        else:
            while section and not section[-1].strip():
                section.pop()
            section += ["", *block]
        new = lines[:start] + section + ([""] + lines[end:] if end < len(lines) else [])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".performance.", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(new).rstrip("\n") + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "real"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--images", type=int, default=64, help="images in the export measurement")
    p.add_argument("--batch", type=int, default=8, help="export batch size")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: 1 on CPU, where a busy machine makes a thread pool "
                        "spin; torch's default on GPU)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per forward variant (the median is reported; CPU RSS is noisy)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch
    import transformers

    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    threads = args.threads or (1 if cpu else 0)
    if threads:
        torch.set_num_threads(threads)
    if args.child:
        return _child(args)

    from lfi_jax.teacher.llava import LlavaTeacher

    export_rows, forward_rows = [], []
    with tempfile.TemporaryDirectory() as work:
        for config in args.config:
            path, model = build(config, work, args.device, args.dtype)
            teacher = LlavaTeacher(path, device=args.device, dtype=args.dtype, model=model)
            dev, dt_name = teacher.device, teacher.dtype_name
            e = measure_export(teacher, config, args.images, args.batch)
            e.update(config=config, device=str(dev), dtype=dt_name, grid=f"{teacher.grid_h}x{teacher.grid_w}",
                     layers=len(teacher.decoder_layers))
            export_rows.append(e)
            print(json.dumps(e), flush=True)
            for variant in args.variants:
                runs = []
                for _ in range(max(1, args.repeats)):
                    if dev.type == "cuda":
                        runs.append(measure_forward(teacher, config, variant))
                        continue
                    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--child-config", config,
                           "--model-dir", path, "--device", str(dev), "--dtype", dt_name,
                           "--threads", str(threads)]
                    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                    if res.returncode:
                        sys.stderr.write(res.stderr)
                        return res.returncode
                    runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
                r = dict(runs[0])
                for k in ("added_mb", "seconds"):
                    r[k] = float(np.median([x[k] for x in runs]))
                r.update(config=config, device=str(dev), dtype=dt_name, repeats=len(runs))
                forward_rows.append(r)
                print(json.dumps(r), flush=True)
            teacher.close()
            del teacher, model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    cmd = "python bench/teacher_export.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "",
        "Export (`LlavaTeacher.maps`, random images of varied sizes, after one warm-up batch):",
        "",
        "| config | device | dtype | layers | grid | batch | images | images/s | images/CPU-s | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in export_rows:
        mem = f"{e['cuda_peak_mb']:.0f} MiB CUDA" if "cuda_peak_mb" in e else f"{e['rss_peak_mb']:.0f} MiB RSS (+{e['rss_added_mb']:.0f})"
        lines.append(f"| {e['config']} | {e['device']} | {e['dtype']} | {e['layers']} | {e['grid']} | {e['batch']} "
                     f"| {e['images']} | {e['images_per_s']:.1f} | {e['images_per_cpu_s']:.1f} | {mem} |")
    lines += [
        "",
        "One forward at batch 8: memory it adds on top of what is resident before it "
        "(CUDA: allocator peak; CPU: sampled RSS, a fresh process per run), and its time when repeated "
        f"(median of {max(1, args.repeats)} run(s)):",
        "",
        "| config | variant | seq | added memory | vs eager | time |",
        "|---|---|---|---|---|---|",
    ]
    for config in args.config:
        rows = [r for r in forward_rows if r["config"] == config]
        eager = next((r["added_mb"] for r in rows if r["variant"] == "eager"), None)
        for r in rows:
            rel = f"{r['added_mb'] / eager:.2f}x" if eager else "-"
            lines.append(f"| {config} | {r['variant']} | {r['seq']} | {r['added_mb']:.1f} MiB | {rel} | {r['seconds'] * 1e3:.0f} ms |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(DOC, table)
        print(f"wrote the {SECTION!r} section of {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
