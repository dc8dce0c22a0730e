"""The Gated Control Network (SPEC section 1, Eq. 5-6) as elementwise code for kernels.

Everything here works on float32 tiles of any 2-D shape (the kernels use [block_q, block_k]
in the forward and dQ kernels and the transposed [block_k, block_q] in the dK/dV kernel: the
gate is pointwise, so the orientation does not matter) and on scalar gate weights read from
a packed per-head vector. It uses only ops that lower on Triton, Mosaic and the interpreter:
no `lax.erf` (Triton has no lowering for it), so the exact-erf GELU uses the
Abramowitz-Stegun 7.1.26 approximation of erfc (absolute error below 1.5e-7, i.e. float32
round-off level), shared between GELU and its derivative.

Packing (per head, float32 vector of `lanes` entries; gradients use the same layout):
  hidden gate (G > 0): w1[0, m] at m, w1[1, m] at G + m, b1[m] at 2G + m,
                       w2[m, 0] at 3G + m, w2[m, 1] at 4G + m, b2[0] at 5G, b2[1] at 5G + 1
  linear gate (G = 0): w2[a, c] at 2a + c, b2[c] at 4 + c
"""

from __future__ import annotations

import dataclasses
from math import erf
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lfi_jax.ops.reference import GateParams

# Abramowitz & Stegun 7.1.26: erfc(x) ~ t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p x), x >= 0.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327

Scalar = Callable[[int], jax.Array]  # packed index -> float32 scalar of the current head


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """Static description of a gate: kind in {"none", "linear", "hidden"} and G."""

    kind: str
    hidden: int = 0

    @property
    def num_params(self) -> int:
        return {"none": 0, "linear": 6, "hidden": 5 * self.hidden + 2}[self.kind]

    @property
    def lanes(self) -> int:
        """Width of the packed vector: a multiple of 128 (one TPU lane row), at least 128."""
        return max(128, -(-self.num_params // 128) * 128)


def gate_spec(gate: GateParams | None) -> GateSpec:
    if gate is None:
        return GateSpec("none")
    if gate.hidden:
        return GateSpec("hidden", gate.hidden)
    return GateSpec("linear")


def pack(gate: GateParams, spec: GateSpec) -> jax.Array:
    """GateParams -> [H, lanes] float32 (layout in the module docstring)."""
    f32 = jnp.float32
    w2, b2 = gate.w2.astype(f32), gate.b2.astype(f32)
    if spec.kind == "hidden":
        w1, b1 = gate.w1.astype(f32), gate.b1.astype(f32)
        parts = [w1[:, 0, :], w1[:, 1, :], b1, w2[:, :, 0], w2[:, :, 1], b2]
    elif spec.kind == "linear":
        parts = [w2.reshape(w2.shape[0], 4), b2]
    else:
        raise ValueError(f"pack: gate kind {spec.kind!r} has no parameters")
    flat = jnp.concatenate(parts, axis=1)
    return jnp.pad(flat, ((0, 0), (0, spec.lanes - flat.shape[1])))


def unpack(flat: jax.Array, gate: GateParams, spec: GateSpec) -> GateParams:
    """[H, lanes] -> GateParams shaped (and typed) like `gate` (used for the gradients)."""
    h = flat.shape[0]
    if spec.kind == "hidden":
        g = spec.hidden
        w1 = jnp.stack([flat[:, 0:g], flat[:, g : 2 * g]], axis=1)
        b1 = flat[:, 2 * g : 3 * g]
        w2 = jnp.stack([flat[:, 3 * g : 4 * g], flat[:, 4 * g : 5 * g]], axis=2)
        b2 = flat[:, 5 * g : 5 * g + 2]
        out = GateParams(w1, b1, w2, b2)
    else:
        out = GateParams(None, None, flat[:, 0:4].reshape(h, 2, 2), flat[:, 4:6])
    return jax.tree.map(lambda x, ref: x.astype(ref.dtype), out, gate)


def sigmoid(t):
    return 1.0 / (1.0 + jnp.exp(-t))


def gelu_and_grad(h, need_grad: bool = True):
    """Exact (erf) GELU h * Phi(h) and its derivative Phi(h) + h phi(h)."""
    x = jnp.abs(h) * _SQRT1_2
    e = jnp.exp(-x * x)  # also exp(-h^2 / 2), reused by the derivative
    t = 1.0 / (1.0 + _AS_P * x)
    a1, a2, a3, a4, a5 = _AS_A
    half_erfc = (0.5 * t) * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5)))) * e
    phi_cdf = jnp.where(h >= 0.0, 1.0 - half_erfc, half_erfc)
    g = h * phi_cdf
    if not need_grad:
        return g, None
    return g, phi_cdf + h * e * _INV_SQRT_2PI


