"""The grain input pipeline: source -> teacher join -> geometry -> per-process shard -> batch.

Train (`make_train_iterator`): an endless, checkpointable grain iterator.
  * Order: epoch e visits the source in grain's index-shuffle permutation seeded by seed + e.
  * Sharding: the global sequence of examples is dealt out round-robin, process p taking
    positions p, p + P, p + 2P, ...; local batch t of every process together make global batch
    t, and the union over processes is the same whatever P is.
  * Augmentation of source example i in epoch e uses uniforms that are a pure function of
    (seed, e, i) (`transforms.example_uniforms`, drawn for a whole batch at once), so it does
    not depend on the process count, the worker count or where training resumed.
  * The geometry runs per batch (`batch_transforms.transform_batch`: two batched products
    per batch instead of numpy calls per example); decoded images can stay in memory across
    epochs and evaluations (`data.cache_mb`, `lfi_jax.data.cache`).
  * Batches are formed before the (optional) worker processes, so the stream is identical
    for any `data.num_workers`.
  * `it.get_state()` / `it.set_state(state)` restore the exact next batch (grain's dataset API);
    the trainer saves the state with the model.

Eval (`make_eval_iterator`): one finite pass; every example exactly once over all processes,
the last batch padded (`valid` = 0) to keep a fixed shape.

Batches are dicts of numpy arrays, this process's share (global_batch_size // process_count):
  image float32 [b, S, S, 3] (normalised), label int32 [b], teacher float32 [b, gh * gw]
  (student patch grid, row-major, sums to 1; zeros where missing), teacher_mask float32 [b],
  and for eval valid float32 [b]. With `return_index=True` also index int64 [b] (source index).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from absl import flags

from lfi_jax.data.batch_transforms import transform_batch
from lfi_jax.data.cache import ImageCache, shared_image_cache
from lfi_jax.data.priority import lower_thread_priority
from lfi_jax.data.sources import get_source
from lfi_jax.data.transforms import CROP_ATTEMPTS, Augment, example_uniforms, sample_crops, transform_single
from lfi_jax.teacher.provenance import check_compatible
from lfi_jax.teacher.store import TeacherStore
from lfi_jax.teacher.types import TeacherEntry

log = logging.getLogger(__name__)

DEFAULT_NUM_THREADS = 2  # in-process prefetch threads (each builds whole batches)
DEFAULT_PREFETCH = 4  # batches buffered ahead
ENTRY_CACHE_BYTES = 256 << 20  # decoded teacher maps kept per TeacherLookup


def _get(cfg: Any, key: str, default: Any) -> Any:
    try:
        return cfg.get(key, default)
    except AttributeError:
        return getattr(cfg, key, default)


# --------------------------------------------------------------------------- teacher join


class TeacherLookup:
    """Per-example teacher entries from a TeacherStore, picklable for grain workers.

    Opened from a path lazily in each process (an open store is never pickled), or wrapping
    a ready store-like object (anything with `__getitem__`, `__contains__`, `grid`).
    """

    def __init__(self, store: Any = None, *, path: str = "", allow_missing: bool = False):
        if store is None and not path:
            raise ValueError("TeacherLookup needs a store or a path")
        self.path = path
        self.allow_missing = bool(allow_missing)
        self._store = store
        self._owns_store = store is None
        # Decoded entries, read once per process (a store read and decode costs about as much
        # as the geometry of an example); up to ENTRY_CACHE_BYTES of maps.
        self._entries: dict[str, TeacherEntry] = {}
        self._entry_bytes = 0

    @property
    def store(self) -> Any:
        if self._store is None:
            self._store = TeacherStore(self.path)
        return self._store

    def __getstate__(self):
        d = dict(self.__dict__)
        if d["_owns_store"]:
            d["_store"] = None
        d["_entries"], d["_entry_bytes"] = {}, 0
        return d

    def get(self, example_id: str) -> TeacherEntry | None:
        """The entry for `example_id`; None if missing and allowed, KeyError naming it if not."""
        entry = self._entries.get(example_id)
        if entry is not None:
            return entry
        store = self.store
        if example_id not in store:
            if self.allow_missing:
                return None
            raise KeyError(
                f"teacher store {self.path or store!r} has no map for example {example_id!r} "
                "(set config.teacher.allow_missing=True to mask such examples out)"
            )
        entry = store[example_id]
        size = np.asarray(entry.map).nbytes
        if self._entry_bytes + size <= ENTRY_CACHE_BYTES:
            self._entries[example_id] = entry
            self._entry_bytes += size
        return entry

    def image_fingerprint(self, example_id: str) -> str | None:
        """The content fingerprint of the image file the store's map was made from (None if
        not recorded)."""
        get = getattr(self.store, "image_fingerprint", None)
        return get(example_id) if get is not None else None

    def missing_ids(self, source) -> list[str]:
        store = self.store
        return [eid for eid in (source.example_id(i) for i in range(len(source))) if eid not in store]


def build_teacher_lookup(
    teacher_cfg: Any, data_spec: str, split: str, *, store: Any = None, source=None, options: Any = None
) -> TeacherLookup | None:
    """The teacher join for (data_spec, split), or None without a teacher.

    `store` (a store-like object) overrides `teacher_cfg.store` (a path). The store must have
    been built from this data (`lfi_jax.teacher.provenance.check_compatible`: source kind,
    split, the options that change the images, not paths; `options` default to the source's);
    with a `source`, every example must have a map unless `teacher_cfg.allow_missing` (then the
    count of missing maps is logged).
    """
    path = str(_get(teacher_cfg, "store", "") or "")
    allow_missing = bool(_get(teacher_cfg, "allow_missing", False))
    if store is None and not path:
        return None
    lookup = TeacherLookup(store, path=path if store is None else "", allow_missing=allow_missing)
    missing = check_compatible(
        lookup.store, source, spec=data_spec, split=split, options=options,
        allow_missing=allow_missing if source is not None else None,
    )
    if missing:
        log.warning("teacher store %s: %d of %d examples have no map (masked out)", path, len(missing), len(source))
    return lookup


# --------------------------------------------------------------------------- per-example work


class _Raw(NamedTuple):
    """One example as read, before the geometry: what `_Prepare.batch` transforms."""

    index: int  # source index (-1: eval padding)
    epoch: int
    image: np.ndarray  # uint8 [H, W, 3]
    label: int
    entry: TeacherEntry | None


class _Prepare:
    """Source index (+ epoch) -> `_Raw`; a list of them -> one batch. Picklable (grain workers).

    Reading (`raw`) checks the image, the label and the teacher join; images come through
    `images` (an in-memory cache when `data.cache_mb` allows). The geometry runs per batch
    (`batch`): crop boxes and flips from `example_uniforms(seed, epoch, index)`, then
    `batch_transforms.transform_batch` over images of one size (`transform_single` one by one
    where sizes differ).
    """

    def __init__(
        self,
        source,
        lookup: TeacherLookup | None,
        *,
        image_size: int,
        grid_hw: tuple[int, int],
        mean,
        std,
        augment: Augment | None,
        seed: int,
        return_index: bool,
        images: ImageCache | None = None,
        thread_nice: int = 0,
    ):
        self.source = source
        self.thread_nice = int(thread_nice)
        self.lookup = lookup
        self.image_size = int(image_size)
        self.grid_hw = grid_hw
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.augment = augment
        self.seed = int(seed) % 2**32
        self.return_index = return_index
        self.num_classes = len(source.class_names)
        self.images = images if images is not None else ImageCache(0)
        self._verified: set[int] = set()  # source indices whose image file matched the store's fingerprint

    def _read(self, index: int) -> tuple[str, np.ndarray, int]:
        ex = self.source[index]
        return ex["id"], np.asarray(ex["image"]), int(ex["label"])

    def raw(self, index: int, epoch: int = 0) -> _Raw:
        eid, image, label = self.images.get(index, self._read)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"example {eid!r}: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        if not 0 <= label < self.num_classes:
            raise ValueError(f"example {eid!r}: label {label} outside [0, {self.num_classes})")
        entry = self.lookup.get(eid) if self.lookup is not None else None
        if entry is not None:
            self._check_same_image(index, eid, image, entry)
        return _Raw(int(index), int(epoch), image, label, entry)

    def _geometry(self, raws: Sequence[_Raw]) -> tuple[np.ndarray, np.ndarray]:
        """Crop boxes [B, 4] and flips [B] of a batch: counter-based draws from (seed, epoch,
        index), so an example's augmentation does not depend on its batch or process."""
        hw = np.asarray([r.image.shape[:2] for r in raws], np.int64)
        boxes = np.concatenate([np.zeros_like(hw), hw], 1)
        flips = np.zeros(len(raws), bool)
        aug = self.augment
        live = np.asarray([r.index >= 0 for r in raws])
        if aug is None or not live.any():
            return boxes, flips
        u = example_uniforms(self.seed, [r.epoch for r in raws], [max(r.index, 0) for r in raws], 4 * CROP_ATTEMPTS + 1)
        if aug.random_resized_crop:
            drawn = sample_crops(u[:, :-1].reshape(-1, CROP_ATTEMPTS, 4), hw, aug.crop_scale, aug.crop_ratio)
            boxes = np.where(live[:, None], drawn, boxes)
        if aug.hflip:
            flips = live & (u[:, -1] < 0.5)
        return boxes, flips

    def batch(self, raws: Sequence[_Raw]) -> dict[str, np.ndarray]:
        lower_thread_priority(self.thread_nice)  # the thread building batches (data.thread_nice)
        boxes, flips = self._geometry(raws)
        kw = dict(image_size=self.image_size, grid_hw=self.grid_hw, mean=self.mean, std=self.std)
        if len({r.image.shape for r in raws}) == 1:
            images = np.stack([r.image for r in raws])
            image, teacher, mask = transform_batch(images, [r.entry for r in raws], boxes, flips, **kw)
        else:  # images of several sizes: one at a time
            outs = [
                transform_single(r.image, r.entry, box=tuple(b), flip=bool(f), **kw)
                for r, b, f in zip(raws, boxes, flips)
            ]
            image, teacher, mask = (np.stack([o[k] for o in outs]) for k in ("image", "teacher", "teacher_mask"))
        out = {
            "image": image,
            "teacher": teacher,
            "teacher_mask": mask,
            "label": np.asarray([r.label for r in raws], np.int32),
        }
        if self.return_index:
            out["index"] = np.asarray([r.index for r in raws], np.int64)
        return out

    def _check_same_image(self, index: int, eid: str, image: np.ndarray, entry: TeacherEntry) -> None:
        want = self.lookup.image_fingerprint(eid)
        fingerprint = getattr(self.source, "content_fingerprint", None)
        where = self.lookup.path or getattr(self.lookup.store, "path", "")
        if want is not None and fingerprint is not None and index not in self._verified:
            if fingerprint(index) != want:
                raise ValueError(
                    f"example {eid!r}: the image changed after teacher store {where} was exported (the file's "
                    f"content differs, now {image.shape[0]}x{image.shape[1]}); re-export the store for the current "
                    "data"
                )
            self._verified.add(index)  # checked once per process, not every epoch
        if tuple(entry.geometry.image_hw) != tuple(image.shape[:2]):
            raise ValueError(
                f"example {eid!r}: teacher geometry is for a {tuple(entry.geometry.image_hw)} image, the source gives "
                f"{tuple(image.shape[:2])} (the image was resized after the export, or a store built from other data)"
            )


class _TrainElement:
    def __init__(self, prepare: _Prepare):
        self.prepare = prepare

    def __call__(self, item: tuple[int, int]) -> _Raw:
        epoch, index = item
        return self.prepare.raw(index, epoch)


class _EpochIndex:
    """(position in the repeated stream, source index) -> (epoch, source index)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, position: int, index: int) -> tuple[int, int]:
        return (int(position) // self.n, int(index))


class _EvalElement:
    def __init__(self, prepare: _Prepare, n: int):
        self.prepare = prepare
        self.n = n
        self._blank: np.ndarray | None = None  # the padding image, made once

    def __call__(self, k: int) -> _Raw:
        if k < self.n:
            return self.prepare.raw(int(k))
        # padding: a blank image of example 0's size, so that the batch keeps one image size
        if self._blank is None:
            self._blank = np.zeros_like(self.prepare.raw(0).image)
            self._blank.flags.writeable = False
        return _Raw(-1, 0, self._blank, 0, None)


class _EvalBatch:
    """`_Prepare.batch` plus `valid`, with the padding rows' images exactly zero."""

    def __init__(self, prepare: _Prepare):
        self.prepare = prepare

    def __call__(self, raws: Sequence[_Raw]) -> dict[str, np.ndarray]:
        out = self.prepare.batch(raws)
        valid = np.asarray([r.index >= 0 for r in raws])
        out["image"][~valid] = 0.0  # padding stays exactly zero
        out["valid"] = valid.astype(np.float32)
        return out


# --------------------------------------------------------------------------- iterators


def _grid(data_cfg: Any, patch_size: int) -> tuple[int, int]:
    size = int(data_cfg.image_size)
    if size <= 0 or patch_size <= 0 or size % patch_size:
        raise ValueError(f"config.data.image_size={size} is not a positive multiple of the patch size {patch_size}")
    return (size // patch_size, size // patch_size)


def _local_batch(global_batch_size: int, process_index: int, process_count: int, key: str) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"config.{key}={global_batch_size} must be a positive multiple of the {process_count} "
            "processes"
        )
    return global_batch_size // process_count


def _options(data_cfg: Any, *, train: bool) -> dict[str, Any]:
    raw = _get(data_cfg, "options", None)
    opts = dict(raw.to_dict() if hasattr(raw, "to_dict") else (raw or {}))
    ratio = float(_get(data_cfg, "data_ratio", 1.0))
    if ratio != 1.0 and float(opts.get("data_ratio", 1.0)) not in (1.0, ratio):
        raise ValueError(
            f"config.data.data_ratio={ratio} and config.data.options.data_ratio={opts['data_ratio']} disagree"
        )
    if train:
        if ratio != 1.0:
            opts["data_ratio"] = ratio
    else:  # evaluation always sees the whole split
        opts.pop("data_ratio", None)
        opts.pop("subset_seed", None)
    return opts


def _finish(ds: grain.MapDataset, data_cfg: Any) -> grain.IterDataset:
    read = grain.ReadOptions(
        num_threads=int(_get(data_cfg, "num_threads", DEFAULT_NUM_THREADS)),
        prefetch_buffer_size=int(_get(data_cfg, "prefetch", DEFAULT_PREFETCH)),
    )
    it = ds.to_iter_dataset(read)
    workers = int(_get(data_cfg, "num_workers", 0))
    if workers < 0:
        raise ValueError(f"config.data.num_workers={workers} must be >= 0")
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app
            flags.FLAGS.mark_as_parsed()  # (tests, scripts) their defaults apply
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def make_train_iterator(
    data_cfg: Any,
    teacher_cfg: Any,
    *,
    global_batch_size: int,
    patch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    store: Any = None,
    return_index: bool = False,
) -> grain.DatasetIterator:
    """The endless, checkpointable train iterator (see the module docstring).

    `store` (a TeacherStore-like object) overrides `teacher_cfg.store`.
    """
    b = _local_batch(global_batch_size, process_index, process_count, "batch_size")
    grid = _grid(data_cfg, patch_size)
    options = _options(data_cfg, train=True)
    source = get_source(data_cfg.source, data_cfg.train_split, options)
    n = len(source)
    if n == 0:
        raise ValueError(f"data source {data_cfg.source}/{data_cfg.train_split} is empty")
    lookup = build_teacher_lookup(
        teacher_cfg, data_cfg.source, data_cfg.train_split, store=store, source=source, options=options
    )
    prepare = _Prepare(
        source,
        lookup,
        image_size=data_cfg.image_size,
        grid_hw=grid,
        mean=data_cfg.mean,
        std=data_cfg.std,
        augment=Augment.from_config(data_cfg.augment),
        seed=seed,
        return_index=return_index,
        images=shared_image_cache(data_cfg.source, data_cfg.train_split, options, _get(data_cfg, "cache_mb", 0)),
        thread_nice=int(_get(data_cfg, "thread_nice", 0)),
    )
    ds = grain.MapDataset.range(n).shuffle(seed=int(seed) % 2**32).repeat()
    ds = ds.map_with_index(_EpochIndex(n))
    ds = ds[process_index::process_count]
    ds = ds.map(_TrainElement(prepare)).batch(b, drop_remainder=True, batch_fn=prepare.batch)
    return iter(_finish(ds, data_cfg))


def make_eval_iterator(
    data_cfg: Any,
    teacher_cfg: Any,
    split: str,
    *,
    global_batch_size: int,
    patch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    store: Any = None,
    return_index: bool = False,
) -> grain.IterDataset:
    """One pass over `split`: every example once over all processes, padded last batch.

    The result is re-iterable; each `iter()` starts a fresh pass of
    `num_eval_batches(len(split), global_batch_size)` batches on every process.
    """
    b = _local_batch(global_batch_size, process_index, process_count, "eval_batch_size")
    grid = _grid(data_cfg, patch_size)
    options = _options(data_cfg, train=False)
    source = get_source(data_cfg.source, split, options)
    n = len(source)
    lookup = build_teacher_lookup(teacher_cfg, data_cfg.source, split, store=store, source=source, options=options)
    prepare = _Prepare(
        source,
        lookup,
        image_size=data_cfg.image_size,
        grid_hw=grid,
        mean=data_cfg.mean,
        std=data_cfg.std,
        augment=None,
        seed=0,
        return_index=return_index,
        images=shared_image_cache(data_cfg.source, split, options, _get(data_cfg, "cache_mb", 0)),
    )
    total = math.ceil(n / global_batch_size) * global_batch_size
    ds = grain.MapDataset.range(total)[process_index::process_count]
    ds = ds.map(_EvalElement(prepare, n)).batch(b, drop_remainder=False, batch_fn=_EvalBatch(prepare))
    return _finish(ds, data_cfg)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    return math.ceil(num_examples / global_batch_size)


__all__ = [
    "TeacherLookup",
    "build_teacher_lookup",
    "make_eval_iterator",
    "make_train_iterator",
    "num_eval_batches",
]
