"""Pallas kernels of the fused interaction attention: forward, dQ (with the row pass), dK/dV.

Layout inside: [B, H, Np, dp] (N padded to a multiple of every block size, d padded to a
power of two on GPU), per-row statistics as lane-dense rows [B, H, 1, Np] float32.

Two drivers run the same per-tile math (`_fwd_*`, `_dq_*`, `_dkv_*` step functions):
  "loop"  (GPU/Triton and CPU/interpret): grid (B, H, row blocks); the streamed operand is a
          whole-sequence ref and a `fori_loop` walks its blocks. Triton programs share no
          state, so this is the only form it supports.
  "grid"  (TPU/Mosaic): the streamed blocks are the last, sequential ("arbitrary") grid
          axis, so the pipeline prefetches them into VMEM; running state lives in VMEM
          scratch, column statistics lane-replicated as [block, 128].
Two-pass kernels (forward: statistics then output; dQ: row terms then dQ) walk the key
blocks twice; in the grid driver the last axis has 2 * nk steps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

import lfi_jax.ops.pallas.gate as gatelib

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: exp(MASK - m) == 0, no NaN
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static shape and backend facts shared by the three kernels."""

    batch: int
    heads: int
    n: int  # true sequence length (keys == queries)
    np_: int  # padded length
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
    num_warps: int = 4
    num_stages: int = 2

    @property
    def width(self) -> int:  # column-statistic width in scratch (grid driver)
        return 128 if self.driver == "grid" else 1

    @property
    def mask_keys(self) -> bool:
        return self.np_ > self.n


# ----------------------------------------------------------------------------- tile helpers


