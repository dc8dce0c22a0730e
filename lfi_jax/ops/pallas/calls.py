"""The pallas_calls of the fused interaction attention: grids, block specs, compiler params."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

import lfi_jax.ops.pallas.kernels as kern
from lfi_jax.ops.pallas.tiles import KernelConfig

F32 = jnp.float32


def _compiler_params(cfg: KernelConfig, ndims: int, bwd: bool):
    if cfg.interpret:
        return None
    if cfg.backend == "gpu":
        warps, stages = (cfg.num_warps_bwd, cfg.num_stages_bwd) if bwd else (cfg.num_warps, cfg.num_stages)
        return pltriton.CompilerParams(num_warps=warps, num_stages=stages)
    if cfg.backend == "tpu":
        sem = ("parallel",) * (ndims - 1) + ("arbitrary",)
        return pltpu.CompilerParams(dimension_semantics=sem)
    return None


def _tile(rows: int, cols: int, fn):
    """BlockSpec of a [rows, cols] tile of a [B, H, R, C] array; fn(grid idx) -> (r, c) block."""
    return pl.BlockSpec((None, None, rows, cols), lambda b, h, *g: (b, h, *fn(*g)))


def _extra_specs(cfg: KernelConfig, valid_block=None):
    """Specs of the gate, valid and nval inputs. valid_block: (width, grid idx -> key block)
    for a streamed [1, width] block of the key-validity row; None = the whole row."""
    specs = []
    if cfg.has_gate:
        if cfg.driver == "grid" and not cfg.interpret:
            specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
        else:
            specs.append(pl.BlockSpec((cfg.heads, cfg.spec.lanes), lambda *g: (0, 0)))
    if cfg.masked:
        if valid_block is None:
            specs.append(pl.BlockSpec((None, 1, cfg.npk), lambda b, h, *g: (b, 0, 0)))
        else:
            width, fn = valid_block
            specs.append(pl.BlockSpec((None, 1, width), lambda b, h, *g: (b, 0, fn(*g))))
        specs.append(pl.BlockSpec((None, 1, 128), lambda b, h, *g: (b, 0, 0)))
    return specs


def _call(cfg, kernel, out_shape, grid, in_specs, out_specs, scratch, name, bwd, *args):
    return pl.pallas_call(
        functools.partial(kernel, cfg),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM(s, F32) for s in scratch],
        compiler_params=_compiler_params(cfg, len(grid), bwd),
        interpret=cfg.interpret,
        name=name,
    )(*args)


def forward(cfg: KernelConfig, q, q2, k, v, extra):
    """q, q2: [B, H, Npq, dp], k, v: [B, H, Npk, dp]; extra: (gate?, valid?, nval?).
    Returns o [B, H, Npq, dp] (v.dtype), lse, lse2 [B, H, 1, Npq] and agt [B, H, 2, 1, Npk]
    (row 0 of C_agt in [:, :, 0, 0]; [:, :, 1] is scratch)."""
    b, h, npq, dp = q.shape
    npk = k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = npq // bq, npk // bk
    out_shape = [
        jax.ShapeDtypeStruct((b, h, npq, dp), v.dtype),
        jax.ShapeDtypeStruct((b, h, 1, npq), F32),
        jax.ShapeDtypeStruct((b, h, 1, npq), F32),
        jax.ShapeDtypeStruct((b, h, 2, 1, npk), F32),
    ]
    if cfg.driver == "loop":
        grid = (b, h, nq)
        in_specs = [_tile(bq, dp, lambda i: (i, 0))] * 2 + [_tile(npk, dp, lambda i: (0, 0))] * 2
        in_specs += _extra_specs(cfg)
        out_specs = [
            _tile(bq, dp, lambda i: (i, 0)),
            _tile(1, bq, lambda i: (0, i)),
            _tile(1, bq, lambda i: (0, i)),
            pl.BlockSpec((None, None, None, 1, npk), lambda b_, h_, i: (b_, h_, jnp.minimum(i, 1), 0, 0)),
        ]
        kernel, scratch = kern.fwd_loop, ()
    else:
        grid = (b, h, nq, 2 * nk)
        in_specs = [
            _tile(bq, dp, lambda i, kk: (i, 0)),
            _tile(bq, dp, lambda i, kk: (i, 0)),
            _tile(bk, dp, lambda i, kk: (lax.rem(kk, nk), 0)),
            _tile(bk, dp, lambda i, kk: (jnp.maximum(kk - nk, 0), 0)),
        ]
        in_specs += _extra_specs(cfg, (bk, lambda i, kk: lax.rem(kk, nk)))
        out_specs = [
            _tile(bq, dp, lambda i, kk: (i, 0)),
            _tile(1, bq, lambda i, kk: (0, i)),
            _tile(1, bq, lambda i, kk: (0, i)),
            pl.BlockSpec(
                (None, None, None, 1, bk),
                lambda b_, h_, i, kk: (b_, h_, jnp.minimum(i, 1), 0, jnp.maximum(kk - nk, 0)),
            ),
        ]
        kernel = kern.fwd_grid
        scratch = [(bq, cfg.width)] * 4 + [(bq, dp)]
    return _call(cfg, kernel, out_shape, grid, in_specs, out_specs, scratch, "interaction_attention_fwd", False,
                 q, q2, k, v, *extra)


def backward(cfg: KernelConfig, q, q2, k, v, do, lse, lse2, extra):
    """Pallas backward. Returns dq, dq2 [B, H, Npq, dp], dk, dv [B, H, Npk, dp] (float32) and
    the per-query-block gate-parameter gradient sums [B, H, nq, 1, lanes] (None without gate
    parameters). dK/dV rows of masked keys are garbage: the caller zeroes them."""
    b, h, npq, dp = q.shape
    npk = k.shape[2]
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    nq, nk = npq // bq, npk // bk
    lanes = cfg.spec.lanes
    q_grad = jax.ShapeDtypeStruct((b, h, npq, dp), F32)
    k_grad = jax.ShapeDtypeStruct((b, h, npk, dp), F32)
    row_shape = jax.ShapeDtypeStruct((b, h, 1, npq), F32)
    dq_out_shape = [q_grad, q_grad, row_shape, row_shape]
    if cfg.has_gate:
        dq_out_shape.append(jax.ShapeDtypeStruct((b, h, nq, 1, lanes), F32))

    # dQ kernel: one pass over the key blocks (row terms and dQ, dQ' together) -------------
    if cfg.driver == "loop":
        grid = (b, h, nq)
        row = lambda i: (i, 0)  # noqa: E731
        in_specs = [_tile(bq, dp, row)] * 3 + [_tile(npk, dp, lambda i: (0, 0))] * 2
        in_specs += [_tile(1, bq, lambda i: (0, i))] * 2 + _extra_specs(cfg)
        out_specs = [_tile(bq, dp, row)] * 2 + [_tile(1, bq, lambda i: (0, i))] * 2
        gspec = pl.BlockSpec((None, None, None, 1, lanes), lambda b_, h_, i: (b_, h_, i, 0, 0))
        kernel, scratch = kern.dq_loop, ()
    else:
        grid = (b, h, nq, nk)
        row = lambda i, kk: (i, 0)  # noqa: E731
        in_specs = [_tile(bq, dp, row)] * 3 + [_tile(bk, dp, lambda i, kk: (kk, 0))] * 2
        in_specs += [_tile(1, bq, lambda i, kk: (0, i))] * 2 + _extra_specs(cfg, (bk, lambda i, kk: kk))
        out_specs = [_tile(bq, dp, row)] * 2 + [_tile(1, bq, lambda i, kk: (0, i))] * 2
        gspec = pl.BlockSpec((None, None, None, 1, lanes), lambda b_, h_, i, kk: (b_, h_, i, 0, 0))
        kernel = kern.dq_grid
        scratch = [(bq, cfg.width)] * 4 + [(1, lanes)] + [(bq, dp)] * 4
    if cfg.has_gate:
        out_specs.append(gspec)
    res = _call(cfg, kernel, dq_out_shape, grid, in_specs, out_specs, scratch, "interaction_attention_dq", True,
                q, q2, do, k, v, lse, lse2, *extra)
    dq, dq2, delta, delta2 = res[:4]
    gsum = res[4] if cfg.has_gate else None

    # dK/dV kernel: key blocks in the grid, query blocks streamed ---------------------------
    if cfg.driver == "loop":
        grid = (b, h, nk)
        in_specs = [_tile(bk, dp, lambda j: (j, 0))] * 2 + [_tile(npq, dp, lambda j: (0, 0))] * 3
        in_specs += [_tile(1, npq, lambda j: (0, 0))] * 4
        out_specs = [_tile(bk, dp, lambda j: (j, 0))] * 2
        kernel, scratch = kern.dkv_loop, ()
    else:
        grid = (b, h, nk, nq)
        in_specs = [_tile(bk, dp, lambda j, i: (j, 0))] * 2 + [_tile(bq, dp, lambda j, i: (i, 0))] * 3
        in_specs += [_tile(1, bq, lambda j, i: (0, i))] * 4
        out_specs = [_tile(bk, dp, lambda j, i: (j, 0))] * 2
        kernel = kern.dkv_grid
        scratch = [(bk, dp), (bk, dp)]
    in_specs += _extra_specs(cfg)
    dk, dv = _call(cfg, kernel, [k_grad, k_grad], grid, in_specs, out_specs, scratch, "interaction_attention_dkv",
                   True, k, v, q, q2, do, lse, lse2, delta, delta2, *extra)
    return dq, dq2, dk, dv, gsum
