"""What the bench scripts share: the huge-page switch of their command lines, and writing a
table into its marked block of a Markdown file together with the command that made it."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lfi_jax import hostmem  # noqa: E402
from lfi_jax.fileio import replace_doc_block  # noqa: E402


def add_hugepages_flag(parser: argparse.ArgumentParser) -> None:
    """--no-hugepages (dest `hugepages`): run without lfi_jax.hostmem's huge-page tunable."""
    parser.add_argument("--no-hugepages", dest="hugepages", action="store_false",
                        help="run without lfi_jax.hostmem's huge-page tunable (the entry points' default)")


def use_hugepages(args: argparse.Namespace) -> None:
    """Re-executes this process with huge pages for XLA's buffers, as training runs, unless
    --no-hugepages. Call before any work."""
    if args.hugepages:
        hostmem.maybe_reexec()


def command() -> str:
    """This script's command line as a user types it from the repository root."""
    return " ".join(["python", f"bench/{os.path.basename(sys.argv[0])}", *sys.argv[1:]])


def record(path: str, section: str, body: str, marker: str) -> None:
    """Put this run's command and `body` into the block `marker` of the Markdown section whose
    heading is `section` in `path` (atomically; the section or block appended when missing)."""
    replace_doc_block(path, section, f"`{command()}`\n\n{body}", marker)
