"""Task and alignment losses (SPEC section 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DIRECTIONS = ("teacher_student", "paper")
# loss.align_reduce: "per_layer" = KL of each layer's map, averaged over layers (SPEC section 2);
# "layer_mean" = KL of the layer-averaged map.
ALIGN_REDUCE = ("per_layer", "layer_mean")
# loss.align_rows: "cls" = the CLS query's row (SPEC); "cls_and_object" = also the mean row of
# the patch queries that cover the object (teacher map > 0), see `object_rows_alignment_loss`.
ALIGN_ROWS = ("cls", "cls_and_object")


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
    reduce: str = "per_layer",
):
    """L_align of SPEC section 2.

    agt_cls: [B, L, H, N] CLS-query rows of C_agt (all N keys, CLS first) for L layers.
    teacher: [B, P] teacher maps on the student grid, P = N - 1 patches, each summing to 1.
    mask: optional [B]; examples with 0 (no teacher map) are left out of the mean.
    direction: "teacher_student" = KL(C_vlm || a_l) (default, finite);
               "paper" = KL(a_l || C_vlm_eps) with the teacher mixed with uniform by `eps`.
    reduce: "per_layer" (SPEC) = the KL of each layer's map a_l, averaged over layers;
            "layer_mean" = the KL of the layer-averaged map mean_l a_l.
    Returns the mean over layers and (masked) batch.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"loss.align_direction={direction!r}; expected one of {DIRECTIONS}")
    if reduce not in ALIGN_REDUCE:
        raise ValueError(f"loss.align_reduce={reduce!r}; expected one of {ALIGN_REDUCE}")
    if agt_cls.ndim != 4:
        raise ValueError(f"alignment_loss: agt_cls must be [B, L, H, N], got {agt_cls.shape}")
    b, _, _, n = agt_cls.shape
    if teacher.shape != (b, n - 1):
        raise ValueError(f"alignment_loss: teacher must be [B, N-1] = {(b, n - 1)}, got {teacher.shape}")
    a = student_maps(agt_cls)  # [B, L, P]
    if reduce == "layer_mean":
        a = jnp.mean(a, axis=1, keepdims=True)  # [B, 1, P], still summing to 1
    return _masked_mean(_teacher_kl(a, teacher, direction, eps), mask)


def _teacher_kl(a, teacher, direction: str, eps: float):
    """[B] mean over layers of KL(teacher || a_l) (or the paper's direction); a [B, L, P] maps."""
    t = teacher.astype(jnp.float32)[:, None, :]  # [B, 1, P]
    tiny = jnp.finfo(jnp.float32).tiny
    if direction == "teacher_student":
        log_t = jnp.log(jnp.maximum(t, tiny))
        kl = _xlogy_ratio(jnp.broadcast_to(t, a.shape), log_t, jnp.log(jnp.maximum(a, tiny)))
    else:
        p = t.shape[-1]
        t_eps = (1.0 - eps) * t + eps / p
        kl = _xlogy_ratio(a, jnp.log(jnp.maximum(a, tiny)), jnp.log(t_eps))
    return jnp.mean(kl, axis=1)  # over layers


