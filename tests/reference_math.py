"""Independent float64 NumPy transcription of SPEC section 1 (tests only)."""

import math

import numpy as np


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gate_dict(gate):
    if gate is None or isinstance(gate, dict):
        return gate
    return {key: val for key, val in gate._asdict().items() if val is not None}  # GateParams


def interaction_attention_ref(q, q2, k, v, gate, key_mask=None, return_rows=False):
    """q, q2 [B, Nq, H, d], k, v [B, Nk, H, d], key_mask [B, Nk] (True = valid) or None.

    Softmaxes over the valid keys only (0 elsewhere), the gate's z scaled by the number of
    valid keys. Returns o [B, Nq, H, d] and agt_cls [B, H, Nk] (or, with return_rows, the
    whole C_agt [B, H, Nq, Nk]) in float64.
    """
    q, q2, k, v = (np.asarray(t, np.float64) for t in (q, q2, k, v))
    gate = _gate_dict(gate)
    b, nq, h, d = q.shape
    nk = k.shape[1]
    mask = np.ones((b, nk), bool) if key_mask is None else np.asarray(key_mask, bool)
    o = np.zeros((b, nq, h, v.shape[3]))
    rows = np.zeros((b, h, nq, nk))
    for bi in range(b):
        idx = np.flatnonzero(mask[bi])
        n = len(idx)
        for hi in range(h):
            kk, vv = k[bi, idx, hi], v[bi, idx, hi]
            s = q[bi, :, hi] @ kk.T / math.sqrt(d)
            s2 = q2[bi, :, hi] @ kk.T / math.sqrt(d)
            c_vfm, c_agt = _softmax(s), _softmax(s2)
            if gate is None:
                c_f = (c_agt + c_vfm) / 2
            else:
                z = np.stack([n * c_agt, n * c_vfm], axis=-1)  # [Nq, n, 2]
                g = {key: np.asarray(val, np.float64)[hi] for key, val in gate.items()}
                if "w1" in g:
                    u = _gelu(z @ g["w1"] + g["b1"])
                    logits = u @ g["w2"] + g["b2"]
                else:
                    logits = z @ g["w2"] + g["b2"]
                gg = _sigmoid(logits)
                c_f = gg[..., 0] * c_agt + gg[..., 1] * c_vfm
            o[bi, :, hi] = c_f @ vv
            rows[bi, hi][:, idx] = c_agt
    return o, (rows if return_rows else rows[:, :, 0, :])


def dot_product_attention_ref(q, k, v, key_mask=None):
    """Plain masked softmax attention in float64: o [B, Nq, H, d], C [B, H, Nq, Nk]."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, nq, h, d = q.shape
    mask = np.ones(k.shape[:2], bool) if key_mask is None else np.asarray(key_mask, bool)
    o = np.zeros((b, nq, h, v.shape[3]))
    c = np.zeros((b, h, nq, k.shape[1]))
    for bi in range(b):
        idx = np.flatnonzero(mask[bi])
        for hi in range(h):
            p = _softmax(q[bi, :, hi] @ k[bi, idx, hi].T / math.sqrt(d))
            o[bi, :, hi] = p @ v[bi, idx, hi]
            c[bi, hi][:, idx] = p
    return o, c


def dense_alignment_loss_ref(rows, teacher, key_mask, query_mask=None, example_mask=None):
    """SPEC section 7 in float64. rows [B, L, H, Nq, Nk]; teacher [B, Nk]; key_mask [B, Nk];
    query_mask [B, Nq] or [B, L, Nq] (None: all queries). Mean of KL(t || a_l) over the
    (example, layer) pairs that have at least one query and a teacher map."""
    rows = np.asarray(rows, np.float64)
    b, L, h, nq, nk = rows.shape
    t = np.asarray(teacher, np.float64)
    km = np.asarray(key_mask, bool)
    qm = np.ones((b, L, nq)) if query_mask is None else np.asarray(query_mask, np.float64)
    if qm.ndim == 2:
        qm = np.repeat(qm[:, None], L, axis=1)
    em = np.ones(b) if example_mask is None else np.asarray(example_mask, np.float64)
    total, count = 0.0, 0.0
    for i in range(b):
        for l in range(L):
            sel = np.flatnonzero(qm[i, l] > 0)
            if len(sel) == 0 or em[i] == 0:
                continue
            a = rows[i, l][:, sel].mean(axis=(0, 1))  # heads and selected queries -> [Nk]
            a = np.where(km[i], a, 0.0)
            a = a / a.sum()
            total += sum(tj * (math.log(tj) - math.log(aj)) for tj, aj in zip(t[i], a) if tj > 0)
            count += 1
    return total / max(count, 1.0)


def alignment_loss_ref(agt_cls, teacher, mask=None, direction="teacher_student", eps=1e-6):
    a = np.asarray(agt_cls, np.float64).mean(2)[..., 1:]
    a = a / a.sum(-1, keepdims=True)
    t = np.asarray(teacher, np.float64)
    b, L, _ = a.shape
    per = np.zeros(b)
    for i in range(b):
        for l in range(L):
            if direction == "teacher_student":
                kl = sum(tj * (math.log(tj) - math.log(aj)) for tj, aj in zip(t[i], a[i, l]) if tj > 0)
            else:
                te = (1 - eps) * t[i] + eps / t.shape[1]
                kl = sum(aj * (math.log(aj) - math.log(tj)) for tj, aj in zip(te, a[i, l]) if aj > 0)
            per[i] += kl / L
    m = np.ones(b) if mask is None else np.asarray(mask, np.float64)
    return float((per * m).sum() / max(m.sum(), 1.0))


def random_attention_inputs(rng, b, n, h, d, kind, *, hidden=4, dtype=None):
    """Random (q, q2, k, v, gate) for interaction attention, and cotangent-like weights
    (do [b, n, h, d], dagt [b, h, n]) for a scalar loss on both outputs. `kind`: "hidden"
    (gate with `hidden` units), "linear" (gate_hidden=0) or anything else (no gate)."""
    import jax.numpy as jnp

    dtype = dtype or jnp.float32
    f32 = jnp.float32
    q, q2, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), dtype) for _ in range(4))
    if kind == "hidden":
        gate = {
            "w1": jnp.asarray(rng.normal(size=(h, 2, hidden)) * 0.7, f32),
            "b1": jnp.asarray(rng.normal(size=(h, hidden)) * 0.5, f32),
            "w2": jnp.asarray(rng.normal(size=(h, hidden, 2)) * 0.7, f32),
            "b2": jnp.asarray(rng.normal(size=(h, 2)), f32),
        }
    elif kind == "linear":
        gate = {
            "w2": jnp.asarray(rng.normal(size=(h, 2, 2)) * 0.7, f32),
            "b2": jnp.asarray(rng.normal(size=(h, 2)), f32),
        }
    else:
        gate = None
    do = jnp.asarray(rng.normal(size=(b, n, h, d)), dtype)
    dagt = jnp.asarray(rng.normal(size=(b, h, n)) * n, f32)  # agt entries are ~1/n
    return (q, q2, k, v, gate), (do, dagt)
