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


def interaction_attention_ref(q, q2, k, v, gate):
    """q, q2, k, v [B, N, H, d]; returns o [B, N, H, d], agt_cls [B, H, N] in float64."""
    q, q2, k, v = (np.asarray(t, np.float64) for t in (q, q2, k, v))
    b, n, h, d = q.shape
    o = np.zeros_like(q)
    agt_cls = np.zeros((b, h, n))
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ k[bi, :, hi].T / math.sqrt(d)
            s2 = q2[bi, :, hi] @ k[bi, :, hi].T / math.sqrt(d)
            c_vfm, c_agt = _softmax(s), _softmax(s2)
            if gate is None:
                c_f = (c_agt + c_vfm) / 2
            else:
                z = np.stack([n * c_agt, n * c_vfm], axis=-1)  # [N, N, 2]
                g = {key: np.asarray(val, np.float64)[hi] for key, val in gate.items()}
                if "w1" in g:
                    u = _gelu(z @ g["w1"] + g["b1"])
                    logits = u @ g["w2"] + g["b2"]
                else:
                    logits = z @ g["w2"] + g["b2"]
                gg = _sigmoid(logits)
                c_f = gg[..., 0] * c_agt + gg[..., 1] * c_vfm
            o[bi, :, hi] = c_f @ v[bi, :, hi]
            agt_cls[bi, hi] = c_agt[0]
    return o, agt_cls


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
        gate = {"w2": jnp.asarray(rng.normal(size=(h, 2, 2)) * 0.7, f32), "b2": jnp.asarray(rng.normal(size=(h, 2)), f32)}
    else:
        gate = None
    do = jnp.asarray(rng.normal(size=(b, n, h, d)), dtype)
    dagt = jnp.asarray(rng.normal(size=(b, h, n)) * n, f32)  # agt entries are ~1/n
    return (q, q2, k, v, gate), (do, dagt)
