"""The LLaVA teacher's text and geometry, without torch (SPEC section 3).

Everything here is plain Python/NumPy so it can be read and tested on its own:
  * the conversation of Eqs. 11-12 (prompt, teacher-forced response, the character spans of the
    class name / object names / background words inside the response),
  * locating those spans as token positions from a tokenizer's offsets on the unexpanded text,
  * the geometry that maps the VLM's patch grid back onto the original image, read off the
    checkpoint's image-processor settings (pad to square, resize, centre crop),
  * boxes drawn on the image for the dense prompt,
  * the map of Eqs. 11-12 from per-span attention.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from lfi_jax.teacher.types import Geometry

CLASSIFY_PROMPT = "Classify foreground vs. background"
CLASSIFY_RESPONSE = "foreground: {class_name}, background: {background}"
DENSE_PROMPT = "Locate all {tgt_obj} instances"
DENSE_RESPONSE = "objects: {objects}, background: {background}"
DEFAULT_BACKGROUND_WORDS = "the surrounding scene"
TASKS = ("classify", "dense")

_REQUIRED_FIELDS = {
    ("classify", "prompt"): set(),
    ("classify", "response"): {"class_name", "background"},
    ("dense", "prompt"): {"tgt_obj"},
    ("dense", "response"): {"objects", "background"},
}


def _fields(template: str, what: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"{what} {template!r} is not a valid template: {e}") from None
    return names


def check_templates(task: str, prompt: str, response: str) -> None:
    """Validates the prompt and response templates for `task`; errors name the option."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    for kind, template, option in (("prompt", prompt, "--prompt"), ("response", response, "--response-template")):
        names = _fields(template, option)
        allowed = _REQUIRED_FIELDS[(task, kind)] | ({"tgt_obj"} if kind == "prompt" else set())
        missing = _REQUIRED_FIELDS[(task, kind)] - set(names)
        extra = set(names) - allowed
        if missing or extra or len(names) != len(set(names)):
            raise ValueError(
                f"{option} {template!r} for task {task!r} must use each of "
                f"{sorted(_REQUIRED_FIELDS[(task, kind)]) or 'no'} field(s) exactly once"
                + (" (optional: tgt_obj)" if kind == "prompt" and task == "classify" else "")
                + (f"; missing {sorted(missing)}" if missing else "")
                + (f"; unknown {sorted(extra)}" if extra else "")
            )
    if _fields(response, "--response-template")[-1] != "background":
        raise ValueError(f"--response-template {response!r}: {{background}} must be its last field")


def clean_name(name: str) -> str:
    """A class name as words: underscores become spaces, surrounding whitespace dropped."""
    return " ".join(str(name).replace("_", " ").split())


@dataclasses.dataclass(frozen=True)
class Response:
    """The teacher-forced response text and its spans: (role, char_start, char_end)."""

    text: str
    spans: tuple[tuple[str, int, int], ...]

    def prefix_before_background(self) -> str:
        """The response up to (not including) the background words, for generation."""
        start = [s for r, s, _ in self.spans if r == "back"][0]
        return self.text[:start].rstrip()


def build_response(template: str, *, objects: Sequence[str], background: str, task: str) -> Response:
    """Formats `template`, recording where each object name and the background words landed.

    classify: `objects` holds one name ({class_name}, role "fore"). dense: {objects} becomes
    the names joined by ", ", one span per object (roles "obj0", "obj1", ...).
    """
    text, spans = "", []
    for literal, field, spec, conv in string.Formatter().parse(template):
        text += literal
        if field is None:
            continue
        if spec or conv:
            raise ValueError(f"--response-template {template!r}: format specs are not supported")
        if field == "class_name":
            if len(objects) != 1:
                raise ValueError("classify response needs exactly one class name")
            spans.append(("fore", len(text), len(text) + len(objects[0])))
            text += objects[0]
        elif field == "objects":
            for k, name in enumerate(objects):
                if k:
                    text += ", "
                spans.append((f"obj{k}", len(text), len(text) + len(name)))
                text += name
        elif field == "background":
            spans.append(("back", len(text), len(text) + len(background)))
            text += background
        else:
            raise ValueError(f"--response-template {template!r}: unknown field {{{field}}}")
    for role, a, b in spans:
        if b <= a or not text[a:b].strip():
            raise ValueError(f"empty {role!r} span in response {text!r} (task {task})")
    return Response(text, tuple(spans))


def conversation(prompt: str, response: str | None) -> list[dict[str, Any]]:
    """The chat: user = image + prompt; assistant = the teacher-forced response (if any)."""
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if response is not None:
        conv.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return conv


