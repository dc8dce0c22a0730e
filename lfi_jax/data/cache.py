"""Decoded images held in memory across epochs and evaluations (`config.data.cache_mb`).

Rendering or decoding an image is most of the input pipeline's work on a small model (the
main job's shortcut digits: 0.4 ms an image, the same again per epoch and per evaluation).
With `data.cache_mb > 0`, the first read of each example keeps (id, uint8 image, label) until
the budget is used up; later reads of the same split in this process, by any iterator (every
evaluation builds a new one), come from memory. Augmentation runs after the cache, so the
stream of batches is the same with or without it.

The caches live in this module, one per (data source, split, options), the most recent
`_KEEP` of them; a process that moves on to other data lets the oldest go. Grain worker
processes start with empty caches (the content is not pickled).
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

Item = tuple[str, np.ndarray, int]  # (example id, uint8 image [H, W, 3], label)
_KEEP = 3  # a run's train split and two eval splits
_MB = 1 << 20


class ImageCache:
    """(id, image, label) per source index, filled on first read, up to `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self._items: dict[int, Item] = {}
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, index: int, load: Callable[[int], Item]) -> Item:
        item = self._items.get(index)
        if item is None:
            item = load(index)
            size = item[1].nbytes
            if self._bytes + size <= self.budget:
                item[1].flags.writeable = False  # shared by every later read
                self._items[index] = item
                self._bytes += size
        return item

    def __getstate__(self):
        return {"budget": self.budget, "_items": {}, "_bytes": 0}


_caches: collections.OrderedDict[str, ImageCache] = collections.OrderedDict()
_lock = threading.Lock()


def _key(source: str, split: str, options: dict[str, Any]) -> str:
    return json.dumps([str(source), str(split), options], sort_keys=True, default=str)


def shared_image_cache(source: str, split: str, options: dict[str, Any], cache_mb: float) -> ImageCache:
    """This process's cache for (data source spec, split, options) with a budget of `cache_mb`
    (`config.data.cache_mb`; a pass-through cache where it is 0)."""
    mb = float(cache_mb)
    if mb < 0:
        raise ValueError(f"config.data.cache_mb={mb} must be >= 0")
    if mb == 0:
        return ImageCache(0)
    key = _key(source, split, options)
    with _lock:
        cache = _caches.get(key)
        if cache is None or cache.budget != int(mb * _MB):
            cache = _caches[key] = ImageCache(int(mb * _MB))
        _caches.move_to_end(key)
        while len(_caches) > _KEEP:
            _caches.popitem(last=False)
    return cache


def clear() -> None:
    """Drops every cache of this process."""
    with _lock:
        _caches.clear()


__all__ = ["ImageCache", "clear", "shared_image_cache"]
