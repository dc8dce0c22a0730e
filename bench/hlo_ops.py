"""Per-op-category breakdown of the demo-size train step from XLA's optimised HLO: for each
category (dot, convolution, reduce, elementwise fusion, transpose/copy, ...), how many
instructions, and the step's total FLOPs and bytes from the compiled cost analysis.

    python bench/hlo_ops.py [--model ivit]

Counts, not times: where the instructions are, to read beside a jax.profiler trace.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.loop import demo_config  # noqa: E402
from lfi_jax import sharding as shd  # noqa: E402
from lfi_jax.models.config import model_config  # noqa: E402
from lfi_jax.trainer import create_trainer  # noqa: E402

CATEGORIES = {
    "dot": "dot (GEMM)",
    "convolution": "convolution (patch embedding)",
    "fusion": "fusion (elementwise / reduce, fused)",
    "reduce": "reduce",
    "transpose": "transpose / copy / layout",
    "copy": "transpose / copy / layout",
    "bitcast": "bitcast / reshape",
    "reshape": "bitcast / reshape",
    "broadcast": "broadcast",
    "custom-call": "custom-call (runtime library)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ivit")
    args = p.parse_args()
    config = demo_config(args.model, 10, 10)
    mcfg = model_config(config)
    mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
    trainer, init, _ = create_trainer(config, mcfg, mesh, seed=0)
    state = init()
    import numpy as np

    from bench.loop import bare_rate  # noqa: F401  (same batch layout)

    rng = np.random.default_rng(0)
    b, g = config.batch_size, mcfg.grid[0] * mcfg.grid[1]
    batch = {
        "image": rng.standard_normal((b, 48, 48, 3)).astype(np.float32),
        "label": rng.integers(0, 10, b).astype(np.int32),
        "teacher": np.full((b, g), 1.0 / g, np.float32),
        "teacher_mask": np.ones(b, np.float32),
    }
    compiled = trainer.train_step.lower(state, shd.global_batch(batch, mesh)).compile()
    text = compiled.as_text()
    entry = text[text.index("ENTRY") :]
    counts: collections.Counter = collections.Counter()
    for line in entry.splitlines():
        m = re.search(r"=\s*\S+\s+([a-z\-]+)\(", line)
        if m:
            counts[CATEGORIES.get(m.group(1), "other: " + m.group(1))] += 1
    fused = collections.Counter(re.findall(r"kind=k(\w+)", text))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"demo {args.model} train step, batch {b}: {cost.get('flops', 0) / 1e9:.2f} GFLOP, "
          f"{cost.get('bytes accessed', 0) / 1e6:.0f} MB accessed")
    print("| category (top-level HLO of the step) | instructions |")
    print("|---|---|")
    for k, v in counts.most_common():
        print(f"| {k} | {v} |")
    print("\nfusion kinds: " + ", ".join(f"{k} {v}" for k, v in fused.most_common()))


if __name__ == "__main__":
    main()