def locate_response(rendered: str, response: str, prompt: str) -> int:
    """Character offset of the assistant's response inside the rendered chat text."""
    at = rendered.rfind(response)
    if at < 0 or at < rendered.find(prompt) + len(prompt):
        raise ValueError(
            "the chat template did not render the response verbatim after the prompt; "
            f"response {response!r} not found in {rendered!r}"
        )
    return at


def span_token_positions(text: str, offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Tokens that carry a non-blank character of text[start:end].

    `offsets` are the tokenizer's (char_start, char_end) per token on `text` (special tokens
    have empty ranges and never match). A token like " cat" that carries the separating space
    counts for the span "cat"; a token of only blanks or of only characters outside does not.
    """
    out = [
        t for t, (a, b) in enumerate(offsets)
        if b > a and a < end and b > start and text[max(a, start) : min(b, end)].strip()
    ]
    if not out:
        raise ValueError(f"no token covers characters [{start}, {end}) = {text[start:end]!r}")
    return out


# --------------------------------------------------------------------------- layers


def parse_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Teacher layers from `--layers`: "all", "3", "0,2,5", "16:32", "-8:" (Python slices).

    Returns sorted unique indices in [0, num_layers); an empty or out-of-range selection is an
    error naming the option.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(num_layers))
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[int] = set()
    for part in parts:
        p = str(part).strip()
        try:
            if ":" in p:
                bits = [int(b) if b.strip() else None for b in p.split(":")]
                if len(bits) > 3:
                    raise ValueError
                chosen.update(range(num_layers)[slice(*bits)])
            else:
                i = int(p)
                if not -num_layers <= i < num_layers:
                    raise IndexError
                chosen.add(i % num_layers)
        except (ValueError, IndexError):
            raise ValueError(
                f"--layers {spec!r}: bad entry {p!r} (the language model has {num_layers} layers; "
                "use 'all', indices like '0,5', or slices like '16:32')"
            ) from None
    if not chosen:
        raise ValueError(f"--layers {spec!r} selects no layer of {num_layers}")
    return sorted(chosen)


# --------------------------------------------------------------------------- geometry


def _get(obj, key, default=None):
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def processor_geometry(ip, height: int, width: int) -> tuple[Geometry, tuple[int, int]]:
    """The region of the original image the processed image covers, and the processed size.

    Follows the checkpoint's image processor exactly: optional pad to square (LlavaImageProcessor
    `do_pad`: the short side padded symmetrically, the odd pixel at the end), resize
    (`shortest_edge` keeping the aspect ratio with the long side truncated, or a fixed
    height/width), optional centre crop (offset floored; the torchvision backend pads a too
    small image by the floored half first). Returns (Geometry, (out_h, out_w)).
    """
    torchvision_backend = any("Torchvision" in c.__name__ for c in type(ip).__mro__)
    do_pad = bool(_get(ip, "do_pad", False)) and hasattr(ip, "pad_to_square")
    h, w = int(height), int(width)
    oy = ox = 0.0  # original-image coordinate of the current image's (0, 0)
    if do_pad and h != w:
        side = max(h, w)
        oy, ox = -float((side - h) // 2), -float((side - w) // 2)
        h = w = side
    sy = sx = 1.0  # original pixels per current pixel
    if _get(ip, "do_resize", True):
        size = _get(ip, "size")
        short = _get(size, "shortest_edge")
        if _get(size, "longest_edge") or _get(size, "max_height"):
            raise ValueError(f"unsupported image processor size {size!r}: only shortest_edge or height/width")
        if short:
            if w <= h:
                nh, nw = int(short * h / w), int(short)
            else:
                nh, nw = int(short), int(short * w / h)
        elif _get(size, "height") and _get(size, "width"):
            nh, nw = int(_get(size, "height")), int(_get(size, "width"))
        else:
            raise ValueError(f"unsupported image processor size {size!r}")
        sy, sx = h / nh, w / nw
        h, w = nh, nw
    if _get(ip, "do_center_crop", False):
        crop = _get(ip, "crop_size")
        ch, cw = int(_get(crop, "height")), int(_get(crop, "width"))

        def top(n, c):
            if n >= c or not torchvision_backend:
                return (n - c) // 2
            return -((c - n) // 2)

        ty, tx = top(h, ch), top(w, cw)
        oy, ox = oy + ty * sy, ox + tx * sx
        h, w = ch, cw
    box = (oy, ox, oy + h * sy, ox + w * sx)
    return Geometry((int(height), int(width)), tuple(float(v) for v in box)), (h, w)


def pad_to_square(image: np.ndarray, fill: Sequence[int]) -> tuple[np.ndarray, tuple[int, int]]:
    """`image` [H, W, 3] pasted on a `fill`-coloured square of side max(H, W), as LLaVA-1.5's
    expand2square does (offset floored); returns (square, (top, left))."""
    h, w = image.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.empty((side, side, image.shape[2]), image.dtype)
    out[...] = np.asarray(fill, image.dtype)[: image.shape[2]]
    out[top : top + h, left : left + w] = image
    return out, (top, left)


def unpad_geometry(geom: Geometry, top_left: tuple[int, int], image_hw: tuple[int, int]) -> Geometry:
    """The geometry `geom` (on the padded square) in the coordinates of the original image."""
    top, left = top_left
    y0, x0, y1, x1 = geom.box
    return Geometry((int(image_hw[0]), int(image_hw[1])), (y0 - top, x0 - left, y1 - top, x1 - left))


def vision_grid(vision_config, select_strategy: str) -> tuple[int, int, int]:
    """(grid_h, grid_w, leading non-patch tokens) of the projected image features.

    CLIP-style towers have image_size / patch_size patches per side plus one CLS token, which
    the "default" feature-select strategy drops and "full" keeps (first).
    """
    image_size = _get(vision_config, "image_size")
    patch = _get(vision_config, "patch_size")
    if not image_size or not patch:
        raise ValueError("vision config lacks image_size / patch_size; cannot derive the teacher grid")
    if isinstance(image_size, (list, tuple)):
        gh, gw = int(image_size[0]) // int(patch), int(image_size[1]) // int(patch)
    else:
        gh = gw = int(image_size) // int(patch)
    if select_strategy == "default":
        extra = 0
    elif select_strategy == "full":
        extra = 1
    else:
        raise ValueError(f"unsupported vision_feature_select_strategy {select_strategy!r}")
    return gh, gw, extra


# --------------------------------------------------------------------------- boxes and maps


def parse_color(spec: str | Sequence[int]) -> tuple[int, int, int]:
    """'red', '#ff0000', '255,0,0' or a 3-sequence -> (r, g, b)."""
    if not isinstance(spec, str):
        rgb = tuple(int(v) for v in spec)
    else:
        s = spec.strip()
        try:
            if "," in s:
                rgb = tuple(int(v) for v in s.split(","))
            else:
                rgb = tuple(ImageColor.getrgb(s))[:3]
        except ValueError:
            raise ValueError(f"--box-color {spec!r} is not a colour (name, #rrggbb or r,g,b)") from None
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"--box-color {spec!r} is not a colour (three values in 0..255)")
    return rgb


def draw_boxes(image: np.ndarray, boxes: np.ndarray, color=(255, 0, 0), width: int = 0) -> np.ndarray:
    """A copy of `image` with each (y0, x0, y1, x1) box outlined (y1/x1 exclusive).

    width 0 picks max(1, round(0.01 * max(H, W))) pixels. The outline is drawn inside the box.
    """
    h, w = image.shape[:2]
    lw = int(width) if width and width > 0 else max(1, round(0.01 * max(h, w)))
    im = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(im)
    for y0, x0, y1, x1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        x0c, y0c = max(0.0, min(x0, w - 1)), max(0.0, min(y0, h - 1))
        x1c, y1c = max(x0c, min(x1 - 1, w - 1)), max(y0c, min(y1 - 1, h - 1))
        draw.rectangle([round(x0c), round(y0c), round(x1c), round(y1c)], outline=tuple(color), width=lw)
    return np.asarray(im)


def map_from_spans(span_attn: np.ndarray, roles: Sequence[str]) -> tuple[np.ndarray, bool, str | None]:
    """Eqs. 11/12 from per-span attention to the image patches.

    span_attn: [P, n] (one row per span, in `roles` order: "fore" or "obj<k>", and "back").
    C = relu(sum of the foreground/object rows - background row), L1-normalised. Returns
    (map [n] float32, degenerate, reason); a degenerate map is all zeros, never replaced.
    """
    a = np.asarray(span_attn, np.float64)
    fg = [i for i, r in enumerate(roles) if r == "fore" or r.startswith("obj")]
    bg = [i for i, r in enumerate(roles) if r == "back"]
    if not fg or len(bg) != 1:
        raise ValueError(f"spans {list(roles)} need foreground/object spans and one background span")
    diff = a[fg].sum(0) - a[bg[0]]
    if not np.all(np.isfinite(diff)):
        return np.zeros(a.shape[1], np.float32), True, "non-finite attention"
    d = np.maximum(diff, 0.0)
    total = d.sum()
    if not total > 0:
        return np.zeros(a.shape[1], np.float32), True, "relu left nothing"
    return (d / total).astype(np.float32), False, None
