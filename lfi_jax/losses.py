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


DENSE_ALIGN = ("query_mean", "matched_mean")


def dense_student_maps(agt_rows, key_mask, query_mask=None):
    """a_l of SPEC section 7: [B, L, H, Nq, Nk] C_agt rows -> ([B, L, Nk] maps, [B, L] weights).

    a_l = mean over heads and (masked) queries, restricted to the valid keys and renormalised
    to sum 1. Also accepts agt_rows already reduced over heads and queries, [B, L, Nk] (then
    query_mask must be None). The weight of (example, layer) is 1 where it has at least one
    selected query, else 0 (its map is then 0).
    """
    f32 = jnp.float32
    tiny = jnp.finfo(f32).tiny
    rows = agt_rows.astype(f32)
    if rows.ndim == 5:
        b, layers, _, nq, _ = rows.shape
        if query_mask is None:
            a = jnp.mean(rows, axis=(2, 3))
            weight = jnp.ones((b, layers), f32)
        else:
            qm = query_mask.astype(f32)
            if qm.shape not in ((b, nq), (b, layers, nq)):
                raise ValueError(
                    f"dense_alignment_loss: query_mask must be [B, Nq] or [B, L, Nq], got {query_mask.shape}"
                )
            if qm.ndim == 2:
                qm = jnp.broadcast_to(qm[:, None, :], (b, layers, nq))
            count = jnp.sum(qm, axis=-1)  # [B, L]
            a = jnp.einsum("blhqk,blq->blk", rows, qm) / (rows.shape[2] * jnp.maximum(count, 1.0))[..., None]
            weight = (count > 0).astype(f32)
    elif rows.ndim == 3:
        if query_mask is not None:
            raise ValueError("dense_alignment_loss: query_mask needs the [B, L, H, Nq, Nk] rows, got [B, L, Nk] maps")
        a = rows
        weight = jnp.ones(rows.shape[:2], f32)
    else:
        raise ValueError(f"dense_alignment_loss: agt_rows must be [B, L, H, Nq, Nk] or [B, L, Nk], got {rows.shape}")
    a = jnp.where(key_mask[:, None, :], a, 0.0)
    total = jnp.sum(a, axis=-1, keepdims=True)
    # An all-zero map stays 0 with a finite (zero) gradient: no 0 / tiny^2 in the backward.
    a = a / jnp.where(total > tiny, total, 1.0)
    return a, weight


def dense_alignment_loss(agt_rows, teacher, key_mask, query_mask=None, *, example_mask=None):
    """Dense L_align of SPEC section 7: KL(C_vlm || a_l), averaged over decoder layers.

    agt_rows: [B, L, H, Nq, Nk] cross-attention C_agt rows of L layers (the op's
        return_rows=True output, stacked), or [B, L, Nk] already averaged over heads and
        queries (see `dense_student_maps`).
    teacher: [B, Nk] the dense teacher map pooled onto the detector's key grid, 0 on padded
        keys, summing to 1 over the valid ones.
    key_mask: [B, Nk] bool, True = valid key.
    query_mask: None (`dense_align="query_mean"`: every query) or [B, Nq] / [B, L, Nq] with 1
        on the queries the matcher assigned to an object (`"matched_mean"`, per layer when the
        layers are matched separately).
    example_mask: optional [B]; 0 = no teacher map for that example.
    Returns the mean of the KL over the (example, layer) pairs that have at least one
    selected query and a teacher map (0 if there is none): with every query selected, the
    mean over layers and batch.
    """
    if teacher.ndim != 2 or tuple(key_mask.shape) != tuple(teacher.shape):
        raise ValueError(
            f"dense_alignment_loss: teacher {teacher.shape} and key_mask {key_mask.shape} must both be [B, Nk]"
        )
    if agt_rows.shape[0] != teacher.shape[0] or agt_rows.shape[-1] != teacher.shape[1]:
        raise ValueError(
            f"dense_alignment_loss: agt_rows {agt_rows.shape} do not match teacher [B, Nk] {teacher.shape}"
        )
    a, weight = dense_student_maps(agt_rows, key_mask, query_mask)
    tiny = jnp.finfo(jnp.float32).tiny
    t = jnp.where(key_mask, teacher.astype(jnp.float32), 0.0)[:, None, :]  # [B, 1, Nk]
    kl = _xlogy_ratio(jnp.broadcast_to(t, a.shape), jnp.log(jnp.maximum(t, tiny)), jnp.log(jnp.maximum(a, tiny)))
    if example_mask is not None:
        weight = weight * example_mask.astype(jnp.float32)[:, None]
    return jnp.sum(kl * weight) / jnp.maximum(jnp.sum(weight), 1.0)
