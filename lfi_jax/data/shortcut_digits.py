"""The embedded benchmark "shortcut digits" (SPEC section 4), generated on the fly.

Objects are the real handwritten digits that ship with scikit-learn (`load_digits`: 1,797
8x8 images, 10 classes), upscaled smoothly, coloured, outlined and pasted at a random position
on a `canvas` x `canvas` RGB canvas over a procedural background texture from one of 10
families. In `train` and `test_iid` the background family equals the label with probability
`spurious_p` and is otherwise drawn uniformly from all 10 families (so the observed
family == label rate is spurious_p + (1 - spurious_p) / 10); in `test_shifted` it is drawn
independently of the label.

Determinism. Every random quantity of example i comes from its own stream,
`numpy.random.default_rng([seed, split_code, stream])`, read at position i. So example i is
a function of (seed, split, i) only: changing `num_train` appends or drops examples, and
changing `spurious_p` changes backgrounds only (the digit, its size, position and colour stay).
`test_iid` and `test_shifted` read the same streams: they show the same digits at the same
places, and differ only where test_iid's background follows the label (a paired comparison).

Digits are split by index into disjoint pools: digit j is a test digit iff j % 5 == 4
(360 test, 1,437 train digits), so no test digit is ever seen in training.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

SPLITS = ("train", "test_iid", "test_shifted")
# test_iid and test_shifted share streams (paired examples); train has its own.
_SPLIT_CODE = {"train": 0, "test_iid": 1, "test_shifted": 1}
NUM_FAMILIES = 10
FAMILY_NAMES = (
    "bands",  # straight bands, near horizontal
    "diagonal",  # straight stripes near 45 degrees
    "pinstripes",  # thin, dense, near-vertical lines
    "checkers",
    "dots",
    "rings",  # concentric circles around a random centre
    "waves",  # near-vertical wavy stripes
    "blobs",  # low-frequency noise
    "speckle",  # high-frequency noise
    "gradient",  # a linear ramp in a random direction
)
# spurious_p of the SPEC's three regimes.
SPURIOUS_PRESETS = {"clean": 0.0, "shortcut": 0.7, "hard": 0.9}
DEFAULTS: dict[str, Any] = dict(
    spurious_p=0.7,
    canvas=48,
    num_train=20000,
    num_test=2000,
    seed=0,
    scale_range=(0.4, 0.7),  # digit side as a fraction of the canvas side
)
_NOISE_BANK = 32  # pre-generated fields per noise family
# stream ids (never reorder: they define the data)
_S_DIGIT, _S_COIN, _S_FAMILY, _S_SCALE, _S_POS, _S_TEX, _S_COLOR = range(7)
_N_TEX, _N_COLOR = 6, 8


def _test_pool_mask(n: int) -> np.ndarray:
    return (np.arange(n) % 5) == 4


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # deferred: importing sklearn takes seconds

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def digit_pool(split: str) -> np.ndarray:
    """Indices into `load_digits()` that `split` draws from (disjoint for train vs test)."""
    images, _ = _digits()
    test = _test_pool_mask(len(images))
    return np.flatnonzero(~test if split == "train" else test)


def resolve_spurious_p(value: Any) -> float:
    """A float in [0, 1], or a preset name ("clean", "shortcut", "hard")."""
    if isinstance(value, str):
        if value not in SPURIOUS_PRESETS:
            raise ValueError(
                f"data.options.spurious_p={value!r}: expected a float in [0, 1] or one of {sorted(SPURIOUS_PRESETS)}"
            )
        return SPURIOUS_PRESETS[value]
    p = float(value)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"data.options.spurious_p={value} must lie in [0, 1]")
    return p


def image_options(split: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options that decide split `split`'s images and their number, defaults filled in and
    normalised (a preset name becomes its spurious_p), as JSON data."""
    opts = {**DEFAULTS, **{k: v for k, v in dict(options or {}).items() if v is not None}}
    out = {
        "spurious_p": resolve_spurious_p(opts["spurious_p"]),
        "canvas": int(opts["canvas"]),
        "seed": int(opts["seed"]),
        "scale_range": [float(x) for x in opts["scale_range"]],
    }
    key = "num_train" if split == "train" else "num_test"
    out[key] = int(opts[key])
    return out


# --------------------------------------------------------------------------- resampling


