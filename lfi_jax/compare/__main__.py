"""`python -m lfi_jax.compare MODE ...`: parity of the JAX models with PyTorch (SPEC section 5).

    python -m lfi_jax.compare vit --hf DIR          # our ViT vs transformers' own ViT
    python -m lfi_jax.compare ivit                  # a small random I-ViT vs lfi_jax.reference
    python -m lfi_jax.compare ivit --hf DIR         # an I-ViT made from a HF ViT checkpoint
    python -m lfi_jax.compare detr --hf DIR         # our DETR vs transformers' DETR (lfi_jax.compare.detr)
    python -m lfi_jax.compare conditional_detr --hf DIR   # our Conditional-DETR vs transformers'

One JSON line is printed:

    {"mode": "ivit", "ok": true, "tol": 0.0001, "max_abs_diff": {"logits": ..., "cls_attn":
     ..., "loss": ..., "grad/interaction_query": ..., "grad/gate": ..., "grad/classifier":
     ..., "grad/backbone": ...}, "max_abs": {...}, ...}

The exit status is 1 when any difference is above `--tol` (default 1e-4, for float32), 2 on
bad input (a missing or mismatched checkpoint: one `error:` line), else 0.

Each mode is a `Subcommand` in `SUBCOMMANDS`: a function adding its flags to an argparse
parser and a function from the parsed arguments to the report (a dict with `ok`).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, NamedTuple

from lfi_jax.cli import add_debug_flag, run_cli
from lfi_jax.compare.conditional_detr import add_arguments as conditional_detr_add_arguments
from lfi_jax.compare.conditional_detr import run as conditional_detr_run
from lfi_jax.compare.detr import add_arguments as detr_add_arguments
from lfi_jax.compare.detr import run as detr_run
from lfi_jax.compare.vit import add_ivit_arguments, add_vit_arguments, run_ivit, run_vit


class Subcommand(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]


SUBCOMMANDS = {
    "vit": Subcommand("load_hf_vit(DIR) vs transformers' from_pretrained(DIR)", add_vit_arguments, run_vit),
    "ivit": Subcommand("an I-ViT (random, or made from --hf DIR) vs lfi_jax.reference", add_ivit_arguments, run_ivit),
    "detr": Subcommand("our DETR (load_hf_detr(DIR)) vs transformers' DetrForObjectDetection on a padded batch",
                       detr_add_arguments, detr_run),
    "conditional_detr": Subcommand("our Conditional-DETR vs transformers' ConditionalDetrForObjectDetection",
                                   conditional_detr_add_arguments, conditional_detr_run),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.compare", description=__doc__.split("\n\n")[0])
    add_debug_flag(p)
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for name, sub in SUBCOMMANDS.items():
        sub.add_arguments(modes.add_parser(name, help=sub.help, description=sub.help))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = SUBCOMMANDS[args.mode].run(args)
    print(json.dumps(report, sort_keys=True))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    run_cli(main)
