"""Examples/s of a full train step (forward, backward, AdamW) for ViT and I-ViT, in JAX and in
the PyTorch reference (eager and torch.compile), on the same machine in one run.

    python bench/train_step.py [--sizes s16,demo] [--steps 5] [--no-compile] [--record docs/performance.md]

Model FLOPs utilisation (MFU) = 3 x forward FLOPs (lfi_jax.models.flops, 2 FLOPs per MAC, gate
included) x examples/s, against a matmul peak measured here (a 2048^3 float32 matmul in each
framework). Both frameworks use every core of the machine (torch's intra-op threads = cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lfi_jax import sharding as shd  # noqa: E402
from lfi_jax.config import base_config, model_fields  # noqa: E402
from lfi_jax.models import ViT, ivit_config, variant  # noqa: E402
from lfi_jax.models.flops import macs  # noqa: E402

SIZES = {
    # name: (variant, overrides, batch)
    "s16": ("S/16", dict(image_size=224, num_classes=200), 16),
    "demo": ("S/6", dict(hidden_size=96, depth=4, num_heads=4, mlp_dim=192, image_size=48, num_classes=10), 64),
}


def matmul_peak_jax(n=2048, reps=5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def matmul_peak_torch(n=2048, reps=5) -> float:
    import torch

    a = torch.ones(n, n)
    a @ a
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _batch(cfg, batch, seed=0):
    rng = np.random.default_rng(seed)
    g = cfg.grid[0] * cfg.grid[1]
    t = rng.random((batch, g)).astype(np.float32)
    return {
        "image": rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32),
        "label": rng.integers(0, cfg.num_classes, batch).astype(np.int32),
        "teacher": t / t.sum(-1, keepdims=True),
        "teacher_mask": np.ones(batch, np.float32),
    }


def time_jax(mcfg, batch, steps) -> float:
    from lfi_jax.train import create_trainer
    import ml_collections

    c = base_config()
    c.model = ml_collections.ConfigDict(model_fields("S/16", **{k: v for k, v in dataclasses.asdict(mcfg).items()}))
    c.batch_size = batch
    c.data.image_size = mcfg.image_size
    c.mesh.shape = (1, 1)
    mesh = shd.make_mesh(c.mesh, devices=jax.devices()[:1])
    trainer, init, _ = create_trainer(c, mcfg, mesh, seed=0)
    state = init()
    gb = shd.global_batch(_batch(mcfg, batch), mesh)
    state, m = trainer.train_step(state, gb)  # compile
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = trainer.train_step(state, gb)
    jax.block_until_ready(m)
    return batch * steps / (time.perf_counter() - t)


def time_torch(mcfg, batch, steps, compile_: bool) -> float:
    import torch

    from lfi_jax.models.convert import save_hf
    from flax import nnx
    from lfi_jax.reference import IViTReference
    from lfi_jax.reference.ivit_torch import alignment_loss

    with tempfile.TemporaryDirectory() as d:
        save_hf(ViT(mcfg, rngs=nnx.Rngs(0)), d)
        model = IViTReference.from_pretrained(d)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    b = _batch(mcfg, batch)
    x = torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(b["label"]).long()
    t_map = torch.from_numpy(b["teacher"])

    def step():
        opt.zero_grad(set_to_none=True)
        logits, cls = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        if cls is not None:
            loss = loss + alignment_loss(cls, t_map)
        loss.backward()
        opt.step()
        return loss

    fn = torch.compile(step) if compile_ else step
    fn()
    fn()  # compile / warm-up
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return batch * steps / (time.perf_counter() - t)


def train_flops(mcfg) -> float:
    return 3 * 2 * macs(mcfg)["total"]


def run(sizes, steps, do_compile, gate_hidden):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    peak_j, peak_t = matmul_peak_jax(), matmul_peak_torch()
    rows = []
    for size in sizes:
        name, over, batch = SIZES[size]
        vit = variant(name, **over)
        ivit = ivit_config(vit, gate_hidden=gate_hidden, attn_impl="xla")
        res = {}
        for label, mcfg in (("ViT", vit), ("I-ViT", ivit)):
            flops = train_flops(mcfg)
            r = {"jax": time_jax(mcfg, batch, steps), "torch eager": time_torch(mcfg, batch, steps, False)}
            if do_compile:
                try:
                    r["torch.compile"] = time_torch(mcfg, batch, steps, True)
                except Exception as e:  # noqa: BLE001 - report, don't die
                    print(f"torch.compile failed for {size} {label}: {type(e).__name__}: {e}", file=sys.stderr)
                    r["torch.compile"] = float("nan")
            res[label] = (r, flops)
            for impl, eps in r.items():
                peak = peak_j if impl == "jax" else peak_t
                rows.append((f"{name} {mcfg.image_size}px b{batch}", label, impl, eps, eps * flops / peak))
                print(f"{size} {label:6s} {impl:14s} {eps:8.1f} ex/s  MFU {eps * flops / peak:.1%}", file=sys.stderr, flush=True)
        j_ratio = res["ViT"][0]["jax"] / res["I-ViT"][0]["jax"]
        print(f"{size}: I-ViT step / ViT step (JAX) = {j_ratio:.2f}", file=sys.stderr)
    return rows, peak_j, peak_t


def table(rows, peak_j, peak_t, gate_hidden) -> str:
    out = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.default_backend()}); gate_hidden={gate_hidden}. "
        f"Measured float32 matmul peak: JAX {peak_j / 1e9:.1f} GFLOP/s, torch {peak_t / 1e9:.1f} GFLOP/s.",
        "",
        "| model | arch | implementation | examples/s | MFU |",
        "|---|---|---|---|---|",
    ]
    for shape, arch, impl, eps, mfu in rows:
        out.append(f"| {shape} | {arch} | {impl} | {eps:.1f} | {mfu:.1%} |")
    by = {}
    for shape, arch, impl, eps, _ in rows:
        by[(shape, arch, impl)] = eps
    out += ["", "| model | JAX / torch eager (ViT) | JAX / torch eager (I-ViT) | I-ViT step time / ViT step time (JAX) |", "|---|---|---|---|"]
    for shape in dict.fromkeys(r[0] for r in rows):
        jv, ji = by[(shape, "ViT", "jax")], by[(shape, "I-ViT", "jax")]
        tv, ti = by[(shape, "ViT", "torch eager")], by[(shape, "I-ViT", "torch eager")]
        out.append(f"| {shape} | {jv / tv:.2f}x | {ji / ti:.2f}x | {jv / ji:.2f}x |")
    return "\n".join(out)


def record(path: str, section: str, body: str, command: str) -> None:
    text = open(path).read() if os.path.exists(path) else "# Performance\n"
    block = f"## {section}\n\n`{command}`\n\n{body}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="s16,demo")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--gate_hidden", type=int, default=8)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--record", default="", help="Markdown file to write the table into (section 'Train step').")
    a = p.parse_args()
    rows, pj, pt = run(a.sizes.split(","), a.steps, not a.no_compile, a.gate_hidden)
    body = table(rows, pj, pt, a.gate_hidden)
    print(body)
    if a.record:
        cmd = "python bench/train_step.py " + " ".join(sys.argv[1:])
        record(a.record, f"Train step (gate_hidden={a.gate_hidden})", body, cmd)


if __name__ == "__main__":
    main()
