"""The paper's figures from trained runs.

    python -m lfi_jax.visualize maps --workdir W [--data SPEC] [--split S] [--n 8]
        [--layer -1|mean] [--head mean|H] [--teacher STORE] [--compare [NAME=]W_VIT] --out f.png
    python -m lfi_jax.visualize convergence --runs [NAME=]W1 [NAME=]W2 ... [--metric KEY] --out f.png
    python -m lfi_jax.visualize similarity --workdir W --human STORE [--data ...] [--split S]
        [--n 500] [--teacher STORE] [--compare [NAME=]W_VIT] [--out f.png]

maps (Fig. 5): one row per example: the image, C_vfm, C_vlm (the teacher) and C_agt, each the
CLS query's attention over the patches (CLS key dropped, renormalised), at one layer (or the
mean over layers) and one head (or the mean over heads). C_vfm and C_agt are computed here
from the layer's own query / interaction-query / key projections (the model is not changed),
so C_vfm is the original queries' map even where the model attends with C_f. `--compare`
adds the C_vfm column of a second run (e.g. the plain ViT).

convergence (Fig. 3): accuracy against step from each run's metrics.jsonl, and the step at
which each run first reaches the first run's final accuracy (the "x times faster" number).

similarity (Fig. 6): cosine similarity of C_vfm, C_vlm and C_agt to human maps given as a
teacher store for the same split (on the embedded benchmark: an oracle store of the digit
masks with no noise stands in for human maps), per layer, printed and drawn as bars.

The teacher map of an example (C_vlm) comes from `--teacher STORE` if given; else from the
run's teacher store where it covers the split; else, for an oracle teacher, it is recomputed
from the example's mask with the run's teacher settings (grid, noise, seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from lfi_jax.evaluate import Run, eval_data_config, load_run
from lfi_jax.fileio import save_figure, write_json_atomic


# --------------------------------------------------------------------------- attention maps


def cls_attention_rows(model, images):
    """CLS-query rows of C_vfm and C_agt for every layer and head.

    Returns (vfm [B, L, H, N], agt [B, L, H, N] or None without interaction queries), float32,
    over all N keys (CLS first). Computed from each layer's projections of its input, then the
    layer itself is applied to move on.
    """
    import jax
    import jax.numpy as jnp

    cfg = model.cfg
    x = model.embeddings(images)
    scale = 1.0 / math.sqrt(cfg.head_dim)
    vfm, agt = [], []
    for layer in model.encoder.layer:
        h = layer.layernorm_before(x)
        att = layer.attention
        b, n, _ = h.shape
        k = att.key(h).reshape(b, n, cfg.num_heads, cfg.head_dim).astype(jnp.float32)

        def row(proj):
            q0 = proj(h[:, :1]).reshape(b, cfg.num_heads, cfg.head_dim).astype(jnp.float32)
            return jax.nn.softmax(jnp.einsum("bhd,bkhd->bhk", q0, k) * scale, axis=-1)

        vfm.append(row(att.query))
        if cfg.interaction_queries:
            agt.append(row(att.interaction_query))
        x, _ = layer(x, False)
    return jnp.stack(vfm, 1), (jnp.stack(agt, 1) if agt else None)


def attention_fn(run: Run):
    """A jitted (params, images) -> (vfm, agt) for `run`'s model."""
    import jax
    from flax import nnx

    def fn(params, images):
        return cls_attention_rows(nnx.merge(run.graphdef, params), images)

    return jax.jit(fn)


def patch_maps(rows: np.ndarray) -> np.ndarray:
    """[..., N] rows over all keys -> [..., N - 1] over the patches, renormalised to sum 1."""
    p = np.asarray(rows, np.float64)[..., 1:]
    return p / np.maximum(p.sum(-1, keepdims=True), 1e-30)


def select(maps: np.ndarray, layer: int | str = -1, head: int | str = "mean") -> np.ndarray:
    """[B, L, H, P] -> [B, P]: one layer (or "mean"), one head (or "mean"); renormalised."""
    m = np.asarray(maps, np.float64)
    m = m.mean(1) if layer == "mean" else m[:, int(layer)]
    m = m.mean(1) if head == "mean" else m[:, int(head)]
    return m / np.maximum(m.sum(-1, keepdims=True), 1e-30)


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


# --------------------------------------------------------------------------- examples + teacher


