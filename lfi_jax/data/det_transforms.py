"""Detection transforms: image, boxes and the dense teacher map moved together (SPEC section 7).

DETR's augmentation (`datasets/coco.py: make_coco_transforms`): a horizontal flip (p = 0.5),
then with p = 0.5 a resize of the short side to one of `scales` (long side at most
`max_size`), otherwise a resize to one of `crop_pre_scales`, a random crop of
`crop_size[0]..crop_size[1]` pixels per side, and a resize to one of `scales`; eval resizes to
`eval_size` / `max_size`. Sizes follow DETR's `get_size_with_aspect_ratio` exactly.

Geometry. A flip is applied to the example first (image columns, boxes and the teacher
entry's map and grid box mirrored); every resize and crop after it only changes a `View`: the
region of the (flipped) original image that the output shows and the output size. The image is
resampled once from that region (`lfi_jax.data.transforms.resize_image`: antialiased bilinear,
edge-aligned: one resample instead of DETR's chain, same geometry); boxes are mapped by the
same affine map and clipped to the region, and boxes left with no area are dropped (DETR's
crop rule). The teacher map is transferred with exact area overlaps (as in
`lfi_jax.data.transforms`) straight from its own grid onto the detector's feature grid over
the padded canvas: mass outside the region (cropped away, or padding) is dropped, cells the
detector calls padding get 0, and the rest is renormalised to sum to 1.

Instance masks (`masks=True`; records' "masks" [K, H, W], soft ink or {0, 1}) move with the
boxes: binarised at `MASK_THRESHOLD` (0.5) and sampled by nearest neighbour at PIXEL CENTRES,
output pixel (i, j) taking the source pixel under its centre, i.e. source row
floor(y0 + (i + 0.5) * (y1 - y0) / oh) (clamped to the image), the same edge-aligned geometry
as the image's resample (DETR resizes masks with torch's nearest, floor(i * in / out), which
sits up to half a source pixel up/left of that; nearest keeps them binary, where
bilinear-then-threshold would need the same 0.5 rule at every step of DETR's chain). A pixel
is in a transformed box's mask exactly when its centre lies in the source mask: for a
rectangle mask, when its centre lies in the transformed box. With `mask_stride` s > 1 the
targets live on a grid of s x s canvas pixels, sampled at the centre (i + 0.5) * s of each
cell (s = 4 is the mask head's own resolution, a deviation that saves memory at COCO
scale: [max_boxes, Hp / s, Wp / s] per image). Masks of dropped boxes are dropped with them.

Batching (`collate`): images padded at the bottom/right to `pad_hw` (fixed, for one compiled
step) or to the batch's largest size rounded up to `pad_multiple`; `pixel_mask` True on the
image; targets padded to `max_boxes` with a validity mask (normalised cxcywh boxes relative to
the unpadded output image, as DETR predicts them); rows added up to `batch_size` have
valid = 0; with masks, "masks" bool [B, max_boxes, Hp / s, Wp / s] (slot t the mask of box t,
zeros for padded slots, padded rows and canvas padding). The feature grid is ceil(pad / stride)
per side (a ResNet's stride-2 stages) and a cell is valid where the pixel nearest-sampled for it
is (PyTorch's `interpolate(mode="nearest")` of the pixel mask, as DETR/transformers downsample it): `valid_cells`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lfi_jax.data.transforms import MASS_EPS, overlap_matrix, resize_image
from lfi_jax.detection.types import DetectionTargets
from lfi_jax.teacher.types import Geometry, TeacherEntry

MASK_THRESHOLD = 0.5  # a soft instance mask (ink alpha) is the object where >= this
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DetAugment:
    """Train-time augmentation (DETR's defaults at COCO scale)."""

    hflip: bool = True
    scales: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    crop_prob: float = 0.5
    crop_pre_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)

    @classmethod
    def from_config(cls, cfg: Any) -> "DetAugment":
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join('data.augment.' + k for k in unknown)}")
        aug = cls(**d)
        if not aug.scales or min(aug.scales) <= 0:
            raise ValueError(f"config.data.augment.scales={aug.scales} must be positive sizes")
        lo, hi = aug.crop_size
        if not 0 < lo <= hi:
            raise ValueError(f"config.data.augment.crop_size={tuple(aug.crop_size)} must satisfy 0 < lo <= hi")
        return dataclasses.replace(aug, scales=tuple(int(s) for s in aug.scales),
                                   crop_pre_scales=tuple(int(s) for s in aug.crop_pre_scales),
                                   crop_size=(int(lo), int(hi)))


