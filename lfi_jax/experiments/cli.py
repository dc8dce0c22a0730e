"""`python -m lfi_jax.experiments NAME ...`: the command line of the experiment runner."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import jax

from lfi_jax.cli import parse_sets, run_cli
from lfi_jax.experiments import (
    ablation,
    choices,
    data_ratio,
    detection,
    hard,
    peers,
    seeds,
    spurious_p,
    teacher_noise,
)
from lfi_jax.experiments.base import GridOptions
from lfi_jax.experiments.cells import DEMO_BUDGETS
from lfi_jax.experiments.runner import DEFAULT_OUT, DEFAULT_WORKDIR, run_experiment
from lfi_jax.metrics import setup_logging

# The command line names the experiment: the one place a name selects one.
EXPERIMENTS = {
    e.name: e
    for e in (
        data_ratio.EXPERIMENT,
        ablation.EXPERIMENT,
        teacher_noise.EXPERIMENT,
        spurious_p.EXPERIMENT,
        peers.EXPERIMENT,
        choices.EXPERIMENT,
        hard.EXPERIMENT,
        seeds.EXPERIMENT,
        detection.EXPERIMENT,  # runs its own cells (detection runs report AP): detection.DenseExperiment.run
    )
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lfi_jax.experiments",
        description="The experiment runner: a grid of training runs, then a Markdown table and a figure.",
    )
    p.add_argument("name", choices=sorted(EXPERIMENTS), help="the experiment")
    p.add_argument("--config", default=None, help="base config FILE[:ARG] (default configs/demo.py, clean regime)")
    p.add_argument(
        "--budget", default="full", choices=sorted(DEMO_BUDGETS), help="full (default: the config as written) or small"
    )
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds per grid point (0..N-1; default 1, detection: 3)"
    )
    p.add_argument(
        "--workdir", default=DEFAULT_WORKDIR, help=f"root of the cells' workdirs (default {DEFAULT_WORKDIR})"
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"where the table, figure and JSON go (default {DEFAULT_OUT})")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every cell (repeatable)"
    )
    p.add_argument("--ratios", default=None, help="data_ratio only: comma-separated ratios (default 1,0.5,0.1,0.01)")
    p.add_argument(
        "--noise",
        nargs="+",
        default=None,
        metavar="KIND=L1[,L2]",
        help="teacher_noise only: the noise levels (default blur=1,2,4 shift=1,2 uniform=0.5,0.9)",
    )
    p.add_argument(
        "--rrr_weights",
        default=None,
        help="peers only: comma-separated weights of the RRR rows (default "
        + ",".join(f"{w:g}" for w in peers.RRR_WEIGHTS) + ")",
    )
    p.add_argument(
        "--regimes",
        default=None,
        help="comma-separated regimes: spurious_p (default clean,shortcut,hard), peers (shortcut,hard), "
        "choices (shortcut), hard (hard), teacher_noise (one regime; default the base config's); "
        "detection: the row groups (default detection,segmentation,conddetr)",
    )
    return p


def parse_noise(items: Sequence[str] | None) -> tuple[tuple[str, float], ...] | None:
    if not items:
        return None
    noise = []
    for item in items:
        kind, sep, levels = item.partition("=")
        if not sep:
            raise ValueError(f"--noise {item!r}: expected KIND=L1[,L2]")
        noise += [(kind, float(v)) for v in levels.split(",") if v]
    teacher_noise.check_levels(noise)
    return tuple(noise)


def grid_options(args) -> GridOptions:
    regimes = tuple(args.regimes.split(",")) if args.regimes else None
    spurious_p.check_regimes(regimes)
    ratios = tuple(float(r) for r in args.ratios.split(",")) if args.ratios else None
    return GridOptions(ratios=ratios, noise=parse_noise(args.noise), regimes=regimes,
                       rrr_weights=parse_rrr_weights(args.rrr_weights))


def parse_rrr_weights(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        weights = tuple(float(w) for w in text.split(",") if w)
    except ValueError:
        raise ValueError(f"--rrr_weights {text!r}: expected comma-separated numbers, e.g. 0.1,1") from None
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"--rrr_weights {text!r}: every weight must be > 0 (weight 0 is the ViT row)")
    return weights


def enable_compilation_cache(workdir: str) -> None:
    """Cells of one architecture compile the same programs: cache them across cells and runs
    (WORKDIR/jax_cache). Only for the command line; a library caller keeps its own settings."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(workdir, "jax_cache")))


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (2 with one `error:` line for a user error)."""
    return run_cli(_main, argv, exit=False)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    sets = parse_sets(args.set)
    exp = EXPERIMENTS[args.name]
    seeds = args.seeds if args.seeds is not None else getattr(exp, "default_seeds", 1)
    run = getattr(exp, "run", None)  # an experiment with its own runner (detection), which checks --regimes
    regimes = tuple(r for r in (args.regimes or "").split(",") if r) or None
    options = grid_options(args) if run is None else GridOptions(regimes=regimes)
    setup_logging()
    if run is not None:
        run(config=args.config, budget=args.budget, seeds=seeds, workdir=args.workdir, out=args.out, sets=sets,
            options=options, command="python -m lfi_jax.experiments " + " ".join(argv))
        return 0
    run_experiment(
        exp,
        config=args.config,
        budget=args.budget,
        seeds=seeds,
        workdir=args.workdir,
        out=args.out,
        sets=sets,
        options=options,
        command="python -m lfi_jax.experiments " + " ".join(argv),
    )
    return 0
