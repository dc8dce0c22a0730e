"""ResNet backbone in Flax NNX with frozen BatchNorm, the math of transformers' `ResNetBackbone`.

DETR's backbone: the BatchNorm statistics and affine parameters are fixed (transformers'
`DetrFrozenBatchNorm2d`, eps 1e-5), so a normalisation layer is a per-channel affine map.
They are `nnx.Param`s (the trainer keeps every model state in the parameter tree) but the
forward pass stops their gradient, and the optimizer's freeze patterns must leave them
alone (their paths end in `normalization/{weight,bias,running_mean,running_var}`), as weight
decay would otherwise move them.

Parameter names mirror transformers' `ResNetModel` / `ResNetBackbone`:
`embedder.embedder.{convolution,normalization}`, `encoder.stages[i].layers[j].shortcut`,
`encoder.stages[i].layers[j].layer[k].{convolution,normalization}`; convolution kernels are
[kh, kw, in, out] (PyTorch's [out, in, kh, kw] transposed). Images are NHWC.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BN_EPS = 1e-5  # DetrFrozenBatchNorm2d's epsilon

# depth -> (layer type, blocks per stage, stage widths)
RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    34: ("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    50: ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048)),
    101: ("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048)),
    152: ("bottleneck", (3, 8, 36, 3), (256, 512, 1024, 2048)),
}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """The architecture of the backbone (transformers' `ResNetConfig` fields, ResNet-50 defaults)."""

    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"  # bottleneck | basic
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False  # stride in the first 1x1 (True) or in the 3x3 (False)
    num_channels: int = 3
    dtype: str = "float32"  # compute dtype; parameters are float32

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if self.layer_type not in ("bottleneck", "basic"):
            raise ValueError(f"backbone.layer_type={self.layer_type!r}; expected 'bottleneck' or 'basic'")
        if len(self.hidden_sizes) != len(self.depths) or not self.depths:
            raise ValueError(
                f"backbone.hidden_sizes {self.hidden_sizes} and backbone.depths {self.depths} must be "
                "non-empty and of the same length (one per stage)"
            )
        if self.layer_type == "bottleneck" and any(h % 4 for h in self.hidden_sizes):
            raise ValueError(f"backbone.hidden_sizes {self.hidden_sizes}: bottleneck widths must divide by 4")
        if self.dtype not in DTYPES:
            raise ValueError(f"backbone.dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")

    @property
    def out_channels(self) -> int:
        return self.hidden_sizes[-1]

    @property
    def stride(self) -> int:
        """Total downsampling of the last stage (32 for the standard ResNets)."""
        return 4 * 2 ** (len(self.depths) - 1) * (2 if self.downsample_in_first_stage else 1)


def resnet_config(depth: int = 50, **overrides) -> ResNetConfig:
    """`resnet_config(50)`: ResNet-18/34/50/101/152."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"backbone depth {depth}: expected one of {sorted(RESNET_DEPTHS)}")
    layer_type, depths, widths = RESNET_DEPTHS[depth]
    return ResNetConfig(**{"layer_type": layer_type, "depths": depths, "hidden_sizes": widths, **overrides})


def feature_size(cfg: ResNetConfig, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the last stage's feature map for an input of height x width.

    Every stride-2 step (the 7x7 stem, the max pool, each downsampling 3x3 or 1x1 with
    PyTorch's padding kernel // 2) maps n to (n - 1) // 2 + 1 = ceil(n / 2).
    """
    halvings = int(math.log2(cfg.stride))

    def one(n):
        for _ in range(halvings):
            n = (n - 1) // 2 + 1
        return n

    return one(height), one(width)


class FrozenBatchNorm(nnx.Module):
    """y = (x - running_mean) / sqrt(running_var + 1e-5) * weight + bias, nothing trained."""

    def __init__(self, channels: int):
        self.weight = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.running_mean = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.running_var = nnx.Param(jnp.ones((channels,), jnp.float32))

    def __call__(self, x):
        stats = (self.weight, self.bias, self.running_mean, self.running_var)
        w, b, mean, var = (jax.lax.stop_gradient(p[...]) for p in stats)
        scale = w * jax.lax.rsqrt(var + BN_EPS)
        shift = b - mean * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def _conv(cin, cout, kernel, stride, cfg: ResNetConfig, rngs):
    p = kernel // 2
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        use_bias=False,
        dtype=DTYPES[cfg.dtype],
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
        rngs=rngs,
    )