@functools.lru_cache(maxsize=256)
def _bilinear_matrix(out_n: int, in_n: int) -> np.ndarray:
    """[out_n, in_n] bilinear interpolation weights (half-pixel centres, clamped edges)."""
    src = (np.arange(out_n) + 0.5) * in_n / out_n - 0.5
    src = np.clip(src, 0.0, in_n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, in_n - 1)
    w = (src - lo).astype(np.float32)
    m = np.zeros((out_n, in_n), np.float32)
    m[np.arange(out_n), lo] += 1.0 - w
    m[np.arange(out_n), hi] += w
    return m


def _max_filter(a: np.ndarray, r: int) -> np.ndarray:
    """Square (2r+1)x(2r+1) max filter, zero outside; separable."""
    out = a.copy()
    for axis in (0, 1):
        src = out.copy()
        for k in range(1, r + 1):
            if axis == 0:
                np.maximum(out[k:], src[:-k], out=out[k:])
                np.maximum(out[:-k], src[k:], out=out[:-k])
            else:
                np.maximum(out[:, k:], src[:, :-k], out=out[:, k:])
                np.maximum(out[:, :-k], src[:, k:], out=out[:, :-k])
    return out


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns [..., 3] float32."""
    h6 = (np.asarray(h) % 1.0) * 6.0
    i = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0
    )  # [6, ..., 3]
    return np.take_along_axis(table, i[None, ..., None], 0)[0].astype(np.float32)


# --------------------------------------------------------------------------- textures


@functools.lru_cache(maxsize=8)
def _noise_bank(canvas: int) -> dict[int, np.ndarray]:
    """Periodic noise fields in [0, 1], [_NOISE_BANK, canvas, canvas] per noise family.

    Independent of the data seed: a family's look is fixed, examples pick a field, a roll and
    a transpose from their own stream.
    """
    rng = np.random.default_rng(20250917)
    fy = np.fft.fftfreq(canvas)[:, None] * canvas  # cycles per canvas
    fx = np.fft.fftfreq(canvas)[None, :] * canvas
    radius = np.sqrt(fy**2 + fx**2)
    out = {}
    for family, cutoff in ((7, 2.2), (8, canvas / 5.0)):
        white = rng.standard_normal((_NOISE_BANK, canvas, canvas))
        filt = np.exp(-0.5 * (radius / cutoff) ** 2)
        f = np.fft.ifft2(np.fft.fft2(white) * filt).real
        f -= f.mean(axis=(1, 2), keepdims=True)
        f /= f.std(axis=(1, 2), keepdims=True) + 1e-12
        out[family] = np.clip(0.5 + 0.3 * f, 0.0, 1.0).astype(np.float32)
    return out


@functools.lru_cache(maxsize=8)
def _coords(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(canvas) + 0.5) / canvas).astype(np.float32)
    return c[:, None], c[None, :]


def _smoothstep(x: np.ndarray, width: float) -> np.ndarray:
    return np.clip(0.5 + x / width, 0.0, 1.0)


def texture(family: int, u: np.ndarray, canvas: int) -> np.ndarray:
    """The family's scalar field t in [0, 1], [canvas, canvas] float32, for params u in [0,1)^6."""
    yy, xx = _coords(canvas)
    two_pi = 2.0 * math.pi
    phase = two_pi * u[0]

    def stripes(angle_deg, jitter_deg, fmin, fmax):
        a = math.radians(angle_deg + (2 * u[1] - 1) * jitter_deg)
        f = fmin + (fmax - fmin) * u[2]
        return 0.5 + 0.5 * np.sin(two_pi * f * (yy * math.cos(a) + xx * math.sin(a)) + phase)

    if family == 0:
        return stripes(0.0, 12.0, 2.5, 4.0)
    if family == 1:
        return stripes(45.0, 10.0, 4.0, 6.0)
    if family == 2:
        t = stripes(90.0, 8.0, 8.0, 11.0)
        return (t > 0.7).astype(np.float32)  # thin bright lines
    if family == 3:
        a = math.radians((2 * u[1] - 1) * 10.0)
        f = 2.5 + 1.5 * u[2]
        ry = yy * math.cos(a) - xx * math.sin(a)
        rx = yy * math.sin(a) + xx * math.cos(a)
        s = np.sin(two_pi * f * ry + phase) * np.sin(two_pi * f * rx + two_pi * u[3])
        return _smoothstep(s, 0.3)
    if family == 4:
        f = 4.0 + 2.0 * u[2]
        r = 0.22 + 0.1 * u[1]
        dy = (yy * f + u[0]) % 1.0 - 0.5
        dx = (xx * f + u[3]) % 1.0 - 0.5
        d = np.sqrt(dy**2 + dx**2)
        return _smoothstep(r - d, 0.08)
    if family == 5:
        f = 3.0 + 2.0 * u[2]
        cy, cx = u[1], u[3]
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        return 0.5 + 0.5 * np.sin(two_pi * f * d + phase)
    if family == 6:
        f = 3.0 + 2.0 * u[2]
        g = 1.5 + 1.0 * u[1]
        amp = 2.0 + 1.5 * u[3]
        return 0.5 + 0.5 * np.sin(two_pi * f * xx + amp * np.sin(two_pi * g * yy + two_pi * u[4]) + phase)
    if family in (7, 8):
        bank = _noise_bank(canvas)[family]
        field = bank[int(u[1] * _NOISE_BANK) % _NOISE_BANK]
        field = np.roll(field, (int(u[2] * canvas), int(u[3] * canvas)), axis=(0, 1))
        return field.T if u[4] < 0.5 else field
    if family == 9:
        a = two_pi * u[1]
        proj = (yy - 0.5) * math.cos(a) + (xx - 0.5) * math.sin(a)
        return np.clip(proj / 0.71 * 0.5 + 0.5, 0.0, 1.0)
    raise ValueError(f"texture family {family} not in [0, {NUM_FAMILIES})")