def object_rows_alignment_loss(
    rows,
    teacher,
    mask=None,
    *,
    direction: str = "teacher_student",
    eps: float = 1e-6,
    reduce: str = "per_layer",
):
    """The alignment term of the patch queries that cover the object (`loss.align_rows =
    "cls_and_object"`; the CLS row's term is `alignment_loss` as before, and the two add up).

    rows: [B, L, N, N] head-mean C_agt rows (queries x keys, CLS first) of L layers, from
        `model(images, attn_rows=True)`.
    teacher: [B, P] teacher maps on the student grid (P = N - 1), summing to 1.
    The object queries are the patches whose teacher value is > 0. Per layer, their rows
    restricted to the patch keys are averaged and renormalised to sum 1: that map is
    compared with the teacher as the CLS map is (same direction, eps and reduce). Examples
    without an object patch (or with mask 0) are left out of the mean.
    """
    if reduce not in ALIGN_REDUCE:
        raise ValueError(f"loss.align_reduce={reduce!r}; expected one of {ALIGN_REDUCE}")
    if direction not in DIRECTIONS:
        raise ValueError(f"loss.align_direction={direction!r}; expected one of {DIRECTIONS}")
    if rows.ndim != 4 or rows.shape[-1] != rows.shape[-2]:
        raise ValueError(f"object_rows_alignment_loss: rows must be [B, L, N, N], got {rows.shape}")
    b, _, n, _ = rows.shape
    if teacher.shape != (b, n - 1):
        raise ValueError(
            f"object_rows_alignment_loss: teacher must be [B, N-1] = {(b, n - 1)}, got {teacher.shape}"
        )
    query_mask = teacher > 0  # [B, P]
    keys = jnp.ones(teacher.shape, bool)
    a, weight = dense_student_maps(rows[:, :, None, 1:, 1:], keys, query_mask)  # [B, L, P], [B, L]
    if reduce == "layer_mean":
        a = jnp.mean(a, axis=1, keepdims=True)
    example = weight[:, 0] if mask is None else weight[:, 0] * mask.astype(jnp.float32)
    return _masked_mean(_teacher_kl(a, teacher, direction, eps), example)


def outside_mask(teacher, grid: tuple[int, int], image_hw: tuple[int, int], *, threshold: float = 0.0):
    """[B, H, W] float mask, 1 on the pixels outside the teacher's mask.

    teacher [B, gh*gw] maps on the student grid, upsampled to pixels by nearest neighbour
    (each cell covers (H/gh) x (W/gw) pixels, the patch it pools). A cell is outside when its
    value is <= threshold * the example's largest value (threshold 0: the cells where the
    map is exactly 0, i.e. the oracle's cells that the object does not touch).
    """
    gh, gw = grid
    h, w = image_hw
    if h % gh or w % gw:
        raise ValueError(f"outside_mask: image {h}x{w} is not a multiple of the grid {gh}x{gw}")
    b = teacher.shape[0]
    if teacher.shape != (b, gh * gw):
        raise ValueError(f"outside_mask: teacher must be [B, {gh * gw}], got {teacher.shape}")
    t = teacher.astype(jnp.float32).reshape(b, gh, gw)
    top = jnp.max(t, axis=(1, 2), keepdims=True)
    cells = (t <= threshold * top).astype(jnp.float32)
    return jnp.repeat(jnp.repeat(cells, h // gh, axis=1), w // gw, axis=2)


def rrr_penalty(input_grads, teacher, grid: tuple[int, int], mask=None, *, threshold: float = 0.0):
    """"Right for the right reasons" (Ross et al., 2017): sum over pixels and channels of
    (outside * d/dx sum_k log p_k)^2, averaged over the (masked) batch.

    input_grads: [B, H, W, C] gradients of each example's summed log-probabilities with
    respect to its input image (`input_gradients`); teacher [B, gh*gw] on the student grid;
    the outside mask is `outside_mask`.
    """
    if input_grads.ndim != 4:
        raise ValueError(f"rrr_penalty: input_grads must be [B, H, W, C], got {input_grads.shape}")
    out = outside_mask(teacher, grid, input_grads.shape[1:3], threshold=threshold)
    per_example = jnp.sum(jnp.square(out[..., None] * input_grads.astype(jnp.float32)), axis=(1, 2, 3))
    return _masked_mean(per_example, mask)


def input_gradients(fn, images):
    """(fn(images), d/d images of sum over batch and classes of log_softmax(logits)), from one
    forward pass. fn(images) -> (logits [B, K], aux); examples must not interact (no batch
    statistics), so the gradient of the batch sum is each example's own gradient."""
    (logits, aux), vjp = jax.vjp(fn, images)
    cot = jax.grad(lambda z: jnp.sum(jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)))(logits)
    aux_cot = jax.tree.map(jnp.zeros_like, aux)
    (grads,) = vjp((cot.astype(logits.dtype), aux_cot))
    return (logits, aux), grads


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
