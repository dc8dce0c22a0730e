"""TinyImageNet-200 in its own layout (the `tinyimagenet:PATH` data source)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lfi_jax.data.files import check_index, decode_image, file_fingerprint, is_image, require_dir


class TinyImageNet:
    """TinyImageNet-200 in its own layout.

      PATH/wnids.txt                              the 200 wnids (classes: sorted wnids)
      PATH/words.txt                              wnid <tab> names (class name: the first one)
      PATH/train/<wnid>/images/<file>.JPEG        train; boxes in train/<wnid>/<wnid>_boxes.txt
      PATH/val/images/<file>.JPEG                 val; labels + boxes in val/val_annotations.txt

    Splits "train" and "val" ("test" has no labels). Ids: `train/<wnid>/<file>`, `val/<file>`.
    Boxes: the data set's inclusive pixel corners (x0, y0, x1, y1) become (y0, x0, y1 + 1, x1 + 1).
    """

    SPLITS = ("train", "val")

    def __init__(self, path: str, split: str, *, name: str | None = None):
        self.name = name or f"tinyimagenet:{path}"
        self.split = split
        if split not in self.SPLITS:
            raise ValueError(f"tinyimagenet has no labelled split {split!r}; expected one of {list(self.SPLITS)}")
        require_dir(path, "tinyimagenet data")
        wnids_file = os.path.join(path, "wnids.txt")
        if os.path.isfile(wnids_file):
            with open(wnids_file) as f:
                wnids = sorted({line.strip() for line in f if line.strip()})
        else:
            require_dir(os.path.join(path, "train"), "tinyimagenet (no wnids.txt) train")
            wnids = sorted(d for d in os.listdir(os.path.join(path, "train")) if not d.startswith("."))
        if not wnids:
            raise ValueError(f"tinyimagenet: no classes found in {wnids_file}")
        self.wnids = wnids
        words = {}
        words_file = os.path.join(path, "words.txt")
        if os.path.isfile(words_file):
            with open(words_file) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.rstrip("\n").split("\t", 1)
                    if len(parts) != 2:
                        raise ValueError(f"{words_file}:{n}: expected '<wnid>\\t<names>', got {line.strip()!r}")
                    words[parts[0]] = parts[1]
        self.class_descriptions = [words.get(w, w) for w in wnids]
        self.class_names = [d.split(",")[0].strip() for d in self.class_descriptions]
        index = {w: i for i, w in enumerate(wnids)}
        ids, files, labels, boxes = [], [], [], []
        if split == "train":
            for w in wnids:
                d = os.path.join(path, "train", w, "images")
                require_dir(d, f"tinyimagenet train class {w}")
                wboxes = _read_boxes(os.path.join(path, "train", w, f"{w}_boxes.txt"), name_col=0, box_col=1)
                for f in sorted(os.listdir(d)):
                    if is_image(f):
                        ids.append(f"train/{w}/{f}")
                        files.append(os.path.join(d, f))
                        labels.append(index[w])
                        boxes.append(wboxes.get(f))
        else:
            d = os.path.join(path, "val", "images")
            require_dir(d, "tinyimagenet val images")
            ann_file = os.path.join(path, "val", "val_annotations.txt")
            if not os.path.isfile(ann_file):
                raise FileNotFoundError(f"tinyimagenet val labels: file not found: {ann_file}")
            ann_labels = {}
            with open(ann_file) as f:
                for n, line in enumerate(f, 1):
                    parts = line.split()
                    if not parts:
                        continue
                    if len(parts) < 2 or parts[1] not in index:
                        raise ValueError(f"{ann_file}:{n}: unknown or missing wnid in {line.strip()!r}")
                    ann_labels[parts[0]] = index[parts[1]]
            vboxes = _read_boxes(ann_file, name_col=0, box_col=2)
            for f in sorted(os.listdir(d)):
                if not is_image(f):
                    continue
                if f not in ann_labels:
                    raise ValueError(f"tinyimagenet: {os.path.join(d, f)} has no label in {ann_file}")
                ids.append(f"val/{f}")
                files.append(os.path.join(d, f))
                labels.append(ann_labels[f])
                boxes.append(vboxes.get(f))
        if not ids:
            raise ValueError(f"tinyimagenet: no images for split {split!r} under {path}")
        self._ids, self._files = ids, files
        self._labels = np.asarray(labels, np.int64)
        self._boxes = boxes

    def __len__(self) -> int:
        return len(self._ids)

    def example_id(self, index: int) -> str:
        return self._ids[check_index(self, index)]

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def content_fingerprint(self, index: int) -> str:
        return file_fingerprint(self._files[check_index(self, index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(self, index)
        out = {"id": self._ids[i], "image": decode_image(self._files[i]), "label": int(self._labels[i])}
        if self._boxes[i] is not None:
            out["boxes"] = self._boxes[i][None, :].copy()
        return out


def _read_boxes(path: str, *, name_col: int, box_col: int) -> dict[str, np.ndarray]:
    """file name -> float32 [4] (y0, x0, y1, x1) from a TinyImageNet box file; {} if absent."""
    if not os.path.isfile(path):
        return {}
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                x0, y0, x1, y1 = (float(v) for v in parts[box_col : box_col + 4])
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 4 box coordinates in {line.strip()!r}") from None
            out[parts[name_col]] = np.asarray([y0, x0, y1 + 1, x1 + 1], np.float32)
    return out


__all__ = ["TinyImageNet"]
