"""Instance masks: DETR's mask postprocessing, COCO RLE encoding/decoding, annotation checks.

Postprocessing (DETR's `PostProcessSegm`), in two halves:

- `mask_detections(logits, boxes, mask_logits, padded_size, top_k=, threshold=0.5)` (jnp,
  jittable: the eval step runs it on device): the detections of `postprocess` (same queries,
  same order) and, for each, its mask logits [h, w] resized bilinearly (PyTorch's
  align_corners=False) to the padded input canvas (Hp, Wp) and thresholded:
  sigmoid(x) > threshold, a bool [B, K, Hp, Wp].
- `masks_to_original(masks, image_size, orig_size)` (numpy, host): one image's masks cropped
  to the unpadded network input (h_in, w_in) and resized to the ORIGINAL image size with
  PyTorch's `interpolate(mode="nearest")` rule (source index floor(dst * in / out), in
  float32), as DETR does.

The eval step of a trainer runs on the padded batch and gathers its outputs onto the host, so
it returns the chosen queries' mask logits at the head's resolution (`select_mask_logits`,
jnp: `mask_detections` without the resize) rather than masks on the padded canvas (at COCO
scale [B, 100, 1333, 1333]). `masks_from_logits(mask_logits [K, h, w], padded_size,
image_size, orig_size)` (numpy, host) then computes exactly what `mask_detections` +
`masks_to_original` compute, but only at the pixels that survive: the bilinear resize is
linear, so each original pixel's value is (row weights) @ logits @ (column weights)^T, with
the weights of the padded-canvas pixel that the nearest rule picks for it.

RLE (pycocotools' compressed format, `counts` as a str so results are JSON):
`encode_masks(masks [K, H, W])` -> list of {"size": [H, W], "counts": str};
`decode_rle(rle, (H, W), where)` -> uint8 [H, W]; `decode_masks` the inverse of
`encode_masks`. An RLE whose "size" is not the image's (or whose uncompressed counts do not
add up to H * W) is an error naming `where` (file, image id, annotation id).

Annotations: `annotation_rle(ann, height, width, where)` -> one compressed RLE from COCO's
three segmentation forms (a list of polygons, an uncompressed RLE with list counts, a
compressed RLE). Polygons: pycocotools rasterises each polygon and keeps the part inside the
image, so a polygon that sticks out of the image is CLIPPED to it (the pixels inside are
exact; COCO's own polygons stray past the border by a fraction of a pixel). A polygon that
lies entirely outside the image (all its vertices beyond the same border) is REFUSED, as are polygons
with an odd number of coordinates, fewer than 3 points or non-finite coordinates: each a
ValueError naming `where`.

`check_segmentation(ann, height, width, where)` makes the same checks without rasterising
(polygon bounds, an RLE's size; a compressed string's run total is checked when it is
decoded): a source can check every annotation when it opens.

`to_coco_segm_results` turns one batch of `mask_detections` outputs into COCO results with a
"segmentation" RLE (and the box of `to_coco_results`) for `lfi_jax.eval.coco_segm`;
`to_coco_segm_results_from_logits` does the same from `select_mask_logits` outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lfi_jax.detection.postprocess import Detections, postprocess, to_coco_results
from lfi_jax.detection.seg_losses import resize_bilinear

RLE = dict[str, Any]  # {"size": [H, W], "counts": str | bytes | list[int]}


def _mask_utils():
    """pycocotools' mask module, imported when first needed: the classification path (the main
    job) imports this module through the data sources and must not need the detection extra."""
    try:
        from pycocotools import mask
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("instance masks need pycocotools: pip install 'lfi-jax[detection]'") from e
    return mask


# --------------------------------------------------------------------------- postprocessing


def select_mask_logits(
    logits: jax.Array, boxes: jax.Array, mask_logits: jax.Array, *, top_k: int | None = None
) -> tuple[Detections, jax.Array]:
    """(Detections of `postprocess`, the same queries' mask logits [B, K, h, w] in the same order)."""
    b, q = logits.shape[:2]
    if mask_logits.ndim != 4 or mask_logits.shape[:2] != (b, q):
        raise ValueError(f"mask_logits {mask_logits.shape} must be [B, Q, h, w] with [B, Q] = {(b, q)} of the logits")
    det = postprocess(logits, boxes, top_k=top_k)
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1].max(-1)
    _, idx = jax.lax.top_k(scores, det.scores.shape[-1])  # postprocess's query order
    return det, jax.vmap(lambda m, i: m[i])(mask_logits, idx)  # [B, K, h, w]


