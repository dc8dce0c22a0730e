"""Fused interaction attention (SPEC section 1) in Pallas, with a custom VJP.

    o, agt_cls = interaction_attention_pallas(q, q2, k, v, gate, key_mask=None)

Same contract as `lfi_jax.ops.interaction_attention` (q, q2 [B, Nq, H, d], k [B, Nk, H, d],
v [B, Nk, H, dv] (q, k and v are zero-padded to one width inside);
gate GateParams, SPEC dict or None; key_mask [B, Nk] bool or None; o [B, Nq, H, dv] in v.dtype,
agt_cls [B, H, Nk] float32). C_vfm, C_agt, the gate activations and C_f only ever exist as
[block_q, block_k] tiles: memory is O(N) per head.

Forward (one kernel, grid (B, H, query blocks)): pass 1 streams the key blocks for the
online row max and sum of both softmaxes; pass 2 recomputes both logit tiles, normalises
them with the log-sum-exps, applies the per-head gate and accumulates C_f @ V. It writes o,
the CLS row of C_agt and the two log-sum-exps, which (with q, q2, k, v and the gate) are all
the backward keeps. Nq and Nk are padded to the block sizes; padded keys get a finite large
negative logit, and z = [N C_agt, N C_vfm] uses the true N. With a key mask the kernels also
read the key-validity row (masked keys get the same negative logit, so no probability mass)
and the per-example number of valid keys (the gate's N); dK, dV rows of masked keys are zeroed
after the kernel. A row whose keys are all masked is not meaningful (it spreads its mass
uniformly over the masked keys rather than being 0 as in the jnp implementations).

Backward. Per head, per entry (i, j) (A = C_agt, P = C_vfm, n = N, c = 1/sqrt(d)):

    h_m = n A w1[0,m] + n P w1[1,m] + b1[m],   u_m = gelu(h_m)
    t_k = b2[k] + sum_m u_m w2[m,k],           g1 = sigmoid(t_0), g2 = sigmoid(t_1)
    F   = g1 A + g2 P,                         o_i = sum_j F_ij v_j

With O-bar the cotangent of o (bars are cotangents):

    F-bar_ij = O-bar_i . v_j                    v-bar_j = sum_i F_ij O-bar_i
    t-bar_0  = F-bar A g1 (1 - g1)              t-bar_1 = F-bar P g2 (1 - g2)
    h-bar_m  = (t-bar_0 w2[m,0] + t-bar_1 w2[m,1]) gelu'(h_m)
    A-bar    = F-bar g1 + n sum_m h-bar_m w1[0,m]
    P-bar    = F-bar g2 + n sum_m h-bar_m w1[1,m]
    b2-bar[k] = sum t-bar_k,  w2-bar[m,k] = sum u_m t-bar_k,  b1-bar[m] = sum h-bar_m,
    w1-bar[0,m] = sum n A h-bar_m,  w1-bar[1,m] = sum n P h-bar_m      (sums over b, i, j)

(linear gate: t_k = b2[k] + n A w2[0,k] + n P w2[1,k], so A-bar = F-bar g1 + n sum_k
t-bar_k w2[0,k] and P-bar likewise with w2[1,k]; no gate: A-bar = P-bar = F-bar / 2.)
Through the softmaxes (S = c q k^T, S' = c q' k^T):

    S-bar_ij  = P_ij (P-bar_ij - delta_i),     delta_i  = sum_j P_ij P-bar_ij
    S'-bar_ij = A_ij (A-bar_ij - delta'_i),    delta'_i = sum_j A_ij A-bar_ij
    q-bar_i = c sum_j S-bar_ij k_j,  q'-bar_i = c sum_j S'-bar_ij k_j,
    k-bar_j = c sum_i (S-bar_ij q_i + S'-bar_ij q'_i)

In flash attention the row term delta_i equals O-bar_i . o_i because P-bar = F-bar there.
Here P-bar and A-bar carry the gate's per-entry factors (g2 and the h-bar terms), so delta
and delta' are not functions of o: a row pass over all key blocks computes them (and the
gate-parameter sums) before S-bar can be formed. Kernels: (1) the dQ kernel, grid over
query blocks, pass 1 = row pass (delta, delta', gate sums per block), pass 2 = dQ, dQ';
(2) the dK/dV kernel, grid over key blocks, streaming query blocks in the transposed
orientation [block_k, block_q] so that the row statistics broadcast without transposes.
The agt_cls cotangent a-bar touches only row 0 of C_agt: S'-bar_0j += A_0j (a-bar_j -
sum_j A_0j a-bar_j), an O(N d) term added outside the kernels.

`bwd_impl="jnp"` instead differentiates the chunked jnp implementation (exact recompute):
the reference the kernels are tested against and a fallback.

Precision. bfloat16 inputs: bf16 matmul operands (tensor cores / MXU) with float32
accumulation; softmax statistics, the gate and every accumulator are float32. float32
inputs: `precision="highest"` (the default: IEEE float32 dots, exact against the float64
reference, no tensor cores) or `precision="default"` (TF32 on NVIDIA GPUs, single-pass bf16
on TPU: faster, ~1e-3 relative error). The paper configs run bf16 compute (`model.dtype`), so
the fast path is the bf16 one; choose "default" for float32 inputs only knowingly.

Tiles. `TILES` is a per-backend, per-generation table (GPU: H100/H200 "hopper", A100
"ampere", others; TPU: v4, v5e, v5p, others) of forward and backward tiles and, on GPU, the
Triton num_warps/num_stages per kernel. The entries were set from the kernels' shape
constraints and register/VMEM budgets, not measured: `python bench/device_check.py` sweeps
blocks on the device and records the best ones for the table. TPU: the tiles are
[128, head_dim]; packing two heads of head_dim 64 into one 128-lane tile is not done (each
head's tile fills half of the lanes).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax

import lfi_jax.ops.pallas.calls as calls
import lfi_jax.ops.pallas.gate as gatelib
from lfi_jax.ops.pallas.tiles import KernelConfig
from lfi_jax.ops.reference import Gate, GateParams, as_gate, check_inputs, chunked_attention

log = logging.getLogger(__name__)

BACKENDS = ("gpu", "tpu", "cpu")
BWD_IMPLS = ("pallas", "jnp")
PRECISIONS = ("highest", "default")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Forward (block_q, block_k) and backward tiles; Triton warps/stages per kernel (GPU)."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    @property
    def blocks(self) -> tuple[int, int, int, int]:
        return self.block_q, self.block_k, self.block_q_bwd, self.block_k_bwd


# (backend, generation) -> tiles; not measured (see the module docstring).
TILES = {
    # Hopper: wgmma wants >= 64 rows per warpgroup; 8 warps = 2 warpgroups for the forward's
    # 128-row tile; the backward holds ~10 live f32 tiles, so 64 x 64 with 8 warps.
    ("gpu", "hopper"): Tiles(128, 64, 64, 64, num_warps=8, num_stages=3, num_warps_bwd=8, num_stages_bwd=2),
    ("gpu", "ampere"): Tiles(64, 64, 64, 32, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=2),
    ("gpu", "other"): Tiles(64, 64, 32, 32),  # Triton: powers of two >= 16
    ("tpu", "v4"): Tiles(128, 128, 128, 128),  # Mosaic: lane-dense tiles, multiples of 128
    ("tpu", "v5e"): Tiles(128, 128, 128, 128),  # 16 MiB scoped VMEM: keep the key tiles at 128
    ("tpu", "v5p"): Tiles(256, 128, 128, 128),
    ("tpu", "other"): Tiles(128, 128, 128, 128),
    ("cpu", "other"): Tiles(128, 128, 128, 128),  # interpreter: big tiles = fewer (slow) grid steps
}
DEFAULT_BLOCKS = {backend: TILES[(backend, "other")].blocks for backend in BACKENDS}


def generation(backend: str, device_kind: str | None = None) -> str:
    """The TILES generation of a device kind string (default: the first local device's)."""
    if device_kind is None:
        device_kind = jax.local_devices()[0].device_kind
    kind = device_kind.lower()
    if backend == "gpu":
        if any(x in kind for x in ("h100", "h200", "h800", "gh200")):
            return "hopper"
        if any(x in kind for x in ("a100", "a800", "a40", "a10")):
            return "ampere"
    if backend == "tpu":
        if "v4" in kind:
            return "v4"
        if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
            return "v5e"
        if "v5" in kind:
            return "v5p"
    return "other"


_LOGGED: set = set()


def default_tiles(backend: str, device_kind: str | None = None) -> Tiles:
    gen = generation(backend, device_kind)
    tiles = TILES.get((backend, gen), TILES[(backend, "other")])
    if (backend, gen) not in _LOGGED:
        _LOGGED.add((backend, gen))
        log.info("interaction_attention_pallas: %s/%s tiles %s", backend, gen, tiles)
    return tiles


def _resolve_backend(backend: str | None) -> str:
    if backend is None:
        backend = jax.default_backend()
    backend = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"interaction_attention_pallas: backend {backend!r} not in {BACKENDS}")
    return backend


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x - 1).bit_length())


