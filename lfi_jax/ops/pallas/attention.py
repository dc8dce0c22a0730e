"""Fused interaction attention (SPEC section 1) in Pallas, with a custom VJP.

    o, agt_cls = interaction_attention_pallas(q, q2, k, v, gate)

Same contract as `lfi_jax.ops.interaction_attention` (q, q2, k, v [B, N, H, d]; gate hidden,
linear or None; o [B, N, H, d] in v.dtype, agt_cls [B, H, N] float32). C_vfm, C_agt, the gate
activations and C_f only ever exist as [block_q, block_k] tiles: memory is O(N) per head.

Forward (one kernel, grid (B, H, query blocks)): pass 1 streams the key blocks for the
online row max and sum of both softmaxes; pass 2 recomputes both logit tiles, normalises
them with the log-sum-exps, applies the per-head gate and accumulates C_f @ V. It writes o,
the CLS row of C_agt and the two log-sum-exps, which (with q, q2, k, v and the gate) are all
the backward keeps. N is padded to the block sizes; padded keys get a finite large negative
logit, and z = [N C_agt, N C_vfm] uses the true N.

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
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

import lfi_jax.ops.pallas.gate as gatelib
import lfi_jax.ops.pallas.kernels as kernels
from lfi_jax.ops.reference import Gate, as_gate, check_inputs, chunked_attention

BACKENDS = ("gpu", "tpu", "cpu")
BWD_IMPLS = ("pallas", "jnp")

# Default tiles per backend: (block_q, block_k, block_q_bwd, block_k_bwd). These were chosen
# from the kernels' shape constraints and register/VMEM budgets, not measured: no GPU or TPU
# was available when they were set. Tune with bench/attention.py on the target hardware.
DEFAULT_BLOCKS = {
    "gpu": (64, 64, 32, 32),  # Triton: powers of two >= 16; the gate MLP is register-heavy
    "tpu": (128, 128, 128, 128),  # Mosaic: lane-dense tiles, multiples of 128
    "cpu": (128, 128, 128, 128),  # interpreter: big tiles = fewer (slow) grid steps
}
DEFAULT_GPU_WARPS = 4
DEFAULT_GPU_STAGES = 2


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


def _make_config(q, gate, backend: str, interpret: bool, blocks) -> kernels.KernelConfig:
    b, n, h, d = q.shape
    names = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
    fitted = [_fit_block(nm, bl, n, backend) for nm, bl in zip(names, blocks)]
    lcm = math.lcm(*fitted)
    np_ = -(-n // lcm) * lcm
    dp = max(16, _next_pow2(d)) if backend == "gpu" else d
    cfg = kernels.KernelConfig(
        batch=b, heads=h, n=n, np_=np_, dp=dp, scale=1.0 / math.sqrt(d),
        spec=gatelib.gate_spec(gate),
        block_q=fitted[0], block_k=fitted[1], block_q_bwd=fitted[2], block_k_bwd=fitted[3],
        driver="grid" if backend == "tpu" else "loop",
        interpret=bool(interpret), backend=backend,
        num_warps=DEFAULT_GPU_WARPS, num_stages=DEFAULT_GPU_STAGES,
    )
    return cfg


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
    interpret: bool | None = None,
    backend: str | None = None,
    bwd_impl: str = "pallas",
):
    """Fused interaction attention; see the module docstring.

    backend: "gpu" (Triton), "tpu" (Mosaic) or "cpu"; default: jax.default_backend().
    interpret: run the kernels in the Pallas interpreter; default True exactly on "cpu".
    block_*: tile sizes (forward query/key, backward query/key); defaults per backend in
    DEFAULT_BLOCKS, shrunk for short sequences. bwd_impl: "pallas" or "jnp".
    """
    gate = as_gate(gate)
    check_inputs(q, q2, k, v, gate, key_mask, name="interaction_attention_pallas")
    if key_mask is not None:
        raise NotImplementedError("interaction_attention_pallas: key_mask")
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"interaction_attention_pallas: needs as many keys as queries, got {k.shape[1]} and {q.shape[1]}"
        )
    if bwd_impl not in BWD_IMPLS:
        raise ValueError(f"interaction_attention_pallas: bwd_impl {bwd_impl!r} not in {BWD_IMPLS}")
    backend = _resolve_backend(backend)
    if interpret is None:
        interpret = backend == "cpu"
    if backend == "cpu" and not interpret:
        raise ValueError("interaction_attention_pallas: backend 'cpu' only runs with interpret=True")
    defaults = DEFAULT_BLOCKS[backend]
    given = (block_q, block_k, block_q_bwd, block_k_bwd)
    blocks = tuple(d if g is None else int(g) for g, d in zip(given, defaults))
    cfg = _make_config(q, gate, backend, interpret, blocks)
    return _vjp_attention(q, q2, k, v, gate, _Static(cfg, bwd_impl))


# ----------------------------------------------------------------------------- layout


def _to_kernel(x, cfg: kernels.KernelConfig, dtype):
    """[B, N, H, d] -> [B, H, Np, dp] in dtype, zero padded."""
    x = x.astype(dtype).transpose(0, 2, 1, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, cfg.np_ - x.shape[2]), (0, cfg.dp - x.shape[3])))


def _from_kernel(x, n: int, d: int):
    return x[:, :, :n, :d].transpose(0, 2, 1, 3)


def _compute_dtype(*xs):
    return jnp.result_type(*[x.dtype for x in xs])


def _forward(q, q2, k, v, gate, cfg: kernels.KernelConfig):
    n, d = q.shape[1], q.shape[3]
    ct = _compute_dtype(q, q2, k, v)
    gp = gatelib.pack(gate, cfg.spec) if cfg.spec.num_params else None
    o, lse, lse2, agt = kernels.forward(
        cfg, *(_to_kernel(x, cfg, ct) for x in (q, q2, k, v)), gp
    )
    return (_from_kernel(o, n, d).astype(v.dtype), agt[:, :, 0, 0, :n]), (lse, lse2)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable static configuration: a nondiff argument of the custom VJP."""

    cfg: kernels.KernelConfig
    bwd_impl: str


