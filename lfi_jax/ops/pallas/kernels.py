"""Pallas kernels of the fused interaction attention: forward, dQ (with the row terms), dK/dV.

The per-tile math is in `lfi_jax.ops.pallas.tiles`; the pallas_calls in `calls.py`. Two
drivers run the same step functions:
  "loop"  (GPU/Triton and CPU/interpret): grid (B, H, row blocks); the streamed operand is a
          whole-sequence ref and a `fori_loop` walks its blocks. Triton programs share no
          state, so this is the only form it supports.
  "grid"  (TPU/Mosaic): the streamed blocks are the last, sequential ("arbitrary") grid
          axis, so the pipeline prefetches them into VMEM; running state lives in VMEM
          scratch, column statistics lane-replicated as [block, 128].
The forward walks the key blocks twice (statistics, then output: in the grid driver the last
axis has 2 * nk steps); the dQ kernel once (the row terms delta, delta' and dQ, dQ' in the
same pass); the dK/dV kernel once over the query blocks.

Refs of every kernel: its main inputs, then the packed gate (if any), then `valid` and
`nval` (with a key mask), then the outputs, then (grid driver) the scratch buffers.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

import lfi_jax.ops.pallas.tiles as t
from lfi_jax.ops.reference import MASK_VALUE

F32 = jnp.float32


def _split(cfg: t.KernelConfig, refs, n_in):
    """(main inputs, gate ref or None, Keys, valid ref or None, the rest)."""
    ins = list(refs[:n_in])
    pos = n_in
    gp = None
    if cfg.has_gate:
        gp, pos = refs[pos], pos + 1
    valid = nval = None
    if cfg.masked:
        valid, nval, pos = refs[pos], refs[pos + 1], pos + 2
    return ins, gp, t.Keys(cfg, valid, nval), valid, refs[pos:]


def _col1(x):
    """A lane-replicated column [r, W] -> [r, 1]."""
    return x if x.shape[1] == 1 else jnp.max(x, axis=1, keepdims=True)


def _dq_finish(cfg, delta, delta2, x, xp, x2, xa):
    d1, d2 = _col1(delta), _col1(delta2)
    return (x - d1 * xp) * cfg.scale, (x2 - d2 * xa) * cfg.scale


# ----------------------------------------------------------------------------- loop driver


def fwd_loop(cfg: t.KernelConfig, *refs):
    (q_ref, q2_ref, k_ref, v_ref), gp_ref, keys, _, (o_ref, lse_ref, lse2_ref, agt_ref) = _split(cfg, refs, 4)
    w = t.scalars(cfg, gp_ref)
    bq, bk = q_ref.shape[0], cfg.block_k
    nk = cfg.npk // bk
    i = pl.program_id(2)
    q, q2 = q_ref[...], q2_ref[...]

    def stats(j, carry):
        return t.fwd_stats_step(cfg, keys, q, q2, k_ref[pl.ds(j * bk, bk), :], j, bk, carry)

    init = (jnp.full((bq, 1), MASK_VALUE, F32), jnp.zeros((bq, 1), F32)) * 2
    m, l, m2, l2 = lax.fori_loop(0, nk, stats, init)
    lse, lse2 = m + jnp.log(l), m2 + jnp.log(l2)

    def out(j, acc):
        sl = pl.ds(j * bk, bk)
        acc, a = t.fwd_out_step(cfg, keys, w, q, q2, k_ref[sl, :], v_ref[sl, :], j, bk, lse, lse2, acc)

        @pl.when(i == 0)
        def _():
            agt_ref[:, sl] = t.cls_row(a)

        return acc

    acc = lax.fori_loop(0, nk, out, jnp.zeros((bq, cfg.dp), F32))
    o_ref[...] = acc.astype(o_ref.dtype)
    lse_ref[...] = t.col_to_row(lse)
    lse2_ref[...] = t.col_to_row(lse2)


def dq_loop(cfg: t.KernelConfig, *refs):
    ins, gp_ref, keys, _, outs = _split(cfg, refs, 7)
    q_ref, q2_ref, do_ref, k_ref, v_ref, lse_ref, lse2_ref = ins
    dq_ref, dq2_ref, delta_ref, delta2_ref = outs[:4]
    w = t.scalars(cfg, gp_ref)
    bq, bk = q_ref.shape[0], cfg.block_k_bwd
    nk = cfg.npk // bk
    q, q2, do = q_ref[...], q2_ref[...], do_ref[...]
    lse, lse2 = t.row_to_col(lse_ref[...], 1), t.row_to_col(lse2_ref[...], 1)

    def body(j, carry):
        sl = pl.ds(j * bk, bk)
        return t.dq_step(cfg, keys, w, q, q2, do, k_ref[sl, :], v_ref[sl, :], j, bk, lse, lse2, carry, gate_rows=True)

    col = jnp.zeros((bq, 1), F32)
    tile = jnp.zeros((bq, cfg.dp), F32)
    init = (col, col, tile, tile, tile, tile, t.gate_row_init(cfg, bq) if cfg.has_gate else ())
    delta, delta2, x, xp, x2, xa, gcols = lax.fori_loop(0, nk, body, init)
    dq_ref[...], dq2_ref[...] = _dq_finish(cfg, delta, delta2, x, xp, x2, xa)
    delta_ref[...] = t.col_to_row(delta)
    delta2_ref[...] = t.col_to_row(delta2)
    if cfg.has_gate:
        outs[4][...] = t.gate_rows_to_packed(cfg, gcols)


def dkv_loop(cfg: t.KernelConfig, *refs):
    ins, gp_ref, keys, _, (dk_ref, dv_ref) = _split(cfg, refs, 9)
    k_ref, v_ref, q_ref, q2_ref, do_ref, lse_ref, lse2_ref, delta_ref, delta2_ref = ins
    w = t.scalars(cfg, gp_ref)
    bk, bq = k_ref.shape[0], cfg.block_q_bwd
    nq = cfg.npq // bq
    kb, vb = k_ref[...], v_ref[...]

    def body(i, carry):
        sl = pl.ds(i * bq, bq)
        stats = [r[:, sl] for r in (lse_ref, lse2_ref, delta_ref, delta2_ref)]
        return t.dkv_step(cfg, keys, w, kb, vb, q_ref[sl, :], q2_ref[sl, :], do_ref[sl, :], *stats, carry)

    zero = jnp.zeros((bk, cfg.dp), F32)
    dk, dv = lax.fori_loop(0, nq, body, (zero, zero))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


# ----------------------------------------------------------------------------- grid driver


def fwd_grid(cfg: t.KernelConfig, *refs):
    (q_ref, q2_ref, k_ref, v_ref), gp_ref, keys, valid_ref, rest = _split(cfg, refs, 4)
    o_ref, lse_ref, lse2_ref, agt_ref, m_ref, l_ref, m2_ref, l2_ref, acc_ref = rest
    w = t.scalars(cfg, gp_ref)
    bk = cfg.block_k
    nk = cfg.npk // bk
    i, kk = pl.program_id(2), pl.program_id(3)
    valid = None if valid_ref is None else valid_ref[...]

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
        carry = t.fwd_stats_step(cfg, keys, q_ref[...], q2_ref[...], k_ref[...], kk, bk, carry, valid)
        for ref, val in zip((m_ref, l_ref, m2_ref, l2_ref), carry):
            ref[...] = val

    @pl.when(kk == nk - 1)
    def _():  # from here on m_ref, m2_ref hold the log-sum-exps
        m_ref[...] = m_ref[...] + jnp.log(l_ref[...])
        m2_ref[...] = m2_ref[...] + jnp.log(l2_ref[...])

    @pl.when(kk >= nk)
    def _():
        j = kk - nk
        acc, a = t.fwd_out_step(
            cfg, keys, w, q_ref[...], q2_ref[...], k_ref[...], v_ref[...], j, bk, m_ref[...], m2_ref[...],
            acc_ref[...], valid,
        )
        acc_ref[...] = acc

        @pl.when(i == 0)
        def _():
            agt_ref[...] = t.cls_row(a)

    @pl.when(kk == 2 * nk - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)
        lse_ref[...] = t.col_to_row(m_ref[...])
        lse2_ref[...] = t.col_to_row(m2_ref[...])


def dq_grid(cfg: t.KernelConfig, *refs):
    ins, gp_ref, keys, valid_ref, outs = _split(cfg, refs, 7)
    q_ref, q2_ref, do_ref, k_ref, v_ref, lse_ref, lse2_ref = ins
    n_out = 4 + int(cfg.has_gate)
    dq_ref, dq2_ref, delta_ref, delta2_ref = outs[:4]
    g_ref = outs[4] if cfg.has_gate else None
    lse_s, lse2_s, delta_s, delta2_s, gacc_s, x_s, xp_s, x2_s, xa_s = outs[n_out:]
    w = t.scalars(cfg, gp_ref)
    bk = cfg.block_k_bwd
    nk = cfg.npk // bk
    kk = pl.program_id(3)
    valid = None if valid_ref is None else valid_ref[...]

    @pl.when(kk == 0)
    def _():
        lse_s[...] = t.row_to_col(lse_ref[...], cfg.width)
        lse2_s[...] = t.row_to_col(lse2_ref[...], cfg.width)
        for ref in (delta_s, delta2_s, gacc_s, x_s, xp_s, x2_s, xa_s):
            ref[...] = jnp.zeros(ref.shape, F32)

    state = (delta_s, delta2_s, x_s, xp_s, x2_s, xa_s, gacc_s)
    carry = tuple(r[...] for r in state)
    carry = t.dq_step(
        cfg, keys, w, q_ref[...], q2_ref[...], do_ref[...], k_ref[...], v_ref[...], kk, bk,
        lse_s[...], lse2_s[...], carry, gate_rows=False, valid=valid,
    )
    for ref, val in zip(state, carry):
        ref[...] = val

    @pl.when(kk == nk - 1)
    def _():
        dq_ref[...], dq2_ref[...] = _dq_finish(cfg, delta_s[...], delta2_s[...], x_s[...], xp_s[...], x2_s[...],
                                               xa_s[...])
        delta_ref[...] = t.col_to_row(delta_s[...])
        delta2_ref[...] = t.col_to_row(delta2_s[...])
        if g_ref is not None:
            g_ref[...] = gacc_s[...]


def dkv_grid(cfg: t.KernelConfig, *refs):
    ins, gp_ref, keys, _, (dk_ref, dv_ref, dk_s, dv_s) = _split(cfg, refs, 9)
    k_ref, v_ref, q_ref, q2_ref, do_ref, lse_ref, lse2_ref, delta_ref, delta2_ref = ins
    w = t.scalars(cfg, gp_ref)
    i = pl.program_id(3)
    nq = cfg.npq // cfg.block_q_bwd

    @pl.when(i == 0)
    def _():
        dk_s[...] = jnp.zeros(dk_s.shape, F32)
        dv_s[...] = jnp.zeros(dv_s.shape, F32)

    stats = [r[...] for r in (lse_ref, lse2_ref, delta_ref, delta2_ref)]
    dk, dv = t.dkv_step(
        cfg, keys, w, k_ref[...], v_ref[...], q_ref[...], q2_ref[...], do_ref[...], *stats, (dk_s[...], dv_s[...])
    )
    dk_s[...] = dk
    dv_s[...] = dv

    @pl.when(i == nq - 1)
    def _():
        dk_ref[...] = dk_s[...] * cfg.scale
        dv_ref[...] = dv_s[...]
