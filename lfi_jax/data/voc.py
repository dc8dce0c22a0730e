"""`voc:PATH`: PASCAL VOC detection (a VOCdevkit year directory), as COCO-style records.

Layout (VOCdevkit/VOC2007, VOC2012): PATH/ImageSets/Main/<split>.txt (one image id a line;
split e.g. "train", "val", "trainval", "test"), PATH/Annotations/<id>.xml and
PATH/JPEGImages/<id>.jpg. Classes: the 20 VOC classes in the standard (alphabetical) order,
`VOC_CLASSES`, contiguous ids 0..19 and COCO category ids 1..20 (`src.category_ids`).

Records follow `lfi_jax.data.coco` (the same transforms, teacher and evaluation serve both):

  id         the VOC image id, e.g. "000005" or "2008_000008" (the teacher store's key)
  image_id   an int for COCOeval: the id's digits ("2008_000008" -> 2008000008) when every id
             of the split is digits and underscores and they stay distinct, else position + 1
  image      uint8 [H, W, 3]
  boxes      float32 [K, 4] (y0, x0, y1, x1) in pixels, y1/x1 exclusive
  labels     int64 [K] contiguous class ids
  difficult  bool [K] VOC's `difficult` flag of each box
  orig_size  (H, W)

Coordinates. VOC's boxes are 1-based inclusive pixel indices (xmin..xmax). As VOC defines
them (and detectron2 / torchvision convert them), the 0-based box is x0 = xmin - 1,
y0 = ymin - 1, x1 = xmax, y1 = ymax (exclusive), so the width is xmax - xmin + 1 as in VOC's
devkit. Boxes sticking out of the image are clipped to it, boxes of zero area dropped, each
counted in `src.problems` with one warning (as `coco:` does).

Difficult objects, as VOC evaluates them: in `gt_dataset()` (COCOeval's ground truth) they are
`iscrowd=1` (and `ignore=1`), so a detection matching one is neither a true nor a false
positive and a missed one is not counted; COCOeval then gives AP, AP50, APs/m/l as in the
paper's Table 7. (One difference to VOC's devkit: COCOeval measures the overlap with an
ignored region as intersection / detection area rather than IoU.) For training, option
`difficult`: "keep" (default: they are targets, with the flag; detectron2's choice) or "drop"
(not targets, as `coco:` drops crowd annotations).

Bad input, each a clear error naming the file and the image id: a split file that does not
exist, a split file naming an image whose JPEG or XML annotation is missing (checked when the
source opens; `check_files=False` defers the image check to reading), malformed XML, an XML
without an integer size or with an object of an unknown class or a box without four numbers,
a decoded image whose size differs from the XML's.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

import numpy as np

from lfi_jax.data.files import decode_image, file_fingerprint

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
OPTIONS = {"check_files": True, "difficult": "keep"}
DIFFICULT = ("keep", "drop")
_SHOW = 5


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{where}: no <{tag}>")
    return child.text.strip()


def parse_annotation(xml_path: str, image_id: str) -> dict[str, Any]:
    """One VOC XML file -> {"height", "width", "boxes" [K, 4] (y0, x0, y1, x1) 0-based, "labels" [K],
    "difficult" [K] bool, "names" [K]} (boxes not yet clipped; see the module docstring)."""
    where = f"{xml_path}: image id {image_id}"
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: annotation file not found") from None
    except ET.ParseError as e:
        raise ValueError(f"{where}: malformed XML: {e}") from None
    size = root.find("size")
    if size is None:
        raise ValueError(f"{where}: no <size>")
    try:
        w, h = int(float(_text(size, "width", where))), int(float(_text(size, "height", where)))
    except ValueError as e:
        raise ValueError(f"{where}: <size> needs integer <width> and <height> ({e})") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: image size {w}x{h} is empty")
    boxes, labels, difficult, names = [], [], [], []
    for k, obj in enumerate(root.findall("object")):
        what = f"{where}: object {k}"
        name = _text(obj, "name", what)
        if name not in VOC_CLASSES:
            raise ValueError(f"{what}: unknown class {name!r} (VOC classes: {', '.join(VOC_CLASSES)})")
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{what} ({name}): no <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(_text(bb, t, what)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise ValueError(f"{what} ({name}): <bndbox> needs numbers xmin, ymin, xmax, ymax ({e})") from None
        if not np.isfinite([xmin, ymin, xmax, ymax]).all():
            raise ValueError(f"{what} ({name}): non-finite box")
        d = obj.find("difficult")
        try:
            diff = bool(int(d.text.strip())) if d is not None and d.text and d.text.strip() else False
        except ValueError:
            raise ValueError(f"{what} ({name}): <difficult> must be 0 or 1, not {d.text!r}") from None
        boxes.append((ymin - 1.0, xmin - 1.0, ymax, xmax))
        labels.append(VOC_CLASSES.index(name))
        difficult.append(diff)
        names.append(name)
    return {
        "height": h,
        "width": w,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int64),
        "difficult": np.asarray(difficult, bool),
        "names": names,
    }


def _int_ids(ids: list[str]) -> list[int]:
    if all(i.replace("_", "").isdigit() for i in ids):
        ints = [int(i.replace("_", "")) for i in ids]
        if len(set(ints)) == len(ints):
            return ints
    return list(range(1, len(ids) + 1))


class VocDetection:
    """A VOC detection split (a grain RandomAccessDataSource); see the module docstring."""

    def __init__(self, path: str, split: str, options: Mapping[str, Any] | None = None, *, name: str | None = None):
        unknown = sorted(set(options or {}) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown voc options: {', '.join('data.options.' + k for k in unknown)} (known: {sorted(OPTIONS)})"
            )
        opts = {**OPTIONS, **dict(options or {})}
        if opts["difficult"] not in DIFFICULT:
            raise ValueError(f"data.options.difficult={opts['difficult']!r}: expected one of {DIFFICULT}")
        self.name = name or f"voc:{path}"
        self.split = split
        self.options = opts
        self.root = os.path.expanduser(path)
        self.class_names = list(VOC_CLASSES)
        self.category_ids = list(range(1, len(VOC_CLASSES) + 1))
        self.split_file = os.path.join(self.root, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(self.split_file):
            raise FileNotFoundError(
                f"voc split {split!r}: split file not found: {self.split_file} (PATH must be a VOCdevkit year "
                "directory holding ImageSets/Main, Annotations and JPEGImages)"
            )
        with open(self.split_file) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        if not ids:
            raise ValueError(f"{self.split_file}: no image ids")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:_SHOW]
            raise ValueError(f"{self.split_file}: duplicate image ids {dup}")
        self._read(ids)

    def _read(self, ids: list[str]) -> None:
        self.problems: list[str] = []
        n_clipped = n_dropped = 0
        self._ids, self._int_ids = ids, _int_ids(ids)
        self._sizes, self._boxes, self._labels, self._difficult = [], [], [], []
        for vid in ids:
            jpg, xml = self._jpg(vid), self._xml(vid)
            for kind, file in (("annotation", xml), ("image", jpg)):
                if (kind == "annotation" or self.options["check_files"]) and not os.path.isfile(file):
                    raise FileNotFoundError(f"{self.split_file}: image id {vid}: {kind} file not found: {file}")
            ann = parse_annotation(xml, vid)
            h, w = ann["height"], ann["width"]
            boxes, keep = [], []
            for k, (y0, x0, y1, x1) in enumerate(ann["boxes"].tolist()):
                c = (max(y0, 0.0), max(x0, 0.0), min(y1, float(h)), min(x1, float(w)))
                what = f"{xml}: image id {vid}: object {k} ({ann['names'][k]}) box {(y0, x0, y1, x1)}"
                if c[2] <= c[0] or c[3] <= c[1]:
                    n_dropped += 1
                    self._problem(f"{what}: zero area in the {w}x{h} image, dropped")
                    continue
                if c != (y0, x0, y1, x1):
                    n_clipped += 1
                    self._problem(f"{what}: outside the {w}x{h} image, clipped")
                boxes.append(c)
                keep.append(k)
            self._sizes.append((h, w))
            self._boxes.append(np.asarray(boxes, np.float32).reshape(-1, 4))
            self._labels.append(ann["labels"][keep])
            self._difficult.append(ann["difficult"][keep])
        if n_clipped or n_dropped:
            shown = "; ".join(self.problems[:_SHOW])
            warnings.warn(f"{self.split_file}: {n_clipped} boxes clipped to their image, {n_dropped} of zero area "
                          f"dropped: {shown}", stacklevel=3)
        self.num_clipped, self.num_dropped = n_clipped, n_dropped

    def _problem(self, text: str) -> None:
        if len(self.problems) < 1000:
            self.problems.append(text)

    def _jpg(self, vid: str) -> str:
        return os.path.join(self.root, "JPEGImages", f"{vid}.jpg")

    def _xml(self, vid: str) -> str:
        return os.path.join(self.root, "Annotations", f"{vid}.xml")

    # -- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def _check(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < len(self._ids):
            raise IndexError(f"{self.name}/{self.split}: index {index} out of range [0, {len(self._ids)})")
        return i

    def example_id(self, index: int) -> str:
        return self._ids[self._check(index)]

    def image_ids(self) -> list[int]:
        return list(self._int_ids)

    def index_of(self, image_id: int) -> int:
        if not hasattr(self, "_by_id"):
            self._by_id = {iid: k for k, iid in enumerate(self._int_ids)}
        if int(image_id) not in self._by_id:
            raise KeyError(f"{self.split_file}: no image id {image_id}")
        return self._by_id[int(image_id)]

    def orig_size(self, index: int) -> tuple[int, int]:
        return self._sizes[self._check(index)]

    def num_boxes(self) -> np.ndarray:
        """Number of target boxes per image (no decoding; after option `difficult`)."""
        drop = self.options["difficult"] == "drop"
        return np.asarray([int((~d).sum()) if drop else len(d) for d in self._difficult], np.int64)

    def content_fingerprint(self, index: int) -> str:
        return file_fingerprint(self._jpg(self._ids[self._check(index)]))

    def subset_strata(self) -> np.ndarray:
        """Each image's most frequent class (ties: the lower id; no object: 20), the strata of a
        `data_ratio` subset (`lfi_jax.data.sources.subset_indices`)."""
        n = len(VOC_CLASSES)
        return np.asarray([np.bincount(lab, minlength=n).argmax() if len(lab) else n for lab in self._labels], np.int64)

    def gt_dataset(self) -> dict[str, Any]:
        """COCOeval's ground truth: every object, difficult ones iscrowd=1 / ignore=1 (see the docstring)."""
        images, anns = [], []
        for vid, iid, (h, w), boxes, labels, diff in zip(
            self._ids, self._int_ids, self._sizes, self._boxes, self._labels, self._difficult
        ):
            images.append({"id": iid, "file_name": f"{vid}.jpg", "height": h, "width": w})
            for (y0, x0, y1, x1), lab, d in zip(boxes.tolist(), labels.tolist(), diff.tolist()):
                anns.append({
                    "id": len(anns) + 1,
                    "image_id": iid,
                    "category_id": self.category_ids[lab],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": int(d),
                    "ignore": int(d),
                })
        cats = [{"id": cid, "name": n} for cid, n in zip(self.category_ids, self.class_names)]
        return {"info": {"description": f"{self.name}/{self.split}"}, "images": images, "annotations": anns,
                "categories": cats}

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._check(index)
        vid, iid, (h, w) = self._ids[i], self._int_ids[i], self._sizes[i]
        file = self._jpg(vid)
        try:
            image = decode_image(file)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{self.split_file}: image id {vid}: {e}") from None
        if image.shape[:2] != (h, w):
            raise ValueError(f"{self._xml(vid)}: image id {vid}: {file} is {image.shape[1]}x{image.shape[0]}, "
                             f"the XML says {w}x{h}")
        keep = ~self._difficult[i] if self.options["difficult"] == "drop" else np.ones(len(self._labels[i]), bool)
        return {
            "id": vid,
            "image_id": iid,
            "image": image,
            "boxes": self._boxes[i][keep].copy(),
            "labels": self._labels[i][keep].copy(),
            "difficult": self._difficult[i][keep].copy(),
            "orig_size": (h, w),
        }

    def __repr__(self) -> str:
        return f"VocDetection({self.split_file!r}, n={len(self)})"


def image_options(split: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """No voc option changes the images or which the split holds (the split file does)."""
    return {}


def build_voc_source(arg: str, split: str, opts: dict[str, Any], spec: str) -> VocDetection:
    """`SourceKind.build` for `voc:PATH`."""
    return VocDetection(arg, split, opts, name=spec)


__all__ = ["DIFFICULT", "OPTIONS", "VOC_CLASSES", "VocDetection", "build_voc_source", "image_options",
           "parse_annotation"]