def _fwd_rule(q, q2, k, v, gate, static):
    out, (lse, lse2) = _forward(q, q2, k, v, gate, static.cfg)
    return out, (q, q2, k, v, gate, lse, lse2)


def _bwd_rule(static, res, cts):
    q, q2, k, v, gate, lse, lse2 = res
    do, dagt = cts
    if static.bwd_impl == "jnp":
        _, pullback = jax.vjp(chunked_attention, q, q2, k, v, gate)
        return pullback((do, dagt))
    return _pallas_bwd(static.cfg, q, q2, k, v, gate, lse, lse2, do, dagt)


def _vjp_attention_primal(q, q2, k, v, gate, static):
    return _forward(q, q2, k, v, gate, static.cfg)[0]


_vjp_attention = jax.custom_vjp(_vjp_attention_primal, nondiff_argnums=(5,))
_vjp_attention.defvjp(_fwd_rule, _bwd_rule)


def _pallas_bwd(cfg: kernels.KernelConfig, q, q2, k, v, gate, lse, lse2, do, dagt):
    b, n, h, d = q.shape
    ct = _compute_dtype(q, q2, k, v)
    gp = gatelib.pack(gate, cfg.spec) if cfg.spec.num_params else None
    dq, dq2, dk, dv, gsum = kernels.backward(
        cfg, *(_to_kernel(x, cfg, ct) for x in (q, q2, k, v, do)), lse, lse2, gp
    )
    dq, dq2, dk, dv = (_from_kernel(x, n, d) for x in (dq, dq2, dk, dv))
    # agt_cls = row 0 of C_agt: its cotangent adds S'-bar_0j = A_0j (a-bar_j - sum A_0 a-bar).
    hi = lax.Precision.HIGHEST
    scale = cfg.scale
    f32 = jnp.float32
    q2_0 = q2[:, 0].astype(f32)  # [B, H, d]
    kf = k.astype(f32)
    a0 = jnp.exp(scale * jnp.einsum("bhd,bjhd->bhj", q2_0, kf, precision=hi) - lse2[:, :, 0, :1])
    dagt = dagt.astype(f32)
    ds0 = a0 * (dagt - jnp.sum(a0 * dagt, axis=-1, keepdims=True))
    dq2 = dq2.at[:, 0].add(scale * jnp.einsum("bhj,bjhd->bhd", ds0, kf, precision=hi))
    dk = dk + scale * jnp.einsum("bhj,bhd->bjhd", ds0, q2_0, precision=hi)
    grads = (dq.astype(q.dtype), dq2.astype(q2.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
    dgate = None
    if gate is not None:
        dgate = gatelib.unpack(jnp.sum(gsum, axis=(0, 2, 3)), gate, cfg.spec)
    return (*grads, dgate)
