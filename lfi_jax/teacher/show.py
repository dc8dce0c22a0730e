"""Draw teacher maps over their images (in the style of the paper's Fig. 5).

  python -m lfi_jax.teacher.show --store DIR [--data SOURCE --split SPLIT] --n 16 --out grid.png

Works for any store (llava or oracle): each map is placed on its image through the geometry
stored with it (the region of the original image the whole teacher grid covers, which may
extend past the image where the VLM padded it to a square), so what is drawn is where the map
lands in image coordinates. `--data`/`--split`/`--data_option` default to what the store's
manifest records. Degenerate maps are drawn as the bare image, titled "degenerate".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lfi_jax.cli import add_debug_flag, run_cli
from lfi_jax.data.sources import get_source
from lfi_jax.errors import UserError
from lfi_jax.fileio import save_figure
from lfi_jax.teacher.export import parse_data_options
from lfi_jax.teacher.store import TeacherStore


def overlay(ax, image: np.ndarray, entry, *, alpha: float = 0.5, cmap: str = "jet", title: str | None = None):
    """Draws `image` and, unless degenerate, `entry.map` placed by `entry.geometry` on `ax`."""
    h, w = image.shape[:2]
    if tuple(entry.geometry.image_hw) != (h, w):
        raise ValueError(
            f"{title or 'example'}: the map's geometry is for a {entry.geometry.image_hw[0]}x"
            f"{entry.geometry.image_hw[1]} image but the data source gives {h}x{w}"
        )
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    if not entry.degenerate:
        y0, x0, y1, x1 = entry.geometry.box
        m = np.asarray(entry.map, np.float32)
        top = float(m.max())
        ax.imshow(m / top if top > 0 else m, extent=(x0, x1, y1, y0), cmap=cmap, alpha=alpha,
                  vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(("degenerate: " if entry.degenerate else "") + title, fontsize=7)


def _labels(source) -> np.ndarray | None:
    get = getattr(source, "labels", None)
    if get is None:
        return None
    labels = get()
    return None if labels is None else np.asarray(labels)


def pick(
    source, store, n: int, *, seed: int | None = 0, ids: Sequence[str] | None = None, first: bool = False
) -> list[int]:
    """Up to `n` source indices whose example id is in `store`.

    Default: a seeded sample across classes (classes in a seeded order, then round-robin, each
    class's members in a seeded order), so a figure shows every class it can; a source without
    labels is sampled uniformly. `first`: the first n instead. `ids`: exactly those examples.
    """
    if ids:
        want = set(ids)
        found = {}
        for i in range(len(source)):
            eid = source.example_id(i)
            if eid in want:
                found[eid] = i
        missing = [e for e in ids if e not in found]
        if missing:
            raise ValueError(f"example ids not in the data source: {missing[:5]}")
        absent = [e for e in ids if e not in store]
        if absent:
            raise ValueError(f"example ids not in teacher store {store.path}: {absent[:5]}")
        return [found[e] for e in ids]
    rng = np.random.default_rng(0 if seed is None else seed)
    labels = None if first else _labels(source)
    if first:
        order: Sequence[int] = range(len(source))
    elif labels is None or len(labels) != len(source):
        order = rng.permutation(len(source))
    else:
        classes = rng.permutation(np.unique(labels))
        groups = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
        order = [int(g[k]) for k in range(max(len(g) for g in groups)) for g in groups if k < len(g)]
    out = []
    for i in order:
        if source.example_id(int(i)) in store:
            out.append(int(i))
            if len(out) == n:
                break
    if not out:
        raise ValueError(f"no example of {source.name}/{source.split} is in teacher store {store.path}")
    return out


def render(store, source, indices: Sequence[int], out: str, *, cols: int = 0, pairs: bool = False,
           alpha: float = 0.5, cmap: str = "jet", dpi: int = 120) -> str:
    """Writes the figure to `out` (atomically; format from the extension); returns `out`."""
    n = len(indices)
    per = 2 if pairs else 1
    cols = max(1, min(n, cols or 4))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols * per, figsize=(2.2 * cols * per, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    names = list(getattr(source, "class_names", []) or [])
    for k, i in enumerate(indices):
        ex = source[i]
        eid = ex.get("id", source.example_id(i))
        entry = store[eid]
        label = ex.get("label")
        cname = names[label] if isinstance(label, (int, np.integer)) and 0 <= label < len(names) else ""
        title = f"{cname} {eid}".strip() if len(eid) <= 24 else f"{cname} ...{eid[-20:]}".strip()
        r, c = divmod(k, cols)
        image = np.asarray(ex["image"])
        if pairs:
            ax = axes[r, c * 2]
            ax.axis("on")
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7)
            ax = axes[r, c * 2 + 1]
            ax.axis("on")
            overlay(ax, image, entry, alpha=alpha, cmap=cmap, title="C_vlm")
        else:
            ax = axes[r, c]
            ax.axis("on")
            overlay(ax, image, entry, alpha=alpha, cmap=cmap, title=title)
    prov = store.provenance
    model = prov.model
    fig.suptitle(f"{prov.backend or 'teacher'} maps"
                 + (f" ({model})" if model else "") + f", grid {list(store.grid)}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out, dpi=dpi)
    return out


def _main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.teacher.show", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="teacher store directory")
    p.add_argument("--data", help="data source spec (default: the one in the store's manifest)")
    p.add_argument("--split", help="split (default: the store's)")
    p.add_argument("--data_option", action="append", default=None, metavar="KEY=VALUE",
                   help="source option (default: the store's recorded data options)")
    p.add_argument("--n", type=int, default=16, help="number of examples (default 16)")
    p.add_argument("--ids", help="comma-separated example ids to draw instead of a sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample across classes (default 0)")
    p.add_argument("--first", action="store_true", help="draw the first n examples instead of a sample across classes")
    p.add_argument("--cols", type=int, default=0, help="examples per row (default 4)")
    p.add_argument("--pairs", action="store_true", help="draw each image beside its overlay")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--cmap", default="jet")
    p.add_argument("--out", required=True, help="output image (png, pdf, svg, jpg)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    store = TeacherStore(args.store)
    prov = store.provenance
    data = args.data or prov.data
    split = args.split or prov.split
    if not data or not split:
        raise UserError(f"teacher store {args.store} records no data source/split; pass --data and --split")
    options = parse_data_options(args.data_option) if args.data_option is not None else dict(prov.data_options)
    source = get_source(data, split, options)
    ids = [s.strip() for s in args.ids.split(",") if s.strip()] if args.ids else None
    try:
        indices = pick(source, store, args.n, seed=args.seed, ids=ids, first=args.first)
    except IndexError as e:
        raise UserError(str(e)) from None
    render(store, source, indices, args.out, cols=args.cols, pairs=args.pairs, alpha=args.alpha, cmap=args.cmap)
    print(json.dumps({"out": args.out, "examples": len(indices)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (lfi_jax.cli convention: one `error:` line and exit 2 for a user error)."""
    return run_cli(_main, argv, exit=False)


if __name__ == "__main__":
    sys.exit(main())
