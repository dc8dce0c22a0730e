"""The CLS query's attention maps of a ViT / I-ViT, computed from each layer's own projections.

C_vfm (the original queries' map) and C_agt (the interaction queries') for every layer and head,
without changing the model: Fig. 5 and Fig. 6 (lfi_jax.visualize) draw and score them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def cls_attention_rows(model, images):
    """CLS-query rows of C_vfm and C_agt for every layer and head.

    Returns (vfm [B, L, H, N], agt [B, L, H, N] or None without interaction queries), float32,
    over all N keys (CLS first). Computed from each layer's projections of its input, then the
    layer itself is applied to move on.
    """
    cfg = model.cfg
    x = model.embeddings(images)
    scale = 1.0 / math.sqrt(cfg.head_dim)
    vfm, agt = [], []
    for layer in model.encoder.layer:
        h = layer.layernorm_before(x)
        att = layer.attention
        b, n, _ = h.shape
        k = att.key(h).reshape(b, n, cfg.num_heads, cfg.head_dim).astype(jnp.float32)

        vfm.append(_cls_row(att.query, h, k, cfg, scale))
        if cfg.interaction_queries:
            agt.append(_cls_row(att.interaction_query, h, k, cfg, scale))
        x, _ = layer(x, False)
    return jnp.stack(vfm, 1), (jnp.stack(agt, 1) if agt else None)


def _cls_row(proj, h, k, cfg, scale):
    """softmax(q_cls k^T * scale) [B, H, N] of the CLS query from projection `proj` of h."""
    q0 = proj(h[:, :1]).reshape(h.shape[0], cfg.num_heads, cfg.head_dim).astype(jnp.float32)
    return jax.nn.softmax(jnp.einsum("bhd,bkhd->bhk", q0, k) * scale, axis=-1)


def attention_fn(run):
    """A jitted (params, images) -> (vfm, agt) for `run`'s model."""

    def fn(params, images):
        return cls_attention_rows(nnx.merge(run.graphdef, params), images)

    return jax.jit(fn)


def patch_maps(rows: np.ndarray) -> np.ndarray:
    """[..., N] rows over all keys -> [..., N - 1] over the patches, renormalised to sum 1."""
    p = np.asarray(rows, np.float64)[..., 1:]
    return p / np.maximum(p.sum(-1, keepdims=True), 1e-30)


def select(maps: np.ndarray, layer: int | str = -1, head: int | str = "mean") -> np.ndarray:
    """[B, L, H, P] -> [B, P]: one layer (or "mean"), one head (or "mean"); renormalised."""
    m = np.asarray(maps, np.float64)
    m = m.mean(1) if layer == "mean" else m[:, int(layer)]
    m = m.mean(1) if head == "mean" else m[:, int(head)]
    return m / np.maximum(m.sum(-1, keepdims=True), 1e-30)


def compute_maps(run, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """{"vfm": [B, L, H, P], "agt": ... or None, "logits": [B, C]} for a stack of model inputs."""
    fn = attention_fn(run)
    logits_fn = jax.jit(lambda p, x: nnx.merge(run.graphdef, p)(x)[0])
    vfm, agt, logits = [], [], []
    for s in range(0, len(images), batch):
        x = images[s : s + batch]
        v, a = jax.device_get(fn(run.params, x))
        vfm.append(patch_maps(v))
        if a is not None:
            agt.append(patch_maps(a))
        logits.append(np.asarray(jax.device_get(logits_fn(run.params, x))))
    return {"vfm": np.concatenate(vfm), "agt": np.concatenate(agt) if agt else None, "logits": np.concatenate(logits)}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of [B, P] arrays (0 where a row is all zero)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)