def _fit_block(name: str, value: int, n: int, backend: str) -> int:
    """Validate a block size for the backend and shrink it for short sequences."""
    if backend == "gpu":
        if value < 16 or value & (value - 1):
            raise ValueError(f"interaction_attention_pallas: {name}={value} must be a power of two >= 16 on GPU")
        return min(value, max(16, _next_pow2(n)))
    align = 128 if backend == "tpu" else 8
    if value <= 0 or value % align:
        raise ValueError(
            f"interaction_attention_pallas: {name}={value} must be a positive multiple of {align} on {backend}"
        )
    return min(value, -(-n // align) * align)


def _make_config(q, k, v, gate, backend, interpret, tiles: Tiles, masked: bool, precision: str) -> KernelConfig:
    b, nq, h, d = q.shape
    nk = k.shape[1]
    dmax = max(d, v.shape[3])  # q, k and v share one padded width; zero columns change nothing
    lengths = (nq, nk, nq, nk)
    names = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
    fq, fk, fqb, fkb = (_fit_block(nm, bl, n, backend) for nm, bl, n in zip(names, tiles.blocks, lengths))
    lq, lk = math.lcm(fq, fqb), math.lcm(fk, fkb)
    return KernelConfig(
        batch=b, heads=h, nq=nq, nk=nk, npq=-(-nq // lq) * lq, npk=-(-nk // lk) * lk,
        dp=max(16, _next_pow2(dmax)) if backend == "gpu" else dmax, scale=1.0 / math.sqrt(d),
        spec=gatelib.gate_spec(gate),
        block_q=fq, block_k=fk, block_q_bwd=fqb, block_k_bwd=fkb,
        driver="grid" if backend == "tpu" else "loop",
        interpret=bool(interpret), backend=backend, masked=masked,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        num_warps_bwd=tiles.num_warps_bwd, num_stages_bwd=tiles.num_stages_bwd,
        precision=precision,
    )


def interaction_attention_pallas(
    q,
    q2,
    k,
    v,
    gate: Gate,
    *,
    key_mask=None,
    block_q: int | None = None,
    block_k: int | None = None,
    block_q_bwd: int | None = None,
    block_k_bwd: int | None = None,
    tiles: Tiles | None = None,
    precision: str | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
    bwd_impl: str = "pallas",
):
    """Fused interaction attention; see the module docstring.

    backend: "gpu" (Triton), "tpu" (Mosaic) or "cpu"; default: jax.default_backend().
    interpret: run the kernels in the Pallas interpreter; default True exactly on "cpu".
    tiles: a `Tiles` (default: TILES for the backend and device generation); block_*
    override single entries; shrunk for short sequences. precision: for float32 inputs,
    "highest" (default) or "default" (see the module docstring). bwd_impl: "pallas" or "jnp".
    """
    gate = as_gate(gate)
    check_inputs(q, q2, k, v, gate, key_mask, name="interaction_attention_pallas")
    if bwd_impl not in BWD_IMPLS:
        raise ValueError(f"interaction_attention_pallas: bwd_impl {bwd_impl!r} not in {BWD_IMPLS}")
    precision = precision or "highest"
    if precision not in PRECISIONS:
        raise ValueError(f"interaction_attention_pallas: precision {precision!r} not in {PRECISIONS}")
    if jnp.result_type(q, q2, k, v) != jnp.float32:
        precision = "default"  # bf16 operands, f32 accumulation: nothing to choose
    backend = _resolve_backend(backend)
    if interpret is None:
        interpret = backend == "cpu"
    if backend == "cpu" and not interpret:
        raise ValueError("interaction_attention_pallas: backend 'cpu' only runs with interpret=True")
    tiles = tiles or default_tiles(backend)
    given = dict(block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd, block_k_bwd=block_k_bwd)
    tiles = dataclasses.replace(tiles, **{key: int(val) for key, val in given.items() if val is not None})
    cfg = _make_config(q, k, v, gate, backend, interpret, tiles, key_mask is not None, precision)
    valid = None if key_mask is None else key_mask.astype(jnp.float32)
    return _vjp_attention(q, q2, k, v, gate, valid, _Static(cfg, bwd_impl))


# ----------------------------------------------------------------------------- layout


def _to_kernel(x, n_pad: int, dp: int, dtype):
    """[B, N, H, d] -> [B, H, Np, dp] in dtype, zero padded."""
    x = x.astype(dtype).transpose(0, 2, 1, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - x.shape[2]), (0, dp - x.shape[3])))


def _from_kernel(x, n: int, d: int):
    return x[:, :, :n, :d].transpose(0, 2, 1, 3)


def _compute_dtype(*xs):
    return jnp.result_type(*[x.dtype for x in xs])


def _extra(cfg: KernelConfig, gate, valid):
    """(packed gate?, valid row [B, 1, Npk]?, nval [B, 1, 128]?) for the kernels."""
    out = (gatelib.pack(gate, cfg.spec),) if cfg.has_gate else ()
    if valid is not None:
        row = jnp.pad(valid, ((0, 0), (0, cfg.npk - cfg.nk)))[:, None, :]
        nval = jnp.broadcast_to(jnp.sum(valid, axis=1)[:, None, None], (valid.shape[0], 1, 128))
        out += (row, nval)
    return out


def _inputs(cfg: KernelConfig, q, q2, k, v, *more_q):
    ct = _compute_dtype(q, q2, k, v)
    qs = tuple(_to_kernel(x, cfg.npq, cfg.dp, ct) for x in (q, q2, *more_q))
    ks = tuple(_to_kernel(x, cfg.npk, cfg.dp, ct) for x in (k, v))
    return qs, ks


def _forward(q, q2, k, v, gate, valid, cfg: KernelConfig):
    (qk, q2k), (kk, vk) = _inputs(cfg, q, q2, k, v)
    o, lse, lse2, agt = calls.forward(cfg, qk, q2k, kk, vk, _extra(cfg, gate, valid))
    return (_from_kernel(o, q.shape[1], v.shape[3]).astype(v.dtype), agt[:, :, 0, 0, : cfg.nk]), (lse, lse2)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable static configuration: a nondiff argument of the custom VJP."""

    cfg: KernelConfig
    bwd_impl: str


def _fwd_rule(q, q2, k, v, gate, valid, static):
    out, (lse, lse2) = _forward(q, q2, k, v, gate, valid, static.cfg)
    return out, (q, q2, k, v, gate, valid, lse, lse2)


def _bwd_rule(static, res, cts):
    q, q2, k, v, gate, valid, lse, lse2 = res
    do, dagt = cts
    dvalid = None if valid is None else jnp.zeros_like(valid)
    if static.bwd_impl == "jnp":
        mask = None if valid is None else valid > 0.5
        fn = lambda q, q2, k, v, g: chunked_attention(q, q2, k, v, g, key_mask=mask)  # noqa: E731
        _, pullback = jax.vjp(fn, q, q2, k, v, gate)
        return (*pullback((do, dagt)), dvalid)
    return (*_pallas_bwd(static.cfg, q, q2, k, v, gate, valid, lse, lse2, do, dagt), dvalid)


def _vjp_attention_primal(q, q2, k, v, gate, valid, static):
    return _forward(q, q2, k, v, gate, valid, static.cfg)[0]


_vjp_attention = jax.custom_vjp(_vjp_attention_primal, nondiff_argnums=(6,))
_vjp_attention.defvjp(_fwd_rule, _bwd_rule)


def _pallas_bwd(cfg: KernelConfig, q, q2, k, v, gate: GateParams | None, valid, lse, lse2, do, dagt):
    nq, d = q.shape[1], q.shape[3]
    (qk, q2k, dok), (kk, vk) = _inputs(cfg, q, q2, k, v, do)
    dq, dq2, dk, dv, gsum = calls.backward(cfg, qk, q2k, kk, vk, dok, lse, lse2, _extra(cfg, gate, valid))
    dq, dq2 = (_from_kernel(x, nq, d) for x in (dq, dq2))
    dk, dv = _from_kernel(dk, cfg.nk, d), _from_kernel(dv, cfg.nk, v.shape[3])
    if valid is not None:  # masked keys' rows are not computed by the kernel
        keep = valid[:, :, None, None] > 0.5
        dk, dv = jnp.where(keep, dk, 0.0), jnp.where(keep, dv, 0.0)
    # agt_cls = row 0 of C_agt: its cotangent adds S'-bar_0j = A_0j (a-bar_j - sum A_0 a-bar).
    hi = lax.Precision.HIGHEST
    scale = cfg.scale
    f32 = jnp.float32
    q2_0 = q2[:, 0].astype(f32)  # [B, H, d]
    kf = k.astype(f32)
    a0 = jnp.exp(scale * jnp.einsum("bhd,bjhd->bhj", q2_0, kf, precision=hi) - lse2[:, :, 0, :1])
    if valid is not None:
        a0 = jnp.where(valid[:, None, :] > 0.5, a0, 0.0)
    dagt = dagt.astype(f32)
    ds0 = a0 * (dagt - jnp.sum(a0 * dagt, axis=-1, keepdims=True))
    dq2 = dq2.at[:, 0].add(scale * jnp.einsum("bhj,bjhd->bhd", ds0, kf, precision=hi))
    dk = dk + scale * jnp.einsum("bhj,bhd->bjhd", ds0, q2_0, precision=hi)
    grads = (dq.astype(q.dtype), dq2.astype(q2.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
    dgate = None
    if gate is not None:
        dgate = gatelib.unpack(jnp.sum(gsum, axis=(0, 2, 3)), gate, cfg.spec)
    return (*grads, dgate)
