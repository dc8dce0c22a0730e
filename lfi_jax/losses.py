"""Task and alignment losses (SPEC section 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DIRECTIONS = ("teacher_student", "paper")


def cross_entropy(logits, labels, *, label_smoothing: float = 0.0, mask=None):
    """Mean softmax cross-entropy over the (masked) batch; labels are int class ids."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    per_example = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return _masked_mean(per_example, mask)


def _masked_mean(x, mask):
    if mask is None:
        return jnp.mean(x)
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def student_maps(agt_cls):
    """a_l of SPEC 2: [B, L, H, N] CLS rows -> [B, L, N-1] head-mean over patch keys, sum 1."""
    a = jnp.mean(agt_cls.astype(jnp.float32), axis=2)[..., 1:]
    return a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def _xlogy_ratio(p, log_p, log_q):
    """sum_j p_j (log p_j - log q_j) with 0 log 0 = 0."""
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def alignment_loss(
    agt_cls,
    teacher,
    mask=None,
    *,
    direction: str = "teacher_student",
    eps: float = 1e-6,
):
    """L_align of SPEC section 2.

    agt_cls: [B, L, H, N] CLS-query rows of C_agt (all N keys, CLS first) for L layers.
    teacher: [B, P] teacher maps on the student grid, P = N - 1 patches, each summing to 1.
    mask: optional [B]; examples with 0 (no teacher map) are left out of the mean.
    direction: "teacher_student" = KL(C_vlm || a_l) (default, finite);
               "paper" = KL(a_l || C_vlm_eps) with the teacher mixed with uniform by `eps`.
    Returns the mean over layers and (masked) batch.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"loss.align_direction={direction!r}; expected one of {DIRECTIONS}")
    if agt_cls.ndim != 4:
        raise ValueError(f"alignment_loss: agt_cls must be [B, L, H, N], got {agt_cls.shape}")
    b, _, _, n = agt_cls.shape
    if teacher.shape != (b, n - 1):
        raise ValueError(f"alignment_loss: teacher must be [B, N-1] = {(b, n - 1)}, got {teacher.shape}")
    a = student_maps(agt_cls)  # [B, L, P]
    t = teacher.astype(jnp.float32)[:, None, :]  # [B, 1, P]
    tiny = jnp.finfo(jnp.float32).tiny
    if direction == "teacher_student":
        log_t = jnp.log(jnp.maximum(t, tiny))
        kl = _xlogy_ratio(jnp.broadcast_to(t, a.shape), log_t, jnp.log(jnp.maximum(a, tiny)))
    else:
        p = t.shape[-1]
        t_eps = (1.0 - eps) * t + eps / p
        kl = _xlogy_ratio(a, jnp.log(jnp.maximum(a, tiny)), jnp.log(t_eps))
    per_example = jnp.mean(kl, axis=1)  # over layers
    return _masked_mean(per_example, mask)
