"""The paper's figures from trained runs.

    python -m lfi_jax.visualize maps --workdir W [--data SPEC] [--split S] [--n 8] [--seed 0 | --start I]
        [--layer -1|mean] [--head mean|H] [--teacher STORE] [--compare [NAME=]W_VIT] --out f.png
    python -m lfi_jax.visualize convergence --runs [NAME=]W1 [NAME=]W2 ... [--metric KEY] --out f.png
    python -m lfi_jax.visualize similarity --workdir W --human STORE [--data ...] [--split S]
        [--n 500] [--teacher STORE] [--compare [NAME=]W_VIT] [--out f.png]

maps (Fig. 5): one row per example: the image, C_vfm, C_vlm (the teacher) and C_agt, each the
CLS query's attention over the patches (CLS key dropped, renormalised), at one layer (or the
mean over layers) and one head (or the mean over heads). C_vfm and C_agt are computed here
from the layer's own query / interaction-query / key projections (the model is not changed),
so C_vfm is the original queries' map even where the model attends with C_f. `--compare`
adds the C_vfm column of a second run (e.g. the plain ViT). The examples are drawn across the
classes (round robin over the classes, each class shuffled with `--seed`), or, with `--start I`,
the n consecutive examples from index I; each row names the true and the predicted class.
For a detection (or segmentation) run the columns are the image (ground-truth and predicted
boxes), the dense teacher C_vlm and the decoder's cross-attention (C_agt; C_vfm for DETR), mean
over heads and object queries, on the feature grid (`dense_maps_figure`, lfi_jax.eval.dense_maps).

convergence (Fig. 3): accuracy against step from each run's metrics.jsonl, and the step at
which each run first reaches the first run's final accuracy (the "x times faster" number).

similarity (Fig. 6): cosine similarity of C_vfm, C_vlm and C_agt to human maps given as a
teacher store for the same split (on the embedded benchmark: an oracle store of the digit
masks with no noise stands in for human maps), per layer, printed and drawn as bars.

The teacher map of an example (C_vlm) comes from `--teacher STORE` if given; else from the
run's own teacher store (its `teacher.store`, or the store the trainer built in W/teacher/)
where that store covers the split; else, for an oracle store, it is recomputed from the
example's mask with the store's settings (grid, geometry, noise, seed). A store of another
kind (a VLM's) covers only the split it was exported for: `maps` then defaults to that split,
and for any other split the teacher column says why it is empty. The JSON printed by `maps`
names the teacher the panels show and how many rows have a teacher map.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lfi_jax.cli import run_cli
from lfi_jax.data.sources import get_source
from lfi_jax.eval import examples as evx
from lfi_jax.eval.attention import compute_maps, cosine, select
from lfi_jax.eval.curves import first_step_reaching, load_curve
from lfi_jax.eval.dense_maps import DenseTeacher, decoder_maps, is_dense, load_dense_examples, pick
from lfi_jax.eval.examples import TeacherSource, default_split, load_examples, model_class_names
from lfi_jax.eval.figures import color_for, draw_curve, pyplot
from lfi_jax.eval.predict import eval_data_config
from lfi_jax.fileio import save_figure, write_json_atomic
from lfi_jax.metrics import setup_logging
from lfi_jax.run import load_config, load_run
from lfi_jax.teacher.store import TeacherStore

# --------------------------------------------------------------------------- arguments


def parse_layer(v: str) -> int | str:
    return "mean" if v == "mean" else int(v)


def layer_name(layer: int | str, depth: int) -> str:
    return "mean over layers" if layer == "mean" else f"layer {int(layer) % depth + 1} of {depth}"


def parse_named(value: str) -> tuple[str, str]:
    """'ViT=runs/vit' -> ('ViT', 'runs/vit'); 'runs/vit' -> ('vit', 'runs/vit')."""
    name, sep, path = value.partition("=")
    if sep and name and path:
        return name, path
    return os.path.basename(os.path.normpath(value)), value


# --------------------------------------------------------------------------- figure helpers


MAP_COLORS = {"C_vfm": "tab:blue", "C_vlm": "tab:green", "C_agt": "tab:red", "uniform": "tab:gray"}


def _overlay(ax, image: np.ndarray, m: np.ndarray | None, grid: tuple[int, int], title: str | None, note: str = ""):
    """The map (scaled to its maximum, `inferno`) over a dimmed grayscale copy of the image."""
    h, w = image.shape[:2]
    gray = np.asarray(image, np.float32)[..., :3] @ np.asarray([0.299, 0.587, 0.114], np.float32)
    ax.imshow(gray, extent=(0, w, h, 0), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    if m is not None:
        g = np.asarray(m, np.float64).reshape(grid)
        top = g.max()
        ax.imshow(g / top if top > 0 else g, extent=(0, w, h, 0), cmap="inferno", alpha=0.75, vmin=0, vmax=1,
                  interpolation="nearest")
    else:
        ax.text(w / 2, h / 2, note or "n/a", ha="center", va="center", color="white", fontsize=8,
                bbox=dict(facecolor="black", alpha=0.6))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _image_cell(ax, img: np.ndarray, title: bool, ylabel: str) -> None:
    ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title("image", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=7)


# --------------------------------------------------------------------------- maps (Fig. 5)


def maps_figure(
    workdir: str,
    out: str,
    *,
    data: str | None = None,
    split: str | None = None,
    n: int = 8,
    start: int | None = None,
    seed: int = 0,
    layer: int | str = -1,
    head: int | str = "mean",
    teacher: str | None = None,
    compare: str | None = None,
    devices=None,
) -> dict[str, Any]:
    """Fig. 5 for n examples (drawn across classes with `seed`, or consecutive from `start`)."""
    devices = devices or jax.devices()[:1]
    run = load_run(workdir, devices=devices)
    if is_dense(run):
        if data:
            raise ValueError(f"--data: a {run.task.name} run is drawn on its own data ({run.config.data.source})")
        return dense_maps_figure(run, out, split=split, n=n, start=start, seed=seed, layer=layer, head=head,
                                 teacher=teacher, compare=compare, devices=devices)
    data_cfg = eval_data_config(run.config, data)
    split = split or default_split(run, data_cfg)
    tsrc = TeacherSource(run, data_cfg, split, teacher)
    source = get_source(data_cfg.source, split, data_cfg.options.to_dict())
    if start is not None:
        idx = list(range(start, min(start + n, len(source))))
    else:
        idx = evx.sample_across_classes(evx.source_labels(source), len(source), n, seed)
    if not idx:
        raise ValueError(f"{data_cfg.source}/{split}: no examples to draw (it has {len(source)}; --start {start})")
    n = len(idx)
    ex = load_examples(run, data_cfg, split, idx, tsrc)
    maps = compute_maps(run, ex["images"])
    vfm = select(maps["vfm"], layer, head)
    agt = select(maps["agt"], layer, head) if maps["agt"] is not None else None
    has_teacher = ex["teacher_mask"] > 0
    cols = [("image", None), ("C_vfm", vfm), ("C_vlm (teacher)", ex["teacher"]), ("C_agt", agt)]
    if compare:
        cname, cpath = parse_named(compare)
        crun = load_run(cpath, devices=devices)
        if crun.mcfg.grid != run.mcfg.grid or crun.config.data.image_size != run.config.data.image_size:
            raise ValueError(f"--compare {cpath}: its grid {crun.mcfg.grid} differs from {run.mcfg.grid}")
        cmaps = compute_maps(crun, ex["images"])
        cols.append((f"C_vfm ({cname})", select(cmaps["vfm"], layer, head)))
    pred = maps["logits"].argmax(1)
    true_names = ex["class_names"]
    pred_names = model_class_names(run, true_names)
    no_teacher = "no teacher map" if tsrc.store is not None or tsrc.oracle is not None else "no teacher"
    plt = pyplot()
    fig, axes = plt.subplots(n, len(cols), figsize=(1.9 * len(cols), 1.9 * n + 0.4), squeeze=False)
    for r in range(n):
        img = ex["raw"][r]
        for c, (title, m) in enumerate(cols):
            ax = axes[r][c]
            if c == 0:
                _image_cell(ax, img, r == 0, f"true {true_names[ex['labels'][r]]}\npred {pred_names[pred[r]]}")
                continue
            note = {"C_agt": "no interaction\nqueries", "C_vlm (teacher)": no_teacher}.get(title, "n/a")
            if title.startswith("C_vlm") and not has_teacher[r]:
                m = None
            _overlay(ax, img, None if m is None else m[r], run.mcfg.grid, title if r == 0 else None, note)
    lname = layer_name(layer, run.mcfg.depth)
    hname = "mean over heads" if head == "mean" else f"head {head}"
    fig.suptitle(f"CLS attention over patches, {lname}, {hname} ({data_cfg.source}/{split})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)
    teacher_text = tsrc.describe
    if not has_teacher.any() and not teacher_text.startswith("none"):
        teacher_text = f"none: no teacher map for these examples ({teacher_text})"
    rows = [
        {
            "index": int(i),
            "id": ex["ids"][r],
            "true": true_names[ex["labels"][r]],
            "pred": pred_names[pred[r]],
            "teacher_map": bool(has_teacher[r]),
        }
        for r, i in enumerate(idx)
    ]
    return {
        "out": out,
        "data": data_cfg.source,
        "split": split,
        "columns": [c for c, _ in cols],
        "rows": n,
        "teacher": teacher_text,
        "teacher_maps": int(has_teacher.sum()),
        "examples": rows,
    }


def _draw_boxes(ax, boxes: np.ndarray, color: str) -> None:
    from matplotlib.patches import Rectangle

    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, lw=1.0))


def dense_maps_figure(run, out: str, *, split: str | None = None, n: int = 8, start: int | None = None,
                      seed: int = 0, layer: int | str = -1, head: int | str = "mean", teacher: str | None = None,
                      compare: str | None = None, devices=None) -> dict[str, Any]:
    """Fig. 5 for a detection run: per image (n drawn with `seed`, or consecutive from `start`)
    the image (ground-truth boxes green, predictions scoring >= 0.5 red), the dense teacher
    C_vlm and the decoder's cross-attention (C_agt; C_vfm for DETR) averaged over heads and
    object queries, on the feature grid (`lfi_jax.eval.dense_maps`)."""
    if head != "mean":
        raise ValueError(f"--head {head}: the dense maps are means over heads and object queries (--head mean)")
    data = run.config.data
    split = split or str(data.eval_splits[0])
    idx = pick(len(get_source(data.source, split, data.options.to_dict())), n, start, seed)
    if not idx:
        raise ValueError(f"{data.source}/{split}: no images to draw (--start {start})")
    tsrc = DenseTeacher(run, split, teacher)
    ex = load_dense_examples(run, split, idx, tsrc)
    dec = decoder_maps(run, ex, layer)
    cols = [("image", None), ("C_vlm (teacher)", ex.teacher), (dec["kind"], dec["map"])]
    if compare:
        cname, cpath = parse_named(compare)
        crun = load_run(cpath, devices=devices)
        if not is_dense(crun) or tuple(crun.config.data.pad_hw) != tuple(data.pad_hw):
            raise ValueError(f"--compare {cpath}: not a detection run on the padded size {tuple(data.pad_hw)}")
        cdec = decoder_maps(crun, ex, layer)
        cols.append((f"{cdec['kind']} ({cname})", cdec["map"]))
    has_teacher = ex.teacher_mask > 0
    plt = pyplot()
    fig, axes = plt.subplots(len(idx), len(cols), figsize=(1.9 * len(cols), 1.9 * len(idx) + 0.4), squeeze=False)
    for r in range(len(idx)):
        img = ex.display[r]
        keep = dec["scores"][r] >= 0.5
        for c, (title, m) in enumerate(cols):
            ax = axes[r][c]
            if c == 0:
                _image_cell(ax, img, r == 0, f"id {ex.ids[r]}\n{len(ex.boxes[r])} objects, {int(keep.sum())} pred")
                _draw_boxes(ax, ex.boxes[r], "lime")
                _draw_boxes(ax, dec["boxes"][r][keep], "red")
                continue
            if title.startswith("C_vlm") and not has_teacher[r]:
                m = None
            note = "no teacher map" if title.startswith("C_vlm") else "n/a"
            _overlay(ax, img, None if m is None else m[r], ex.grid, title if r == 0 else None, note)
    fig.suptitle(f"Decoder cross-attention, mean over heads and object queries, {layer_name(layer, dec['layers'])} "
                 f"({data.source}/{split})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)
    rows = [{"index": int(i), "id": ex.ids[r], "objects": len(ex.boxes[r]), "teacher_map": bool(has_teacher[r]),
             "predicted": int((dec["scores"][r] >= 0.5).sum())} for r, i in enumerate(idx)]
    return {"out": out, "data": data.source, "split": split, "columns": [c for c, _ in cols], "rows": len(idx),
            "teacher": tsrc.describe, "teacher_maps": int(has_teacher.sum()), "attention": dec["kind"],
            "grid": list(ex.grid), "examples": rows}


# --------------------------------------------------------------------------- convergence (Fig. 3)


def convergence_figure(runs: dict[str, str], out: str, *, metric: str | None = None) -> dict[str, Any]:
    """Fig. 3: each run's `metric` (default: the first run's first eval split's accuracy)
    against step, and the step at which each run first reaches the first run's final value."""
    if metric is None:
        metric = f"{load_config(next(iter(runs.values()))).data.eval_splits[0]}/accuracy"
    curves = {name: load_curve(wd, metric) for name, wd in runs.items()}
    names = list(curves)
    base = names[0]
    target = curves[base][1][-1]
    t_base = first_step_reaching(*curves[base], target)
    summary = {}
    for name in names:
        s, v = curves[name]
        t = first_step_reaching(s, v, target)
        summary[name] = {
            "final": v[-1],
            "best": max(v),
            "final_step": s[-1],
            "step_reaching_baseline_final": t,
            "speedup": (t_base / t) if (t and t_base) else None,
        }
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in names:
        draw_curve(ax, *curves[name], scale=100, color=color_for(name), label=name)
    ax.axhline(100 * target, color="gray", lw=0.8, ls=":", label=f"{base} final")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Convergence: {metric}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)
    return {"out": out, "metric": metric, "baseline": base, "target": target, "runs": summary}