def gelu_reference_error() -> float:
    """Max |approx - exact| / max(1, |h|) of the GELU above on [-12, 12] (float32 rounding of
    the exact value alone is ~6e-8 on this scale; the tests check this stays below 3e-7)."""
    hs = np.linspace(-12.0, 12.0, 20001)
    exact = np.array([0.5 * v * (1.0 + erf(v * _SQRT1_2)) for v in hs])
    approx = np.asarray(gelu_and_grad(jnp.asarray(hs, jnp.float32), False)[0], np.float64)
    return float(np.max(np.abs(approx - exact) / np.maximum(1.0, np.abs(hs))))


def _logits(spec: GateSpec, za, zv, w: Scalar):
    """Gate pre-activations t0 (weights C_agt) and t1 (weights C_vfm)."""
    if spec.kind == "linear":
        t0 = za * w(0) + zv * w(2) + w(4)
        t1 = za * w(1) + zv * w(3) + w(5)
        return t0, t1
    g = spec.hidden
    t0 = t1 = None
    for m in range(g):
        u, _ = gelu_and_grad(za * w(m) + zv * w(g + m) + w(2 * g + m), need_grad=False)
        t0 = u * w(3 * g + m) if t0 is None else t0 + u * w(3 * g + m)
        t1 = u * w(4 * g + m) if t1 is None else t1 + u * w(4 * g + m)
    return t0 + w(5 * g), t1 + w(5 * g + 1)


def _nf(n):
    """The gate's N: a Python number (static) or a [1, 1] array (per example, masked keys)."""
    return float(n) if isinstance(n, (int, float)) else n


def fuse(spec: GateSpec, a, p, n, w: Scalar | None):
    """C_f = g1 * C_agt + g2 * C_vfm for tiles a = C_agt, p = C_vfm (float32)."""
    if spec.kind == "none":
        return 0.5 * (a + p)
    nf = _nf(n)
    t0, t1 = _logits(spec, a * nf, p * nf, w)
    return sigmoid(t0) * a + sigmoid(t1) * p


def sum11(x):
    """Sum of a 2-D tile as a [1, 1] array (two single-axis reductions lower everywhere)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def param_order(spec: GateSpec) -> list[int]:
    """Packed indices in the order `fuse_vjp` lists its parameter sums."""
    if spec.kind == "linear":
        return [0, 1, 2, 3, 4, 5]
    if spec.kind == "none":
        return []
    g = spec.hidden
    order = []
    for m in range(g):
        order += [m, g + m, 2 * g + m, 3 * g + m, 4 * g + m]
    return order + [5 * g, 5 * g + 1]


def fuse_vjp(spec: GateSpec, a, p, fbar, n, w: Scalar | None, param_sums: bool, reduce=sum11):
    """Forward map and its pullback for one tile.

    Given F-bar = dL/dC_f (per entry), returns (C_f, A-bar, P-bar, sums) where A-bar, P-bar are
    the total derivatives dL/dC_agt, dL/dC_vfm through both the direct term and the gate,
    and `sums` (if param_sums) lists (packed index, reduce(tile)) of the gate-parameter
    gradient contributions of this tile, in `param_order(spec)`: reduce = sum11 gives [1, 1]
    tile sums, a row reduction [rows, 1] partial sums (reduced over rows later, once).
    See `lfi_jax.ops.pallas.attention` for the math.
    """
    if spec.kind == "none":
        half = 0.5 * fbar
        return 0.5 * (a + p), half, half, []
    nf = _nf(n)
    za, zv = a * nf, p * nf
    t0, t1 = _logits(spec, za, zv, w)
    g1, g2 = sigmoid(t0), sigmoid(t1)
    f = g1 * a + g2 * p
    tb0 = fbar * a * (g1 * (1.0 - g1))  # dL/dt0
    tb1 = fbar * p * (g2 * (1.0 - g2))  # dL/dt1
    abar = fbar * g1
    pbar = fbar * g2
    sums = []
    if spec.kind == "linear":
        abar = abar + nf * (tb0 * w(0) + tb1 * w(1))
        pbar = pbar + nf * (tb0 * w(2) + tb1 * w(3))
        if param_sums:
            vals = [za * tb0, za * tb1, zv * tb0, zv * tb1, tb0, tb1]
            sums = [(idx, reduce(x)) for idx, x in zip(param_order(spec), vals)]
        return f, abar, pbar, sums
    g = spec.hidden
    for m in range(g):
        u, du = gelu_and_grad(za * w(m) + zv * w(g + m) + w(2 * g + m))
        hb = (tb0 * w(3 * g + m) + tb1 * w(4 * g + m)) * du  # dL/dh_m
        abar = abar + (nf * w(m)) * hb
        pbar = pbar + (nf * w(g + m)) * hb
        if param_sums:
            sums += [
                (m, reduce(za * hb)), (g + m, reduce(zv * hb)), (2 * g + m, reduce(hb)),
                (3 * g + m, reduce(u * tb0)), (4 * g + m, reduce(u * tb1)),
            ]
    if param_sums:
        sums += [(5 * g, reduce(tb0)), (5 * g + 1, reduce(tb1))]
    return f, abar, pbar, sums
