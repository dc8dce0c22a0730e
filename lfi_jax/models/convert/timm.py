"""timm ViT checkpoints in and out (no timm package needed): `load_timm_vit`, `save_timm`.

    model, cfg = load_timm_vit("vit_small.safetensors", image_size=384)
    save_timm(model, "out.safetensors")   # timm names, fused qkv

timm names are mapped onto the Hub's (`blocks.i.attn.qkv` split into query/key/value, `norm`,
`head`, ...); the I-ViT tensors are `blocks.{i}.attn.interaction_query.*` and
`blocks.{i}.attn.gate.*`.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import numpy as np

from lfi_jax.models.config import VARIANTS, ModelConfig
from lfi_jax.models.convert.io import CheckpointError, read_json, read_state_dict, write_safetensors
from lfi_jax.models.convert.names import flat_params, flat_to_hf
from lfi_jax.models.convert.weights import finish_load
from lfi_jax.models.vit import ViT

TIMM_LAYER_NORM_EPS = 1e-6  # timm's ViT LayerNorm epsilon (not stored in its checkpoints)

_TIMM_SIMPLE = (  # timm name -> unprefixed HF name (regex, replacement)
    (re.compile(r"^cls_token$"), "embeddings.cls_token"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embeddings"),
    (re.compile(r"^patch_embed\.proj\."), "embeddings.patch_embeddings.projection."),
    (re.compile(r"^blocks\.(\d+)\.norm1\."), r"encoder.layer.\1.layernorm_before."),
    (re.compile(r"^blocks\.(\d+)\.norm2\."), r"encoder.layer.\1.layernorm_after."),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\."), r"encoder.layer.\1.attention.output.dense."),
    (re.compile(r"^blocks\.(\d+)\.attn\.(interaction_query|gate)\."), r"encoder.layer.\1.attention.attention.\2."),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\."), r"encoder.layer.\1.intermediate.dense."),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\."), r"encoder.layer.\1.output.dense."),
    (re.compile(r"^norm\."), "layernorm."),
    (re.compile(r"^head\."), "classifier."),
)
_TIMM_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def timm_to_hf_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm ViT state dict -> unprefixed HF names (fused qkv split into query/key/value).

    Names with no counterpart (e.g. `fc_norm`, layer scale `ls1.gamma`) are kept as they are,
    so that the shape check reports them as unexpected.
    """
    out = {}
    for k, v in sd.items():
        m = _TIMM_QKV.match(k)
        if m:
            if v.shape[0] % 3:
                raise CheckpointError(f"{k}: fused qkv with {v.shape[0]} rows is not divisible by 3")
            for part, chunk in zip(("query", "key", "value"), np.split(np.asarray(v), 3, axis=0)):
                out[f"encoder.layer.{m.group(1)}.attention.attention.{part}.{m.group(2)}"] = chunk
            continue
        for pattern, repl in _TIMM_SIMPLE:
            if pattern.search(k):
                k = pattern.sub(repl, k)
                break
        out[k] = v
    return out