def _dot_nt(a, b):  # a [m, k], b [n, k] -> [m, n] f32
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot(a, b):  # a [m, k], b [k, n] -> [m, n] f32
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _bc(x, width: int):
    """Column statistic [r, W] made broadcastable against [r, width]."""
    if x.shape[1] in (1, width):
        return x
    return jnp.tile(x, (1, width // x.shape[1]))


def _eye(r: int):
    return lax.broadcasted_iota(jnp.int32, (r, r), 0) == lax.broadcasted_iota(jnp.int32, (r, r), 1)


def _col_to_row(c):
    """[r, W] (column, replicated over W) -> [1, r], by a masked reduction (no transpose)."""
    r = c.shape[0]
    return jnp.sum(jnp.where(_eye(r), _bc(c, r), 0.0), axis=0, keepdims=True)


def _row_to_col(row, width: int):
    """[1, r] -> [r, width] (replicated), by a masked reduction (no transpose)."""
    r = row.shape[1]
    col = jnp.sum(jnp.where(_eye(r), row, 0.0), axis=1, keepdims=True)
    return col if width == 1 else jnp.broadcast_to(col, (r, width))


def _scalars(cfg: KernelConfig, gp_ref):
    if gp_ref is None:
        return None
    h = pl.program_id(1)
    vals = [gp_ref[h, idx] for idx in range(cfg.spec.num_params)]
    return vals.__getitem__


def _masked_logits(cfg, qb, kb, j, bk):
    s = _dot_nt(qb, kb) * cfg.scale
    if cfg.mask_keys:
        col = j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(col < cfg.n, s, MASK_VALUE)
    return s


def _probs(cfg, q, q2, kb, j, bk, lse, lse2):
    """C_vfm and C_agt tiles [bq, bk] from the saved log-sum-exps (columns)."""
    p = jnp.exp(_masked_logits(cfg, q, kb, j, bk) - _bc(lse, bk))
    a = jnp.exp(_masked_logits(cfg, q2, kb, j, bk) - _bc(lse2, bk))
    return p, a


def _pack_sums(sums, lanes: int):
    lane = lax.broadcasted_iota(jnp.int32, (1, lanes), 1)
    out = jnp.zeros((1, lanes), F32)
    for idx, val in sums:
        out = out + jnp.where(lane == idx, val, 0.0)
    return out


# ----------------------------------------------------------------------------- step math


def _fwd_stats_step(cfg, q, q2, kb, j, bk, carry):
    """Online max / sum of both softmaxes over one key block."""
    m, l, m2, l2 = carry
    out = []
    for qx, mx, lx in ((q, m, l), (q2, m2, l2)):
        s = _masked_logits(cfg, qx, kb, j, bk)
        m_new = jnp.maximum(mx, jnp.max(s, axis=1, keepdims=True))
        l_new = lx * jnp.exp(mx - m_new) + jnp.sum(jnp.exp(s - _bc(m_new, bk)), axis=1, keepdims=True)
        out += [m_new, l_new]
    return tuple(out)


def _fwd_out_step(cfg, w, q, q2, kb, vb, j, bk, lse, lse2, acc):
    """acc += C_f @ V for one key block; also returns the tile's C_agt."""
    p, a = _probs(cfg, q, q2, kb, j, bk, lse, lse2)
    f = gatelib.fuse(cfg.spec, a, p, cfg.n, w)
    return acc + _dot(f.astype(vb.dtype), vb), a


def _cls_row(a):
    """Row 0 of a [bq, bk] tile as [1, bk] (masked reduction: lowers everywhere)."""
    row = lax.broadcasted_iota(jnp.int32, a.shape, 0)
    return jnp.sum(jnp.where(row == 0, a, 0.0), axis=0, keepdims=True)


def _dq_rows_step(cfg, w, q, q2, do, kb, vb, j, bk, lse, lse2, carry):
    """Row pass: delta = sum_j P P-bar, delta' = sum_j A A-bar, gate-parameter sums."""
    delta, delta2, gacc = carry
    p, a = _probs(cfg, q, q2, kb, j, bk, lse, lse2)
    fbar = _dot_nt(do, vb)
    want = cfg.spec.num_params > 0
    _, abar, pbar, sums = gatelib.fuse_vjp(cfg.spec, a, p, fbar, cfg.n, w, param_sums=want)
    delta = delta + jnp.sum(p * pbar, axis=1, keepdims=True)
    delta2 = delta2 + jnp.sum(a * abar, axis=1, keepdims=True)
    if want:
        gacc = gacc + _pack_sums(sums, cfg.spec.lanes)
    return delta, delta2, gacc


def _dq_grad_step(cfg, w, q, q2, do, kb, vb, j, bk, lse, lse2, delta, delta2, carry):
    dq, dq2 = carry
    p, a = _probs(cfg, q, q2, kb, j, bk, lse, lse2)
    fbar = _dot_nt(do, vb)
    _, abar, pbar, _ = gatelib.fuse_vjp(cfg.spec, a, p, fbar, cfg.n, w, param_sums=False)
    ds = p * (pbar - _bc(delta, bk))
    ds2 = a * (abar - _bc(delta2, bk))
    return dq + _dot(ds.astype(kb.dtype), kb), dq2 + _dot(ds2.astype(kb.dtype), kb)


def _dkv_step(cfg, w, kb, vb, qb, q2b, dob, lse, lse2, delta, delta2, carry):
    """Transposed tiles [bk, bq]: row statistics broadcast over keys, no transposes needed.

    Padded keys only touch their own (discarded) dK/dV rows and padded queries have
    dO = 0 and delta = 0, so no mask is needed here.
    """
    dk, dv = carry
    pt = jnp.exp(_dot_nt(kb, qb) * cfg.scale - lse)
    at = jnp.exp(_dot_nt(kb, q2b) * cfg.scale - lse2)
    fbar_t = _dot_nt(vb, dob)
    f_t, abar_t, pbar_t, _ = gatelib.fuse_vjp(cfg.spec, at, pt, fbar_t, cfg.n, w, param_sums=False)
    ds_t = pt * (pbar_t - delta)
    ds2_t = at * (abar_t - delta2)
    dv = dv + _dot(f_t.astype(dob.dtype), dob)
    dk = dk + _dot(ds_t.astype(qb.dtype), qb) + _dot(ds2_t.astype(q2b.dtype), q2b)
    return dk, dv


# ----------------------------------------------------------------------------- loop driver


def _split(refs, n_in, has_gate):
    ins = list(refs[:n_in])
    gp = refs[n_in] if has_gate else None
    return ins, gp, refs[n_in + int(has_gate) :]


def _fwd_loop(cfg: KernelConfig, *refs):
    has_gate = cfg.spec.num_params > 0
    (q_ref, q2_ref, k_ref, v_ref), gp_ref, (o_ref, lse_ref, lse2_ref, agt_ref) = _split(refs, 4, has_gate)
    w = _scalars(cfg, gp_ref)
    bq, bk = q_ref.shape[0], cfg.block_k
    nk = cfg.np_ // bk
    i = pl.program_id(2)
    q, q2 = q_ref[...], q2_ref[...]

    def stats(j, carry):
        return _fwd_stats_step(cfg, q, q2, k_ref[pl.ds(j * bk, bk), :], j, bk, carry)

    init = (jnp.full((bq, 1), MASK_VALUE, F32), jnp.zeros((bq, 1), F32)) * 2
    m, l, m2, l2 = lax.fori_loop(0, nk, stats, init)
    lse, lse2 = m + jnp.log(l), m2 + jnp.log(l2)

    def out(j, acc):
        sl = pl.ds(j * bk, bk)
        acc, a = _fwd_out_step(cfg, w, q, q2, k_ref[sl, :], v_ref[sl, :], j, bk, lse, lse2, acc)

        @pl.when(i == 0)
        def _():
            agt_ref[:, sl] = _cls_row(a)

        return acc

    acc = lax.fori_loop(0, nk, out, jnp.zeros((bq, cfg.dp), F32))
    o_ref[...] = acc.astype(o_ref.dtype)
    lse_ref[...] = _col_to_row(lse)
    lse2_ref[...] = _col_to_row(lse2)


def _dq_loop(cfg: KernelConfig, *refs):
    has_gate = cfg.spec.num_params > 0
    ins, gp_ref, outs = _split(refs, 7, has_gate)
    q_ref, q2_ref, do_ref, k_ref, v_ref, lse_ref, lse2_ref = ins
    dq_ref, dq2_ref, delta_ref, delta2_ref = outs[:4]
    w = _scalars(cfg, gp_ref)
    bq, bk = q_ref.shape[0], cfg.block_k_bwd
    nk = cfg.np_ // bk
    q, q2, do = q_ref[...], q2_ref[...], do_ref[...]
    lse, lse2 = _row_to_col(lse_ref[...], 1), _row_to_col(lse2_ref[...], 1)

    def rows(j, carry):
        sl = pl.ds(j * bk, bk)
        return _dq_rows_step(cfg, w, q, q2, do, k_ref[sl, :], v_ref[sl, :], j, bk, lse, lse2, carry)

    zero_col = jnp.zeros((bq, 1), F32)
    init = (zero_col, zero_col, jnp.zeros((1, cfg.spec.lanes), F32))
    delta, delta2, gacc = lax.fori_loop(0, nk, rows, init)

    def grads(j, carry):
        sl = pl.ds(j * bk, bk)
        kb, vb = k_ref[sl, :], v_ref[sl, :]
        return _dq_grad_step(cfg, w, q, q2, do, kb, vb, j, bk, lse, lse2, delta, delta2, carry)

    zero = jnp.zeros((bq, cfg.dp), F32)
    dq, dq2 = lax.fori_loop(0, nk, grads, (zero, zero))
    dq_ref[...] = dq * cfg.scale
    dq2_ref[...] = dq2 * cfg.scale
    delta_ref[...] = _col_to_row(delta)
    delta2_ref[...] = _col_to_row(delta2)
    if has_gate:
        outs[4][...] = gacc


def _dkv_loop(cfg: KernelConfig, *refs):
    has_gate = cfg.spec.num_params > 0
    ins, gp_ref, (dk_ref, dv_ref) = _split(refs, 9, has_gate)
    k_ref, v_ref, q_ref, q2_ref, do_ref, lse_ref, lse2_ref, delta_ref, delta2_ref = ins
    w = _scalars(cfg, gp_ref)
    bk, bq = k_ref.shape[0], cfg.block_q_bwd
    nq = cfg.np_ // bq
    kb, vb = k_ref[...], v_ref[...]

    def body(i, carry):
        sl = pl.ds(i * bq, bq)
        stats = [r[:, sl] for r in (lse_ref, lse2_ref, delta_ref, delta2_ref)]
        return _dkv_step(cfg, w, kb, vb, q_ref[sl, :], q2_ref[sl, :], do_ref[sl, :], *stats, carry)

    zero = jnp.zeros((bk, cfg.dp), F32)
    dk, dv = lax.fori_loop(0, nq, body, (zero, zero))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


# ----------------------------------------------------------------------------- grid driver


def _fwd_grid(cfg: KernelConfig, *refs):
    has_gate = cfg.spec.num_params > 0
    (q_ref, q2_ref, k_ref, v_ref), gp_ref, rest = _split(refs, 4, has_gate)
    o_ref, lse_ref, lse2_ref, agt_ref, m_ref, l_ref, m2_ref, l2_ref, acc_ref = rest
    w = _scalars(cfg, gp_ref)
    bk = cfg.block_k
    nk = cfg.np_ // bk
    i, kk = pl.program_id(2), pl.program_id(3)

    @pl.when(kk == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, F32)
        m2_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, F32)
        l_ref[...] = jnp.zeros(l_ref.shape, F32)
        l2_ref[...] = jnp.zeros(l_ref.shape, F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(kk < nk)
    def _():
        carry = (m_ref[...], l_ref[...], m2_ref[...], l2_ref[...])
        carry = _fwd_stats_step(cfg, q_ref[...], q2_ref[...], k_ref[...], kk, bk, carry)
        for ref, val in zip((m_ref, l_ref, m2_ref, l2_ref), carry):
            ref[...] = val

    @pl.when(kk == nk - 1)
    def _():  # from here on m_ref, m2_ref hold the log-sum-exps
        m_ref[...] = m_ref[...] + jnp.log(l_ref[...])
        m2_ref[...] = m2_ref[...] + jnp.log(l2_ref[...])

    @pl.when(kk >= nk)
    def _():
        j = kk - nk
        acc, a = _fwd_out_step(
            cfg, w, q_ref[...], q2_ref[...], k_ref[...], v_ref[...], j, bk, m_ref[...], m2_ref[...], acc_ref[...]
        )
        acc_ref[...] = acc

        @pl.when(i == 0)
        def _():
            agt_ref[...] = _cls_row(a)

    @pl.when(kk == 2 * nk - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)
        lse_ref[...] = _col_to_row(m_ref[...])
        lse2_ref[...] = _col_to_row(m2_ref[...])


def _dq_grid(cfg: KernelConfig, *refs):
    has_gate = cfg.spec.num_params > 0
    ins, gp_ref, outs = _split(refs, 7, has_gate)
    q_ref, q2_ref, do_ref, k_ref, v_ref, lse_ref, lse2_ref = ins
    if has_gate:
        dq_ref, dq2_ref, delta_ref, delta2_ref, g_ref, *scratch = outs
    else:
        (dq_ref, dq2_ref, delta_ref, delta2_ref, *scratch), g_ref = outs, None
    lse_s, lse2_s, delta_s, delta2_s, gacc_s, dq_s, dq2_s = scratch
    w = _scalars(cfg, gp_ref)
    bk = cfg.block_k_bwd
    nk = cfg.np_ // bk
    kk = pl.program_id(3)
    width = cfg.width

    @pl.when(kk == 0)
    def _():
        lse_s[...] = _row_to_col(lse_ref[...], width)
        lse2_s[...] = _row_to_col(lse2_ref[...], width)
        for ref in (delta_s, delta2_s, gacc_s, dq_s, dq2_s):
            ref[...] = jnp.zeros(ref.shape, F32)

    @pl.when(kk < nk)
    def _():
        carry = (delta_s[...], delta2_s[...], gacc_s[...])
        delta, delta2, gacc = _dq_rows_step(
            cfg, w, q_ref[...], q2_ref[...], do_ref[...], k_ref[...], v_ref[...], kk, bk,
            lse_s[...], lse2_s[...], carry,
        )
        delta_s[...], delta2_s[...], gacc_s[...] = delta, delta2, gacc

    @pl.when(kk >= nk)
    def _():
        carry = (dq_s[...], dq2_s[...])
        dq, dq2 = _dq_grad_step(
            cfg, w, q_ref[...], q2_ref[...], do_ref[...], k_ref[...], v_ref[...], kk - nk, bk,
            lse_s[...], lse2_s[...], delta_s[...], delta2_s[...], carry,
        )
        dq_s[...], dq2_s[...] = dq, dq2

    @pl.when(kk == 2 * nk - 1)
    def _():
        dq_ref[...] = dq_s[...] * cfg.scale
        dq2_ref[...] = dq2_s[...] * cfg.scale
        delta_ref[...] = _col_to_row(delta_s[...])
        delta2_ref[...] = _col_to_row(delta2_s[...])
        if g_ref is not None:
            g_ref[...] = gacc_s[...]


def _dkv_grid(cfg: KernelConfig, *refs):
    has_gate = cfg.spec.num_params > 0
    ins, gp_ref, (dk_ref, dv_ref, dk_s, dv_s) = _split(refs, 9, has_gate)
    k_ref, v_ref, q_ref, q2_ref, do_ref, lse_ref, lse2_ref, delta_ref, delta2_ref = ins
    w = _scalars(cfg, gp_ref)
    i = pl.program_id(3)
    nq = cfg.np_ // cfg.block_q_bwd

    @pl.when(i == 0)
    def _():
        dk_s[...] = jnp.zeros(dk_s.shape, F32)
        dv_s[...] = jnp.zeros(dv_s.shape, F32)

    stats = [r[...] for r in (lse_ref, lse2_ref, delta_ref, delta2_ref)]
    dk, dv = _dkv_step(
        cfg, w, k_ref[...], v_ref[...], q_ref[...], q2_ref[...], do_ref[...], *stats, (dk_s[...], dv_s[...])
    )
    dk_s[...] = dk
    dv_s[...] = dv

    @pl.when(i == nq - 1)
    def _():
        dk_ref[...] = dk_s[...] * cfg.scale
        dv_ref[...] = dv_s[...]


# ----------------------------------------------------------------------------- pallas_call


def _compiler_params(cfg: KernelConfig, ndims: int):
    if cfg.interpret:
        return None
    if cfg.backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        sem = ("parallel",) * (ndims - 1) + ("arbitrary",)
        return pltpu.CompilerParams(dimension_semantics=sem)
    return None


def _gate_spec(cfg: KernelConfig):
    if cfg.driver == "grid" and not cfg.interpret:
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec((cfg.heads, cfg.spec.lanes), lambda *g: (0, 0))


def _scratch(cfg: KernelConfig, shapes):
    from jax.experimental.pallas import tpu as pltpu

    return [pltpu.VMEM(s, F32) for s in shapes]


def _tile(rows: int, cols: int, fn):
    """BlockSpec of a [rows, cols] tile of a [B, H, R, C] array; fn(grid idx) -> (r, c) block."""
    return pl.BlockSpec((None, None, rows, cols), lambda b, h, *g: (b, h, *fn(*g)))


def forward(cfg: KernelConfig, q, q2, k, v, gp):
    """q, q2, k, v: [B, H, Np, dp]. Returns o [B, H, Np, dp] (v.dtype), lse, lse2 [B, H, 1, Np]
    and agt [B, H, 2, 1, Np] (row 0 of C_agt in [:, :, 0, 0]; [:, :, 1] is scratch)."""
    b, h, np_, dp = q.shape
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = np_ // bq, np_ // bk
    has_gate = gp is not None
    out_shape = [
        jax.ShapeDtypeStruct((b, h, np_, dp), v.dtype),
        jax.ShapeDtypeStruct((b, h, 1, np_), F32),
        jax.ShapeDtypeStruct((b, h, 1, np_), F32),
        jax.ShapeDtypeStruct((b, h, 2, 1, np_), F32),
    ]
    if cfg.driver == "loop":
        grid = (b, h, nq)
        in_specs = [
            _tile(bq, dp, lambda i: (i, 0)),
            _tile(bq, dp, lambda i: (i, 0)),
            _tile(np_, dp, lambda i: (0, 0)),
            _tile(np_, dp, lambda i: (0, 0)),
        ]
        out_specs = [
            _tile(bq, dp, lambda i: (i, 0)),
            _tile(1, bq, lambda i: (0, i)),
            _tile(1, bq, lambda i: (0, i)),
            pl.BlockSpec((None, None, None, 1, np_), lambda b_, h_, i: (b_, h_, jnp.minimum(i, 1), 0, 0)),
        ]
        kernel, scratch = _fwd_loop, ()
    else:
        grid = (b, h, nq, 2 * nk)
        in_specs = [
            _tile(bq, dp, lambda i, kk: (i, 0)),
            _tile(bq, dp, lambda i, kk: (i, 0)),
            _tile(bk, dp, lambda i, kk: (lax.rem(kk, nk), 0)),
            _tile(bk, dp, lambda i, kk: (jnp.maximum(kk - nk, 0), 0)),
        ]
        out_specs = [
            _tile(bq, dp, lambda i, kk: (i, 0)),
            _tile(1, bq, lambda i, kk: (0, i)),
            _tile(1, bq, lambda i, kk: (0, i)),
            pl.BlockSpec(
                (None, None, None, 1, bk),
                lambda b_, h_, i, kk: (b_, h_, jnp.minimum(i, 1), 0, jnp.maximum(kk - nk, 0)),
            ),
        ]
        w = cfg.width
        kernel = _fwd_grid
        scratch = _scratch(cfg, [(bq, w)] * 4 + [(bq, dp)])
    if has_gate:
        in_specs.append(_gate_spec(cfg))
    args = (q, q2, k, v) + ((gp,) if has_gate else ())
    return pl.pallas_call(
        functools.partial(kernel, cfg),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=_compiler_params(cfg, len(grid)),
        interpret=cfg.interpret,
        name="interaction_attention_fwd",
    )(*args)


def backward(cfg: KernelConfig, q, q2, k, v, do, lse, lse2, gp):
    """Pallas backward. Returns dq, dq2, dk, dv [B, H, Np, dp] (float32) and the per-block
    gate-parameter gradient sums [B, H, nq, 1, lanes] (None without gate parameters)."""
    b, h, np_, dp = q.shape
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    nq, nk = np_ // bq, np_ // bk
    has_gate = gp is not None
    lanes = cfg.spec.lanes
    grad_shape = jax.ShapeDtypeStruct((b, h, np_, dp), F32)
    row_shape = jax.ShapeDtypeStruct((b, h, 1, np_), F32)
    dq_out_shape = [grad_shape, grad_shape, row_shape, row_shape]
    if has_gate:
        dq_out_shape.append(jax.ShapeDtypeStruct((b, h, nq, 1, lanes), F32))
    extra = ((gp,) if has_gate else ())
    w = cfg.width

    # dQ kernel: row pass (delta, delta', gate sums), then dQ, dQ' -------------------------
    if cfg.driver == "loop":
        grid = (b, h, nq)
        row = lambda i: (i, 0)  # noqa: E731
        full = lambda i: (0, 0)  # noqa: E731
        in_specs = [_tile(bq, dp, row)] * 3 + [_tile(np_, dp, full)] * 2 + [_tile(1, bq, lambda i: (0, i))] * 2
        out_specs = [_tile(bq, dp, row)] * 2 + [_tile(1, bq, lambda i: (0, i))] * 2
        gspec = pl.BlockSpec((None, None, None, 1, lanes), lambda b_, h_, i: (b_, h_, i, 0, 0))
        kernel, scratch = _dq_loop, ()
    else:
        grid = (b, h, nq, 2 * nk)
        row = lambda i, kk: (i, 0)  # noqa: E731
        kv = lambda i, kk: (lax.rem(kk, nk), 0)  # noqa: E731
        in_specs = [_tile(bq, dp, row)] * 3 + [_tile(bk, dp, kv)] * 2 + [_tile(1, bq, lambda i, kk: (0, i))] * 2
        out_specs = [_tile(bq, dp, row)] * 2 + [_tile(1, bq, lambda i, kk: (0, i))] * 2
        gspec = pl.BlockSpec((None, None, None, 1, lanes), lambda b_, h_, i, kk: (b_, h_, i, 0, 0))
        kernel = _dq_grid
        scratch = _scratch(cfg, [(bq, w)] * 4 + [(1, lanes), (bq, dp), (bq, dp)])
    if has_gate:
        in_specs.append(_gate_spec(cfg))
        out_specs.append(gspec)
    res = pl.pallas_call(
        functools.partial(kernel, cfg),
        out_shape=dq_out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=_compiler_params(cfg, len(grid)),
        interpret=cfg.interpret,
        name="interaction_attention_dq",
    )(q, q2, do, k, v, lse, lse2, *extra)
    dq, dq2, delta, delta2 = res[:4]
    gsum = res[4] if has_gate else None

    # dK/dV kernel: key blocks in the grid, query blocks streamed ---------------------------
    if cfg.driver == "loop":
        grid = (b, h, nk)
        in_specs = [_tile(bk, dp, lambda j: (j, 0))] * 2 + [_tile(np_, dp, lambda j: (0, 0))] * 3
        in_specs += [_tile(1, np_, lambda j: (0, 0))] * 4
        out_specs = [_tile(bk, dp, lambda j: (j, 0))] * 2
        kernel, scratch = _dkv_loop, ()
    else:
        grid = (b, h, nk, nq)
        in_specs = [_tile(bk, dp, lambda j, i: (j, 0))] * 2 + [_tile(bq, dp, lambda j, i: (i, 0))] * 3
        in_specs += [_tile(1, bq, lambda j, i: (0, i))] * 4
        out_specs = [_tile(bk, dp, lambda j, i: (j, 0))] * 2
        kernel = _dkv_grid
        scratch = _scratch(cfg, [(bk, dp), (bk, dp)])
    if has_gate:
        in_specs.append(_gate_spec(cfg))
    dk, dv = pl.pallas_call(
        functools.partial(kernel, cfg),
        out_shape=[grad_shape, grad_shape],
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=_compiler_params(cfg, len(grid)),
        interpret=cfg.interpret,
        name="interaction_attention_dkv",
    )(k, v, q, q2, do, lse, lse2, delta, delta2, *extra)
    return dq, dq2, dk, dv, gsum
