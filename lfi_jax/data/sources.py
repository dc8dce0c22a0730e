"""Random-access data sources, each named by one spec string (SPEC section 5).

  shortcut_digits        the embedded benchmark (lfi_jax/data/shortcut_digits.py)
  imagefolder:PATH       PATH/<split>/<class>/<file> if PATH/<split> exists, else PATH/<class>/<file>
  tinyimagenet:PATH      the data set's own layout (train/<wnid>/images, val/images + annotations)
  tfds:NAME              a TFDS catalog data set (needs tensorflow_datasets, imported lazily)
  coco:PATH              COCO detection (lfi_jax/data/coco.py)
  shortcut_digits_det    the embedded detection benchmark (lfi_jax/data/shortcut_digits_det.py)
  voc:PATH               PASCAL VOC detection, a VOCdevkit year directory (lfi_jax/data/voc.py)

Each kind is a `SourceKind` in `SOURCE_KINDS` (a build function, whether the spec's argument
is a path or a name, and which options change the images: what a teacher store must match).

Every source is a grain `RandomAccessDataSource`: `len(src)`, `src[i]` -> a dict with "id"
(stable example id, the key of the teacher store), "image" (uint8 [H, W, 3]), "label" (int)
and optionally "mask" (float32 [H, W] in [0, 1]) and "boxes" (float32 [K, 4], (y0, x0, y1, x1)
in pixels, y1/x1 exclusive); `src.example_id(i)` gives the id without decoding. Sources read
from files also give `src.content_fingerprint(i)` (a digest of the image file's bytes), which a
teacher store records to notice an image changed after its export.

Generic options (any source): `data_ratio` in (0, 1] keeps a deterministic class-stratified
subset (the same for a given `subset_seed`, default 0; a smaller ratio's subset is contained in
a larger one's), as in the paper's 1/10/50/100 % training-data experiments. Classification
sources stratify by `labels()`; detection sources (no image label) by `subset_strata()` when
they have it (voc, shortcut_digits_det: each image's most frequent class, ties to the lower
id), else (coco) an unstratified seeded subset. A subset of a detection source keeps its
detection attributes: `category_ids`, `image_ids()`, `gt_dataset()` (only the subset's images
and their annotations), `orig_size(i)`, `num_boxes()`, `index_of(image_id)`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lfi_jax.data import coco, shortcut_digits_det, voc
from lfi_jax.data.files import IMAGE_EXTENSIONS, check_index, decode_image, file_fingerprint, is_image, require_dir
from lfi_jax.data.shortcut_digits import ShortcutDigits
from lfi_jax.data.shortcut_digits import image_options as shortcut_digits_image_options
from lfi_jax.data.tinyimagenet import TinyImageNet

GENERIC_OPTIONS = ("data_ratio", "subset_seed")


@runtime_checkable
class DataSource(Protocol):
    name: str
    split: str
    class_names: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...

    def example_id(self, index: int) -> str: ...


def _no_options(kind: str, options: Mapping[str, Any], known: Sequence[str] = ()) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown {kind} options: {', '.join('data.options.' + k for k in unknown)}"
            + (f" (known: {sorted(known)})" if known else "")
        )


# --------------------------------------------------------------------------- imagefolder


class ImageFolder:
    """`PATH/<split>/<class>/<file>` (or `PATH/<class>/<file>`); classes and files sorted.

    The class list is taken from PATH/train when it exists (the label space the model is
    trained on), else from the split's own directory; a class directory in the split that is
    not in that list is an error naming it. Example id: `<class>/<file>`.
    """

    def __init__(self, path: str, split: str, *, name: str | None = None):
        self.name = name or f"imagefolder:{path}"
        self.split = split
        require_dir(path, f"imagefolder data for split {split!r}")
        root = os.path.join(path, split)
        train_dir = os.path.join(path, "train")
        if not os.path.isdir(root):
            if os.path.isdir(train_dir):  # a split layout without this split
                raise FileNotFoundError(f"imagefolder split {split!r}: directory not found: {root}")
            root = path
        self.root = root
        class_root = train_dir if os.path.isdir(train_dir) else root
        self.class_names = sorted(
            d for d in os.listdir(class_root) if not d.startswith(".") and os.path.isdir(os.path.join(class_root, d))
        )
        if not self.class_names:
            raise ValueError(f"imagefolder: no class directories in {class_root}")
        index = {c: i for i, c in enumerate(self.class_names)}
        files, labels = [], []
        for c in sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))):
            if c not in index:
                raise ValueError(f"imagefolder: class directory {os.path.join(root, c)} is not a class of {class_root}")
            for f in sorted(os.listdir(os.path.join(root, c))):
                if is_image(f):
                    files.append(f"{c}/{f}")
                    labels.append(index[c])
        if not files:
            raise ValueError(f"imagefolder: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self._ids = files
        self._labels = np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self._ids)

    def example_id(self, index: int) -> str:
        return self._ids[check_index(self, index)]

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def path(self, index: int) -> str:
        return os.path.join(self.root, self._ids[check_index(self, index)])

    def content_fingerprint(self, index: int) -> str:
        return file_fingerprint(self.path(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(self, index)
        return {"id": self._ids[i], "image": decode_image(self.path(i)), "label": int(self._labels[i])}


# --------------------------------------------------------------------------- tfds


class TFDSSource:
    """A TFDS catalog data set through `tfds.data_source` (random access, ArrayRecord files).

    Options: data_dir (TFDS data dir), image_key ("image"), label_key ("label").
    Ids: `<name>/<split>/<index>` (TFDS record order is stable for a given version).
    """

    OPTIONS = ("data_dir", "image_key", "label_key")

    def __init__(self, tfds_name: str, split: str, options: Mapping[str, Any], *, name: str | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError(
                f"data source 'tfds:{tfds_name}' needs tensorflow_datasets, which is not installed: "
                "pip install 'lfi-jax[tfds]'"
            ) from None
        _no_options("tfds", options, self.OPTIONS)
        self.name = name or f"tfds:{tfds_name}"
        self.split = split
        self._image_key = options.get("image_key", "image")
        self._label_key = options.get("label_key", "label")
        self._tfds_name = tfds_name
        self.options = dict(options)
        builder = tfds.builder(tfds_name, data_dir=options.get("data_dir"))
        self._src = tfds.data_source(tfds_name, split=split, data_dir=options.get("data_dir"))
        label = builder.info.features[self._label_key]
        self.class_names = list(getattr(label, "names", None) or [str(i) for i in range(label.num_classes)])

    def __len__(self) -> int:
        return len(self._src)

    def example_id(self, index: int) -> str:
        return f"{self._tfds_name}/{self.split}/{check_index(self, index)}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(self, index)
        rec = self._src[i]
        img = np.asarray(rec[self._image_key])
        if img.ndim == 2:
            img = img[..., None]
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        elif img.shape[-1] == 4:
            img = img[..., :3]
        return {"id": self.example_id(i), "image": img.astype(np.uint8), "label": int(rec[self._label_key])}


# --------------------------------------------------------------------------- subsets


def subset_indices(labels: np.ndarray | None, n: int, ratio: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a deterministic `ratio` subset of n examples, stratified by label.

    Each class is permuted once by (seed, class) and its first ceil(ratio * n_c) members are
    kept, so subsets for a smaller ratio are contained in those for a larger one.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"data_ratio={ratio} must lie in (0, 1]")
    if ratio == 1.0:
        return np.arange(n)
    if labels is None:
        perm = np.random.default_rng([seed, 2**31 - 1]).permutation(n)
        return np.sort(perm[: max(1, math.ceil(ratio * n - 1e-9))])
    labels = np.asarray(labels)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        perm = np.random.default_rng([seed, int(c)]).permutation(len(members))
        keep.append(members[perm[: max(1, math.ceil(ratio * len(members) - 1e-9))]])
    return np.sort(np.concatenate(keep))


_PASSED_THROUGH = ("content_fingerprint", "orig_size", "category_ids", "image_ids", "num_boxes", "subset_strata",
                   "index_of", "gt_dataset")


class SubsetSource:
    """A fixed subset of another source (ids and labels unchanged; detection attributes restricted
    to the subset, see the module docstring)."""

    def __init__(self, base, indices: np.ndarray, *, data_ratio: float):
        self.base = base
        self.indices = np.asarray(indices, np.int64)
        self.name, self.split, self.class_names = base.name, base.split, base.class_names
        self.data_ratio = data_ratio

    @property
    def options(self) -> dict[str, Any]:
        return source_options(self.base)

    def __len__(self) -> int:
        return len(self.indices)

    def _base_index(self, index: int) -> int:
        return int(self.indices[check_index(self, index)])

    def example_id(self, index: int) -> str:
        return self.base.example_id(self._base_index(index))

    def labels(self) -> np.ndarray | None:
        labels = getattr(self.base, "labels", None)
        return None if labels is None else labels()[self.indices]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.base[self._base_index(index)]

    def __getattr__(self, name: str):
        base = self.__dict__.get("base")
        if base is None or not hasattr(base, name) or name not in _PASSED_THROUGH:
            raise AttributeError(name)
        if name == "content_fingerprint":
            return lambda index: base.content_fingerprint(self._base_index(index))
        if name == "orig_size":
            return lambda index: base.orig_size(self._base_index(index))
        if name == "category_ids":
            return base.category_ids
        if name == "image_ids":
            return lambda: [base.image_ids()[int(i)] for i in self.indices]
        if name == "num_boxes":
            return lambda: np.asarray(base.num_boxes())[self.indices]
        if name == "subset_strata":
            return lambda: np.asarray(base.subset_strata())[self.indices]
        if name == "index_of":
            return self._index_of
        return self._gt_dataset  # gt_dataset

    def _index_of(self, image_id: int) -> int:
        if "_by_id" not in self.__dict__:
            self._by_id = {int(iid): k for k, iid in enumerate(self.image_ids())}
        if int(image_id) not in self._by_id:
            raise KeyError(f"{self.name}/{self.split} (data_ratio={self.data_ratio}): no image id {image_id}")
        return self._by_id[int(image_id)]

    def _gt_dataset(self) -> dict[str, Any]:
        gt = self.base.gt_dataset()
        keep = {int(i) for i in self.image_ids()}
        out = dict(gt)
        out["images"] = [im for im in gt["images"] if int(im["id"]) in keep]
        out["annotations"] = [a for a in gt.get("annotations", []) if int(a["image_id"]) in keep]
        return out

    def __repr__(self) -> str:
        return f"SubsetSource({self.base!r}, n={len(self)}, data_ratio={self.data_ratio})"


# --------------------------------------------------------------------------- entry point


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """One kind of data source (the part of a spec before ':').

    build: (arg, split, options, spec) -> DataSource, with the generic options removed.
    arg: "" (the spec takes no argument), "PATH" (a directory: where the data lies, not what it
      is, so never compared between a teacher store and a run) or "NAME" (part of its identity).
    image_options: (split, options) -> the options that change the images or which examples
      the split holds, defaults filled in (what a teacher store's compatibility check compares);
      None: every option except the generic ones and `path_options`.
    path_options: options that only say where the data lies (e.g. tfds' data_dir).
    """

    build: Callable[[str, str, dict[str, Any], str], Any]
    arg: str = ""
    image_options: Callable[[str, Mapping[str, Any]], dict[str, Any]] | None = None
    path_options: tuple[str, ...] = ()

    def identity_options(self, split: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
        opts = {k: v for k, v in dict(options or {}).items() if k not in GENERIC_OPTIONS}
        if self.image_options is not None:
            return self.image_options(split, opts)
        return {k: v for k, v in opts.items() if k not in self.path_options}


def _build_shortcut_digits(arg: str, split: str, opts: dict[str, Any], spec: str):
    return ShortcutDigits(split, opts, name=spec)


def _build_imagefolder(arg: str, split: str, opts: dict[str, Any], spec: str):
    _no_options("imagefolder", opts)
    return ImageFolder(os.path.expanduser(arg), split, name=spec)


def _build_tinyimagenet(arg: str, split: str, opts: dict[str, Any], spec: str):
    _no_options("tinyimagenet", opts)
    return TinyImageNet(os.path.expanduser(arg), split, name=spec)


def _build_tfds(arg: str, split: str, opts: dict[str, Any], spec: str):
    return TFDSSource(arg, split, opts, name=spec)


SOURCE_KINDS: dict[str, SourceKind] = {
    "shortcut_digits": SourceKind(_build_shortcut_digits, "", shortcut_digits_image_options),
    "imagefolder": SourceKind(_build_imagefolder, "PATH"),
    "tinyimagenet": SourceKind(_build_tinyimagenet, "PATH"),
    "tfds": SourceKind(_build_tfds, "NAME", path_options=("data_dir",)),
    # detection sources (records with "boxes" and "labels" [K], no image-level "label")
    "coco": SourceKind(coco.build_coco_source, "PATH", path_options=coco.PATH_OPTIONS),
    "shortcut_digits_det": SourceKind(shortcut_digits_det.build_source, "", shortcut_digits_det.image_options),
    "voc": SourceKind(voc.build_voc_source, "PATH", voc.image_options),
}


def _spec_help() -> str:
    forms = [k if not v.arg else f"{k}:{v.arg}" for k, v in SOURCE_KINDS.items()]
    return ", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else forms[0]


def parse_spec(spec: str) -> tuple[str, str]:
    """'kind:arg' -> (kind, arg); 'shortcut_digits' -> ('shortcut_digits', '')."""
    kind, _, arg = str(spec).partition(":")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data.source={spec!r}: expected {_spec_help()}")
    if not SOURCE_KINDS[kind].arg and arg:
        raise ValueError(f"data.source={spec!r}: {kind} takes no argument (use data.options)")
    if SOURCE_KINDS[kind].arg and not arg:
        raise ValueError(f"data.source={spec!r}: {kind} needs an argument ({kind}:{SOURCE_KINDS[kind].arg})")
    return kind, arg


def get_source(spec: str, split: str, options: Mapping[str, Any] | None = None) -> DataSource:
    """The source named by `spec` for `split` (see the module docstring for specs and options)."""
    opts = dict(options or {})
    ratio = float(opts.pop("data_ratio", 1.0))
    subset_seed = int(opts.pop("subset_seed", 0))
    kind, arg = parse_spec(spec)
    src = SOURCE_KINDS[kind].build(arg, split, opts, spec)
    if ratio != 1.0:
        labels = getattr(src, "labels", None) or getattr(src, "subset_strata", None)
        idx = subset_indices(None if labels is None else labels(), len(src), ratio, subset_seed)
        src = SubsetSource(src, idx, data_ratio=ratio)
    return src


def source_options(source) -> dict[str, Any]:
    """The options a source was built with (resolved where the source records them)."""
    return dict(getattr(source, "options", None) or {})


__all__ = [
    "DataSource",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "SOURCE_KINDS",
    "ShortcutDigits",
    "SourceKind",
    "SubsetSource",
    "TFDSSource",
    "TinyImageNet",
    "decode_image",
    "file_fingerprint",
    "get_source",
    "parse_spec",
    "source_options",
    "subset_indices",
]
