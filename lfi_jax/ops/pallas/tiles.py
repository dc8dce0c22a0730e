"""Per-tile math of the fused interaction attention kernels (shared by both drivers).

Layout: q, q2, do, o [B, H, Npq, dp]; k, v [B, H, Npk, dp] (the query and key lengths padded
to multiples of their block sizes, d padded to a power of two on GPU); per-row statistics as
lane-dense rows [B, H, 1, Npq] float32. With a key mask, `valid` [B, 1, Npk] (1 = valid key,
0 = masked or padding) and `nval` [B, 1, 128] (the example's number of valid keys, in every
lane: the gate's N) are extra inputs; without one, keys past the true length are masked by
position and N is the static key count.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

import lfi_jax.ops.pallas.gate as gatelib
from lfi_jax.ops.reference import MASK_VALUE

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static shape and backend facts shared by the three kernels."""

    batch: int
    heads: int
    nq: int  # true query length
    nk: int  # true key length
    npq: int  # padded query length
    npk: int  # padded key length
    dp: int  # padded head dim
    scale: float
    spec: gatelib.GateSpec
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    driver: str  # "loop" | "grid"
    interpret: bool
    backend: str  # "gpu" | "tpu" | "cpu"
    masked: bool = False  # a key mask (valid, nval inputs) is given
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    precision: str = "default"  # dot precision for float32 inputs (see attention.py)

    @property
    def width(self) -> int:  # column-statistic width in scratch (grid driver)
        return 128 if self.driver == "grid" else 1

    @property
    def pad_keys(self) -> bool:
        return self.npk > self.nk and not self.masked

    @property
    def has_gate(self) -> bool:
        return self.spec.num_params > 0

    @property
    def n_extra(self) -> int:
        """Inputs after the main ones: gate (if any), then valid and nval (if masked)."""
        return int(self.has_gate) + 2 * int(self.masked)


def _precision(cfg: KernelConfig):
    return {"default": None, "highest": lax.Precision.HIGHEST}[cfg.precision]


def dot_nt(cfg, a, b):  # a [m, k], b [n, k] -> [m, n] f32
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32, precision=_precision(cfg))


def dot(cfg, a, b):  # a [m, k], b [k, n] -> [m, n] f32
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32, precision=_precision(cfg))