def mask_detections(
    logits: jax.Array,
    boxes: jax.Array,
    mask_logits: jax.Array,
    padded_size: tuple[int, int],
    *,
    top_k: int | None = None,
    threshold: float = 0.5,
) -> tuple[Detections, jax.Array]:
    """(Detections of `postprocess`, bool masks [B, K, Hp, Wp] of the same queries in the same order)."""
    det, chosen = select_mask_logits(logits, boxes, mask_logits, top_k=top_k)
    up = resize_bilinear(chosen, tuple(int(s) for s in padded_size))
    return det, jax.nn.sigmoid(up) > threshold


def _nearest_index(out: int, inp: int) -> np.ndarray:
    scale = np.float32(inp) / np.float32(out)
    idx = np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, inp - 1)


def masks_to_original(masks: np.ndarray, image_size: Sequence[int], orig_size: Sequence[int]) -> np.ndarray:
    """bool [K, Hp, Wp] on the padded canvas -> bool [K, H0, W0] (crop to image_size, nearest resize)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} must be [K, Hp, Wp]")
    h_in, w_in = (int(s) for s in image_size)
    h0, w0 = (int(s) for s in orig_size)
    if not (0 < h_in <= masks.shape[1] and 0 < w_in <= masks.shape[2]) or h0 <= 0 or w0 <= 0:
        raise ValueError(f"image size {h_in}x{w_in} does not fit the padded masks {masks.shape[1:]} "
                         f"(or original size {h0}x{w0} is empty)")
    crop = masks[:, :h_in, :w_in].astype(bool)
    return crop[:, _nearest_index(h0, h_in)][:, :, _nearest_index(w0, w_in)]


def _bilinear_rows(n_out: int, n_in: int, dst: np.ndarray) -> np.ndarray:
    """[len(dst), n_in]: PyTorch's bilinear (align_corners=False) weights of output pixels `dst`."""
    src = np.maximum((dst.astype(np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    w = np.zeros((len(dst), n_in), np.float64)
    r = np.arange(len(dst))
    np.add.at(w, (r, i0), 1.0 - frac)
    np.add.at(w, (r, i1), frac)
    return w


def masks_from_logits(
    mask_logits: np.ndarray,
    padded_size: Sequence[int],
    image_size: Sequence[int],
    orig_size: Sequence[int],
    *,
    threshold: float = 0.5,
) -> np.ndarray:
    """float [K, h, w] mask logits of one image -> bool [K, H0, W0] at its original size.

    The same masks as `mask_detections` (bilinear to `padded_size`, sigmoid > threshold)
    followed by `masks_to_original` (crop to `image_size`, nearest to `orig_size`); see the
    module docstring.
    """
    x = np.asarray(mask_logits, np.float32)
    if x.ndim != 3:
        raise ValueError(f"mask_logits {x.shape} must be [K, h, w]")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"mask threshold {threshold} must lie in (0, 1)")
    hp, wp = (int(s) for s in padded_size)
    h_in, w_in = (int(s) for s in image_size)
    h0, w0 = (int(s) for s in orig_size)
    if not (0 < h_in <= hp and 0 < w_in <= wp) or h0 <= 0 or w0 <= 0:
        raise ValueError(f"image size {h_in}x{w_in} does not fit the padded size {hp}x{wp} "
                         f"(or original size {h0}x{w0} is empty)")
    ry = _bilinear_rows(hp, x.shape[1], _nearest_index(h0, h_in)).astype(np.float32)  # [H0, h]
    rx = _bilinear_rows(wp, x.shape[2], _nearest_index(w0, w_in)).astype(np.float32)  # [W0, w]
    values = ry[None] @ x @ rx.T[None]  # [K, H0, W0]
    return values > np.float32(np.log(threshold / (1.0 - threshold)))


# --------------------------------------------------------------------------- RLE


def encode_masks(masks: np.ndarray) -> list[RLE]:
    """Binary masks [K, H, W] -> compressed RLEs ({"size": [H, W], "counts": str})."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} must be [K, H, W]")
    if masks.shape[0] == 0:
        return []
    rles = _mask_utils().encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    out = []
    for r in rles:
        counts = r["counts"]
        out.append({"size": [int(s) for s in r["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes)
                    else counts})
    return out


def _rle_size(rle: Mapping[str, Any], where: str) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in rle["size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: an RLE needs 'size': [height, width] and 'counts'") from None
    if "counts" not in rle:
        raise ValueError(f"{where}: an RLE needs 'size': [height, width] and 'counts'")
    return h, w


def string_counts(s: str) -> list[int]:
    """The run lengths of a compressed RLE string (pycocotools' `rleFrString`, in Python)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def compress_rle(rle: Mapping[str, Any], size: Sequence[int], where: str, *, check_counts: bool = True) -> RLE:
    """A compressed RLE (counts a str) checked against the image size (H, W); uncompressed ones are compressed.

    check_counts=False checks a compressed string's "size" only, not that its runs add up to
    H * W (parsing the string in Python costs about a microsecond per run: COCOeval of many
    results from `encode_masks` skips it; decoding always checks, pycocotools' decoder does not).
    """
    h, w = (int(s) for s in size)
    rh, rw = _rle_size(rle, where)
    if (rh, rw) != (h, w):
        raise ValueError(f"{where}: RLE of size {rh}x{rw} (height x width) for a {h}x{w} image")
    counts = rle["counts"]
    if isinstance(counts, list):
        if any((not isinstance(c, (int, np.integer))) or c < 0 for c in counts) or sum(counts) != h * w:
            raise ValueError(f"{where}: uncompressed RLE counts must be non-negative integers summing to "
                             f"{h}x{w} = {h * w} pixels (they sum to {sum(c for c in counts if isinstance(c, int))})")
        counts = _mask_utils().frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if not isinstance(counts, str):
        raise ValueError(f"{where}: RLE counts must be a string or a list of integers, not {type(counts).__name__}")
    if not check_counts:
        return {"size": [h, w], "counts": counts}
    try:
        runs = string_counts(counts)
    except (IndexError, ValueError):
        raise ValueError(f"{where}: corrupt RLE counts string") from None
    if any(c < 0 for c in runs) or sum(runs) != h * w:
        raise ValueError(f"{where}: RLE counts cover {sum(runs)} pixels, not {h}x{w} = {h * w}")
    return {"size": [h, w], "counts": counts}


def decode_rle(rle: Mapping[str, Any], size: Sequence[int], where: str) -> np.ndarray:
    """One RLE -> uint8 [H, W] (the size checked against the image's, see the module docstring)."""
    c = compress_rle(rle, size, where)
    return np.asarray(_mask_utils().decode({"size": c["size"], "counts": c["counts"].encode("ascii")}), np.uint8)


def decode_masks(rles: Sequence[Mapping[str, Any]], size: Sequence[int], where: str = "masks") -> np.ndarray:
    """RLEs -> uint8 [K, H, W] (the inverse of `encode_masks`)."""
    h, w = (int(s) for s in size)
    if not rles:
        return np.zeros((0, h, w), np.uint8)
    return np.stack([decode_rle(r, (h, w), f"{where}[{k}]") for k, r in enumerate(rles)])


def _checked_polygons(polygons: Any, height: int, width: int, where: str) -> list[list[float]]:
    if not isinstance(polygons, (list, tuple)) or not polygons:
        raise ValueError(f"{where}: a polygon segmentation is a non-empty list of [x0, y0, x1, y1, ...] lists")
    polys = []
    for k, p in enumerate(polygons):
        try:
            a = np.asarray(p, np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: polygon {k} is not a list of numbers") from None
        if a.size % 2 or a.size < 6:
            raise ValueError(f"{where}: polygon {k} has {a.size} coordinates; needs an even number, at least 6")
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: polygon {k} has non-finite coordinates")
        xs, ys = a[0::2], a[1::2]
        if xs.max() <= 0 or ys.max() <= 0 or xs.min() >= width or ys.min() >= height:
            raise ValueError(
                f"{where}: polygon {k} (x in [{xs.min():g}, {xs.max():g}], y in [{ys.min():g}, {ys.max():g}]) lies "
                f"outside the {width}x{height} image"
            )
        polys.append(a.tolist())
    return polys


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int, where: str) -> RLE:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] -> one compressed RLE (clipped to the image; see the docstring)."""
    polys = _checked_polygons(polygons, height, width, where)
    rle = _mask_utils().merge(_mask_utils().frPyObjects(polys, int(height), int(width)))
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(height), int(width)], "counts": counts}


def _segmentation(ann: Mapping[str, Any], where: str) -> Any:
    seg = ann.get("segmentation")
    if seg is None or (isinstance(seg, (list, tuple)) and not seg):
        raise ValueError(f"{where}: no 'segmentation'")
    return seg


def annotation_rle(ann: Mapping[str, Any], height: int, width: int, where: str) -> RLE:
    """The compressed RLE of a COCO annotation's "segmentation" (polygons or RLE), checked against the image."""
    seg = _segmentation(ann, where)
    if isinstance(seg, Mapping):
        return compress_rle(seg, (height, width), where)
    return polygons_to_rle(seg, height, width, where)


def check_segmentation(ann: Mapping[str, Any], height: int, width: int, where: str) -> None:
    """`annotation_rle`'s checks without rasterising (a compressed string's runs are checked when decoded)."""
    seg = _segmentation(ann, where)
    if isinstance(seg, Mapping):
        compress_rle(seg, (height, width), where, check_counts=False)
    else:
        _checked_polygons(seg, height, width, where)


# --------------------------------------------------------------------------- results


def to_coco_segm_results(
    detections: Detections,
    masks: np.ndarray,
    image_ids: Sequence[int] | np.ndarray,
    image_sizes: np.ndarray,
    orig_sizes: np.ndarray,
    category_ids: Sequence[int],
    *,
    valid: np.ndarray | None = None,
    min_score: float = 0.0,
) -> list[dict[str, Any]]:
    """COCO results with "segmentation" (RLE at the original size) and "bbox" of one batch.

    masks: bool [B, K, Hp, Wp] from `mask_detections`; image_sizes [B, 2] the unpadded network
    input (h, w); orig_sizes [B, 2] the original (H, W); rows with valid == 0 are skipped.
    """
    boxes = to_coco_results(detections, image_ids, orig_sizes, category_ids, valid=None, min_score=-np.inf)
    scores = np.asarray(detections.scores, np.float64)
    masks = np.asarray(masks)
    b, k = scores.shape
    if masks.shape[:2] != (b, k):
        raise ValueError(f"masks {masks.shape} do not match the detections [B, K] = {(b, k)}")
    sizes = np.asarray(image_sizes).reshape(b, 2)
    origs = np.asarray(orig_sizes).reshape(b, 2)
    out = []
    for i in range(b):
        if valid is not None and not valid[i]:
            continue
        keep = np.flatnonzero(scores[i] >= min_score)
        rles = encode_masks(masks_to_original(masks[i][keep], sizes[i], origs[i]))
        for j, rle in zip(keep, rles):
            r = dict(boxes[i * k + j])
            r["segmentation"] = rle
            out.append(r)
    return out



def to_coco_segm_results_from_logits(
    detections: Detections,
    mask_logits: np.ndarray,
    image_ids: Sequence[int] | np.ndarray,
    padded_size: Sequence[int],
    image_sizes: np.ndarray,
    orig_sizes: np.ndarray,
    category_ids: Sequence[int],
    *,
    valid: np.ndarray | None = None,
    threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """`to_coco_segm_results` of `select_mask_logits` outputs (mask_logits [B, K, h, w] in the
    detections' order; padded_size the batch canvas (Hp, Wp)), masks by `masks_from_logits`."""
    boxes = to_coco_results(detections, image_ids, orig_sizes, category_ids, valid=None, min_score=-np.inf)
    scores = np.asarray(detections.scores)
    mask_logits = np.asarray(mask_logits)
    b, k = scores.shape
    if mask_logits.ndim != 4 or mask_logits.shape[:2] != (b, k):
        raise ValueError(f"mask_logits {mask_logits.shape} do not match the detections [B, K] = {(b, k)}")
    sizes = np.asarray(image_sizes).reshape(b, 2)
    origs = np.asarray(orig_sizes).reshape(b, 2)
    out = []
    for i in range(b):
        if valid is not None and not valid[i]:
            continue
        masks = masks_from_logits(mask_logits[i], padded_size, sizes[i], origs[i], threshold=threshold)
        for j, rle in enumerate(encode_masks(masks)):
            out.append(dict(boxes[i * k + j], segmentation=rle))
    return out


__all__ = [
    "RLE",
    "annotation_rle",
    "check_segmentation",
    "compress_rle",
    "decode_masks",
    "decode_rle",
    "encode_masks",
    "mask_detections",
    "masks_from_logits",
    "masks_to_original",
    "polygons_to_rle",
    "select_mask_logits",
    "string_counts",
    "to_coco_segm_results",
    "to_coco_segm_results_from_logits",
]