class View(NamedTuple):
    """The region `box` = (y0, x0, y1, x1) of the (flipped) original image shown at `out_hw`."""

    box: tuple[float, float, float, float]
    out_hw: tuple[int, int]

    @classmethod
    def identity(cls, hw: Sequence[int]) -> "View":
        h, w = int(hw[0]), int(hw[1])
        return cls((0.0, 0.0, float(h), float(w)), (h, w))

    def resized(self, hw: tuple[int, int]) -> "View":
        return View(self.box, (int(hw[0]), int(hw[1])))

    def cropped(self, top: int, left: int, h: int, w: int) -> "View":
        (y0, x0, y1, x1), (oh, ow) = self.box, self.out_hw
        sy, sx = (y1 - y0) / oh, (x1 - x0) / ow
        return View((y0 + top * sy, x0 + left * sx, y0 + (top + h) * sy, x0 + (left + w) * sx), (int(h), int(w)))


def resize_size(hw: Sequence[int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """DETR's `get_size_with_aspect_ratio`: the short side to `size`, the long side <= max_size."""
    h, w = int(hw[0]), int(hw[1])
    if max_size is not None:
        lo, hi = float(min(h, w)), float(max(h, w))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def sample_view(rng: np.random.Generator, image_hw: Sequence[int], aug: DetAugment) -> View:
    """A random DETR train view of an image of `image_hw` (after the flip, which `flip_example` does)."""
    view = View.identity(image_hw)
    if rng.random() < aug.crop_prob:
        view = view.resized(resize_size(view.out_hw, int(rng.choice(aug.crop_pre_scales))))
        oh, ow = view.out_hw
        lo, hi = aug.crop_size
        cw = int(rng.integers(min(lo, ow), min(ow, hi) + 1))
        ch = int(rng.integers(min(lo, oh), min(oh, hi) + 1))
        top, left = int(rng.integers(0, oh - ch + 1)), int(rng.integers(0, ow - cw + 1))
        view = view.cropped(top, left, ch, cw)
    return view.resized(resize_size(view.out_hw, int(rng.choice(aug.scales)), aug.max_size))


def eval_view(image_hw: Sequence[int], size: int, max_size: int | None = None) -> View:
    return View.identity(image_hw).resized(resize_size(image_hw, size, max_size))


# --------------------------------------------------------------------------- flip


def flip_entry(entry: TeacherEntry) -> TeacherEntry:
    """The teacher entry of the horizontally flipped image (map columns and grid box mirrored)."""
    (h, w), (y0, x0, y1, x1) = entry.geometry.image_hw, entry.geometry.box
    geo = Geometry((h, w), (y0, w - x1, y1, w - x0))
    return dataclasses.replace(entry, map=np.ascontiguousarray(np.asarray(entry.map)[:, ::-1]), geometry=geo)


def flip_example(example: Mapping[str, Any], entry: TeacherEntry | None) -> tuple[dict[str, Any], TeacherEntry | None]:
    """Image, boxes (y0, x0, y1, x1), instance masks and teacher entry, mirrored left-right."""
    ex = dict(example)
    w = ex["image"].shape[1]
    ex["image"] = np.ascontiguousarray(ex["image"][:, ::-1])
    b = np.asarray(ex["boxes"], np.float32).reshape(-1, 4)
    ex["boxes"] = np.stack([b[:, 0], w - b[:, 3], b[:, 2], w - b[:, 1]], -1).astype(np.float32)
    if ex.get("masks") is not None:
        ex["masks"] = np.ascontiguousarray(np.asarray(ex["masks"])[..., ::-1])
    return ex, None if entry is None else flip_entry(entry)


# --------------------------------------------------------------------------- boxes and teacher


def view_boxes(boxes: np.ndarray, view: View) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (y0, x0, y1, x1) of the source image in output pixels, clipped: (boxes [K, 4], keep [K])."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    (y0, x0, y1, x1), (oh, ow) = view.box, view.out_hw
    sy, sx = oh / (y1 - y0), ow / (x1 - x0)
    out = np.stack([(b[:, 0] - y0) * sy, (b[:, 1] - x0) * sx, (b[:, 2] - y0) * sy, (b[:, 3] - x0) * sx], -1)
    out = np.clip(out, 0.0, [oh, ow, oh, ow])
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out.astype(np.float32), keep


def mask_cells(n: int, stride: int = 1) -> int:
    """Cells of `stride` pixels along an image side of n pixels whose centre lies on the image."""
    return (2 * int(n) + int(stride) - 1) // (2 * int(stride))


def view_masks(masks: np.ndarray, view: View, stride: int = 1) -> np.ndarray:
    """Instance masks [K, H, W] of the (flipped) source image on the output image: bool
    [K, mask_cells(oh, s), mask_cells(ow, s)], nearest at pixel (cell) centres (module docstring)."""
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"instance masks {m.shape} must be [K, H, W]")
    (y0, x0, y1, x1), (oh, ow) = view.box, view.out_hw

    def index(n_out: int, lo: float, hi: float, n_src: int) -> np.ndarray:
        centres = (np.arange(mask_cells(n_out, stride), dtype=np.float64) + 0.5) * stride
        return np.clip(np.floor(lo + centres * ((hi - lo) / n_out)).astype(np.int64), 0, n_src - 1)

    rows, cols = index(oh, y0, y1, m.shape[1]), index(ow, x0, x1, m.shape[2])
    return np.ascontiguousarray(m[:, rows][:, :, cols] >= MASK_THRESHOLD)


def feature_grid(pad_hw: Sequence[int], stride: int = 32) -> tuple[int, int]:
    """The detector's feature grid of a padded canvas: ceil(size / stride) per side."""
    return math.ceil(int(pad_hw[0]) / stride), math.ceil(int(pad_hw[1]) / stride)


def valid_cells(out_hw: Sequence[int], pad_hw: Sequence[int], grid_hw: Sequence[int]) -> np.ndarray:
    """bool [gh, gw]: cells whose nearest-sampled pixel lies on the image.

    PyTorch's nearest rule, in its float32 arithmetic: pixel floor(i * float32(pad / g)).
    """

    def axis(n_out: int, pad: int, g: int) -> np.ndarray:
        scale = np.float32(pad) / np.float32(g)
        src = np.minimum(np.floor(np.arange(g, dtype=np.float32) * scale).astype(np.int64), pad - 1)
        return src < n_out

    rows, cols = axis(out_hw[0], pad_hw[0], grid_hw[0]), axis(out_hw[1], pad_hw[1], grid_hw[1])
    return rows[:, None] & cols[None, :]


def _axis_transfer(n_dst: int, pad: int, out_n: int, b0: float, b1: float, c0: float, c1: float, n_cells: int,
                   limit: float) -> np.ndarray:
    """[n_dst, n_cells] share of each teacher cell's mass landing in each feature cell (one axis).

    Feature cell i spans [i, i + 1) * pad / n_dst output pixels = b0 + that * (b1 - b0) / out_n in
    source pixels; only source [max(b0, 0), min(b1, limit)] is on the output image.
    """
    e = np.arange(n_dst + 1, dtype=np.float64) * (pad / n_dst)
    src = b0 + e * ((b1 - b0) / out_n)
    src = np.clip(src, max(b0, 0.0), min(b1, limit))
    cells = c0 + (c1 - c0) / n_cells * np.arange(n_cells + 1, dtype=np.float64)
    return overlap_matrix(src, cells) / ((c1 - c0) / n_cells)


def teacher_on_grid(
    entry: TeacherEntry, view: View, pad_hw: Sequence[int], grid_hw: Sequence[int]
) -> tuple[np.ndarray, bool]:
    """The entry (of the already flipped image) on the feature grid of the padded canvas.

    Returns (map float32 [gh, gw], ok): the map sums to 1 over `valid_cells` and is 0 elsewhere;
    (zeros, False) when the view keeps no teacher mass or the entry is degenerate.
    """
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    m = np.asarray(entry.map, np.float64)
    if entry.degenerate or m.ndim != 2:
        return np.zeros((gh, gw), np.float32), False
    (h, w), (ty0, tx0, ty1, tx1) = entry.geometry.image_hw, entry.geometry.box
    (y0, x0, y1, x1), (oh, ow) = view.box, view.out_hw
    ay = _axis_transfer(gh, int(pad_hw[0]), oh, y0, y1, ty0, ty1, m.shape[0], float(h))
    ax = _axis_transfer(gw, int(pad_hw[1]), ow, x0, x1, tx0, tx1, m.shape[1], float(w))
    out = (ay @ m @ ax.T) * valid_cells((oh, ow), pad_hw, (gh, gw))
    total = out.sum()
    if not np.isfinite(total) or total <= MASS_EPS:
        return np.zeros((gh, gw), np.float32), False
    return (out / total).astype(np.float32), True


# --------------------------------------------------------------------------- examples and batches


class DetExample(NamedTuple):
    """One transformed, unpadded example (collate pads it)."""

    image: np.ndarray  # float32 [oh, ow, 3], normalised
    boxes: np.ndarray  # float32 [K, 4] normalised cxcywh of the output image
    labels: np.ndarray  # int32 [K]
    view: View
    entry: TeacherEntry | None  # the (flipped) teacher entry
    image_id: int
    orig_size: tuple[int, int]
    masks: np.ndarray | None = None  # bool [K, mh, mw] (`view_masks`) when asked for


def transform_detection(
    example: Mapping[str, Any],
    entry: TeacherEntry | None,
    *,
    rng: np.random.Generator | None = None,
    augment: DetAugment | None = None,
    eval_size: int = 800,
    max_size: int | None = 1333,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    masks: bool = False,
    mask_stride: int = 1,
) -> DetExample:
    """Train (`augment` and `rng` given): DETR's flip + resize/crop; eval: the resize to eval_size.
    masks: also carry the record's instance masks (`view_masks`, on cells of `mask_stride` px)."""
    image = np.asarray(example["image"])
    if masks:
        _check_masks(example, image.shape[:2])
    if augment is not None:
        if rng is None:
            raise ValueError("transform_detection: train augmentation needs an rng")
        if augment.hflip and rng.random() < 0.5:
            example, entry = flip_example(example, entry)
            image = example["image"]
        view = sample_view(rng, image.shape[:2], augment)
    else:
        view = eval_view(image.shape[:2], eval_size, max_size)
    img = resize_image(image, view.box, view.out_hw)
    img = (img - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    boxes, keep = view_boxes(example["boxes"], view)
    boxes = boxes[keep]
    oh, ow = view.out_hw
    cxcywh = np.stack(
        [(boxes[:, 1] + boxes[:, 3]) / 2 / ow, (boxes[:, 0] + boxes[:, 2]) / 2 / oh,
         (boxes[:, 3] - boxes[:, 1]) / ow, (boxes[:, 2] - boxes[:, 0]) / oh], -1
    ).astype(np.float32)
    labels = np.asarray(example["labels"], np.int32).reshape(-1)[keep]
    iid = int(example.get("image_id", example.get("id", -1)))
    orig = tuple(int(s) for s in example.get("orig_size", image.shape[:2]))
    m = view_masks(example["masks"], view, mask_stride)[keep] if masks else None
    return DetExample(np.ascontiguousarray(img, np.float32), cxcywh, labels, view, entry, iid, orig, m)


def _check_masks(example: Mapping[str, Any], hw: tuple[int, ...]) -> None:
    """The record's masks are [K, H, W] for its K boxes and H x W image (errors name the example)."""
    eid = example.get("image_id", example.get("id", "?"))
    m = example.get("masks")
    if m is None:
        raise ValueError(f"example {eid!r}: instance masks asked for (config.data.masks) but the record has no "
                         "'masks' (a coco source needs data.options.masks=True)")
    k = len(np.asarray(example["boxes"]).reshape(-1, 4))
    shape = tuple(np.shape(m))
    if shape != (k, int(hw[0]), int(hw[1])):
        raise ValueError(f"example {eid!r}: masks of shape {shape} for {k} boxes on a {hw[0]}x{hw[1]} image "
                         f"(expected {(k, int(hw[0]), int(hw[1]))})")


def collate(
    examples: Sequence[DetExample],
    *,
    max_boxes: int,
    stride: int = 32,
    pad_hw: Sequence[int] | None = None,
    pad_multiple: int = 32,
    batch_size: int | None = None,
    mask_stride: int = 1,
) -> dict[str, np.ndarray]:
    """Pad images and targets into one batch (see the module docstring for the fields); the
    batch has "masks" when the examples carry them (all or none)."""
    n = len(examples)
    bs = n if batch_size is None else int(batch_size)
    if n == 0 or n > bs:
        raise ValueError(f"collate: {n} examples for a batch of {bs}")
    if pad_hw is None:
        hmax = max(e.image.shape[0] for e in examples)
        wmax = max(e.image.shape[1] for e in examples)
        pad_hw = (-(-hmax // pad_multiple) * pad_multiple, -(-wmax // pad_multiple) * pad_multiple)
    ph, pw = int(pad_hw[0]), int(pad_hw[1])
    gh, gw = feature_grid((ph, pw), stride)
    out = {
        "image": np.zeros((bs, ph, pw, 3), np.float32),
        "pixel_mask": np.zeros((bs, ph, pw), bool),
        "labels": np.zeros((bs, max_boxes), np.int32),
        "boxes": np.tile(np.float32([0.5, 0.5, 1.0, 1.0]), (bs, max_boxes, 1)),
        "box_valid": np.zeros((bs, max_boxes), bool),
        "teacher": np.zeros((bs, gh * gw), np.float32),
        "teacher_mask": np.zeros((bs,), np.float32),
        "key_mask": np.zeros((bs, gh * gw), bool),
        "image_id": np.zeros((bs,), np.int64),
        "orig_size": np.ones((bs, 2), np.int32),
        "size": np.ones((bs, 2), np.int32),
        "valid": np.zeros((bs,), np.float32),
    }
    with_masks = [e.masks is not None for e in examples]
    if any(with_masks):
        if not all(with_masks):
            missing = [e.image_id for e in examples if e.masks is None]
            raise ValueError(f"collate: image ids {missing[:5]} carry no masks, others of the batch do")
        if ph % mask_stride or pw % mask_stride:
            raise ValueError(f"the pad size {ph}x{pw} is not divisible by config.data.mask_stride={mask_stride}")
        out["masks"] = np.zeros((bs, max_boxes, ph // mask_stride, pw // mask_stride), bool)
    for b, e in enumerate(examples):
        oh, ow = e.image.shape[:2]
        if oh > ph or ow > pw:
            raise ValueError(f"image id {e.image_id}: transformed size {oh}x{ow} exceeds the pad size {ph}x{pw}")
        k = len(e.boxes)
        if k > max_boxes:
            raise ValueError(f"image id {e.image_id}: {k} boxes after transforms exceed max_boxes={max_boxes}")
        out["image"][b, :oh, :ow] = e.image
        out["pixel_mask"][b, :oh, :ow] = True
        out["labels"][b, :k] = e.labels
        out["boxes"][b, :k] = e.boxes
        out["box_valid"][b, :k] = True
        if e.masks is not None:
            mh, mw = e.masks.shape[1:]
            if len(e.masks) != k or mh != mask_cells(oh, mask_stride) or mw != mask_cells(ow, mask_stride):
                raise ValueError(f"image id {e.image_id}: masks {e.masks.shape} do not fit {k} boxes on a {oh}x{ow} "
                                 f"image at mask_stride={mask_stride}")
            out["masks"][b, :k, :mh, :mw] = e.masks
        out["key_mask"][b] = valid_cells((oh, ow), (ph, pw), (gh, gw)).reshape(-1)
        if e.entry is not None:
            t, ok = teacher_on_grid(e.entry, e.view, (ph, pw), (gh, gw))
            out["teacher"][b], out["teacher_mask"][b] = t.reshape(-1), float(ok)
        out["image_id"][b] = e.image_id
        out["orig_size"][b] = e.orig_size
        out["size"][b] = (oh, ow)
        out["valid"][b] = 1.0
    return out


def batch_targets(batch: Mapping[str, Any]) -> DetectionTargets:
    """The padded targets of a collated batch."""
    return DetectionTargets(batch["labels"], batch["boxes"], batch["box_valid"])


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MASK_THRESHOLD",
    "DetAugment",
    "DetExample",
    "View",
    "batch_targets",
    "collate",
    "eval_view",
    "feature_grid",
    "flip_entry",
    "flip_example",
    "mask_cells",
    "resize_size",
    "sample_view",
    "teacher_on_grid",
    "transform_detection",
    "valid_cells",
    "view_boxes",
    "view_masks",
]