class ConvLayer(nnx.Module):
    """Convolution, frozen BatchNorm, optional ReLU (transformers' `ResNetConvLayer`)."""

    def __init__(self, cin, cout, cfg, rngs, *, kernel=3, stride=1, relu=True):
        self.convolution = _conv(cin, cout, kernel, stride, cfg, rngs)
        self.normalization = FrozenBatchNorm(cout)
        self.relu = relu

    def __call__(self, x):
        x = self.normalization(self.convolution(x))
        return jax.nn.relu(x) if self.relu else x


class ShortCut(nnx.Module):
    def __init__(self, cin, cout, stride, cfg, rngs):
        self.convolution = _conv(cin, cout, 1, stride, cfg, rngs)
        self.normalization = FrozenBatchNorm(cout)

    def __call__(self, x):
        return self.normalization(self.convolution(x))


class ResidualLayer(nnx.Module):
    """A bottleneck (1x1, 3x3, 1x1) or basic (3x3, 3x3) residual block."""

    def __init__(self, cin, cout, stride, cfg: ResNetConfig, rngs):
        self.shortcut = ShortCut(cin, cout, stride, cfg, rngs) if (cin != cout or stride != 1) else None
        if cfg.layer_type == "bottleneck":
            mid = cout // 4
            s1, s2 = (stride, 1) if cfg.downsample_in_bottleneck else (1, stride)
            layers = [
                ConvLayer(cin, mid, cfg, rngs, kernel=1, stride=s1),
                ConvLayer(mid, mid, cfg, rngs, kernel=3, stride=s2),
                ConvLayer(mid, cout, cfg, rngs, kernel=1, relu=False),
            ]
        else:
            layers = [ConvLayer(cin, cout, cfg, rngs, stride=stride), ConvLayer(cout, cout, cfg, rngs, relu=False)]
        self.layer = nnx.List(layers)

    def __call__(self, x):
        residual = x if self.shortcut is None else self.shortcut(x)
        for layer in self.layer:
            x = layer(x)
        return jax.nn.relu(x + residual)


class Stage(nnx.Module):
    def __init__(self, cin, cout, stride, depth, cfg, rngs):
        self.layers = nnx.List(
            [ResidualLayer(cin if i == 0 else cout, cout, stride if i == 0 else 1, cfg, rngs) for i in range(depth)]
        )

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: ResNetConfig, rngs):
        ins = (cfg.embedding_size,) + cfg.hidden_sizes[:-1]
        strides = (2 if cfg.downsample_in_first_stage else 1,) + (2,) * (len(cfg.depths) - 1)
        self.stages = nnx.List(
            [Stage(i, o, s, d, cfg, rngs) for i, o, s, d in zip(ins, cfg.hidden_sizes, strides, cfg.depths)]
        )

    def __call__(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return tuple(feats)


def max_pool_3x3_s2(x):
    """PyTorch's MaxPool2d(kernel_size=3, stride=2, padding=1) on NHWC (padding never wins)."""
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Embeddings(nnx.Module):
    def __init__(self, cfg: ResNetConfig, rngs):
        self.embedder = ConvLayer(cfg.num_channels, cfg.embedding_size, cfg, rngs, kernel=7, stride=2)

    def __call__(self, x):
        return max_pool_3x3_s2(self.embedder(x))


class ResNet(nnx.Module):
    """`ResNet(cfg, rngs=...)(images [B, H, W, C])` -> the feature map of every stage (NHWC)."""

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedder = Embeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)

    def __call__(self, images):
        cfg = self.cfg
        if images.ndim != 4 or images.shape[-1] != cfg.num_channels:
            raise ValueError(f"ResNet expects images [B, H, W, {cfg.num_channels}] (NHWC), got {images.shape}")
        return self.encoder(self.embedder(images.astype(DTYPES[cfg.dtype])))


def count_params(cfg: ResNetConfig, *, include_frozen_stats: bool = True) -> int:
    """Number of parameters from shapes only; without the BatchNorm tensors if asked."""
    abstract = nnx.eval_shape(lambda: ResNet(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return sum(
        math.prod(v.shape) for path, v in flat if include_frozen_stats or "normalization" not in path
    )