def bc(x, width: int):
    """Column statistic [r, W] made broadcastable against [r, width]."""
    if x.shape[1] in (1, width):
        return x
    return jnp.tile(x, (1, width // x.shape[1]))


def _eye(r: int):
    return lax.broadcasted_iota(jnp.int32, (r, r), 0) == lax.broadcasted_iota(jnp.int32, (r, r), 1)


def col_to_row(c):
    """[r, W] (column, replicated over W) -> [1, r], by a masked reduction (no transpose)."""
    r = c.shape[0]
    return jnp.sum(jnp.where(_eye(r), bc(c, r), 0.0), axis=0, keepdims=True)


def row_to_col(row, width: int):
    """[1, r] -> [r, width] (replicated), by a masked reduction (no transpose)."""
    r = row.shape[1]
    col = jnp.sum(jnp.where(_eye(r), row, 0.0), axis=1, keepdims=True)
    return col if width == 1 else jnp.broadcast_to(col, (r, width))


def scalars(cfg: KernelConfig, gp_ref):
    if gp_ref is None:
        return None
    h = pl.program_id(1)
    vals = [gp_ref[h, idx] for idx in range(cfg.spec.num_params)]
    return vals.__getitem__


class Keys:
    """What a step needs to know about the keys: validity of a block and the gate's N."""

    def __init__(self, cfg: KernelConfig, valid_ref=None, nval_ref=None):
        self.cfg = cfg
        self.valid_ref = valid_ref
        self.n = float(cfg.nk) if nval_ref is None else jnp.max(nval_ref[...], axis=1, keepdims=True)  # [1, 1]

    def mask(self, s, j, bk, valid=None):
        """Masked logits of a [bq, bk] tile of key block j (valid: the block's [1, bk] row)."""
        cfg = self.cfg
        if cfg.masked:
            if valid is None:
                valid = self.valid_ref[:, pl.ds(j * bk, bk)]
            return jnp.where(valid > 0.5, s, MASK_VALUE)
        if cfg.pad_keys:
            col = j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            return jnp.where(col < cfg.nk, s, MASK_VALUE)
        return s


def pack_sums(sums, lanes: int):
    """[(packed index, [1, 1] value)] -> [1, lanes]."""
    lane = lax.broadcasted_iota(jnp.int32, (1, lanes), 1)
    out = jnp.zeros((1, lanes), F32)
    for idx, val in sums:
        out = out + jnp.where(lane == idx, val, 0.0)
    return out


def cls_row(a):
    """Row 0 of a [bq, bk] tile as [1, bk] (masked reduction: lowers everywhere)."""
    row = lax.broadcasted_iota(jnp.int32, a.shape, 0)
    return jnp.sum(jnp.where(row == 0, a, 0.0), axis=0, keepdims=True)


# ----------------------------------------------------------------------------- step math


def fwd_stats_step(cfg, keys, q, q2, kb, j, bk, carry, valid=None):
    """Online max / sum of both softmaxes over one key block."""
    m, l, m2, l2 = carry
    out = []
    for qx, mx, lx in ((q, m, l), (q2, m2, l2)):
        s = keys.mask(dot_nt(cfg, qx, kb) * cfg.scale, j, bk, valid)
        m_new = jnp.maximum(mx, jnp.max(s, axis=1, keepdims=True))
        l_new = lx * jnp.exp(mx - m_new) + jnp.sum(jnp.exp(s - bc(m_new, bk)), axis=1, keepdims=True)
        out += [m_new, l_new]
    return tuple(out)


def probs(cfg, keys, q, q2, kb, j, bk, lse, lse2, valid=None):
    """C_vfm and C_agt tiles [bq, bk] from the saved log-sum-exps (columns)."""
    p = jnp.exp(keys.mask(dot_nt(cfg, q, kb) * cfg.scale, j, bk, valid) - bc(lse, bk))
    a = jnp.exp(keys.mask(dot_nt(cfg, q2, kb) * cfg.scale, j, bk, valid) - bc(lse2, bk))
    return p, a


def fwd_out_step(cfg, keys, w, q, q2, kb, vb, j, bk, lse, lse2, acc, valid=None):
    """acc += C_f @ V for one key block; also returns the tile's C_agt."""
    p, a = probs(cfg, keys, q, q2, kb, j, bk, lse, lse2, valid)
    f = gatelib.fuse(cfg.spec, a, p, keys.n, w)
    return acc + dot(cfg, f.astype(vb.dtype), vb), a


def _row_sums(x):
    return jnp.sum(x, axis=1, keepdims=True)


def dq_step(cfg, keys, w, q, q2, do, kb, vb, j, bk, lse, lse2, carry, *, gate_rows: bool, valid=None):
    """The one backward pass over key blocks per query block (row terms and dQ together).

    dQ_i = c sum_j P_ij (P-bar_ij - delta_i) k_j = c (sum_j (P P-bar)_ij k_j - delta_i sum_j P_ij k_j),
    so both sums accumulate alongside delta_i = sum_j P_ij P-bar_ij and no second pass (and
    no second gate evaluation) is needed; likewise dQ' with A, A-bar, delta'.
    carry: (delta, delta2, x, xp, x2, xa, gate) with x = sum (P P-bar) k, xp = sum P k, x2, xa the
    same for A. gate: per-row partial sums of the gate-parameter gradients (gate_rows: a tuple
    of [bq, 1] columns, one per parameter, reduced over rows once at the end) or the packed
    [1, lanes] per-tile sums.
    """
    delta, delta2, x, xp, x2, xa, gacc = carry
    p, a = probs(cfg, keys, q, q2, kb, j, bk, lse, lse2, valid)
    fbar = dot_nt(cfg, do, vb)
    reduce = _row_sums if gate_rows else gatelib.sum11
    _, abar, pbar, sums = gatelib.fuse_vjp(cfg.spec, a, p, fbar, keys.n, w, param_sums=cfg.has_gate, reduce=reduce)
    ppb, aab = p * pbar, a * abar
    delta = delta + jnp.sum(ppb, axis=1, keepdims=True)
    delta2 = delta2 + jnp.sum(aab, axis=1, keepdims=True)
    dt = kb.dtype
    x = x + dot(cfg, ppb.astype(dt), kb)
    xp = xp + dot(cfg, p.astype(dt), kb)
    x2 = x2 + dot(cfg, aab.astype(dt), kb)
    xa = xa + dot(cfg, a.astype(dt), kb)
    if cfg.has_gate:
        if gate_rows:
            gacc = tuple(g + val for g, (_, val) in zip(gacc, sums))
        else:
            gacc = gacc + pack_sums(sums, cfg.spec.lanes)
    return delta, delta2, x, xp, x2, xa, gacc


def gate_row_init(cfg, bq: int):
    return tuple(jnp.zeros((bq, 1), F32) for _ in range(len(gatelib.param_order(cfg.spec))))


def gate_rows_to_packed(cfg, cols):
    """Per-row partial sums (one [bq, 1] column per parameter) -> packed [1, lanes]."""
    order = gatelib.param_order(cfg.spec)
    return pack_sums([(idx, jnp.sum(c, axis=0, keepdims=True)) for idx, c in zip(order, cols)], cfg.spec.lanes)


def dkv_step(cfg, keys, w, kb, vb, qb, q2b, dob, lse, lse2, delta, delta2, carry):
    """Transposed tiles [bk, bq]: row statistics broadcast over keys, no transposes needed.

    Padded or masked keys only touch their own dK/dV rows (discarded or zeroed by the
    caller) and padded queries have dO = 0 and delta = 0, so no mask is needed here.
    """
    dk, dv = carry
    pt = jnp.exp(dot_nt(cfg, kb, qb) * cfg.scale - lse)
    at = jnp.exp(dot_nt(cfg, kb, q2b) * cfg.scale - lse2)
    fbar_t = dot_nt(cfg, vb, dob)
    f_t, abar_t, pbar_t, _ = gatelib.fuse_vjp(cfg.spec, at, pt, fbar_t, keys.n, w, param_sums=False)
    ds_t = pt * (pbar_t - delta)
    ds2_t = at * (abar_t - delta2)
    dv = dv + dot(cfg, f_t.astype(dob.dtype), dob)
    dk = dk + dot(cfg, ds_t.astype(qb.dtype), qb) + dot(cfg, ds2_t.astype(q2b.dtype), q2b)
    return dk, dv
