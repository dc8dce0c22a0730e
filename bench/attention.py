"""Benchmark the interaction-attention implementations: time and temporary memory.

    python bench/attention.py                      # H=6, d=64, N in {197, 785, 3137}, B=1
    python bench/attention.py --batch 8 --n 785 --dtype bfloat16 --no-write

For each implementation (xla, chunked at one or more query blocks, and pallas when not on
CPU: the CPU runs Pallas only in the interpreter, whose speed means nothing) and N, it
compiles the forward and the forward+backward (gradients w.r.t. q, q2, k, v and the gate,
cotangents on o and agt_cls), reads the temporaries XLA allocates (compiled
memory_analysis().temp_size_in_bytes: everything besides arguments and outputs), and
times warm runs (median). It prints a Markdown table and, unless --no-write, puts it into
the "## Interaction attention" section of docs/performance.md (other sections untouched).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lfi_jax.fileio import replace_doc_block
from lfi_jax.ops import interaction_attention

SECTION = "## Interaction attention"
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance.md")


def _inputs(batch, n, heads, dim, hidden, dtype, seed=0):
    r = np.random.default_rng(seed)
    q, q2, k, v = (jnp.asarray(r.normal(size=(batch, n, heads, dim)), dtype) for _ in range(4))
    f32 = jnp.float32
    if hidden > 0:
        gate = {
            "w1": jnp.asarray(r.normal(size=(heads, 2, hidden)) * 0.1, f32),
            "b1": jnp.zeros((heads, hidden), f32),
            "w2": jnp.asarray(r.normal(size=(heads, hidden, 2)) * 0.1, f32),
            "b2": jnp.tile(jnp.asarray([[-4.0, 4.0]], f32), (heads, 1)),
        }
    else:
        gate = {"w2": jnp.asarray(r.normal(size=(heads, 2, 2)) * 0.1, f32), "b2": jnp.zeros((heads, 2), f32)}
    do = jnp.asarray(r.normal(size=(batch, n, heads, dim)), dtype)
    dagt = jnp.asarray(r.normal(size=(batch, heads, n)), jnp.float32)
    return (q, q2, k, v, gate), (do, dagt)


def _functions(impl: str, block_q: int | None):
    kw = {} if block_q is None else {"block_q": block_q}

    def fwd(q, q2, k, v, gate):
        return interaction_attention(q, q2, k, v, gate, impl=impl, **kw)

    def fwd_bwd(args, cts):
        out, pullback = jax.vjp(fwd, *args)
        return out, pullback(cts)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def _compile(fn, args):
    compiled = fn.lower(*args).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def _time(compiled, args, reps: int) -> float:
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_line() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    extra = f", {os.cpu_count()} CPU cores visible" if dev.platform == "cpu" else ""
    return f"{dev.platform} ({kind}{extra}), jax {jax.__version__}, {platform.machine()}"


def _fmt_ms(t):
    return "not run" if t is None else f"{t * 1e3:.1f}"


def _fmt_mb(b):
    return f"{b / 2**20:.1f}"


def run(args) -> str:
    dtype = jnp.dtype(args.dtype)
    on_cpu = jax.default_backend() == "cpu"
    impls: list[tuple[str, str, int | None]] = [("xla", "xla", None)]
    for bq in args.chunked_block_q:
        impls.append((f"chunked (block_q={bq})", "chunked", bq))
    if not on_cpu and not args.no_pallas:
        impls.append(("pallas", "pallas", None))
    rows = []
    for n in args.n:
        inputs, cts = _inputs(args.batch, n, args.heads, args.dim, args.gate_hidden, dtype)
        for label, impl, bq in impls:
            fwd, fwd_bwd = _functions(impl, bq)
            # Compile first: the memory analysis decides whether running is affordable.
            c_f, temp_f = _compile(fwd, inputs)
            c_fb, temp_fb = _compile(fwd_bwd, (inputs, cts))
            affordable = temp_fb <= args.max_temp_gb * 2**30
            t_f = _time(c_f, inputs, args.reps) if affordable else None
            t_fb = _time(c_fb, (inputs, cts), args.reps) if affordable else None
            del c_f, c_fb
            rows.append((label, n, t_f, temp_f, t_fb, temp_fb))
            print(f"  {label:24s} N={n:5d}  fwd {_fmt_ms(t_f):>9s} ms {_fmt_mb(temp_f):>9s} MB   "
                  f"fwd+bwd {_fmt_ms(t_fb):>9s} ms {_fmt_mb(temp_fb):>9s} MB", file=sys.stderr, flush=True)
    header = (
        f"B={args.batch}, H={args.heads}, d={args.dim}, gate_hidden={args.gate_hidden}, {args.dtype}; "
        f"median of {args.reps} warm runs; temp = XLA temporaries of the compiled program "
        f"(arguments and outputs excluded)."
    )
    lines = [
        header,
        "",
        "| impl | N | fwd ms | fwd temp MiB | fwd+bwd ms | fwd+bwd temp MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, n, t_f, temp_f, t_fb, temp_fb in rows:
        lines.append(f"| {label} | {n} | {_fmt_ms(t_f)} | {_fmt_mb(temp_f)} | {_fmt_ms(t_fb)} | {_fmt_mb(temp_fb)} |")
    if any(r[2] is None for r in rows):
        lines += ["", f"'not run': temporaries above --max-temp-gb={args.max_temp_gb}; compiled for memory only."]
    return "\n".join(lines)


MARKER = "generated by bench/attention.py"  # <!-- begin: MARKER --> ... <!-- end: MARKER -->


def write_section(path: str, body: str) -> None:
    """Put `body` into the attention section of `path`, atomically.

    Only the marked block inside "## Interaction attention" is replaced (the prose around it
    and every other section stay as they are); a missing section or marker block is appended.
    """
    replace_doc_block(path, SECTION, body, MARKER)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[197, 785, 3137], help="sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dim", type=int, default=64, help="head dim d")
    p.add_argument("--gate-hidden", type=int, default=8, help="G (0: linear gate)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunked-block-q", type=int, nargs="+", default=[128, 64],
                   help="query blocks of the chunked implementation to compare")
    p.add_argument("--no-pallas", action="store_true", help="skip pallas on GPU/TPU")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-temp-gb", type=float, default=12.0,
                   help="compile only (no timing) where fwd+bwd temporaries exceed this")
    p.add_argument("--doc", default=DOC, help="Markdown file whose attention section is rewritten")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    print(f"device: {_device_line()}", file=sys.stderr)
    table = run(args)
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/attention.py " + " ".join(shlex.quote(a) for a in given)
    body = "\n".join([
        f"Device: {_device_line()}.",
        f"Command: `{command.strip()}`",
        f"Load average (1 min) when done: {os.getloadavg()[0]:.1f} (times are wall clock; memory is exact).",
        "",
        table,
    ])
    print(body)
    if not args.no_write:
        write_section(args.doc, body)
        print(f"wrote the attention section of {args.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
