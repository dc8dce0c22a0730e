"""`shortcut_digits_det`: the embedded detection benchmark (issue 13), generated on the fly.

Each image is a `canvas` x `canvas` (96) RGB canvas over one of shortcut digits' 10 background
textures, with 1-4 handwritten digits from scikit-learn's `load_digits` (12-48 px cells,
coloured and outlined exactly as in `lfi_jax.data.shortcut_digits`, whose digit pools,
textures and resampling this module imports). Targets: every digit's tight ink box and its
class; instance ink masks ("masks", visible ink after occlusion).

Variants:
- plain (`clutter=False`): 10 categories, the digits 0-9 (COCO ids 1-10, names "0".."9");
- clutter (`clutter=True`): 5 categories, the digits 0-4; each image also carries 1-3
  distractor digits of classes 5-9, drawn the same way but NOT annotated (a detector must
  not fire on them; an oracle or VLM map of the targets puts no mass there). Their boxes are
  in the record as "distractor_boxes" (for analysis only).

Few-shot (`classes=K`, `shots=N`, `class_seed=S`; the Table 7 path on embedded data): K of the
variant's classes, drawn by `class_seed` alone (the same seed gives the same classes, sorted;
K = 0 keeps them all), are the categories (contiguous labels 0..K-1 in that order, names and
COCO ids those of the digits). Every target digit of either split is of a kept class (absent
classes are simply not drawn; clutter distractors stay classes 5-9). With N > 0 the train split
has exactly N images per kept class, K * N in all (`num_train` is then K * N): image i holds
`objects` digits all of class kept[i % K], so every prefix of K images covers each class once;
`val` keeps `num_val` images whose digits are drawn from the kept classes. Defaults (K = 0,
N = 0) are the plain benchmark, and then these options are not part of the image identity (a
teacher store built before they existed still fits).

Digits never overlap by more than IoU `max_overlap` (cells), so every target stays visible.
Determinism: example i is a function of (seed, split, i) only (its own generator
`default_rng([seed, 1000 + split_code, i])`), so `num_train` appends or drops examples.
train draws from the train digit pool, val from the disjoint test pool (j % 5 == 4).

Records follow `lfi_jax.data.coco` (id = str(image_id), image_id = index + 1, boxes
(y0, x0, y1, x1) px, contiguous labels, orig_size, masks), so the same transforms, teacher and
evaluation serve both; `coco_dataset()` is the split's COCO ground truth in memory (area = box
area) and `write_coco(root, split, options)` writes root/annotations/instances_<split>.json +
root/<split>/<image_id>.png for `coco:root`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from lfi_jax.data.shortcut_digits import (
    NUM_FAMILIES,
    _bilinear_matrix,
    _digits,
    _hsv_to_rgb,
    _max_filter,
    digit_pool,
    texture,
)
from lfi_jax.fileio import atomic_write, write_json_atomic

SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 0, "val": 1}
DEFAULTS: dict[str, Any] = dict(
    canvas=96,
    num_train=4000,
    num_val=500,
    seed=0,
    clutter=False,
    objects=(1, 4),  # targets per image (inclusive range)
    distractors=(1, 3),  # distractor digits per image with clutter=True
    size_range=(12, 48),  # digit cell side in pixels (inclusive)
    max_overlap=0.1,  # largest IoU between two digit cells
    classes=0,  # few-shot: number of kept classes (0 = all)
    shots=0,  # few-shot: train images per kept class (0 = num_train images)
    class_seed=0,  # few-shot: which classes are kept
)
FEW_SHOT = ("classes", "shots", "class_seed")
_OBJECT_CLASSES = {False: tuple(range(10)), True: tuple(range(5))}
_DISTRACTOR_CLASSES = tuple(range(5, 10))
_ATTEMPTS = 30  # placement tries per digit before it is left out


def _resolve(split: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    if split not in SPLITS:
        raise ValueError(f"shortcut_digits_det has no split {split!r}; expected one of {list(SPLITS)}")
    opts = dict(DEFAULTS)
    unknown = sorted(set(options or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown shortcut_digits_det options: {', '.join('data.options.' + k for k in unknown)} "
            f"(known: {sorted(DEFAULTS)})"
        )
    opts.update({k: v for k, v in (options or {}).items() if v is not None})
    out = {
        "canvas": int(opts["canvas"]),
        "seed": int(opts["seed"]),
        "clutter": bool(opts["clutter"]),
        "objects": [int(x) for x in opts["objects"]],
        "distractors": [int(x) for x in opts["distractors"]],
        "size_range": [int(x) for x in opts["size_range"]],
        "max_overlap": float(opts["max_overlap"]),
        "num_train": int(opts["num_train"]),
        "num_val": int(opts["num_val"]),
        "classes": int(opts["classes"]),
        "shots": int(opts["shots"]),
        "class_seed": int(opts["class_seed"]),
    }
    n_all = len(_OBJECT_CLASSES[out["clutter"]])
    if not 0 <= out["classes"] <= n_all:
        raise ValueError(f"data.options.classes={out['classes']} must lie in [0, {n_all}] (0 = all classes of "
                         f"the {'clutter' if out['clutter'] else 'plain'} variant)")
    if out["shots"] < 0:
        raise ValueError(f"data.options.shots={out['shots']} must be >= 0 (0 = num_train images)")
    if out["shots"] > 0:
        out["num_train"] = len(kept_classes(out)) * out["shots"]
    lo, hi = out["size_range"]
    if not 4 <= lo <= hi <= out["canvas"]:
        raise ValueError(f"data.options.size_range={tuple(out['size_range'])} must satisfy 4 <= lo <= hi <= canvas")
    for key in ("objects", "distractors"):
        a, b = out[key]
        if not 0 <= a <= b or (key == "objects" and a < 1):
            raise ValueError(f"data.options.{key}={tuple(out[key])} must be an inclusive range (objects >= 1)")
    n = out["num_train" if split == "train" else "num_val"]
    if n <= 0:
        raise ValueError(f"data.options.{'num_train' if split == 'train' else 'num_val'}={n} must be > 0")
    return out


def kept_classes(resolved: Mapping[str, Any]) -> tuple[int, ...]:
    """The digit classes that are categories under resolved options (all of the variant's, or the
    `classes` drawn by `class_seed`, sorted)."""
    all_classes = _OBJECT_CLASSES[bool(resolved["clutter"])]
    k = int(resolved.get("classes", 0))
    if k == 0 or k == len(all_classes):
        return all_classes
    rng = np.random.default_rng([int(resolved.get("class_seed", 0)), 7919])
    return tuple(sorted(int(c) for c in rng.choice(all_classes, k, replace=False)))


def image_options(split: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options that decide the split's images and their number (JSON data, defaults filled in;
    the few-shot options only when set)."""
    out = _resolve(split, options)
    out.pop("num_val" if split == "train" else "num_train")
    if out["classes"] == 0:
        out.pop("class_seed")
        out.pop("classes")
    if out["shots"] == 0 or split != "train":
        out.pop("shots")
    return out


