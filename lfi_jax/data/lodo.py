"""Leave-one-domain-out image-folder layouts (configs/pacs.py, configs/vlcs.py).

`make_lodo_layout(ROOT, held_out, OUT)` turns ROOT/<domain>/<class>/<file> into
OUT/train/<class>/<domain>__<file> (every domain but the held-out one) and
OUT/test/<class>/<held_out>__<file>, as symlinks, so `imagefolder:OUT` trains on the other
domains and tests on the held-out one. Command line: `python -m lfi_jax.evaluate lodo-layout`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence

from lfi_jax.data.files import is_image
from lfi_jax.fileio import write_json_atomic

log = logging.getLogger("lfi_jax.data")


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def make_lodo_layout(root: str, held_out: str, out: str, domains: Sequence[str] | None = None) -> str:
    """OUT/train/<class>/<domain>__<file> (every domain but `held_out`) and OUT/test/<class>/
    <held_out>__<file>, as symlinks into ROOT/<domain>/<class>/<file>. Built in a temporary
    directory and renamed into place; an existing complete layout is kept."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"domain root not found: {root}")
    all_domains = _subdirs(root)
    domains = list(domains) if domains else all_domains
    if held_out not in domains:
        raise ValueError(f"held-out domain {held_out!r} is not a directory of {root} (domains: {all_domains})")
    for d in domains:
        if not os.path.isdir(os.path.join(root, d)):
            raise FileNotFoundError(f"domain directory not found: {os.path.join(root, d)}")
    marker = os.path.join(out, "layout.json")
    desc = {"root": root, "held_out": held_out, "train_domains": [d for d in domains if d != held_out]}
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == desc:
                return out
        raise ValueError(f"{out} holds another layout ({marker}); remove it or choose another --out")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", suffix=".tmp", dir=parent)
    try:
        counts: dict[str, int] = {}
        for d in domains:
            split = "test" if d == held_out else "train"
            droot = os.path.join(root, d)
            for c in _subdirs(droot):
                os.makedirs(os.path.join(tmp, split, c), exist_ok=True)
                for f in sorted(os.listdir(os.path.join(droot, c))):
                    if is_image(f):
                        os.symlink(os.path.join(droot, c, f), os.path.join(tmp, split, c, f"{d}__{f}"))
                        counts[d] = counts.get(d, 0) + 1
        for d in domains:
            if not counts.get(d):
                raise ValueError(f"domain {d!r}: no images under {os.path.join(root, d)}/<class>/")
        write_json_atomic(os.path.join(tmp, "layout.json"), desc)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("leave-one-domain-out layout in %s: %s", out, counts)
    return out
