"""Dense maps of a detection run (DETR / I-DETR, its segmentation and Conditional-DETR variants)
for `python -m lfi_jax.visualize maps`: per image the teacher's dense map C_vlm and the
decoder's cross-attention, each on the feature grid over the padded image.

The decoder map of an image is the interaction attention C_agt of I-DETR's decoder
cross-attention (C_vfm, the plain cross-attention, for a DETR without interaction queries),
averaged over heads and object queries over the valid (unpadded) keys and renormalised: the
student map a_l that the `query_mean` alignment loss compares with C_vlm (SPEC section 7). It
is read from the model itself (`model(pixels, mask, attn_rows=True).attn_rows`, every layer;
for a model without that switch, the alignment rows `agt_rows` of the align layers, which need
the interaction constraint on).

The teacher map: from `--teacher STORE` if given, else from the run's own store where that
store covers the split; else, for an `oracle_dense` store (the embedded benchmark's), it is
recomputed from the image's boxes / masks with the store's settings. A shuffled store (the
control) is not recomputed (its maps belong to other images). The image goes through the eval
transform of the run's data config (resize to `data.eval_size`, pad to `data.pad_hw`) and the
map onto the feature grid exactly as the training pipeline does (`det_transforms.collate`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.data.det_pipeline import DetSettings
from lfi_jax.data.det_transforms import collate, feature_grid, transform_detection
from lfi_jax.data.sources import get_source
from lfi_jax.eval.examples import run_store_path
from lfi_jax.teacher.oracle_dense import dense_entry
from lfi_jax.teacher.provenance import check_compatible
from lfi_jax.teacher.store import TeacherStore

DENSE_TASKS = ("detection", "segmentation")


def is_dense(run) -> bool:
    return run.task is not None and run.task.name in DENSE_TASKS


def data_settings(run) -> DetSettings:
    """The run's detection data settings (the stride from its backbone)."""
    d = run.config.data.to_dict()
    d["stride"] = run.mcfg.backbone.stride
    return DetSettings(d)


class DenseTeacher:
    """Per-image dense teacher entries for a split; `describe` says where they come from."""

    def __init__(self, run, split: str, store_path: str | None = None):
        self.store, self.options = None, None
        data = run.config.data
        path = store_path or run_store_path(run)
        if store_path:
            self.store, self.describe = TeacherStore(store_path), f"store {store_path}"
        elif path:
            store = TeacherStore(path)
            prov = store.provenance
            try:
                check_compatible(store, spec=data.source, split=split, options=data.options.to_dict())
                covers = True
            except ValueError:
                covers = False
            if covers:
                self.store, self.describe = store, f"store {path}"
            elif prov.backend == "oracle_dense" and "shuffled" not in prov.teacher:
                t = prov.teacher
                self.options = dict(grid=tuple(prov.grid), geometry=t.get("geometry", "full"),
                                    target=t.get("target", "auto"), instance_weight=t.get("instance_weight", "equal"),
                                    seed=t.get("seed", 0), **(prov.noise or {}))
                self.describe = f"oracle_dense recomputed with the settings of store {path}"
            else:
                what = "a shuffled copy (the control)" if "shuffled" in prov.teacher else f"a {prov.backend} store"
                self.describe = f"none: the run's store {path} is {what} of {prov.data}/{prov.split}, not of {split}"
        elif not run.config.model.interaction_constraint:
            self.describe = "none: the run reads no teacher (model.interaction_constraint is off)"
        else:
            self.describe = "none: the run's teacher store is not there"

    def get(self, example: dict):
        if self.store is not None:
            return self.store.get(str(example["id"]))
        if self.options is not None:
            return dense_entry(example, self.options)
        return None


@dataclasses.dataclass
class DenseExamples:
    """n eval-transformed images: `image` [n, H, W, 3] normalised, `pixel_mask` [n, H, W],
    `display` [n, H, W, 3] uint8 (the padded canvas), `teacher` [n, gh*gw] with `teacher_mask`
    [n], `boxes` (per image [k, 4] pixel xyxy on the canvas) and `labels`, `ids`, `grid`."""

    image: np.ndarray
    pixel_mask: np.ndarray
    display: np.ndarray
    teacher: np.ndarray
    teacher_mask: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    ids: list[str]
    sizes: np.ndarray
    grid: tuple[int, int]
    class_names: tuple[str, ...]


def pick(n_source: int, n: int, start: int | None, seed: int) -> list[int]:
    """n consecutive indices from `start`, else n indices drawn with `seed` (sorted)."""
    if start is not None:
        return list(range(start, min(start + n, n_source)))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_source, size=min(n, n_source), replace=False))