class TeacherSource:
    """Per-example teacher entries for a (data, split): a store, or the oracle recomputed."""

    def __init__(self, run: Run, data_cfg, split: str, store_path: str | None = None):
        self.store = None
        self.oracle = None
        self.describe = "none"
        path = store_path
        cfg = run.config
        if path is None and cfg.teacher.store and os.path.isfile(os.path.join(cfg.teacher.store, "manifest.json")):
            with open(os.path.join(cfg.teacher.store, "manifest.json")) as f:
                man = json.load(f)
            if man.get("split") == split and man.get("data") == data_cfg.source:
                path = cfg.teacher.store
            elif man.get("backend") == "oracle":
                t = man["teacher"]
                self.oracle = dict(grid=t["grid"], geometry=t["geometry"], target=t["target"], seed=t["seed"], **t["noise"])
        if path:
            from lfi_jax.teacher.store import TeacherStore

            self.store = TeacherStore(path)
            self.describe = f"store {path}"
        elif self.oracle is None and (cfg.teacher.auto == "oracle" or cfg.model.interaction_constraint):
            noise = {k: float(cfg.teacher.noise[k]) for k in ("blur", "shift", "uniform")}
            self.oracle = dict(grid=int(cfg.teacher.grid), seed=int(cfg.seed), **noise)
        if self.oracle is not None:
            self.describe = f"oracle recomputed ({self.oracle})"

    def get(self, example: dict):
        if self.store is not None:
            return self.store.get(example["id"])
        if self.oracle is not None and ("mask" in example or "boxes" in example):
            from lfi_jax.teacher.oracle import oracle_entry

            return oracle_entry(example, self.oracle)
        return None


def load_examples(run: Run, data_cfg, split: str, indices: Sequence[int], teacher: TeacherSource | None,
                  human=None) -> dict[str, Any]:
    """Images (raw and model input), labels, and teacher / human maps on the student grid."""
    from lfi_jax.data.sources import get_source
    from lfi_jax.data.transforms import transform_example

    source = get_source(data_cfg.source, split, data_cfg.options.to_dict())
    gh, gw = run.mcfg.grid
    raw, inputs, labels, ids = [], [], [], []
    tmaps, tmask, hmaps, hmask = [], [], [], []
    for i in indices:
        ex = source[int(i)]
        kw = dict(image_size=int(data_cfg.image_size), grid_hw=(gh, gw), mean=data_cfg.mean, std=data_cfg.std)
        entry = teacher.get(ex) if teacher is not None else None
        t = transform_example(ex["image"], entry, **kw)
        raw.append(ex["image"])
        inputs.append(t["image"])
        labels.append(int(ex["label"]))
        ids.append(ex["id"])
        tmaps.append(t["teacher"])
        tmask.append(float(t["teacher_mask"]))
        if human is not None:
            if ex["id"] not in human:
                raise KeyError(f"human store {human.path} has no map for example {ex['id']!r}")
            h = transform_example(ex["image"], human[ex["id"]], **kw)
            hmaps.append(h["teacher"])
            hmask.append(float(h["teacher_mask"]))
    out = {
        "raw": raw,
        "images": np.stack(inputs).astype(np.float32),
        "labels": np.asarray(labels),
        "ids": ids,
        "teacher": np.stack(tmaps).astype(np.float64),
        "teacher_mask": np.asarray(tmask),
        "class_names": list(source.class_names),
    }
    if human is not None:
        out["human"] = np.stack(hmaps).astype(np.float64)
        out["human_mask"] = np.asarray(hmask)
    return out