# --------------------------------------------------------------------------- similarity (Fig. 6)


def _ms(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "n": int(len(x))}


def similarity(
    workdir: str,
    human: str,
    *,
    data: str | None = None,
    split: str | None = None,
    n: int = 500,
    start: int = 0,
    layer: int | str = -1,
    head: str | int = "mean",
    teacher: str | None = None,
    compare: str | None = None,
    out: str | None = None,
    devices=None,
) -> dict[str, Any]:
    devices = devices or jax.devices()[:1]
    run = load_run(workdir, devices=devices)
    data_cfg = eval_data_config(run.config, data)
    split = split or run.config.data.eval_splits[0]
    hstore = TeacherStore(human)
    src_len = len(get_source(data_cfg.source, split, data_cfg.options.to_dict()))
    idx = list(range(start, min(start + n, src_len)))
    tsrc = TeacherSource(run, data_cfg, split, teacher)
    ex = load_examples(run, data_cfg, split, idx, tsrc, human=hstore)
    keep = ex["human_mask"] > 0
    if not keep.any():
        raise ValueError(f"human store {human}: every map of the {len(idx)} examples is degenerate")
    hm = ex["human"]
    maps = compute_maps(run, ex["images"])
    L = maps["vfm"].shape[1]
    res: dict[str, Any] = {
        "workdir": run.workdir,
        "human": human,
        "data": data_cfg.source,
        "split": split,
        "examples": int(keep.sum()),
        "layer": layer,
        "head": head,
        "teacher": tsrc.describe,
    }
    bars = {}
    per_layer = {"C_vfm": [], "C_agt": []}
    for l in range(L):
        per_layer["C_vfm"].append(_ms(cosine(select(maps["vfm"], l, head), hm)[keep]))
        if maps["agt"] is not None:
            per_layer["C_agt"].append(_ms(cosine(select(maps["agt"], l, head), hm)[keep]))
    bars["C_vfm"] = _ms(cosine(select(maps["vfm"], layer, head), hm)[keep])
    tkeep = keep & (ex["teacher_mask"] > 0)
    if tkeep.any():
        bars["C_vlm"] = _ms(cosine(ex["teacher"], hm)[tkeep])
    if maps["agt"] is not None:
        bars["C_agt"] = _ms(cosine(select(maps["agt"], layer, head), hm)[keep])
    bars["uniform"] = _ms(cosine(np.ones_like(hm), hm)[keep])
    if compare:
        cname, cpath = parse_named(compare)
        crun = load_run(cpath, devices=devices)
        cm = compute_maps(crun, ex["images"])
        cname = f"C_vfm ({cname})"
        bars[cname] = _ms(cosine(select(cm["vfm"], layer, head), hm)[keep])
        per_layer[cname] = [_ms(cosine(select(cm["vfm"], l, head), hm)[keep]) for l in range(cm["vfm"].shape[1])]
    res["similarity"] = bars
    res["per_layer"] = {k: v for k, v in per_layer.items() if v}
    if out:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(1.3 * len(bars) + 2, 3.8))
        names = list(bars)
        ax.bar(range(len(names)), [bars[k]["mean"] for k in names], yerr=[bars[k]["std"] for k in names], capsize=3,
               color=[MAP_COLORS.get(k, "tab:purple") for k in names])
        for i, k in enumerate(names):
            ax.text(i, bars[k]["mean"] + bars[k]["std"] + 0.01, f"{bars[k]['mean']:.3f}", ha="center", va="bottom",
                    fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([k.replace(" (", "\n(") for k in names], fontsize=8)
        ax.set_ylabel("cosine similarity to the human map")
        ax.set_ylim(0, 1.12)
        lname = layer_name(layer, L)
        ax.set_title(f"Similarity to human maps ({lname}, {res['examples']} examples)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        save_figure(fig, out)
        res["out"] = out
        write_json_atomic(os.path.splitext(out)[0] + ".json", res)
    return res


def format_similarity(res: dict[str, Any]) -> str:
    lines = [
        f"cosine similarity to human maps ({res['examples']} examples of {res['data']}/{res['split']}; "
        f"teacher: {res['teacher']})",
        "",
    ]
    for k, v in res["similarity"].items():
        lines.append(f"  {k:<28} {v['mean']:.4f} ± {v['std']:.4f}")
    lines += ["", "per layer (head mean):", "  layer " + "".join(f"{k:>14}" for k in res["per_layer"])]
    L = len(next(iter(res["per_layer"].values())))
    for l in range(L):
        lines.append(f"  {l:>5} " + "".join(f"{res['per_layer'][k][l]['mean']:>14.4f}" for k in res["per_layer"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _runs_arg(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, wd = item.partition("=")
        if not sep:
            name, wd = os.path.basename(os.path.normpath(item)), item
        if name in out:
            raise ValueError(f"--runs: name {name!r} given twice (use NAME=W)")
        out[name] = wd
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.visualize", description="Figures 3, 5 and 6 from trained runs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("maps", help="Fig. 5: image, C_vfm, C_vlm, C_agt per example")
    s = sub.add_parser("similarity", help="Fig. 6: cosine similarity of the maps to human maps")
    for q in (m, s):
        q.add_argument("--workdir", required=True)
        q.add_argument("--data", default=None)
        q.add_argument("--split", default=None)
        q.add_argument("--layer", default="-1", help="layer index or 'mean' (default -1: the last)")
        q.add_argument("--head", default="mean", help="head index or 'mean' (default)")
        q.add_argument("--teacher", default=None, help="teacher store for this split (C_vlm)")
        q.add_argument(
            "--compare", default=None, metavar="[NAME=]W", help="a second run whose C_vfm is shown too (e.g. ViT=W_VIT)"
        )
    m.add_argument("--n", type=int, default=8)
    m.add_argument("--start", type=int, default=None, help="draw the n consecutive examples from this index instead")
    m.add_argument("--seed", type=int, default=0, help="seed of the examples drawn across classes (default 0)")
    m.add_argument("--out", required=True)
    s.add_argument("--start", type=int, default=0, help="first example index")
    s.add_argument("--human", required=True, help="teacher-format store of human maps for the split")
    s.add_argument("--n", type=int, default=500)
    s.add_argument("--out", default=None)
    c = sub.add_parser("convergence", help="Fig. 3: accuracy vs step")
    c.add_argument("--runs", nargs="+", required=True, metavar="[NAME=]W")
    c.add_argument("--metric", default=None, help="metrics.jsonl key (default: <first eval split>/accuracy)")
    c.add_argument("--out", required=True)
    return p


def _main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    setup_logging()
    if a.cmd == "maps":
        r = maps_figure(a.workdir, a.out, data=a.data, split=a.split, n=a.n, start=a.start, seed=a.seed,
                        layer=parse_layer(a.layer), head=parse_layer(a.head), teacher=a.teacher, compare=a.compare)
        print(json.dumps(r))
    elif a.cmd == "similarity":
        r = similarity(a.workdir, a.human, data=a.data, split=a.split, n=a.n, start=a.start,
                       layer=parse_layer(a.layer), head=parse_layer(a.head), teacher=a.teacher, compare=a.compare,
                       out=a.out)
        print(format_similarity(r))
    else:
        r = convergence_figure(_runs_arg(a.runs), a.out, metric=a.metric)
        print(f"{r['metric']}: target = {r['baseline']}'s final {100 * r['target']:.2f} %")
        for name, v in r["runs"].items():
            t = v["step_reaching_baseline_final"]
            sp = f"{v['speedup']:.2f}x" if v["speedup"] else "-"
            print(
                f"  {name:<16} final {100 * v['final']:.2f} %  best {100 * v['best']:.2f} %  "
                f"reaches target at step {t if t is not None else 'never'}  speedup {sp}"
            )
        print(json.dumps(r))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (2 with one `error:` line for a user error)."""
    return run_cli(_main, argv, exit=False)


if __name__ == "__main__":
    sys.exit(main())