# --------------------------------------------------------------------------- the source


class ShortcutDigits:
    """Random-access source of shortcut digits for one split (a grain RandomAccessDataSource)."""

    def __init__(self, split: str, options: Mapping[str, Any] | None = None, *, name: str = "shortcut_digits"):
        if split not in SPLITS:
            raise ValueError(f"shortcut_digits has no split {split!r}; expected one of {list(SPLITS)}")
        opts = dict(DEFAULTS)
        unknown = sorted(set(options or {}) - set(DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown shortcut_digits options: {', '.join('data.options.' + k for k in unknown)} "
                f"(known: {sorted(DEFAULTS)})"
            )
        opts.update(options or {})
        self.name = name
        self.split = split
        self.class_names = [str(i) for i in range(10)]
        self.family_names = list(FAMILY_NAMES)
        self.spurious_p = resolve_spurious_p(opts["spurious_p"])
        self.canvas = int(opts["canvas"])
        if self.canvas < 16:
            raise ValueError(f"data.options.canvas={self.canvas} must be >= 16")
        self.seed = int(opts["seed"])
        lo, hi = (float(x) for x in opts["scale_range"])
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.options.scale_range={tuple(opts['scale_range'])} must satisfy 0 < lo <= hi <= 1")
        self.scale_range = (lo, hi)
        n = int(opts["num_train"] if split == "train" else opts["num_test"])
        if n <= 0:
            key = "num_train" if split == "train" else "num_test"
            raise ValueError(f"data.options.{key}={n} must be > 0")
        self._n = n
        self.options = opts

        images, targets = _digits()
        pool = digit_pool(split)
        code = _SPLIT_CODE[split]

        def stream(sid: int, k: int | None = None) -> np.ndarray:
            rng = np.random.default_rng([self.seed, code, sid])
            return rng.random(n) if k is None else rng.random((n, k))

        self._digit = pool[np.minimum((stream(_S_DIGIT) * len(pool)).astype(np.int64), len(pool) - 1)]
        self._labels = targets[self._digit]
        coin = stream(_S_COIN)
        rand_family = np.minimum((stream(_S_FAMILY) * NUM_FAMILIES).astype(np.int64), NUM_FAMILIES - 1)
        if split == "test_shifted":
            self._families = rand_family
        else:
            self._families = np.where(coin < self.spurious_p, self._labels, rand_family)
        scale = lo + (hi - lo) * stream(_S_SCALE)
        self._size = np.clip(np.round(scale * self.canvas).astype(np.int64), 4, self.canvas)
        pos = stream(_S_POS, 2)
        room = self.canvas - self._size + 1
        self._y0 = np.minimum((pos[:, 0] * room).astype(np.int64), room - 1)
        self._x0 = np.minimum((pos[:, 1] * room).astype(np.int64), room - 1)
        self._tex = stream(_S_TEX, _N_TEX).astype(np.float32)
        col = stream(_S_COLOR, _N_COLOR)
        # background: a dark and a light colour of random hues; the digit: a bright colour.
        self._c0 = _hsv_to_rgb(col[:, 0], 0.3 + 0.6 * col[:, 1], 0.15 + 0.3 * col[:, 2])
        self._c1 = _hsv_to_rgb(col[:, 3], 0.3 + 0.6 * col[:, 4], 0.55 + 0.35 * col[:, 5])
        self._cd = _hsv_to_rgb(col[:, 6], 0.5 + 0.5 * col[:, 7], np.ones(n))
        self._images = images

    # -- cheap metadata (no rendering) ---------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def example_id(self, index: int) -> str:
        return f"shortcut_digits/{self.split}/{self._check(index)}"

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def families(self) -> np.ndarray:
        return self._families.copy()

    def digit_index(self, index: int) -> int:
        """Which `load_digits()` image example `index` shows."""
        return int(self._digit[self._check(index)])

    def _check(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < self._n:
            raise IndexError(f"shortcut_digits/{self.split}: index {index} out of range [0, {self._n})")
        return i

    # -- rendering -------------------------------------------------------------------------
    def background(self, index: int) -> np.ndarray:
        """Example `index`'s background alone, float32 [canvas, canvas, 3] in [0, 1]."""
        i = self._check(index)
        t = texture(int(self._families[i]), self._tex[i], self.canvas)[..., None]
        return self._c0[i] + t * (self._c1[i] - self._c0[i])

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._check(index)
        c = self.canvas
        s, y0, x0 = int(self._size[i]), int(self._y0[i]), int(self._x0[i])
        m = _bilinear_matrix(s, 8)
        glyph = m @ self._images[self._digit[i]] @ m.T
        glyph = np.clip((glyph - 0.2) / 0.45, 0.0, 1.0)  # crisp strokes
        alpha = np.zeros((c, c), np.float32)
        alpha[y0 : y0 + s, x0 : x0 + s] = glyph
        # a dark outline (the glyph dilated by r pixels) keeps the digit visible on any texture
        r = 2 if s >= 24 else 1
        local = np.zeros((s + 2 * r, s + 2 * r), np.float32)
        local[r : r + s, r : r + s] = glyph
        outline = _max_filter(local, r)
        ya, xa = max(y0 - r, 0), max(x0 - r, 0)
        yb, xb = min(y0 + s + r, c), min(x0 + s + r, c)
        outline = outline[ya - (y0 - r) : yb - (y0 - r), xa - (x0 - r) : xb - (x0 - r)]
        a = alpha[ya:yb, xa:xb, None]
        img = self.background(i)
        region = img[ya:yb, xa:xb] * (1.0 - 0.85 * outline)[..., None]
        img[ya:yb, xa:xb] = region * (1.0 - a) + self._cd[i] * a
        rows = np.flatnonzero(glyph.max(1) > 0)
        cols = np.flatnonzero(glyph.max(0) > 0)
        if len(rows):
            box = [[y0 + rows[0], x0 + cols[0], y0 + rows[-1] + 1, x0 + cols[-1] + 1]]
        else:  # an empty glyph cannot happen with load_digits, but stay well-formed
            box = np.zeros((0, 4))
        return {
            "id": f"shortcut_digits/{self.split}/{i}",
            "image": np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8),
            "label": int(self._labels[i]),
            "mask": alpha,
            "boxes": np.asarray(box, np.float32),
            "family": int(self._families[i]),
        }

    def __repr__(self) -> str:
        return (
            f"ShortcutDigits(split={self.split!r}, n={self._n}, spurious_p={self.spurious_p}, "
            f"canvas={self.canvas}, seed={self.seed})"
        )


__all__ = [
    "DEFAULTS",
    "FAMILY_NAMES",
    "NUM_FAMILIES",
    "SPLITS",
    "SPURIOUS_PRESETS",
    "ShortcutDigits",
    "digit_pool",
    "image_options",
    "resolve_spurious_p",
    "texture",
]
