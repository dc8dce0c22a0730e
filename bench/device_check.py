"""One command for a first, short run on an accelerator: kernel correctness, timings, train
steps and the teacher export, in one JSON + Markdown report.

    python bench/device_check.py --quick               # a few minutes on one H100/H200 (tiny on CPU)
    python bench/device_check.py --full --out DIR      # at most ~8 minutes on one H100/H200
    python bench/device_check.py --parts a,b           # only some parts

Parts (each runs in its own process on an accelerator, so a device crash in one is reported
with its error while the others still run; in-process on CPU):
  a  the Pallas kernel compiled and run on the device against impl="xla" (float32 matmuls at
     "highest"): o, agt_cls and the gradients of q, q2, k, v and every gate tensor, bf16 and
     f32, G in {0, 8}, N in {197, 577, 785}, a padded N, masked cross-attention; fails
     loudly (status "fail", exit code 1) on a mismatch.
  b  forward and forward+backward times of xla / chunked / pallas (bf16) at N in {197, 577,
     785, 3137}, H in {6, 12, 16}, and a small tile sweep of the kernel recording the best
     tiles (the entries for lfi_jax.ops.pallas.TILES).
  c  ViT-B/16 and I-ViT-B/16 train steps (224 and 384 px, bf16 compute) with the trainer's
     own jitted step: images/s, MFU against the device's peak, peak memory; the largest batch
     of a short list that fits.
  d  the LLaVA export at LLaVA-1.5-7B sizes with random weights in bf16 (bench/teacher_export.py
     "real"), skipped with a line saying why when torch has no GPU.
On a CPU both modes run tiny sizes (the test suite runs `--quick` so it cannot rot): part b times
only impl="chunked" and part c only the I-ViT; pallas runs there in the interpreter (its timings
mean nothing and are not taken).

If XLA's GPU autotuner crashes the train step (CUDA_ERROR_ILLEGAL_ADDRESS has been reported
for JAX ViT training on H100), part c is retried once with XLA_FLAGS=--xla_gpu_autotune_level=0
and the report says so. Writes DIR/device_check.json and DIR/device_check.md (default DIR:
device_check/ under the current directory); the exit code is 1 when a part failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lfi_jax import sharding as shd  # noqa: E402
from lfi_jax.config import base_config  # noqa: E402
from lfi_jax.fileio import atomic_write, write_json_atomic  # noqa: E402
from lfi_jax.models.config import ivit_config, variant  # noqa: E402
from lfi_jax.models.flops import macs  # noqa: E402
from lfi_jax.ops import interaction_attention  # noqa: E402
from lfi_jax.ops.pallas import Tiles, default_tiles, generation, interaction_attention_pallas  # noqa: E402

PARTS = ("a", "b", "c", "d")
TITLES = {"a": "kernel correctness vs xla", "b": "attention timings and tile sweep",
          "c": "ViT-B/16 and I-ViT-B/16 train steps", "d": "LLaVA-1.5-7B export (random weights)"}
TOL = {"float32": 2e-4, "bfloat16": 3e-2}  # max |pallas - xla| / max |xla| per output
# Dense bf16 peak FLOP/s by device generation (vendor figures, no sparsity).
# Seconds per part before it stops starting new cases (the whole --full run: ~8 minutes).
BUDGET_S = {"quick": {"a": 45, "b": 60, "c": 90, "d": 60}, "full": {"a": 90, "b": 150, "c": 180, "d": 60}}
PEAK_BF16 = {"hopper": 989e12, "ampere": 312e12, "v4": 275e12, "v5e": 197e12, "v5p": 459e12}


@dataclasses.dataclass(frozen=True)
class Sizes:
    correct: tuple  # (nq, nk, dtype, gate_hidden, masked)
    heads: int
    dim: int
    timing_n: tuple
    timing_h: tuple
    sweep: tuple  # Tiles candidates (pallas, on the device)
    train: tuple  # (variant, image_size, batches to try)
    steps: int
    models: tuple = (False, True)  # part c: the ViT, the I-ViT (ivit flag)
    impls: tuple = ("xla", "chunked")  # part b: the non-Pallas implementations timed


def sizes_for(mode: str, backend: str) -> Sizes:
    if backend == "cpu":  # tiny, both modes: checks that everything runs (the I-ViT step covers the ViT's code
        # and part a's reference already runs impl="xla": one model, one timed impl)
        return Sizes(correct=((24, 24, "float32", 8, False), (8, 24, "bfloat16", 0, True)), heads=2, dim=16,
                     timing_n=(37,), timing_h=(2,), sweep=(), train=(("tiny", 32, (2,)),), steps=2, models=(True,),
                     impls=("chunked",))
    corr = [(n, n, dt, g, False) for n in (197, 577, 785) for dt in ("bfloat16", "float32") for g in (0, 8)]
    corr += [(200, 200, "bfloat16", 8, True), (100, 850, "float32", 8, True), (100, 850, "bfloat16", 0, True)]
    base = default_tiles(backend)
    if backend == "gpu":
        sweep = (base, Tiles(64, 64, 32, 32), Tiles(64, 64, 64, 64, num_warps=8, num_warps_bwd=8),
                 Tiles(128, 64, 64, 64, num_warps=8, num_stages=3, num_warps_bwd=8),
                 Tiles(128, 128, 64, 64, num_warps=8, num_stages=2, num_warps_bwd=8))
    else:
        sweep = (base, Tiles(128, 128, 128, 128), Tiles(256, 128, 128, 128), Tiles(256, 256, 128, 128))
    if mode == "quick":
        return Sizes(correct=tuple(c for c in corr if c[0] in (197, 100, 200)), heads=4, dim=64, timing_n=(197, 785),
                     timing_h=(12,), sweep=sweep[:3], train=(("B/16", 224, (128, 64, 32)),), steps=5)
    return Sizes(correct=tuple(corr), heads=4, dim=64, timing_n=(197, 577, 785, 3137), timing_h=(6, 12, 16),
                 sweep=sweep, train=(("B/16", 224, (256, 128, 64)), ("B/16", 384, (96, 64, 32))), steps=10)


def _backend() -> str:
    return {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())


def _rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def _inputs(b, nq, nk, h, d, dtype, g, masked, seed=0):
    r = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    q, q2 = (jnp.asarray(r.normal(size=(b, nq, h, d)), dt) for _ in range(2))
    k, v = (jnp.asarray(r.normal(size=(b, nk, h, d)), dt) for _ in range(2))
    f32 = jnp.float32
    if g:
        gate = {"w1": r.normal(size=(h, 2, g)) * 0.7, "b1": r.normal(size=(h, g)) * 0.5,
                "w2": r.normal(size=(h, g, 2)) * 0.7, "b2": r.normal(size=(h, 2))}
    else:
        gate = {"w2": r.normal(size=(h, 2, 2)) * 0.7, "b2": r.normal(size=(h, 2))}
    gate = {key: jnp.asarray(val, f32) for key, val in gate.items()}
    mask = None
    if masked:
        m = np.ones((b, nk), bool)
        m[0, nk - nk // 4 :] = False
        mask = jnp.asarray(m)
    wo = jnp.asarray(r.normal(size=(b, nq, h, d)), f32)
    wc = jnp.asarray(r.normal(size=(b, h, nk)) * nk, f32)
    return (q, q2, k, v, gate), mask, (wo, wc)


def _loss_fn(op, mask, weights):
    wo, wc = weights

    def loss(q, q2, k, v, gate):
        o, cls = op(q, q2, k, v, gate, mask)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(cls * wc), (o, cls)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def _xla(q, q2, k, v, gate, mask):
    return interaction_attention(q, q2, k, v, gate, impl="xla", key_mask=mask)


def _pallas(tiles=None):
    def op(q, q2, k, v, gate, mask):
        return interaction_attention_pallas(q, q2, k, v, gate, key_mask=mask, tiles=tiles)

    return op


# ----------------------------------------------------------------------------- part a


def part_a(sz: Sizes, budget: float) -> dict:
    rows, failed, t0 = [], [], time.perf_counter()
    for nq, nk, dtype, g, masked in sz.correct:
        if time.perf_counter() - t0 > budget:
            rows.append({"case": f"Nq={nq} Nk={nk} {dtype} G={g}", "status": "skipped: time budget"})
            continue
        case = f"Nq={nq} Nk={nk} {dtype} G={g}" + (" masked" if masked else "")
        try:
            args, mask, w = _inputs(2, nq, nk, sz.heads, sz.dim, dtype, g, masked)
            (_, (o, c)), grads = _loss_fn(_pallas(), mask, w)(*args)
            with jax.default_matmul_precision("highest"):
                (_, (o_r, c_r)), grads_r = _loss_fn(_xla, mask, w)(*args)
            errs = {"o": _rel(o, o_r), "agt_cls": _rel(c, c_r)}
            for name, x, ref in zip(("dq", "dq2", "dk", "dv"), grads[:4], grads_r[:4]):
                errs[name] = _rel(x, ref)
            for key in grads[4]:
                errs[f"d{key}"] = _rel(grads[4][key], grads_r[4][key])
            bad = {k: e for k, e in errs.items() if not e <= TOL[dtype]}
            rows.append({"case": case, "status": "fail" if bad else "ok", "max_rel_err": max(errs.values()),
                         "errors": errs})
            if bad:
                failed.append(f"{case}: {bad}")
        except Exception as e:  # a compile or runtime failure of one case: record it, go on
            rows.append({"case": case, "status": "fail", "error": f"{type(e).__name__}: {e}"[:2000]})
            failed.append(f"{case}: {type(e).__name__}")
    return {"status": "fail" if failed else "ok", "cases": rows, "failures": failed, "tolerance": TOL}


# ----------------------------------------------------------------------------- part b


def _time(fn, args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _timed_pair(op, args, mask, w):
    fwd = jax.jit(lambda *a: op(*a, mask))
    bwd = _loss_fn(op, mask, w)
    return _time(fwd, args) * 1e3, _time(bwd, args) * 1e3


def part_b(sz: Sizes, budget: float, backend: str) -> dict:
    rows, t0 = [], time.perf_counter()
    impls = {"xla": _xla, "chunked": lambda q, q2, k, v, g, m: interaction_attention(q, q2, k, v, g, impl="chunked",
                                                                                     key_mask=m)}
    impls = {name: op for name, op in impls.items() if name in sz.impls}
    if backend != "cpu":
        impls["pallas"] = _pallas()
    tokens = 4 * 37 if backend == "cpu" else 16 * 785
    for n in sz.timing_n:
        for h in sz.timing_h:
            b = max(1, tokens // n)
            args, mask, w = _inputs(b, n, n, h, sz.dim, "bfloat16", 8, False)
            for name, op in impls.items():
                row = {"impl": name, "N": n, "H": h, "B": b}
                if time.perf_counter() - t0 > budget:
                    rows.append({**row, "status": "skipped: time budget"})
                    continue
                try:
                    row["fwd_ms"], row["fwd_bwd_ms"] = _timed_pair(op, args, mask, w)
                    row["status"] = "ok"
                except Exception as e:
                    row.update(status="fail", error=f"{type(e).__name__}: {e}"[:1000])
                rows.append(row)
    sweep = []
    if sz.sweep:
        n, h = (785, 12)
        args, mask, w = _inputs(max(1, tokens // n), n, n, h, sz.dim, "bfloat16", 8, False)
        for tiles in sz.sweep:
            row = {"tiles": dataclasses.asdict(tiles), "N": n, "H": h}
            if time.perf_counter() - t0 > budget:
                sweep.append({**row, "status": "skipped: time budget"})
                continue
            try:
                row["fwd_ms"], row["fwd_bwd_ms"] = _timed_pair(_pallas(tiles), args, mask, w)
                row["status"] = "ok"
            except Exception as e:
                row.update(status="fail", error=f"{type(e).__name__}: {e}"[:1000])
            sweep.append(row)
    ok = [r for r in sweep if r.get("status") == "ok"]
    best = min(ok, key=lambda r: r["fwd_bwd_ms"]) if ok else None
    failed = [r for r in rows + sweep if r.get("status") == "fail"]
    return {"status": "fail" if failed else "ok", "timings": rows, "sweep": sweep,
            "best_tiles": best and best["tiles"], "note": "pallas not timed on CPU (interpreter)" * (backend == "cpu")}


# ----------------------------------------------------------------------------- part c


def build_train_step(mcfg, batch: int):
    """The trainer's own jitted train step on one device, and a state and a batch for it.
    (The one place that knows the trainer's API.)"""
    from lfi_jax.trainer import create_trainer

    c = base_config()
    c.model = ml_collections.ConfigDict(dataclasses.asdict(mcfg))
    c.batch_size = batch
    c.data.image_size = mcfg.image_size
    c.mesh.shape = (1, 1)
    mesh = shd.make_mesh(c.mesh, devices=jax.devices()[:1])
    trainer, init, _ = create_trainer(c, mcfg, mesh, seed=0)
    r = np.random.default_rng(0)
    t = r.random((batch, mcfg.grid[0] * mcfg.grid[1])).astype(np.float32)
    host = {
        "image": r.standard_normal((batch, mcfg.image_size, mcfg.image_size, 3)).astype(np.float32),
        "label": r.integers(0, mcfg.num_classes, batch).astype(np.int32),
        "teacher": t / t.sum(-1, keepdims=True),
        "teacher_mask": np.ones(batch, np.float32),
    }
    return trainer.train_step, init(), shd.global_batch(host, mesh)


def _model(name: str, image: int, ivit: bool, attn_impl: str, dtype: str):
    if name == "tiny":
        m = variant("Ti/16", hidden_size=32, depth=1, num_heads=2, mlp_dim=64, image_size=image, num_classes=10,
                    dtype=dtype, attn_impl=attn_impl)
    else:
        m = variant(name, image_size=image, num_classes=1000, dtype=dtype, attn_impl=attn_impl)
    return ivit_config(m) if ivit else m


def _peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def part_c(sz: Sizes, budget: float, backend: str) -> dict:
    rows, t0 = [], time.perf_counter()
    attn = "chunked" if backend == "cpu" else "auto"
    dtype = "float32" if backend == "cpu" else "bfloat16"
    peak = PEAK_BF16.get(generation(backend)) if backend != "cpu" else None
    for name, image, batches in sz.train:
        for ivit in sz.models:
            label = ("I-ViT-" if ivit else "ViT-") + name
            mcfg = _model(name, image, ivit, attn, dtype)
            row = {"model": label, "image_size": image, "dtype": dtype, "attn_impl": attn}
            for batch in batches:
                if time.perf_counter() - t0 > budget:
                    row["status"] = "skipped: time budget"
                    break
                try:
                    step, state, gb = build_train_step(mcfg, batch)
                    t = time.perf_counter()
                    state, m = step(state, gb)
                    jax.block_until_ready(m)
                    row["compile_s"] = time.perf_counter() - t
                    t = time.perf_counter()
                    for _ in range(sz.steps):
                        state, m = step(state, gb)
                    jax.block_until_ready(m)
                    ips = batch * sz.steps / (time.perf_counter() - t)
                    flops = 3 * 2 * macs(mcfg)["total"]
                    row.update(status="ok", batch=batch, images_per_s=ips, train_flops_per_image=flops,
                               mfu=(ips * flops / peak) if peak else None, peak_bytes=_peak_memory())
                    del state
                    break
                except Exception as e:
                    text = f"{type(e).__name__}: {e}"
                    row.update(status="fail", error=text[:1500], batch=batch)
                    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
                        break  # not a size problem: a smaller batch will not help
            rows.append(row)
    failed = [r for r in rows if r.get("status") == "fail"]
    return {"status": "fail" if failed else "ok", "steps": rows, "peak_flops": peak,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


# ----------------------------------------------------------------------------- part d


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def part_d(sz: Sizes, budget: float, backend: str) -> dict:
    if not _has_nvidia_gpu():  # decided without importing torch (slow, and pointless here)
        return {"status": "skipped", "reason": "no NVIDIA GPU on this machine (no /dev/nvidiactl, no nvidia-smi)"}
    try:
        import torch
    except ImportError:
        return {"status": "skipped", "reason": "torch is not installed here"}
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": f"torch {torch.__version__} has no CUDA device here"}
    spec = importlib.util.spec_from_file_location("bench_teacher_export", os.path.join(ROOT, "bench",
                                                                                       "teacher_export.py"))
    te = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(te)
    from lfi_jax.teacher.llava import LlavaTeacher

    with tempfile.TemporaryDirectory() as work:
        path, model = te.build("real", work, "cuda", "bfloat16")
        teacher = LlavaTeacher(path, device="cuda", dtype="bfloat16", model=model)
        images = 16 if sz.steps < 10 else 32
        out = te.measure_export(teacher, "real", images, 8)
        teacher.close()
    return {"status": "ok", "export": out, "device": torch.cuda.get_device_name()}


# ----------------------------------------------------------------------------- driver


def run_part(part: str, mode: str, budget: float) -> dict:
    backend = _backend()
    sz = sizes_for(mode, backend)
    t = time.perf_counter()
    try:
        if part == "a":
            res = part_a(sz, budget)
        elif part == "b":
            res = part_b(sz, budget, backend)
        elif part == "c":
            res = part_c(sz, budget, backend)
        else:
            res = part_d(sz, budget, backend)
    except Exception as e:
        res = {"status": "fail", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    res["seconds"] = time.perf_counter() - t
    return res


def _in_child(part: str, args, env_extra=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "part.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", part, "--child-out", out, "--mode", args.mode,
               "--budget-s", str(args.budget_s)]
        env = dict(os.environ, **(env_extra or {}))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.part_timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "fail", "error": f"timed out after {args.part_timeout_s} s"}
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        return {"status": "fail", "error": f"process exited with {proc.returncode}", "stderr": proc.stderr[-4000:]}


def _crashed(res: dict) -> bool:
    return res.get("status") == "fail" and ("exited with" in res.get("error", "") or "ILLEGAL_ADDRESS" in
                                            json.dumps(res))


def environment() -> dict:
    dev = jax.devices()[0]
    env = {"backend": jax.default_backend(), "device_kind": dev.device_kind, "device_count": jax.device_count(),
           "generation": generation(_backend()), "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", ""),
           "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        env["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        env["torch"] = None
    env["nvidia_gpu"] = _has_nvidia_gpu()
    return env


def markdown(report: dict) -> str:
    e = report["environment"]
    lines = [f"Device check ({report['mode']}): `{report['command']}`  ",
             f"Device: {e['device_kind']} x{e['device_count']} ({e['backend']}, generation {e['generation']}); "
             f"jax {e['jax']}, python {e['python']}, torch {e.get('torch')}  ",
             f"Started {report['started']}, {report['seconds']:.0f} s in all.", ""]
    for part, res in report["parts"].items():
        lines.append(f"### ({part}) {TITLES[part]}: {res['status']} ({res.get('seconds', 0):.1f} s)")
        lines.append("")
        if res.get("error"):
            lines += ["```", str(res["error"])[:1500], "```", ""]
        if res.get("reason"):
            lines += [res["reason"], ""]
        if part == "a" and "cases" in res:
            lines += ["| case | status | max rel. error |", "|---|---|---|"]
            lines += [f"| {c['case']} | {c['status']} | {c.get('max_rel_err', float('nan')):.2e} |"
                      for c in res["cases"]]
        if part == "b" and "timings" in res:
            lines += ["| impl | N | H | B | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|---|"]
            for r in res["timings"]:
                lines.append(f"| {r['impl']} | {r['N']} | {r['H']} | {r['B']} | {r.get('fwd_ms', float('nan')):.3f} "
                             f"| {r.get('fwd_bwd_ms', float('nan')):.3f} |")
            if res.get("best_tiles"):
                lines += ["", f"Best tiles (N=785, H=12, bf16, fwd+bwd): `{res['best_tiles']}`"]
        if part == "c" and "steps" in res:
            lines += ["| model | px | batch | images/s | MFU | peak memory | status |", "|---|---|---|---|---|---|---|"]
            for r in res["steps"]:
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
                mem = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else "-"
                lines.append(f"| {r['model']} | {r['image_size']} | {r.get('batch', '-')} | "
                             f"{r.get('images_per_s', float('nan')):.1f} | {mfu} | {mem} | {r['status']} |")
        if part == "d" and "export" in res:
            x = res["export"]
            lines.append(f"{x['images']} images at batch {x['batch']}: {x['images_per_s']:.2f} images/s, "
                         f"peak {x.get('cuda_peak_mb', 0):.0f} MiB CUDA")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="mode", action="store_const", const="quick")
    g.add_argument("--full", dest="mode", action="store_const", const="full")
    p.add_argument("--mode", dest="mode", choices=("quick", "full"), help=argparse.SUPPRESS)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of a,b,c,d")
    p.add_argument("--out", default="device_check", help="report directory")
    p.add_argument("--budget-s", type=float, default=0.0, help="per-part time budget (default: BUDGET_S; CPU: half)")
    p.add_argument("--part-timeout-s", type=float, default=0.0, help="per-part process timeout (default: by mode)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each part in its own process (default: on an accelerator)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mode = args.mode or "quick"
    if args.child:
        write_json_atomic(args.child_out, run_part(args.child, args.mode, args.budget_s))
        return 0
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; expected a subset of {','.join(PARTS)}")
    accel = jax.default_backend() != "cpu"
    isolate = accel if args.isolate is None else args.isolate
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    results = {}
    given_budget, given_timeout = args.budget_s, args.part_timeout_s
    for part in parts:
        args.budget_s = given_budget or BUDGET_S[args.mode][part] * (1 if accel else 0.5)
        args.part_timeout_s = given_timeout or args.budget_s * 2 + 120
        res = _in_child(part, args) if isolate else run_part(part, args.mode, args.budget_s)
        if part == "c" and isolate and _crashed(res) and "autotune" not in os.environ.get("XLA_FLAGS", ""):
            flags = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
            retry = _in_child(part, args, {"XLA_FLAGS": flags})
            retry["first_attempt"] = res
            retry["retried_with"] = f"XLA_FLAGS={flags}"
            res = retry
        results[part] = res
        print(f"device_check ({part}) {TITLES[part]}: {res['status']} ({res.get('seconds', 0):.1f} s)"
              + (f" -- {res.get('error') or res.get('reason') or ''}"[:300] if res["status"] != "ok" else ""),
              flush=True)
    command = "python bench/device_check.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    report = {"command": command.strip(), "mode": args.mode, "started": started, "environment": environment(),
              "seconds": time.perf_counter() - t0, "parts": results}
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "device_check.json"), report, indent=1, default=str)
    atomic_write(os.path.join(args.out, "device_check.md"), markdown(report))
    print(f"device_check: report in {os.path.join(args.out, 'device_check.md')}", flush=True)
    return int(any(r["status"] == "fail" for r in results.values()))


if __name__ == "__main__":
    sys.exit(main())
