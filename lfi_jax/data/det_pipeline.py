"""The detection input pipeline: source -> teacher join -> det_transforms -> padded batches.

The same contract as `lfi_jax.data.pipeline` (the classification one): the train iterator is
endless and checkpointable (grain; epoch e in the index-shuffle order seeded by seed + e;
augmentation of source example i in epoch e from `default_rng([seed, e, i])`; the global
stream dealt round-robin over processes), the eval iterable is one pass with the last batch
padded (`valid` = 0). Every example is padded to the fixed `pad_hw` (one compiled step), so
grain's default batching stacks them. Fields: `det_transforms.collate`.

Data config keys (`config.data`; defaults for DETR at COCO scale):
  source, train_split, options          as for classification
  augment                               DetAugment fields (hflip, scales, max_size, crop_prob,
                                        crop_pre_scales, crop_size)
  eval_size (800), max_size (1333)      the eval resize
  pad_hw ((max_size, max_size))         the padded canvas
  max_boxes (100)                       targets per image
  stride (32)                           the backbone's total stride (feature grid)
  masks (False), mask_stride (1)        carry instance masks as "masks" [B, max_boxes, Hp/s, Wp/s]
                                        (`det_transforms.view_masks`; the segmentation task
                                        turns `masks` on)
  mean, std (ImageNet's)                normalisation
  num_threads, prefetch, num_workers    as for classification
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np

from lfi_jax.data.det_transforms import IMAGENET_MEAN, IMAGENET_STD, DetAugment, collate, transform_detection
from lfi_jax.data.pipeline import build_teacher_lookup
from lfi_jax.data.sources import get_source

DEFAULT_NUM_THREADS = 2
DEFAULT_PREFETCH = 4


def _get(cfg: Any, key: str, default: Any) -> Any:
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _options(data_cfg: Any) -> dict[str, Any]:
    raw = _get(data_cfg, "options", {})
    return dict(raw.to_dict() if hasattr(raw, "to_dict") else raw)


class DetSettings:
    """The geometry settings of the detection pipeline, read once from `config.data`."""

    def __init__(self, data_cfg: Any):
        self.max_size = int(_get(data_cfg, "max_size", 1333))
        self.eval_size = int(_get(data_cfg, "eval_size", 800))
        pad = _get(data_cfg, "pad_hw", (self.max_size, self.max_size))
        self.pad_hw = (int(pad[0]), int(pad[1]))
        self.max_boxes = int(_get(data_cfg, "max_boxes", 100))
        self.stride = int(_get(data_cfg, "stride", 32))
        self.mean = tuple(float(m) for m in _get(data_cfg, "mean", IMAGENET_MEAN))
        self.std = tuple(float(s) for s in _get(data_cfg, "std", IMAGENET_STD))
        aug = _get(data_cfg, "augment", {})
        self.augment = DetAugment.from_config(aug)
        self.masks = bool(_get(data_cfg, "masks", False))
        self.mask_stride = int(_get(data_cfg, "mask_stride", 1))
        if min(self.pad_hw) <= 0 or self.max_boxes <= 0 or self.stride <= 0:
            raise ValueError(
                f"config.data.pad_hw={self.pad_hw}, max_boxes={self.max_boxes}, stride={self.stride} must be positive"
            )
        if self.masks and (self.mask_stride <= 0 or self.pad_hw[0] % self.mask_stride
                           or self.pad_hw[1] % self.mask_stride):
            raise ValueError(f"config.data.mask_stride={self.mask_stride} must be positive and divide "
                             f"config.data.pad_hw={self.pad_hw}")


class _Prepare:
    """Source index (+ epoch) -> one padded example (a dict of arrays). Picklable."""

    def __init__(self, source, lookup, settings: DetSettings, *, train: bool, seed: int):
        self.source, self.lookup, self.s = source, lookup, settings
        self.train, self.seed = train, int(seed) % 2**32
        self.num_classes = len(source.class_names)

    def example(self, index: int, epoch: int = 0) -> dict[str, np.ndarray]:
        ex = self.source[index]
        eid = ex["id"]
        labels = np.asarray(ex["labels"])
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"example {eid!r}: labels outside [0, {self.num_classes})")
        entry = self.lookup.get(eid) if self.lookup is not None else None
        if entry is not None and tuple(entry.geometry.image_hw) != tuple(np.asarray(ex["image"]).shape[:2]):
            raise ValueError(
                f"example {eid!r}: teacher geometry is for a {tuple(entry.geometry.image_hw)} image, the source "
                f"gives {tuple(np.asarray(ex['image']).shape[:2])}"
            )
        s = self.s
        rng = np.random.default_rng([self.seed, int(epoch), int(index)]) if self.train else None
        e = transform_detection(
            ex, entry, rng=rng, augment=s.augment if self.train else None, eval_size=s.eval_size,
            max_size=s.max_size, mean=s.mean, std=s.std, masks=s.masks, mask_stride=s.mask_stride,
        )
        if e.image.shape[0] > s.pad_hw[0] or e.image.shape[1] > s.pad_hw[1]:
            raise ValueError(
                f"example {eid!r}: transformed to {e.image.shape[0]}x{e.image.shape[1]}, larger than "
                f"config.data.pad_hw={s.pad_hw}"
            )
        batch = collate([e], max_boxes=s.max_boxes, stride=s.stride, pad_hw=s.pad_hw, mask_stride=s.mask_stride)
        return {k: v[0] for k, v in batch.items()}

    def blank(self) -> dict[str, np.ndarray]:
        """A padding row (valid = 0) of the same shapes."""
        first = self.example(0)
        return {k: np.zeros_like(v) for k, v in first.items()}


class _Train:
    def __init__(self, prepare: _Prepare, n: int):
        self.prepare, self.n = prepare, n

    def __call__(self, position: int, index: int) -> dict[str, np.ndarray]:
        return self.prepare.example(int(index), int(position) // self.n)


class _Eval:
    def __init__(self, prepare: _Prepare, n: int):
        self.prepare, self.n = prepare, n
        self._blank = None

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        if k < self.n:
            return self.prepare.example(int(k))
        if self._blank is None:
            self._blank = self.prepare.blank()
        return dict(self._blank)


def _local_batch(global_batch_size: int, process_index: int, process_count: int, key: str) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"config.{key}={global_batch_size} must be a positive multiple of the {process_count} processes"
        )
    return global_batch_size // process_count


def _finish(ds: grain.MapDataset, data_cfg: Any) -> grain.IterDataset:
    read = grain.ReadOptions(
        num_threads=int(_get(data_cfg, "num_threads", DEFAULT_NUM_THREADS)),
        prefetch_buffer_size=int(_get(data_cfg, "prefetch", DEFAULT_PREFETCH)),
    )
    it = ds.to_iter_dataset(read)
    workers = int(_get(data_cfg, "num_workers", 0))
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def make_det_train_iterator(
    data_cfg: Any, teacher_cfg: Any, *, global_batch_size: int, seed: int, process_index: int = 0,
    process_count: int = 1, store: Any = None,
) -> grain.DatasetIterator:
    """The endless, checkpointable detection train iterator (see the module docstring)."""
    b = _local_batch(global_batch_size, process_index, process_count, "batch_size")
    options = _options(data_cfg)
    source = get_source(data_cfg.source, data_cfg.train_split, options)
    n = len(source)
    if n == 0:
        raise ValueError(f"data source {data_cfg.source}/{data_cfg.train_split} is empty")
    lookup = build_teacher_lookup(
        teacher_cfg, data_cfg.source, data_cfg.train_split, store=store, source=source, options=options
    )
    prepare = _Prepare(source, lookup, DetSettings(data_cfg), train=True, seed=seed)
    ds = grain.MapDataset.range(n).shuffle(seed=int(seed) % 2**32).repeat()
    ds = ds.map_with_index(_Train(prepare, n))[process_index::process_count]
    return iter(_finish(ds.batch(b, drop_remainder=True), data_cfg))


def make_det_eval_iterator(
    data_cfg: Any, split: str, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
) -> grain.IterDataset:
    """One pass over `split` (no teacher), the last global batch padded with valid = 0 rows."""
    b = _local_batch(global_batch_size, process_index, process_count, "eval_batch_size")
    source = get_source(data_cfg.source, split, _options(data_cfg))
    n = len(source)
    prepare = _Prepare(source, None, DetSettings(data_cfg), train=False, seed=0)
    total = math.ceil(n / global_batch_size) * global_batch_size
    ds = grain.MapDataset.range(total)[process_index::process_count].map(_Eval(prepare, n))
    return _finish(ds.batch(b, drop_remainder=False), data_cfg)


__all__ = ["DetSettings", "make_det_eval_iterator", "make_det_train_iterator"]
