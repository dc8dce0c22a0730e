"""Start-up validation: everything that can be checked before the first step, checked before
the first step and before anything is written to the workdir.

    report = validate_for_training(config, mesh, source, store)   # raises UserError
    for line in report.lines(): log.info(line)

`source` is the train split's DataSource, `store` the resolved teacher store (a TeacherStore, its
path, or None when no teacher is read; `lfi_jax.teacher.resolve.resolve_teacher`). The checks,
each failing with ONE line that names the config key and both sides:
  * the static config checks (`lfi_jax.config.validate`);
  * batch sizes against the devices on the mesh's batch axes: `batch_size /
    optim.grad_accum_steps` (the micro-batch each step splits over the devices) and
    `eval_batch_size` must divide evenly;
  * classification: `model.num_classes` against the classes the train source knows (its class
    list, and its labels where it lists them);
  * every split in `data.eval_splits` opened (a missing split names the split and the source),
    its classes compared with the train split's, and its first example decoded (a corrupt image
    names its file); the train split's first example too; an image folder without split
    directories (every split reads the same images) evaluates nothing, so a split there is refused;
  * the teacher store, when the model reads one, checked against the train data
    (`lfi_jax.teacher.provenance.check_compatible`: what identifies the data, not its path) and
    for missing maps (unless `teacher.allow_missing`).
Each check is also a function of its own, for entry points that need only some of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lfi_jax.config import task_name
from lfi_jax.config import validate as validate_config
from lfi_jax.data.sources import get_source
from lfi_jax.errors import UserError
from lfi_jax.sharding import batch_axes
from lfi_jax.teacher.provenance import check_compatible
from lfi_jax.teacher.store import TeacherStore

SourceOpener = Callable[[str, str, Mapping[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class StartupReport:
    """What a run trains on, as validated (for the start-up log)."""

    data: str
    train_split: str
    train_examples: int
    classes: tuple[str, ...]
    eval_splits: tuple[tuple[str, int], ...]  # (split, examples)
    teacher: str | None  # the store read, or None
    teacher_missing: int  # train examples without a map (masked out)
    batch_devices: int

    def lines(self) -> list[str]:
        evals = ", ".join(f"{s} ({n:,})" for s, n in self.eval_splits) or "none"
        teacher = "none" if self.teacher is None else self.teacher
        if self.teacher is not None and self.teacher_missing:
            teacher += f" ({self.teacher_missing:,} train examples without a map, masked out)"
        return [
            f"data: {self.data} split {self.train_split} ({self.train_examples:,} examples), "
            f"{len(self.classes)} classes: {_short_list(self.classes)}",
            f"eval splits: {evals}",
            f"teacher store: {teacher}",
            f"devices on the batch axes: {self.batch_devices}",
        ]


def _short_list(items: Sequence[Any], n: int = 5) -> str:
    items = [str(x) for x in items]
    return ", ".join(items) if len(items) <= n else ", ".join(items[:n]) + f", ... ({len(items)} in all)"


def _options(config) -> dict[str, Any]:
    opts = config.data.options
    return dict(opts.to_dict() if hasattr(opts, "to_dict") else (opts or {}))


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


# --------------------------------------------------------------------------- devices


def batch_device_count(mesh) -> int:
    """Devices a global batch is split over (the mesh's batch axes; 1 without a mesh)."""
    if mesh is None:
        return 1
    shape = dict(mesh.shape)
    return int(np.prod([shape[a] for a in batch_axes(mesh)], dtype=np.int64))


def check_batch_sizes(config, mesh) -> int:
    """`batch_size`, its micro-batch `batch_size / optim.grad_accum_steps` and `eval_batch_size`
    divide evenly over the devices on the batch axes; returns that device count."""
    n = batch_device_count(mesh)
    where = f"the {n} devices on the batch axes of mesh {dict(mesh.shape) if mesh is not None else {}}"
    bs, accum = int(config.batch_size), int(config.optim.grad_accum_steps)
    if accum < 1 or bs % accum:
        raise UserError(f"config.batch_size={bs} is not divisible by config.optim.grad_accum_steps={accum}")
    if (bs // accum) % n:
        if accum == 1:
            raise UserError(f"config.batch_size={bs} is not divisible by {where}")
        raise UserError(
            f"config.batch_size / config.optim.grad_accum_steps = {bs} / {accum} = {bs // accum} "
            f"(the micro-batch) is not divisible by {where}"
        )
    if int(config.eval_batch_size) % n:
        raise UserError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by {where}")
    return n


# --------------------------------------------------------------------------- data


def check_num_classes(config, source) -> tuple[str, ...]:
    """`model.num_classes` equals the train source's class count, and its labels (where the
    source lists them) lie in [0, num_classes); returns the class names."""
    classes = tuple(str(c) for c in getattr(source, "class_names", None) or ())
    want = int(config.model.num_classes)
    where = f"{source.name} split {source.split}"
    if classes and len(classes) != want:
        raise UserError(
            f"config.model.num_classes={want} but the data ({where}) has {len(classes)} classes "
            f"({_short_list(classes)}): set --config.model.num_classes={len(classes)}"
        )
    labels_fn = getattr(source, "labels", None)
    labels = labels_fn() if callable(labels_fn) else None
    if labels is not None and len(labels):
        lo, hi = int(np.min(labels)), int(np.max(labels))
        if lo < 0 or hi >= want:
            raise UserError(
                f"config.model.num_classes={want} but the labels of {where} range over [{lo}, {hi}]"
            )
    return classes


def check_first_example(source, key: str) -> None:
    """Decodes `source[0]`; a failure is one line naming `key`, the split and the example."""
    if len(source) == 0:
        raise UserError(f"{key}: split {source.split!r} of {source.name} has no examples")
    try:
        example_id = source.example_id(0)
    except Exception as e:  # any failure here is the data's
        raise UserError(f"{key}: split {source.split!r} of {source.name}: {_one_line(e)}") from e
    try:
        example = source[0]
    except Exception as e:  # PIL and the sources raise many types
        raise UserError(
            f"{key}: split {source.split!r} of {source.name}: first example {example_id!r}: {_one_line(e)}"
        ) from e
    image = np.asarray(example.get("image")) if isinstance(example, Mapping) else None
    if image is None or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        shape = None if image is None else tuple(image.shape)
        raise UserError(
            f"{key}: split {source.split!r} of {source.name}: first example {example_id!r} has image shape "
            f"{shape}; expected [H, W, 3]"
        )


def check_eval_splits(
    config, train_source=None, *, open_source: SourceOpener = get_source
) -> tuple[tuple[str, int], ...]:
    """Opens every split in `data.eval_splits`, compares its classes with the train split's and
    decodes its first example; returns (split, examples) for each."""
    spec, options = config.data.source, _options(config)
    splits = tuple(config.data.eval_splits)
    train_classes = tuple(getattr(train_source, "class_names", None) or ()) if train_source is not None else ()
    out = []
    for split in splits:
        try:
            src = open_source(spec, split, options)
        except Exception as e:  # a missing directory, an unknown split name, ...
            raise UserError(
                f"config.data.eval_splits: split {split!r} of data.source={spec!r} cannot be opened: {_one_line(e)} "
                f"(eval splits {list(splits)}; set --config.data.eval_splits=SPLIT,...)"
            ) from e
        root, train_root = getattr(src, "root", None), getattr(train_source, "root", None)
        if root is not None and root == train_root and split != config.data.train_split:
            raise UserError(
                f"config.data.eval_splits: split {split!r} of {spec} has no directory of its own ({root} has no "
                f"split directories), so it would evaluate on the training images: use the layout PATH/train + "
                f"PATH/{split}, or --config.data.eval_splits= (none)"
            )
        classes = tuple(getattr(src, "class_names", None) or ())
        if train_classes and classes and classes != train_classes:
            raise UserError(
                f"config.data.eval_splits: split {split!r} of {spec} has classes [{_short_list(classes)}] but the "
                f"train split {config.data.train_split!r} has [{_short_list(train_classes)}]"
            )
        check_first_example(src, "config.data.eval_splits")
        out.append((split, len(src)))
    return tuple(out)


# --------------------------------------------------------------------------- teacher


def check_teacher(config, source, store) -> tuple[str | None, int]:
    """The store (when the model reads a teacher) fits the train data; returns (store path or
    None, number of train examples without a map)."""
    if not config.model.interaction_constraint:
        return None, 0
    if store is None or store == "":
        raise UserError(
            "config.model.interaction_constraint is on but no teacher store is in use: "
            "set config.teacher.store (or config.teacher.auto='oracle')"
        )
    if isinstance(store, str):
        try:
            store = TeacherStore(store)
        except Exception as e:  # a missing or broken store directory
            raise UserError(f"config.teacher.store={store!r}: {_one_line(e)}") from e
    try:
        missing = check_compatible(store, source, allow_missing=bool(config.teacher.allow_missing))
    except (ValueError, KeyError) as e:
        raise UserError(f"config.teacher.store: {_one_line(e)}") from e
    return str(getattr(store, "path", store)), len(missing or ())


# --------------------------------------------------------------------------- all of it


def validate_for_training(
    config, mesh, source, store=None, *, teacher: bool = True, open_source: SourceOpener = get_source
) -> StartupReport:
    """All start-up checks (module docstring); raises UserError (one line) at the first failure.

    teacher=False skips the store check (and reports no store): for a caller that validates
    before it builds an automatic teacher store, then calls `check_teacher` on the result.
    open_source(spec, split, options) opens an evaluation split (default `get_source`); a task
    with sources of its own passes e.g. `lambda spec, split, options: task.source(config, split)`.
    """
    try:
        validate_config(config)
    except UserError:
        raise
    except (ValueError, KeyError) as e:
        raise UserError(_one_line(e)) from e
    n = check_batch_sizes(config, mesh)
    if task_name(config) == "classification":
        classes = check_num_classes(config, source)
    else:  # the task's own label checks are its business
        classes = tuple(getattr(source, "class_names", None) or ())
    check_first_example(source, "config.data.train_split")
    evals = check_eval_splits(config, source, open_source=open_source)
    store_path, missing = check_teacher(config, source, store) if teacher else (None, 0)
    return StartupReport(
        data=str(source.name),
        train_split=str(source.split),
        train_examples=len(source),
        classes=tuple(str(c) for c in classes),
        eval_splits=evals,
        teacher=store_path,
        teacher_missing=missing,
        batch_devices=n,
    )


__all__ = [
    "StartupReport",
    "batch_device_count",
    "check_batch_sizes",
    "check_eval_splits",
    "check_first_example",
    "check_num_classes",
    "check_teacher",
    "validate_for_training",
]