def compute_maps(run: Run, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """{"vfm": [B, L, H, P], "agt": ... or None, "logits": [B, C]} for a stack of model inputs."""
    import jax
    from flax import nnx

    fn = attention_fn(run)
    logits_fn = jax.jit(lambda p, x: nnx.merge(run.graphdef, p)(x)[0])
    vfm, agt, logits = [], [], []
    for s in range(0, len(images), batch):
        x = images[s : s + batch]
        v, a = jax.device_get(fn(run.params, x))
        vfm.append(patch_maps(v))
        if a is not None:
            agt.append(patch_maps(a))
        logits.append(np.asarray(jax.device_get(logits_fn(run.params, x))))
    return {"vfm": np.concatenate(vfm), "agt": np.concatenate(agt) if agt else None, "logits": np.concatenate(logits)}


# --------------------------------------------------------------------------- figure helpers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


# --------------------------------------------------------------------------- maps (Fig. 5)


def maps_figure(workdir: str, out: str, *, data: str | None = None, split: str | None = None, n: int = 8, start: int = 0,
                layer: int | str = -1, head: int | str = "mean", teacher: str | None = None, compare: str | None = None,
                devices=None) -> dict[str, Any]:
    import jax

    devices = devices or jax.devices()[:1]
    run = load_run(workdir, devices=devices)
    data_cfg = eval_data_config(run.config, data)
    split = split or run.config.data.eval_splits[0]
    tsrc = TeacherSource(run, data_cfg, split, teacher)
    idx = list(range(start, start + n))
    ex = load_examples(run, data_cfg, split, idx, tsrc)
    maps = compute_maps(run, ex["images"])
    vfm = select(maps["vfm"], layer, head)
    agt = select(maps["agt"], layer, head) if maps["agt"] is not None else None
    cols = [("image", None), ("C_vfm", vfm), ("C_vlm (teacher)", ex["teacher"]), ("C_agt", agt)]
    if compare:
        cname, cpath = parse_named(compare)
        crun = load_run(cpath, devices=devices)
        if crun.mcfg.grid != run.mcfg.grid or crun.config.data.image_size != run.config.data.image_size:
            raise ValueError(f"--compare {cpath}: its grid {crun.mcfg.grid} differs from {run.mcfg.grid}")
        cmaps = compute_maps(crun, ex["images"])
        cols.append((f"C_vfm ({cname})", select(cmaps["vfm"], layer, head)))
    pred = maps["logits"].argmax(1)
    plt = _pyplot()
    fig, axes = plt.subplots(n, len(cols), figsize=(1.9 * len(cols), 1.9 * n + 0.4), squeeze=False)
    for r in range(n):
        img = ex["raw"][r]
        name = ex["class_names"]
        for c, (title, m) in enumerate(cols):
            ax = axes[r][c]
            if c == 0:
                ax.imshow(img, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title("image", fontsize=8)
                ax.set_ylabel(f"true {name[ex['labels'][r]]}\npred {pred[r]}", fontsize=7)
                continue
            note = "no interaction\nqueries" if title == "C_agt" else "no teacher map"
            if title.startswith("C_vlm") and ex["teacher_mask"][r] == 0:
                m = None
            _overlay(ax, img, None if m is None else m[r], run.mcfg.grid, title if r == 0 else None, note)
    lname = layer_name(layer, run.mcfg.depth)
    hname = "mean over heads" if head == "mean" else f"head {head}"
    fig.suptitle(f"CLS attention over patches, {lname}, {hname} ({data_cfg.source}/{split})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)
    return {"out": out, "columns": [c for c, _ in cols], "rows": n, "teacher": tsrc.describe}


# --------------------------------------------------------------------------- convergence (Fig. 3)


def load_curve(workdir: str, metric: str | None = None) -> tuple[str, list[int], list[float]]:
    from lfi_jax.evaluate import load_config
    from lfi_jax.metrics import read_metrics

    if metric is None:
        metric = f"{load_config(workdir).data.eval_splits[0]}/accuracy"
    rows = [r for r in read_metrics(workdir) if metric in r]
    if not rows:
        raise ValueError(f"{workdir}/metrics.jsonl has no {metric!r} values")
    by_step = {}
    for r in rows:  # a resumed run may have logged a step twice: keep the last
        by_step[int(r["step"])] = float(r[metric])
    steps = sorted(by_step)
    return metric, steps, [by_step[s] for s in steps]


def first_step_reaching(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    for s, v in zip(steps, values):
        if v >= target - 1e-12:
            return int(s)
    return None


def convergence_figure(runs: dict[str, str], out: str, *, metric: str | None = None) -> dict[str, Any]:
    curves = {}
    for name, wd in runs.items():
        m, s, v = load_curve(wd, metric)
        metric = metric or m
        curves[name] = (s, v)
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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in names:
        s, v = curves[name]
        ax.plot(s, [100 * x for x in v], "-o", ms=3, label=name)
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


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of [B, P] arrays (0 where a row is all zero)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)


def _ms(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "n": int(len(x))}


def similarity(workdir: str, human: str, *, data: str | None = None, split: str | None = None, n: int = 500, start: int = 0,
               layer: int | str = -1, head: str | int = "mean", teacher: str | None = None, compare: str | None = None,
               out: str | None = None, devices=None) -> dict[str, Any]:
    import jax

    from lfi_jax.data.sources import get_source
    from lfi_jax.teacher.store import TeacherStore

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
    res: dict[str, Any] = {"workdir": run.workdir, "human": human, "data": data_cfg.source, "split": split,
                           "examples": int(keep.sum()), "layer": layer, "head": head, "teacher": tsrc.describe}
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
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(1.3 * len(bars) + 2, 3.8))
        names = list(bars)
        colors = {"C_vfm": "tab:blue", "C_vlm": "tab:green", "C_agt": "tab:red", "uniform": "tab:gray"}
        ax.bar(range(len(names)), [bars[k]["mean"] for k in names], yerr=[bars[k]["std"] for k in names], capsize=3,
               color=[colors.get(k, "tab:purple") for k in names])
        for i, k in enumerate(names):
            ax.text(i, bars[k]["mean"] + bars[k]["std"] + 0.01, f"{bars[k]['mean']:.3f}", ha="center", va="bottom", fontsize=8)
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
    lines = [f"cosine similarity to human maps ({res['examples']} examples of {res['data']}/{res['split']}; "
             f"teacher: {res['teacher']})", ""]
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


def main(argv: Sequence[str] | None = None) -> int:
    from lfi_jax.metrics import setup_logging

    p = argparse.ArgumentParser(prog="python -m lfi_jax.visualize", description="Figures 3, 5 and 6 from trained runs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("maps", help="Fig. 5: image, C_vfm, C_vlm, C_agt per example")
    s = sub.add_parser("similarity", help="Fig. 6: cosine similarity of the maps to human maps")
    for q in (m, s):
        q.add_argument("--workdir", required=True)
        q.add_argument("--data", default=None)
        q.add_argument("--split", default=None)
        q.add_argument("--start", type=int, default=0, help="first example index")
        q.add_argument("--layer", default="-1", help="layer index or 'mean' (default -1: the last)")
        q.add_argument("--head", default="mean", help="head index or 'mean' (default)")
        q.add_argument("--teacher", default=None, help="teacher store for this split (C_vlm)")
        q.add_argument("--compare", default=None, metavar="[NAME=]W", help="a second run whose C_vfm is shown too (e.g. ViT=W_VIT)")
    m.add_argument("--n", type=int, default=8)
    m.add_argument("--out", required=True)
    s.add_argument("--human", required=True, help="teacher-format store of human maps for the split")
    s.add_argument("--n", type=int, default=500)
    s.add_argument("--out", default=None)
    c = sub.add_parser("convergence", help="Fig. 3: accuracy vs step")
    c.add_argument("--runs", nargs="+", required=True, metavar="[NAME=]W")
    c.add_argument("--metric", default=None, help="metrics.jsonl key (default: <first eval split>/accuracy)")
    c.add_argument("--out", required=True)
    a = p.parse_args(argv)
    setup_logging()
    try:
        if a.cmd == "maps":
            r = maps_figure(a.workdir, a.out, data=a.data, split=a.split, n=a.n, start=a.start, layer=parse_layer(a.layer),
                            head=parse_layer(a.head), teacher=a.teacher, compare=a.compare)
            print(json.dumps(r))
        elif a.cmd == "similarity":
            r = similarity(a.workdir, a.human, data=a.data, split=a.split, n=a.n, start=a.start, layer=parse_layer(a.layer),
                           head=parse_layer(a.head), teacher=a.teacher, compare=a.compare, out=a.out)
            print(format_similarity(r))
        else:
            r = convergence_figure(_runs_arg(a.runs), a.out, metric=a.metric)
            print(f"{r['metric']}: target = {r['baseline']}'s final {100 * r['target']:.2f} %")
            for name, v in r["runs"].items():
                t = v["step_reaching_baseline_final"]
                sp = f"{v['speedup']:.2f}x" if v["speedup"] else "-"
                print(f"  {name:<16} final {100 * v['final']:.2f} %  best {100 * v['best']:.2f} %  "
                      f"reaches target at step {t if t is not None else 'never'}  speedup {sp}")
            print(json.dumps(r))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"visualize: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