_HF_TO_TIMM = (
    (re.compile(r"^embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"^embeddings\.position_embeddings$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embeddings\.projection\."), "patch_embed.proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.layernorm_before\."), r"blocks.\1.norm1."),
    (re.compile(r"^encoder\.layer\.(\d+)\.layernorm_after\."), r"blocks.\1.norm2."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\."), r"blocks.\1.attn.proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(interaction_query|gate)\."), r"blocks.\1.attn.\2."),
    (re.compile(r"^encoder\.layer\.(\d+)\.intermediate\.dense\."), r"blocks.\1.mlp.fc1."),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.dense\."), r"blocks.\1.mlp.fc2."),
    (re.compile(r"^layernorm\."), "norm."),
    (re.compile(r"^classifier\."), "head."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def to_timm_state_dict(model: ViT) -> dict[str, np.ndarray]:
    """Our params -> timm ViT names (`blocks.i.attn.qkv` fused, `norm`, `head`)."""
    hf = flat_to_hf({p: np.asarray(v, np.float32) for p, v in flat_params(model).items()}, headless=True)
    out, qkv = {}, {}
    for k, v in hf.items():
        m = _HF_QKV.match(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        for pattern, repl in _HF_TO_TIMM:
            if pattern.search(k):
                k = pattern.sub(repl, k)
                break
        out[k] = v
    for (layer, kind), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate([parts["query"], parts["key"], parts["value"]], 0)
    return out


def save_timm(model: ViT, path: str) -> None:
    """Write `to_timm_state_dict(model)` to a .safetensors file (atomically)."""
    write_safetensors(path, to_timm_state_dict(model))


_TIMM_ARCH = re.compile(r"vit_(tiny|small|base|large|huge)_patch(\d+)")
_TIMM_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}


def _timm_heads(hidden: int, timm_cfg: Mapping[str, Any] | None, num_heads: int | None, source: str) -> int:
    if num_heads is not None:
        return int(num_heads)
    if timm_cfg:
        args = timm_cfg.get("model_args") or {}
        if "num_heads" in args:
            return int(args["num_heads"])
        m = _TIMM_ARCH.search(str(timm_cfg.get("architecture", "")))
        if m:
            return VARIANTS[_TIMM_SIZES[m.group(1)]][2]
    for d, _, heads, _ in VARIANTS.values():
        if d == hidden:
            return heads
    raise CheckpointError(f"{source}: cannot tell the number of heads for hidden size {hidden}; pass num_heads=")


def load_timm_vit(
    path: str,
    *,
    num_heads: int | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    interaction: bool | Mapping[str, Any] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    layer_norm_eps: float = TIMM_LAYER_NORM_EPS,
    **overrides: Any,
) -> tuple[ViT, ModelConfig]:
    """Load a timm ViT state dict (a .safetensors/.bin/.pth file, or a directory with one).

    No timm package is needed. The architecture is read off the tensor shapes (qkv bias: on
    when the checkpoint has one); the number of heads (not visible in shapes) comes from
    `num_heads`, else the directory's timm config.json (`model_args.num_heads` or an
    architecture name like `vit_small_patch16_224`), else the standard variant with that
    hidden size. The other arguments are those of `load_hf_vit`.
    """
    raw, file = read_state_dict(path)
    timm_cfg = read_json(path) if os.path.isdir(path) else None
    if timm_cfg and timm_cfg.get("global_pool") not in (None, "token"):
        raise CheckpointError(f"{file}: global_pool={timm_cfg['global_pool']!r}; only CLS-token pooling is supported")
    sd = timm_to_hf_names(raw)
    need = ("embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
            "encoder.layer.0.intermediate.dense.weight")
    absent = [n for n in need if n not in sd]
    if absent:
        raise CheckpointError(f"{file}: not a timm ViT state dict; missing {absent} (timm names: cls_token, pos_embed, "
                              "patch_embed.proj.weight, blocks.0.mlp.fc1.weight)")
    d = int(sd["embeddings.cls_token"].shape[-1])
    patch = int(sd["embeddings.patch_embeddings.projection.weight"].shape[-1])
    n_patches = int(sd["embeddings.position_embeddings"].shape[1]) - 1
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise CheckpointError(f"{file}: pos_embed has {n_patches} patch positions, not a square grid "
                              "(class-token-free position embeddings are not supported)")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    has_head = "classifier.weight" in sd
    kw = dict(
        hidden_size=d,
        depth=depth,
        num_heads=_timm_heads(d, timm_cfg, num_heads, file),
        mlp_dim=int(sd["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        patch_size=patch,
        image_size=grid * patch,
        num_classes=int(sd["classifier.weight"].shape[0]) if has_head else 0,
        layer_norm_eps=layer_norm_eps,
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in sd,
    )
    if "encoder.layer.0.attention.attention.interaction_query.weight" in sd:
        gate = "encoder.layer.0.attention.attention.gate.b2" in sd
        w1 = sd.get("encoder.layer.0.attention.attention.gate.w1")
        kw.update(interaction_queries=True, interaction_constraint=True, gated_control=gate,
                  gate_hidden=int(w1.shape[-1]) if w1 is not None else 0)
    try:
        cfg = ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None
    return finish_load(cfg, sd, file, "timm ViT read off its shapes", image_size=image_size,
                       num_classes=num_classes, interaction=interaction, dtype=dtype, seed=seed, overrides=overrides)


__all__ = ["TIMM_LAYER_NORM_EPS", "load_timm_vit", "save_timm", "timm_to_hf_names", "to_timm_state_dict"]
