"""`coco:PATH`: object detection data in COCO's instances format, read with pycocotools.

Layout (COCO 2017's): PATH/annotations/instances_<split>.json and the images in PATH/<split>/
(split e.g. "train2017", "val2017"; the embedded `shortcut_digits_det` writes "train"/"val").
Options `ann_file` and `image_dir` replace those two paths (relative to PATH unless absolute);
they only say where the data lies.

Records (`src[i]`, the same for every detection source):

  id         str(image_id): the example id (the teacher store's key)
  image_id   the JSON's image id (int)
  image      uint8 [H, W, 3]
  boxes      float32 [K, 4] (y0, x0, y1, x1) in pixels, y1/x1 exclusive (the sources' convention)
  labels     int64 [K] contiguous class ids: category ids sorted, numbered 0..C-1
  orig_size  (H, W)
  masks      uint8 [K, H, W] {0, 1} instance masks (only with option masks=True; the
             annotation's polygons or RLE decoded with pycocotools through
             `lfi_jax.detection.masks.annotation_rle`)

`src.category_ids[c]` maps contiguous class c back to the JSON's category id (for results).
Crowd annotations (iscrowd=1) are not targets (as in DETR; COCOeval reads them from the JSON).

Bad input, each naming the file and the image id: an image file that does not exist (checked
when the source opens; `check_files=False` defers it to reading), an image whose decoded size
differs from the JSON's, an annotation of an unknown image or category, duplicate image ids
(errors); boxes that stick out of the image are clipped to it and boxes of zero area (before
or after clipping) dropped, as DETR does, each counted and the first few named in
`src.problems` and one warning; an image without annotations is kept with an empty target.
With masks=True every target annotation's segmentation is checked when the source opens
(`check_segmentation`: no segmentation, an RLE whose size is not the image's, a polygon
outside the image, malformed polygons) and fully when decoded (an RLE's runs not adding up to
H x W): each a ValueError naming the file, the image id and the annotation id.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from lfi_jax.detection.masks import annotation_rle, check_segmentation, decode_rle

PATH_OPTIONS = ("ann_file", "image_dir")
OPTIONS = {"ann_file": None, "image_dir": None, "check_files": True, "masks": False}
_SHOW = 5  # problems named in the warning


def _decode(path: str, where: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image file not found: {path}") from None
    except Exception as e:  # PIL raises several types for corrupt files
        raise ValueError(f"{where}: cannot decode image file {path}: {type(e).__name__}: {e}") from e


def contiguous_categories(categories: list[Mapping[str, Any]], where: str) -> tuple[list[int], list[str]]:
    """(category ids sorted, their names): contiguous class c is category_ids[c]."""
    ids = [int(c["id"]) for c in categories]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate category ids")
    if not ids:
        raise ValueError(f"{where}: no categories")
    order = sorted(range(len(ids)), key=lambda k: ids[k])
    return [ids[k] for k in order], [str(categories[k].get("name", ids[k])) for k in order]


class CocoDetection:
    """A COCO-format detection split (a grain RandomAccessDataSource); see the module docstring."""

    def __init__(self, path: str, split: str, options: Mapping[str, Any] | None = None, *, name: str | None = None):
        opts = dict(OPTIONS)
        unknown = sorted(set(options or {}) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown coco options: {', '.join('data.options.' + k for k in unknown)} (known: {sorted(OPTIONS)})"
            )
        opts.update(options or {})
        self.name = name or f"coco:{path}"
        self.split = split
        self.options = opts
        root = os.path.expanduser(path)
        ann = opts["ann_file"] or os.path.join("annotations", f"instances_{split}.json")
        img_dir = opts["image_dir"] or split
        self.ann_file = ann if os.path.isabs(ann) else os.path.join(root, ann)
        self.image_dir = img_dir if os.path.isabs(img_dir) else os.path.join(root, img_dir)
        if not os.path.isfile(self.ann_file):
            raise FileNotFoundError(f"coco split {split!r}: annotation file not found: {self.ann_file}")
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            try:
                self.coco = COCO(self.ann_file)
            except (ValueError, KeyError, TypeError, AssertionError) as e:
                raise ValueError(f"{self.ann_file}: not a COCO instances file: {type(e).__name__}: {e}") from e
        self._read(opts)

    # -- index ------------------------------------------------------------------------------
    def _read(self, opts: Mapping[str, Any]) -> None:
        f = self.ann_file
        d = self.coco.dataset
        for key in ("images", "categories"):
            if key not in d:
                raise ValueError(f"{f}: no {key!r} list")
        self.category_ids, self.class_names = contiguous_categories(d["categories"], f)
        cat_index = {c: k for k, c in enumerate(self.category_ids)}
        images = sorted(d["images"], key=lambda im: int(im["id"]))
        ids = [int(im["id"]) for im in images]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"{f}: duplicate image ids {dup}")
        known = set(ids)
        self.problems: list[str] = []
        n_clipped = n_dropped = 0
        per_image: dict[int, list] = {i: [] for i in ids}
        for a in d.get("annotations", []):
            iid, aid = int(a["image_id"]), a.get("id")
            if iid not in known:
                raise ValueError(f"{f}: annotation {aid} names image id {iid}, which is not in 'images'")
            if int(a["category_id"]) not in cat_index:
                raise ValueError(
                    f"{f}: image id {iid}: annotation {aid} has unknown category id {a['category_id']} "
                    f"(categories: {self.category_ids[:20]})"
                )
            per_image[iid].append(a)
        self._images, self._boxes, self._labels, self._anns = [], [], [], []
        for im in images:
            iid = int(im["id"])
            where = f"{f}: image id {iid}"
            try:
                h, w = int(im["height"]), int(im["width"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: needs integer 'height' and 'width'") from None
            if "file_name" not in im:
                raise ValueError(f"{where}: no 'file_name'")
            file = os.path.join(self.image_dir, im["file_name"])
            if opts["check_files"] and not os.path.isfile(file):
                raise FileNotFoundError(f"{where}: image file not found: {file}")
            boxes, labels, anns = [], [], []
            for a in per_image[iid]:
                if a.get("iscrowd", 0):
                    continue
                try:
                    x, y, bw, bh = (float(v) for v in a["bbox"])
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"{where}: annotation {a.get('id')} has no [x, y, w, h] 'bbox'") from None
                if not np.isfinite([x, y, bw, bh]).all():
                    raise ValueError(f"{where}: annotation {a.get('id')}: non-finite bbox {a['bbox']}")
                y0, x0, y1, x1 = max(y, 0.0), max(x, 0.0), min(y + bh, float(h)), min(x + bw, float(w))
                what = f"{where}: annotation {a.get('id')} bbox {a['bbox']}"
                if y1 <= y0 or x1 <= x0:
                    n_dropped += 1
                    self._problem(f"{what}: zero area in the image, dropped")
                    continue
                if (y0, x0, y1, x1) != (y, x, y + bh, x + bw):
                    n_clipped += 1
                    self._problem(f"{what}: outside the {w}x{h} image, clipped")
                if opts["masks"]:
                    check_segmentation(a, h, w, f"{where}: annotation {a.get('id')}")
                boxes.append((y0, x0, y1, x1))
                labels.append(cat_index[int(a["category_id"])])
                anns.append(a)
            self._images.append((iid, file, h, w))
            self._boxes.append(np.asarray(boxes, np.float32).reshape(-1, 4))
            self._labels.append(np.asarray(labels, np.int64))
            self._anns.append(anns)
        if not self._images:
            raise ValueError(f"{f}: no images")
        if n_clipped or n_dropped:
            shown = "; ".join(self.problems[:_SHOW])
            msg = f"{f}: {n_clipped} boxes clipped to their image, {n_dropped} of zero area dropped: {shown}"
            warnings.warn(msg, stacklevel=3)
        self.num_clipped, self.num_dropped = n_clipped, n_dropped

    def _problem(self, text: str) -> None:
        if len(self.problems) < 1000:
            self.problems.append(text)

    # -- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._images)

    def _check(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < len(self._images):
            raise IndexError(f"{self.name}/{self.split}: index {index} out of range [0, {len(self._images)})")
        return i

    def example_id(self, index: int) -> str:
        return str(self._images[self._check(index)][0])

    def image_ids(self) -> list[int]:
        return [im[0] for im in self._images]

    def index_of(self, image_id: int) -> int:
        if not hasattr(self, "_by_id"):
            self._by_id = {im[0]: k for k, im in enumerate(self._images)}
        if int(image_id) not in self._by_id:
            raise KeyError(f"{self.ann_file}: no image id {image_id}")
        return self._by_id[int(image_id)]

    def orig_size(self, index: int) -> tuple[int, int]:
        _, _, h, w = self._images[self._check(index)]
        return h, w

    def num_boxes(self) -> np.ndarray:
        """Number of target boxes per image (no decoding)."""
        return np.asarray([len(b) for b in self._boxes], np.int64)

    def gt_dataset(self) -> dict[str, Any]:
        """The instances JSON as loaded (COCOeval's ground truth)."""
        return self.coco.dataset

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._check(index)
        iid, file, h, w = self._images[i]
        where = f"{self.ann_file}: image id {iid}"
        image = _decode(file, where)
        if image.shape[:2] != (h, w):
            raise ValueError(f"{where}: {file} is {image.shape[1]}x{image.shape[0]}, the JSON says {w}x{h}")
        out = {
            "id": str(iid),
            "image_id": iid,
            "image": image,
            "boxes": self._boxes[i].copy(),
            "labels": self._labels[i].copy(),
            "orig_size": (h, w),
        }
        if self.options["masks"]:
            masks = [decode_rle(annotation_rle(a, h, w, f"{where}: annotation {a.get('id')}"), (h, w),
                                f"{where}: annotation {a.get('id')}") for a in self._anns[i]]
            out["masks"] = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
        return out

    def __repr__(self) -> str:
        return f"CocoDetection({self.ann_file!r}, n={len(self)}, classes={len(self.class_names)})"


def build_coco_source(arg: str, split: str, opts: dict[str, Any], spec: str) -> CocoDetection:
    """`SourceKind.build` for `coco:PATH`."""
    return CocoDetection(arg, split, opts, name=spec)


__all__ = ["OPTIONS", "PATH_OPTIONS", "CocoDetection", "build_coco_source", "contiguous_categories"]
