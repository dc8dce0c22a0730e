"""Vision Transformer (and Interaction ViT) in Flax NNX, with the math of Hugging Face `ViTModel`.

Parameter names mirror transformers' ViT (`embeddings.patch_embeddings`, `encoder.layer[i]
.attention.query`, `layernorm_before`, `intermediate`, `output`, `layernorm`, `classifier`)
so checkpoints map one to one (see `lfi_jax.models.convert`).

The same module builds the Interaction ViT (SPEC section 1): `ModelConfig.interaction_queries`
adds the interaction query projection and the gate to every attention layer
(`lfi_jax.models.layers.Attention`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Older import path (`from lfi_jax.models.vit import ModelConfig, variant`); new code imports
# them from lfi_jax.models (or lfi_jax.models.config).
from lfi_jax.models.config import DTYPES, VARIANTS, ModelConfig, variant  # noqa: E402, F401
from lfi_jax.models.layers import Attention, dense, layer_norm


class PatchEmbeddings(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.projection = nnx.Conv(
            3,
            cfg.hidden_size,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=DTYPES[cfg.dtype],
            param_dtype=jnp.float32,
            kernel_init=nnx.initializers.lecun_normal(),
            rngs=rngs,
        )

    def __call__(self, images):  # [B, H, W, 3] -> [B, gh*gw, D]
        x = self.projection(images)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Embeddings(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, cfg.hidden_size), jnp.float32))
        self.position_embeddings = nnx.Param(init(rngs.params(), (1, cfg.num_tokens, cfg.hidden_size), jnp.float32))
        self.patch_embeddings = PatchEmbeddings(cfg, rngs)

    def __call__(self, images):
        cfg = self.cfg
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"ViT expects images [B, {cfg.image_size}, {cfg.image_size}, 3] (model.image_size), "
                f"got {images.shape}"
            )
        dtype = DTYPES[cfg.dtype]
        x = self.patch_embeddings(images.astype(dtype))
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embeddings[...].astype(dtype)


class Intermediate(nnx.Module):
    def __init__(self, cfg, rngs):
        self.dense = dense(cfg.hidden_size, cfg.mlp_dim, cfg, rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.dense(x), approximate=False)


class Output(nnx.Module):
    def __init__(self, cfg, rngs):
        self.dense = dense(cfg.mlp_dim, cfg.hidden_size, cfg, rngs)

    def __call__(self, x):
        return self.dense(x)


class Layer(nnx.Module):
    """Pre-LN transformer block; the attention is plain or interaction attention."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.layernorm_before = layer_norm(cfg, rngs)
        self.attention = Attention(cfg, rngs)
        self.layernorm_after = layer_norm(cfg, rngs)
        self.intermediate = Intermediate(cfg, rngs)
        self.output = Output(cfg, rngs)

    def __call__(self, x, want_cls: bool, want_rows: bool = False):
        a, cls_row = self.attention(self.layernorm_before(x), want_cls=want_cls, want_rows=want_rows)
        x = x + a
        x = x + self.output(self.intermediate(self.layernorm_after(x)))
        return x, cls_row


def _layer_fn(want_cls: bool, want_rows: bool = False):
    def run(layer, x):
        return layer(x, want_cls, want_rows)

    return run


class Encoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer = nnx.List([Layer(cfg, rngs) for _ in range(cfg.depth)])

    def __call__(self, x, attn_rows: bool = False):
        """(x, [B, L, H, N] CLS rows), or with attn_rows (x, [B, L, N, N] head-mean rows)."""
        cfg = self.cfg
        want = set(cfg.resolved_align_layers()) if cfg.interaction_constraint else set()
        rows = []
        for i, layer in enumerate(self.layer):
            want_cls = i in want
            want_rows = want_cls and attn_rows
            if cfg.remat:
                x, row = nnx.remat(_layer_fn(want_cls, want_rows))(layer, x)
            else:
                x, row = layer(x, want_cls, want_rows)
            if want_cls:
                rows.append(row)
        cls_attn = jnp.stack(rows, axis=1) if rows else None  # [B, L, H, N] (or [B, L, N, N])
        return x, cls_attn


class ViT(nnx.Module):
    """ViT / I-ViT classifier.

    `model(images)` -> (logits [B, num_classes] float32, aux) where aux["cls_attn"] is
    [B, L_align, H, N] float32 (CLS rows of C_agt, or of C_vfm with IQ off) when the
    interaction constraint is on, else absent. `model(images, attn_rows=True)` returns instead
    aux["attn_rows"] [B, L_align, N, N] float32, the head-mean rows of every query (CLS first;
    the CLS row is row 0), for `loss.align_rows = "cls_and_object"`. `model.features(images)`
    returns the final normalised token sequence [B, N, D].
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.layernorm = layer_norm(cfg, rngs)
        self.classifier = dense(cfg.hidden_size, cfg.num_classes, cfg, rngs, std=0.0) if cfg.num_classes else None

    def features(self, images, attn_rows: bool = False):
        x, cls_attn = self.encoder(self.embeddings(images), attn_rows)
        return self.layernorm(x), cls_attn

    def __call__(self, images, *, attn_rows: bool = False):
        x, cls_attn = self.features(images, attn_rows)
        aux = {}
        if cls_attn is not None:
            aux["attn_rows" if attn_rows else "cls_attn"] = cls_attn
        if self.classifier is None:
            return x[:, 0].astype(jnp.float32), aux
        return self.classifier(x[:, 0]).astype(jnp.float32), aux


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters, computed from shapes only (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def interpolate_pos_embed(pos: jax.Array, new_grid: Sequence[int]) -> jax.Array:
    """Resample [1, 1 + g*g, D] position embeddings onto a new patch grid (bicubic)."""
    n_old = pos.shape[1] - 1
    g = int(round(math.sqrt(n_old)))
    if g * g != n_old:
        raise ValueError(f"position embeddings with {n_old} patch tokens are not a square grid")
    gh, gw = new_grid
    if (g, g) == (gh, gw):
        return pos
    cls, grid = pos[:, :1], pos[:, 1:].reshape(1, g, g, -1)
    grid = jax.image.resize(grid, (1, gh, gw, grid.shape[-1]), method="bicubic")
    return jnp.concatenate([cls, grid.reshape(1, gh * gw, -1)], axis=1)


__all__ = ["ViT", "count_params", "interpolate_pos_embed"]
