"""Which teacher store a run reads: one answer for train, experiments, demo and visualize.

`resolve_teacher(config, workdir=..., cache_root=...)`:
  * `model.interaction_constraint` off: no store (nothing reads a teacher, nothing is built);
  * `teacher.store` set: that store;
  * `teacher.auto = "oracle"`: the oracle store of the train split, built on first use (grid
    and noise from `config.teacher`, noise drawn with `config.seed`; a noise-free store does
    not depend on the seed and is shared by every seed) in
      cache_root/<hash of teacher_key(config)>   when `cache_root` is given (stores shared by
                                                 many runs; `key.json` records the key), else
      workdir/teacher/<train split>              (the run's own store);
    a store already there that does not fit the config is refused, naming both sides;
  * otherwise an error: interaction_constraint needs a teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from lfi_jax.data.sources import get_source
from lfi_jax.teacher.export import export_store
from lfi_jax.teacher.oracle import parse_grid
from lfi_jax.teacher.provenance import check_compatible
from lfi_jax.teacher.records import atomic_write_json
from lfi_jax.teacher.store import MANIFEST, TeacherStore

log = logging.getLogger(__name__)
AUTO_BACKENDS = ("oracle",)


@dataclasses.dataclass(frozen=True)
class TeacherChoice:
    """The store a run reads, and why.

    store: the store directory, or None when no teacher is read.
    reason: one line for logs: "config.teacher.store", "built (oracle) ...", "model.interaction_
      constraint is off ...".
    auto: the backend that builds the store automatically ("oracle"), or "" for a given store.
    built: this call exported the store. ready: the store's manifest exists (False only when
      `build=False` and another process is still building it).
    """

    store: str | None
    reason: str
    auto: str = ""
    built: bool = False
    ready: bool = True

    @property
    def active(self) -> bool:
        return self.store is not None


def _options(config) -> dict[str, Any]:
    opts = config.data.options
    return dict(opts.to_dict() if hasattr(opts, "to_dict") else (opts or {}))


def _noise(config) -> dict[str, float]:
    return {k: float(config.teacher.noise[k]) for k in ("blur", "shift", "uniform")}


def teacher_key(config) -> dict[str, Any]:
    """Everything the automatic oracle store depends on (JSON data; its hash names the store)."""
    noise = _noise(config)
    grid = config.teacher.grid
    return {
        "source": config.data.source,
        "split": config.data.train_split,
        "options": _options(config),
        "grid": list(grid) if isinstance(grid, (tuple, list)) else int(grid),
        "noise": noise,
        "seed": int(config.seed) if any(noise.values()) else 0,
    }


def build_auto_teacher(config, out: str, *, log_fn: Callable[[str], None] | None = None) -> None:
    """Export the teacher `config.teacher` describes (backend `teacher.auto`, default oracle;
    its grid and noise, noise drawn with `config.seed`) for the train split into `out`, unless
    a complete store is already there."""
    if os.path.exists(os.path.join(out, MANIFEST)):
        return
    t = config.teacher
    backend = t.auto or "oracle"
    if backend not in AUTO_BACKENDS:
        raise ValueError(f"config.teacher.auto={backend!r}; expected '' or one of {list(AUTO_BACKENDS)}")
    (log_fn or log.info)(
        f"building the {backend} teacher store for {config.data.source}/{config.data.train_split} "
        f"in {out}"
    )
    source = get_source(config.data.source, config.data.train_split, _options(config))
    export_store(
        source,
        out,
        backend=backend,
        grid=t.grid,
        seed=int(config.seed),
        data_spec=config.data.source,
        **_noise(config),
    )


def _check_auto_store(path: str, config) -> None:
    """A store found where the automatic one goes must be the one this config would build."""
    store = TeacherStore(path)
    check_compatible(store, spec=config.data.source, split=config.data.train_split, options=_options(config))
    prov = store.provenance
    want_grid, want_noise = parse_grid(config.teacher.grid), _noise(config)
    diffs = []
    if prov.backend != (config.teacher.auto or "oracle"):
        diffs.append(f"backend: store has {prov.backend!r}, config.teacher.auto {config.teacher.auto!r}")
    if tuple(prov.grid) != tuple(want_grid):
        diffs.append(f"grid: store has {list(prov.grid)}, config.teacher.grid {list(want_grid)}")
    if prov.noise is not None and prov.noise != want_noise:
        diffs.append(f"noise: store has {prov.noise}, config.teacher.noise {want_noise}")
    seed = teacher_key(config)["seed"]
    if any(want_noise.values()) and prov.teacher.get("seed") != seed:
        diffs.append(f"noise seed: store has {prov.teacher.get('seed')}, config.seed {seed}")
    if diffs:
        raise ValueError(
            f"teacher store {path} (built automatically) does not fit this config: {'; '.join(diffs)}; "
            "delete it to rebuild, or use another workdir"
        )


def auto_store_path(config, *, workdir: str | None = None, cache_root: str | None = None) -> str:
    """Where the automatic store of `config` lies (see the module docstring)."""
    if cache_root:
        key = json.dumps(teacher_key(config), sort_keys=True, default=str)
        return os.path.join(cache_root, hashlib.sha256(key.encode()).hexdigest()[:10])
    if workdir:
        return os.path.join(workdir, "teacher", config.data.train_split)
    raise ValueError(
        f"config.teacher.auto={config.teacher.auto!r} needs a directory to build the store in (a workdir or a cache "
        "root)"
    )


def resolve_teacher(
    config,
    *,
    workdir: str | None = None,
    cache_root: str | None = None,
    build: bool = True,
    log_fn: Callable[[str], None] | None = None,
) -> TeacherChoice:
    """The teacher store `config` asks for (see the module docstring).

    build=False: never export (e.g. on the processes of a multi-host run other than the
    first, which wait for it): the choice then says `ready=False` while the store is missing.
    """
    t = config.teacher
    if not config.model.interaction_constraint:
        return TeacherChoice(None, "model.interaction_constraint is off: no teacher is read")
    if t.store:
        return TeacherChoice(str(t.store), "config.teacher.store")
    if not t.auto:
        raise ValueError(
            "config.model.interaction_constraint is on but no teacher is configured: "
            "set config.teacher.store (or config.teacher.auto='oracle')"
        )
    if t.auto not in AUTO_BACKENDS:
        raise ValueError(f"config.teacher.auto={t.auto!r}; expected '' or one of {list(AUTO_BACKENDS)}")
    path = auto_store_path(config, workdir=workdir, cache_root=cache_root)
    if os.path.exists(os.path.join(path, MANIFEST)):
        _check_auto_store(path, config)
        return TeacherChoice(path, f"reused the {t.auto} store built for this config", auto=t.auto)
    if not build:
        return TeacherChoice(path, f"the {t.auto} store another process builds", auto=t.auto, ready=False)
    key = teacher_key(config)
    if cache_root:
        os.makedirs(path, exist_ok=True)
        atomic_write_json(os.path.join(path, "key.json"), key)
    build_config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    build_config.seed = key["seed"]
    build_auto_teacher(build_config, path, log_fn=log_fn)
    return TeacherChoice(path, f"built the {t.auto} store for {config.data.source}/{config.data.train_split}",
                         auto=t.auto, built=True)


__all__ = ["TeacherChoice", "auto_store_path", "build_auto_teacher", "resolve_teacher", "teacher_key"]
