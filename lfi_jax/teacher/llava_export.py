"""The `llava` backend of `python -m lfi_jax.teacher.export` (options, provenance, export).

`export_backend(source, indices, options)` reads the examples, looks up their class names and
boxes and returns [(example_id, TeacherEntry)]; the teacher is loaded once per process for a
given set of options and reused across shards. `precheck(options)` gives the provenance
fields known without loading the model (the export compares them with an existing store
first). torch is imported only when a teacher is built (lfi_jax.teacher.llava_runtime).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lfi_jax.teacher import llava_conv as conv
from lfi_jax.teacher.llava import LlavaTeacher
from lfi_jax.teacher.progress import Progress
from lfi_jax.teacher.types import TeacherEntry

TEACHER_OPTIONS = {
    # option name: (default, help)
    "model": ("llava-hf/llava-1.5-7b-hf", "hub id or local directory of a LLaVA-1.5-style checkpoint"),
    "revision": (None, "hub revision (branch, tag or commit)"),
    "dtype": ("auto", "auto | float32 | float16 | bfloat16 (auto: bf16 on GPU, fp32 on CPU)"),
    "device": ("auto", "auto | cpu | cuda | cuda:<i>"),
    "layers": ("all", "language-model layers to average: all | 0,5 | 16:32"),
    "task": ("classify", "classify (Eq. 11) | dense (Eq. 12, boxes drawn on the image)"),
    "prompt": (None, "prompt template (default per task; dense uses {tgt_obj})"),
    "response_template": (None, "response template (default per task)"),
    "background": ("fixed", "fixed | generate (greedy background words from the VLM)"),
    "background_words": (conv.DEFAULT_BACKGROUND_WORDS, "background words for --background=fixed"),
    "background_max_tokens": (8, "max new tokens for --background=generate"),
    "box_color": ("red", "dense: box colour (name, #rrggbb, r,g,b)"),
    "box_width": (0, "dense: box line width in pixels (0: 1% of the long side)"),
    "batch_size": (8, "images per forward pass"),
    "pad": ("square", "square (pad to a square first, as the original LLaVA-1.5; the default) | processor "
                      "(the checkpoint's own preprocessing: llava-hf resizes the short side and centre-crops)"),
}

_CACHE: dict[str, Any] = {}


def _opt(options, key: str, default=None):
    if options is None:
        return default
    for k in (key, key.replace("_", "-")):
        if isinstance(options, Mapping):
            if k in options and options[k] is not None:
                return options[k]
        elif getattr(options, k, None) is not None:
            return getattr(options, k)
    return default


def teacher_from_options(options):
    """The LlavaTeacher for these export options (loaded once per process and reused)."""
    kwargs = {k: _opt(options, k, d) for k, (d, _) in TEACHER_OPTIONS.items()}
    key = json.dumps(kwargs, sort_keys=True, default=str)
    if key not in _CACHE:
        for old in _CACHE.values():
            old.close()
        _CACHE.clear()
        model = kwargs.pop("model")
        _CACHE[key] = LlavaTeacher(model, **kwargs)
    return _CACHE[key]


def provenance(options) -> dict[str, Any]:
    return teacher_from_options(options).provenance()


def precheck(options) -> dict[str, Any]:
    """The provenance fields these options fix before the model loads (same values as
    `LlavaTeacher.provenance` gives for them)."""
    o = {k: _opt(options, k, d) for k, (d, _) in TEACHER_OPTIONS.items()}
    model = str(o["model"])
    task = o["task"]
    prompt = o["prompt"]
    if prompt is None:
        prompt = conv.CLASSIFY_PROMPT if task == "classify" else conv.DENSE_PROMPT
    response = o["response_template"]
    if response is None:
        response = conv.CLASSIFY_RESPONSE if task == "classify" else conv.DENSE_RESPONSE
    return {
        "teacher": "llava",
        "model": os.path.abspath(model) if os.path.isdir(model) else model,
        "revision": o["revision"],
        "task": task,
        "prompt": prompt,
        "response_template": response,
        "background": o["background"],
        "background_words": " ".join(str(o["background_words"]).split()),
        "image_pad": o["pad"],
    }


def _class_names_for(source, ex: dict, teacher, where: str):
    names = list(getattr(source, "class_names", None) or [])

    def name_of(label):
        try:
            lab = int(label)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {label!r} is not an integer") from None
        if not 0 <= lab < len(names) or not str(names[lab]).strip():
            raise ValueError(
                f"{where}: no class name for label {lab} (the source has {len(names)} class names)"
            )
        return str(names[lab])

    if "label" not in ex:
        raise ValueError(f"{where}: the example has no label, so no class name for the prompt")
    if teacher.task == "dense" and ex.get("box_labels") is not None:
        return [name_of(lab) for lab in np.asarray(ex["box_labels"]).reshape(-1)]
    return name_of(ex["label"])


def export_backend(source, indices: Sequence[int], options) -> list[tuple[str, TeacherEntry]]:
    """The export registry's `llava` backend: (source, indices, options) -> [(id, entry)]."""
    teacher = teacher_from_options(options)
    out: list[tuple[str, TeacherEntry]] = []
    indices = list(indices)
    progress = Progress(len(indices)) if _opt(options, "progress", True) else None
    try:
        _export_batches(source, indices, teacher, out, progress)
    finally:
        if progress:
            progress.close()  # an error line after this starts on its own line
    return out


def _export_batches(source, indices: list[int], teacher, out: list, progress) -> None:
    for s in range(0, len(indices), teacher.batch_size):
        chunk = indices[s : s + teacher.batch_size]
        ids, images, names, boxes = [], [], [], []
        for i in chunk:
            try:
                eid = source.example_id(i)
            except Exception as e:
                raise ValueError(f"{getattr(source, 'name', 'source')}: index {i}: {e}") from e
            where = f"{getattr(source, 'name', 'source')}/{getattr(source, 'split', '?')} example {eid}"
            try:
                ex = source[i]
            except Exception as e:
                raise ValueError(f"{where}: cannot read the example: {type(e).__name__}: {e}") from e
            ids.append(eid)
            images.append(ex["image"])
            names.append(_class_names_for(source, ex, teacher, where))
            boxes.append(ex.get("boxes"))
        entries = teacher.maps(images, names, boxes if teacher.task == "dense" else None, ids=ids)
        out.extend(zip(ids, entries))
        if progress:
            progress.update(len(chunk))


__all__ = ["TEACHER_OPTIONS", "export_backend", "precheck", "provenance", "teacher_from_options"]
