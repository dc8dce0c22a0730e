"""Weights into models: checking a state dict against an architecture, building a model from
it, and the I-ViT made from a ViT (`ivit_from_vit`: Wq' = Wq, the pretrained gate bias).

The readers of the checkpoint formats (`lfi_jax.models.convert.hf`, `.timm`) hand their
tensors, renamed to the Hub's names, to `finish_load`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.models.config import ModelConfig, ivit_config
from lfi_jax.models.convert.io import CheckpointError
from lfi_jax.models.convert.names import IGNORED, Path, flat_params, from_hf_array, hf_name, hf_shape, path_name
from lfi_jax.models.vit import ViT, interpolate_pos_embed

# ModelConfig fields a caller may change at load time without touching the weights.
RUNTIME_FIELDS = ("dtype", "remat", "attn_impl", "interaction_constraint", "align_layers")


def _has_gates(cfg: ModelConfig) -> bool:
    return cfg.interaction_queries and cfg.gated_control


def ivit_from_vit(vit: ViT, cfg: ModelConfig, *, seed: int = 0) -> ViT:
    """An I-ViT (architecture `cfg`) initialised from a ViT's weights.

    Every ViT parameter is copied; each layer's interaction query starts as a copy of its
    query projection, and new gates get small random weights and the bias
    `cfg.gate_bias(pretrained=True)`: `cfg.gate_bias_init` when set, else
    `PRETRAINED_GATE_BIAS` (-4, +4), so the I-ViT starts out computing the ViT. The returned
    model's config has that bias filled in. The ViT and `cfg` must agree on every field of
    `ARCHITECTURE_FIELDS` (a ValueError lists the differences); a new number of classes gets a
    fresh head.
    """
    src = vit.cfg
    diffs = src.architecture_differences(cfg)
    if diffs:
        raise ValueError(f"ivit_from_vit: the ViT and the I-ViT config differ (ViT vs I-ViT): {'; '.join(diffs)}")
    if _has_gates(cfg) and not _has_gates(src):
        cfg = dataclasses.replace(cfg, gate_bias_init=cfg.gate_bias(pretrained=True))
    model = ViT(cfg, rngs=nnx.Rngs(seed))
    src_map = {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(vit, nnx.Param))}
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    updates = {}
    for path, var in flat:
        path = tuple(path)
        if path in src_map:
            value = src_map[path].get_value()
            if value.shape != var.shape:
                if path[0] == "classifier":
                    continue  # a new head (other number of classes) stays freshly initialised
                raise ValueError(f"ivit_from_vit: {path_name(path)} has shape {value.shape} vs {var.shape}")
            updates[path] = value
        elif "interaction_query" in path:
            qpath = tuple("query" if p == "interaction_query" else p for p in path)
            updates[path] = src_map[qpath].get_value()
    for path, var in flat:
        if tuple(path) in updates:
            var.set_value(jnp.asarray(updates[tuple(path)], var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[Path, tuple]]:
    """{unprefixed HF name: (our path, torch-layout shape)} of an architecture (no allocation)."""
    abstract = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        path = tuple(path)
        out[hf_name(path)] = (path, hf_shape(path, var.shape))
    return out


def check_tensors(sd: Mapping[str, np.ndarray], cfg: ModelConfig, source: str, what: str) -> dict[str, tuple]:
    """`expected_tensors(cfg)`, or a CheckpointError listing every missing, unexpected and
    mis-shaped tensor of `sd` (unprefixed Hub names)."""
    expected = expected_tensors(cfg)
    given = {k: v for k, v in sd.items() if not any(p.search(k) for p in IGNORED)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs expected {expected[k][1]}"
        for k in sorted(set(expected) & set(given))
        if tuple(given[k].shape) != expected[k][1]
    ]
    if missing or unexpected or misshaped:
        arch = (f"D={cfg.hidden_size}, depth={cfg.depth}, heads={cfg.num_heads}, mlp={cfg.mlp_dim}, "
                f"patch={cfg.patch_size}, image={cfg.image_size}, classes={cfg.num_classes}, "
                f"I-ViT={cfg.interaction_queries}")
        lines = [f"{source}: the tensors do not match the {what} ({arch}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {x}" for x in items)
        raise CheckpointError("\n".join(lines))
    return expected


def build_from_params(cfg: ModelConfig, params: Mapping[Path, np.ndarray], seed: int) -> ViT:
    """A ViT of `cfg` whose parameters come from `params` (our layout); others stay fresh."""
    abstract = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(seed)))
    complete = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))} <= set(params)
    # With every variable given nothing needs initialising (no random init to compile/run).
    model = abstract if complete else ViT(cfg, rngs=nnx.Rngs(seed))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        path = tuple(path)
        if path in params:
            value = params[path]
            if tuple(value.shape) != tuple(var.shape):
                raise CheckpointError(f"{path_name(path)}: {value.shape} vs model {var.shape}")
            var.set_value(jnp.asarray(np.asarray(value, np.float32), var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def finish_load(
    cfg: ModelConfig,
    sd: Mapping[str, np.ndarray],
    source: str,
    what: str,
    *,
    image_size: int | None,
    num_classes: int | None,
    interaction: bool | Mapping[str, Any] | None,
    dtype: str,
    seed: int,
    overrides: Mapping[str, Any],
) -> tuple[ViT, ModelConfig]:
    """The model of a checkpoint's tensors `sd` (unprefixed Hub names) and its architecture
    `cfg`, with the load-time changes of `load_hf_vit` applied. -> (model, config)."""
    expected = check_tensors(sd, cfg, source, what)
    params = {path: from_hf_array(path, sd[name]) for name, (path, _) in expected.items()}

    final = cfg
    if image_size is not None and image_size != cfg.image_size:
        final = dataclasses.replace(final, image_size=int(image_size))
        key = ("embeddings", "position_embeddings")
        params[key] = np.asarray(interpolate_pos_embed(jnp.asarray(params[key]), final.grid))
    if num_classes is not None and num_classes != cfg.num_classes:
        final = dataclasses.replace(final, num_classes=int(num_classes))
        params = {p: v for p, v in params.items() if p[0] != "classifier"}  # a new head, fresh
    final = dataclasses.replace(final, dtype=dtype)
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(f"load: {bad} cannot be changed at load time; allowed: {list(RUNTIME_FIELDS)}")

    model = build_from_params(final, params, seed)
    if interaction:
        extra = dict(interaction) if isinstance(interaction, Mapping) else {}
        if final.interaction_queries:
            if extra:
                raise ValueError(f"{source} is already an I-ViT; pass its switches as overrides instead of {extra}")
        else:
            model = ivit_from_vit(model, ivit_config(final, **extra), seed=seed)
            final = model.cfg
    if overrides:
        final = dataclasses.replace(final, **overrides)
        model = build_from_params(final, flat_params(model), seed)
    return model, final


__all__ = ["RUNTIME_FIELDS", "build_from_params", "check_tensors", "expected_tensors", "finish_load", "ivit_from_vit"]
