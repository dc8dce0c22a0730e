"""The typed model configuration: `ModelConfig`, the named variants, and the config boundary.

    cfg = variant("S/16", image_size=384, num_classes=200)   # a ViT
    icfg = ivit_config(cfg)                                   # its I-ViT (IQ + IC + GC on)
    mcfg = model_config(config)                               # from an ml_collections config

Everything that fixes the architecture lives here and nothing about training; the modules
(`lfi_jax.models.layers`, `lfi_jax.models.vit`) read it, they never infer it from parameters.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import ml_collections

# name -> (hidden size D, depth, heads, MLP width)
VARIANTS = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Gate bias b2 = [b_agt, b_vfm] of a new gate (SPEC section 1). From a pretrained ViT the
# I-ViT starts as the ViT: g1 = sigmoid(-4) ~ 0.018 on C_agt, g2 = sigmoid(4) on C_vfm.
PRETRAINED_GATE_BIAS = (-4.0, 4.0)
SCRATCH_GATE_BIAS = (0.0, 0.0)

# The fields that fix the parameter shapes and the math of a pretrained backbone: a ViT's
# weights only fit an architecture that agrees on all of them.
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_dim",
    "patch_size",
    "image_size",
    "layer_norm_eps",
    "qkv_bias",
)


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
    gate_hidden: int = 8  # G: hidden width of the gate MLP; 0 = the linear gate
    # None = unset: PRETRAINED_GATE_BIAS when the I-ViT is made from a ViT's weights
    # (`ivit_from_vit`, init.hf / init.timm), SCRATCH_GATE_BIAS for a fresh model. A value
    # given here is used as it is in both cases.
    gate_bias_init: tuple[float, float] | None = None
    gate_init_scale: float = 0.02
    align_layers: tuple[int, ...] | None = None  # None = all layers
    attn_impl: str = "xla"  # xla | chunked | pallas | auto

    def __post_init__(self):
        # Sequences from JSON or a ConfigDict arrive as lists: store tuples (hashable, comparable).
        if self.gate_bias_init is not None:
            bias = tuple(float(b) for b in self.gate_bias_init)
            if len(bias) != 2:
                raise ValueError(f"model.gate_bias_init={self.gate_bias_init!r} must be two numbers (b_agt, b_vfm)")
            object.__setattr__(self, "gate_bias_init", bias)
        if self.align_layers is not None:
            object.__setattr__(self, "align_layers", tuple(int(i) for i in self.align_layers))
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

    def resolved_align_layers(self) -> tuple[int, ...]:
        if self.align_layers is None:
            return tuple(range(self.depth))
        return tuple(i % self.depth if i < 0 else i for i in self.align_layers)

    def gate_bias(self, *, pretrained: bool) -> tuple[float, float]:
        """The gate bias a new gate starts from: the configured one, else the default of the case."""
        if self.gate_bias_init is not None:
            return self.gate_bias_init
        return PRETRAINED_GATE_BIAS if pretrained else SCRATCH_GATE_BIAS

    def architecture_differences(self, other: ModelConfig) -> list[str]:
        """`model.<field>` mismatches on ARCHITECTURE_FIELDS, as "field: self vs other" strings."""
        return [
            f"model.{f}: {getattr(self, f)!r} vs {getattr(other, f)!r}"
            for f in ARCHITECTURE_FIELDS
            if getattr(self, f) != getattr(other, f)
        ]


def variant(name: str, **overrides: Any) -> ModelConfig:
    """`variant("S/16", image_size=384, num_classes=200)`; any patch size: "B/8", "Ti/4"."""
    m = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", name)
    if not m:
        raise ValueError(f"unknown ViT variant {name!r}; expected e.g. 'S/16' ({'|'.join(VARIANTS)}/<patch>)")
    d, depth, heads, mlp = VARIANTS[m.group(1)]
    base = dict(hidden_size=d, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=int(m.group(2)))
    base.update(overrides)
    return ModelConfig(**base)


def ivit_config(cfg: ModelConfig, **overrides: Any) -> ModelConfig:
    """The I-ViT of an architecture: IQ + IC + GC on (Table 3's last row) unless overridden."""
    base = dict(interaction_queries=True, interaction_constraint=True, gated_control=True)
    base.update(overrides)
    return dataclasses.replace(cfg, **base)


def model_fields(name: str, **overrides: Any) -> dict[str, Any]:
    """All ModelConfig fields of a named variant ("S/16"), as a plain dict for a ConfigDict."""
    return dataclasses.asdict(variant(name, **overrides))


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The typed ModelConfig of `config.model`; unknown keys are errors naming the key."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    raw = config.model.to_dict()
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join('model.' + k for k in unknown)}")
    return ModelConfig(**raw)


__all__ = [
    "ARCHITECTURE_FIELDS",
    "DTYPES",
    "PRETRAINED_GATE_BIAS",
    "SCRATCH_GATE_BIAS",
    "VARIANTS",
    "ModelConfig",
    "ivit_config",
    "model_config",
    "model_fields",
    "variant",
]
