"""Vision Transformer in Flax NNX, with the math of Hugging Face `ViTModel`.

Parameter names mirror transformers' ViT (`embeddings.patch_embeddings`, `encoder.layer[i]
.attention.query`, `layernorm_before`, `intermediate`, `output`, `layernorm`, `classifier`)
so checkpoints map one to one (see `lfi_jax.models.convert`).

The same module builds the Interaction ViT (SPEC section 1): `ModelConfig.interaction_queries`
adds the interaction query projection and the gate to every attention layer; see
`lfi_jax.models.ivit` for the attention layer itself.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# name -> (hidden size D, depth, heads, MLP width)
VARIANTS = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the architecture (and nothing about training)."""

    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    patch_size: int = 16
    image_size: int = 224
    num_classes: int = 1000
    layer_norm_eps: float = 1e-12  # transformers' ViT default; timm uses 1e-6
    qkv_bias: bool = True
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: bool = False  # rematerialise each block in the backward pass (saves memory)
    # Interaction ViT switches (SPEC section 1, Table 3).
    interaction_queries: bool = False  # IQ
    interaction_constraint: bool = False  # IC: return attention CLS rows for the alignment loss
    gated_control: bool = True  # GC (only meaningful with IQ)
    gate_hidden: int = 8
    gate_bias_init: tuple[float, float] = (0.0, 0.0)
    gate_init_scale: float = 0.02
    align_layers: tuple[int, ...] | None = None  # None = all layers
    attn_impl: str = "xla"  # xla | chunked | pallas | auto

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.image_size={self.image_size} is not divisible by model.patch_size={self.patch_size}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.gate_hidden < 0:
            raise ValueError(f"model.gate_hidden={self.gate_hidden} must be >= 0")
        for i in self.resolved_align_layers():
            if not 0 <= i < self.depth:
                raise ValueError(f"model.align_layers has {i}, outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid
        return 1 + gh * gw

    @property
    def is_interaction(self) -> bool:
        return self.interaction_queries

    def resolved_align_layers(self) -> tuple[int, ...]:
        if self.align_layers is None:
            return tuple(range(self.depth))
        return tuple(i % self.depth if i < 0 else i for i in self.align_layers)


def variant(name: str, **overrides: Any) -> ModelConfig:
    """`variant("S/16", image_size=384, num_classes=200)`; any patch size: "B/8", "Ti/4"."""
    m = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", name)
    if not m:
        raise ValueError(f"unknown ViT variant {name!r}; expected e.g. 'S/16' ({'|'.join(VARIANTS)}/<patch>)")
    d, depth, heads, mlp = VARIANTS[m.group(1)]
    base = dict(hidden_size=d, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=int(m.group(2)))
    base.update(overrides)
    return ModelConfig(**base)


def _dense(din, dout, cfg: ModelConfig, rngs, *, bias=True, std=0.02):
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=DTYPES[cfg.dtype],
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.truncated_normal(std),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def _layernorm(cfg: ModelConfig, rngs):
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=DTYPES[cfg.dtype], param_dtype=jnp.float32, rngs=rngs
    )


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
        self.dense = _dense(cfg.hidden_size, cfg.mlp_dim, cfg, rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.dense(x), approximate=False)


class Output(nnx.Module):
    def __init__(self, cfg, rngs):
        self.dense = _dense(cfg.mlp_dim, cfg.hidden_size, cfg, rngs)

    def __call__(self, x):
        return self.dense(x)


class Layer(nnx.Module):
    """Pre-LN transformer block; the attention is plain or interaction attention."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        from lfi_jax.models.ivit import Attention  # one attention module for ViT and I-ViT

        self.layernorm_before = _layernorm(cfg, rngs)
        self.attention = Attention(cfg, rngs)
        self.layernorm_after = _layernorm(cfg, rngs)
        self.intermediate = Intermediate(cfg, rngs)
        self.output = Output(cfg, rngs)

    def __call__(self, x, want_cls: bool):
        a, cls_row = self.attention(self.layernorm_before(x), want_cls=want_cls)
        x = x + a
        x = x + self.output(self.intermediate(self.layernorm_after(x)))
        return x, cls_row


def _layer_fn(want_cls: bool):
    def run(layer, x):
        return layer(x, want_cls)

    return run


class Encoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer = nnx.List([Layer(cfg, rngs) for _ in range(cfg.depth)])

    def __call__(self, x):
        cfg = self.cfg
        want = set(cfg.resolved_align_layers()) if cfg.interaction_constraint else set()
        rows = []
        for i, layer in enumerate(self.layer):
            want_cls = i in want
            if cfg.remat:
                x, row = nnx.remat(_layer_fn(want_cls))(layer, x)
            else:
                x, row = layer(x, want_cls)
            if want_cls:
                rows.append(row)
        cls_attn = jnp.stack(rows, axis=1) if rows else None  # [B, L, H, N]
        return x, cls_attn


class ViT(nnx.Module):
    """ViT / I-ViT classifier.

    `model(images)` -> (logits [B, num_classes] float32, aux) where aux["cls_attn"] is
    [B, L_align, H, N] float32 (CLS rows of C_agt, or of C_vfm with IQ off) when the
    interaction constraint is on, else absent. `model.features(images)` returns the final
    normalised token sequence [B, N, D].
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.layernorm = _layernorm(cfg, rngs)
        self.classifier = _dense(cfg.hidden_size, cfg.num_classes, cfg, rngs, std=0.0) if cfg.num_classes else None

    def features(self, images):
        x, cls_attn = self.encoder(self.embeddings(images))
        return self.layernorm(x), cls_attn

    def __call__(self, images):
        x, cls_attn = self.features(images)
        aux = {}
        if cls_attn is not None:
            aux["cls_attn"] = cls_attn
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