def _iou(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    (ya, xa, sa), (yb, xb, sb) = a, b
    ih = max(0, min(ya + sa, yb + sb) - max(ya, yb))
    iw = max(0, min(xa + sa, xb + sb) - max(xa, xb))
    inter = ih * iw
    return inter / (sa * sa + sb * sb - inter)


class ShortcutDigitsDet:
    """Random-access detection source (a grain RandomAccessDataSource); see the module docstring."""

    def __init__(self, split: str, options: Mapping[str, Any] | None = None, *, name: str = "shortcut_digits_det"):
        self.options = _resolve(split, options)
        self.name, self.split = name, split
        self.canvas = self.options["canvas"]
        self.clutter = self.options["clutter"]
        self._n = self.options["num_train" if split == "train" else "num_val"]
        classes = self.object_classes = kept_classes(self.options)
        self._anchored = split == "train" and self.options["shots"] > 0
        self.class_names = [str(c) for c in classes]
        self.category_ids = [c + 1 for c in classes]
        images, targets = _digits()
        self._images = images
        pool = digit_pool("train" if split == "train" else "test_iid")
        self._pools = {c: pool[targets[pool] == c] for c in range(10)}
        self._targets = targets
        self._code = _SPLIT_CODE[split]

    def __len__(self) -> int:
        return self._n

    def _check(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < self._n:
            raise IndexError(f"{self.name}/{self.split}: index {index} out of range [0, {self._n})")
        return i

    def example_id(self, index: int) -> str:
        return str(self._check(index) + 1)

    def image_ids(self) -> list[int]:
        return list(range(1, self._n + 1))

    def index_of(self, image_id: int) -> int:
        i = int(image_id) - 1
        if not 0 <= i < self._n:
            raise KeyError(f"{self.name}/{self.split}: no image id {image_id} (ids 1..{self._n})")
        return i

    def orig_size(self, index: int) -> tuple[int, int]:
        self._check(index)
        return self.canvas, self.canvas

    # -- layout (cheap, no rendering) -------------------------------------------------------
    def _layout(self, i: int) -> dict[str, Any]:
        o = self.options
        rng = np.random.default_rng([o["seed"], 1000 + self._code, i])
        family = int(rng.integers(NUM_FAMILIES))
        tex = rng.random(6).astype(np.float32)
        col = rng.random(6)
        c0 = _hsv_to_rgb(col[0], 0.3 + 0.6 * col[1], 0.15 + 0.3 * col[2])
        c1 = _hsv_to_rgb(col[3], 0.3 + 0.6 * col[4], 0.55 + 0.35 * col[5])
        n_obj = int(rng.integers(o["objects"][0], o["objects"][1] + 1))
        n_dis = int(rng.integers(o["distractors"][0], o["distractors"][1] + 1)) if self.clutter else 0
        obj_classes = (self.object_classes[i % len(self.object_classes)],) if self._anchored else self.object_classes
        kinds = [True] * n_obj + [False] * n_dis
        cells, digits = [], []
        for is_obj in kinds:
            cls = int(rng.choice(obj_classes if is_obj else _DISTRACTOR_CLASSES))
            pool = self._pools[cls]
            digit = int(pool[min(int(rng.random() * len(pool)), len(pool) - 1)])
            colour = _hsv_to_rgb(rng.random(), 0.5 + 0.5 * rng.random(), 1.0)
            lo, hi = o["size_range"]
            placed = None
            for _ in range(_ATTEMPTS):
                s = int(rng.integers(lo, hi + 1))
                y0, x0 = (int(v) for v in rng.integers(0, self.canvas - s + 1, size=2))
                if all(_iou((y0, x0, s), c) <= o["max_overlap"] for c in cells):
                    placed = (y0, x0, s)
                    break
            if placed is None:
                continue
            cells.append(placed)
            digits.append({"object": is_obj, "class": cls, "digit": digit, "cell": placed, "colour": colour})
        if not any(d["object"] for d in digits):  # cannot happen: the first digit always fits
            raise RuntimeError(f"{self.name}/{self.split}: example {i} has no target digit")
        order = rng.permutation(len(digits))  # paint order
        return {"family": family, "tex": tex, "c0": c0, "c1": c1, "digits": digits, "order": order}

    def _glyph(self, digit: int, s: int) -> np.ndarray:
        m = _bilinear_matrix(s, 8)
        return np.clip((m @ self._images[digit] @ m.T - 0.2) / 0.45, 0.0, 1.0)

    @staticmethod
    def _tight(glyph: np.ndarray, y0: int, x0: int) -> tuple[float, float, float, float]:
        rows, cols = np.flatnonzero(glyph.max(1) > 0), np.flatnonzero(glyph.max(0) > 0)
        return (y0 + rows[0], x0 + cols[0], y0 + rows[-1] + 1, x0 + cols[-1] + 1)

    def subset_strata(self) -> np.ndarray:
        """Each image's most frequent class (ties: the lower label), the strata of a `data_ratio`
        subset (`lfi_jax.data.sources.subset_indices`); from the layouts, nothing rendered."""
        k = len(self.object_classes)
        out = np.zeros(self._n, np.int64)
        for i in range(self._n):
            labels = [self.object_classes.index(d["class"]) for d in self._layout(i)["digits"] if d["object"]]
            out[i] = np.bincount(labels, minlength=k).argmax()
        return out

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes [K, 4] y0,x0,y1,x1, labels [K], distractor boxes [D, 4]) without rendering."""
        return self._annotations(self._layout(self._check(index)))

    def _annotations(self, lay: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes, labels, dis = [], [], []
        for d in lay["digits"]:
            y0, x0, s = d["cell"]
            box = self._tight(self._glyph(d["digit"], s), y0, x0)
            if d["object"]:
                boxes.append(box)
                labels.append(self.object_classes.index(d["class"]))
            else:
                dis.append(box)
        as_boxes = lambda b: np.asarray(b, np.float32).reshape(-1, 4)  # noqa: E731
        return as_boxes(boxes), np.asarray(labels, np.int64), as_boxes(dis)

    # -- rendering --------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._check(index)
        c = self.canvas
        lay = self._layout(i)
        t = texture(lay["family"], lay["tex"], c)[..., None]
        img = lay["c0"] + t * (lay["c1"] - lay["c0"])
        alphas = []
        for k in lay["order"]:
            d = lay["digits"][k]
            y0, x0, s = d["cell"]
            glyph = self._glyph(d["digit"], s)
            r = 2 if s >= 24 else 1
            local = np.zeros((s + 2 * r, s + 2 * r), np.float32)
            local[r : r + s, r : r + s] = glyph
            outline = _max_filter(local, r)
            ya, xa, yb, xb = max(y0 - r, 0), max(x0 - r, 0), min(y0 + s + r, c), min(x0 + s + r, c)
            outline = outline[ya - (y0 - r) : yb - (y0 - r), xa - (x0 - r) : xb - (x0 - r)]
            alpha = np.zeros((c, c), np.float32)
            alpha[y0 : y0 + s, x0 : x0 + s] = glyph
            a = alpha[ya:yb, xa:xb, None]
            region = img[ya:yb, xa:xb] * (1.0 - 0.85 * outline)[..., None]
            img[ya:yb, xa:xb] = region * (1.0 - a) + d["colour"] * a
            for prev in alphas:  # later digits hide the ink of earlier ones (visible ink masks)
                prev[1] *= 1.0 - alpha
            alphas.append([k, alpha])
        visible = {k: a for k, a in alphas}
        boxes, labels, dis = self._annotations(lay)
        masks = [visible[k] for k, d in enumerate(lay["digits"]) if d["object"]]
        return {
            "id": str(i + 1),
            "image_id": i + 1,
            "image": np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8),
            "boxes": boxes,
            "labels": labels,
            "orig_size": (c, c),
            "masks": np.stack(masks).astype(np.float32),
            "distractor_boxes": dis,
        }

    # -- COCO ground truth ------------------------------------------------------------------
    def coco_dataset(self) -> dict[str, Any]:
        """The split's instances JSON (COCOeval's ground truth), built without rendering."""
        images, anns = [], []
        for i in range(self._n):
            images.append({"id": i + 1, "file_name": f"{i + 1:06d}.png", "height": self.canvas, "width": self.canvas})
            boxes, labels, _ = self.annotations(i)
            for (y0, x0, y1, x1), lab in zip(boxes.tolist(), labels.tolist()):
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i + 1,
                        "category_id": self.category_ids[lab],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
        cats = [{"id": cid, "name": n} for cid, n in zip(self.category_ids, self.class_names)]
        return {"info": {"description": f"{self.name}/{self.split}", "options": self.options}, "images": images,
                "annotations": anns, "categories": cats}

    def gt_dataset(self) -> dict[str, Any]:
        return self.coco_dataset()

    def __repr__(self) -> str:
        o = self.options
        few = f", classes={list(self.object_classes)}, shots={o['shots']}" if o["classes"] or o["shots"] else ""
        return f"ShortcutDigitsDet(split={self.split!r}, n={self._n}, clutter={self.clutter}, seed={o['seed']}{few})"


def build_source(arg: str, split: str, opts: dict[str, Any], spec: str) -> ShortcutDigitsDet:
    """`SourceKind.build` for `shortcut_digits_det`."""
    return ShortcutDigitsDet(split, opts, name=spec or "shortcut_digits_det")


def write_coco(root: str, split: str, options: Mapping[str, Any] | None = None) -> str:
    """Write the split as COCO files under `root` (readable as `coco:root`); returns the JSON's path."""
    src = ShortcutDigitsDet(split, options)
    gt = src.coco_dataset()
    for i, im in enumerate(gt["images"]):
        buf = io.BytesIO()
        Image.fromarray(src[i]["image"]).save(buf, format="PNG")
        atomic_write(os.path.join(root, split, im["file_name"]), buf.getvalue())
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    write_json_atomic(path, gt)
    return path


__all__ = ["DEFAULTS", "FEW_SHOT", "SPLITS", "ShortcutDigitsDet", "build_source", "image_options", "kept_classes",
           "write_coco"]
