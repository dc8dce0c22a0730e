"""The bare train step at the main job's size with and without huge pages for XLA's CPU
buffers (`lfi_jax.hostmem`), side by side in one run: examples/s and page faults per step.

    python bench/hugepages.py [--models vit,ivit] [--steps 30]

Each configuration runs in a fresh subprocess (the glibc tunable is read at process start):
`bench/loop.py`'s bare step (one fixed device batch, after a compile step), with the minor page
faults and the system CPU time of the timed steps from getrusage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from lfi_jax import hostmem  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {here!r})
from loop import demo_config, bare_rate
model, steps = sys.argv[1], int(sys.argv[2])
config = demo_config(model, steps, 10)
r0 = resource.getrusage(resource.RUSAGE_SELF)
rate = bare_rate(config, steps)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(rate=rate, faults=(r1.ru_minflt - r0.ru_minflt) / (steps + 1),
                      sys_s=r1.ru_stime - r0.ru_stime, user_s=r1.ru_utime - r0.ru_utime)))
"""


def run(model: str, steps: int, tuned: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != hostmem.ENV}
    if tuned:
        env = hostmem.tuned_environ(env)
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(here=HERE), model, str(steps)],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit,ivit")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    rows = []
    for model in args.models.split(","):
        for tuned in (False, True):
            print(f"{model}, huge pages {'on' if tuned else 'off'} ...", file=sys.stderr, flush=True)
            rows.append((model, tuned, run(model, args.steps, tuned)))
    print(f"demo size, batch 128, {args.steps} steps; {hostmem.describe().split(';')[0]}")
    print("| model | glibc.malloc.hugetlb | bare step (ex/s) | minor page faults / step | system CPU (s) |")
    print("|---|---|---|---|---|")
    for model, tuned, r in rows:
        print(f"| {model} | {'1' if tuned else 'unset'} | {r['rate']:.0f} | {r['faults']:,.0f} | {r['sys_s']:.1f} |")


if __name__ == "__main__":
    main()