def to_pixels(boxes: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Normalised cxcywh [k, 4] of an h x w (unpadded) image -> pixel xyxy."""
    h, w = float(size[0]), float(size[1])
    cx, cy, bw, bh = (np.asarray(boxes, np.float64)[:, i] for i in range(4))
    return np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)


def load_dense_examples(run, split: str, idx: Sequence[int], teacher: DenseTeacher) -> DenseExamples:
    s = data_settings(run)
    data = run.config.data
    source = get_source(data.source, split, data.options.to_dict())
    exs = []
    for i in idx:
        ex = source[int(i)]
        exs.append(transform_detection(ex, teacher.get(ex), eval_size=s.eval_size, max_size=s.max_size,
                                       mean=s.mean, std=s.std))
    max_boxes = max([s.max_boxes] + [len(e.boxes) for e in exs])
    b = collate(exs, max_boxes=max_boxes, stride=s.stride, pad_hw=s.pad_hw)
    disp = b["image"] * np.asarray(s.std, np.float32) + np.asarray(s.mean, np.float32)
    disp = (np.clip(disp, 0.0, 1.0) * 255).round().astype(np.uint8) * b["pixel_mask"][..., None]
    gh, gw = feature_grid(s.pad_hw, s.stride)
    v = b["box_valid"]
    return DenseExamples(
        b["image"], b["pixel_mask"], disp, b["teacher"], b["teacher_mask"],
        [to_pixels(b["boxes"][r][v[r]], b["size"][r]) for r in range(len(exs))],
        [b["labels"][r][v[r]] for r in range(len(exs))], [str(source.example_id(int(i))) for i in idx],
        b["size"], (gh, gw), tuple(source.class_names),
    )


def _takes_attn_rows(model) -> bool:
    return "attn_rows" in inspect.signature(type(model).__call__).parameters


def decoder_maps(run, ex: DenseExamples, layer: int | str = -1) -> dict[str, Any]:
    """{"map": [n, gh*gw] the decoder map (mean over heads and queries, valid keys, renormalised),
    "kind": "C_agt" | "C_vfm", "layers": its layer count, "scores" [n, Q], "classes" [n, Q] and
    "boxes" [n, Q, 4] (pixel xyxy) of the predictions}."""
    graphdef, params = run.graphdef, run.params
    full = _takes_attn_rows(nnx.merge(graphdef, params))

    @jax.jit
    def fwd(params, x, m):
        model = nnx.merge(graphdef, params)
        out = model(x, m, attn_rows=True) if full else model(x, m)
        out = getattr(out, "detr", out)  # DetrForSegmentation wraps the DETR's outputs
        rows = out.attn_rows if full else (None if out.agt_rows is None else out.agt_rows.mean(axis=2))
        return out.logits, out.pred_boxes, rows, out.key_mask

    logits, boxes, rows, key_mask = jax.device_get(fwd(params, jnp.asarray(ex.image), jnp.asarray(ex.pixel_mask)))
    if rows is None:
        raise ValueError(f"{run.workdir}: this model returns no cross-attention rows (no attn_rows switch and "
                         "model.interaction_constraint off)")
    if rows.shape[-1] != ex.grid[0] * ex.grid[1]:
        raise ValueError(f"{run.workdir}: the model's {rows.shape[-1]} keys differ from the {ex.grid} feature grid")
    n_layers = rows.shape[1]
    r = rows.mean(axis=1) if layer == "mean" else rows[:, int(layer)]
    m = np.where(key_mask, r.mean(axis=1), 0.0).astype(np.float64)
    m = m / np.maximum(m.sum(-1, keepdims=True), 1e-12)
    c = run.mcfg.num_classes
    if logits.shape[-1] == c + 1:  # softmax with a no-object class (DETR)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        prob = (e / e.sum(-1, keepdims=True))[..., :-1]
    else:  # sigmoid per class (Conditional-DETR)
        prob = 1.0 / (1.0 + np.exp(-logits))
    px = np.stack([to_pixels(boxes[i], ex.sizes[i]) for i in range(len(boxes))])
    kind = "C_agt" if run.mcfg.interaction_queries else "C_vfm"
    return {"map": m, "kind": kind, "layers": n_layers, "scores": prob.max(-1), "classes": prob.argmax(-1),
            "boxes": px}


__all__ = ["DenseExamples", "DenseTeacher", "decoder_maps", "is_dense", "load_dense_examples", "pick"]
