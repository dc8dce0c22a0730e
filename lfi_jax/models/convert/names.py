"""Our parameter paths <-> Hugging Face (Hub) names, and the array layouts of both sides.

Names follow the checkpoints on the Hugging Face Hub (`vit.encoder.layer.3.attention.attention
.query.weight`, ...); `normalize_hf_names` also reads the module names of newer transformers
(`vit.layers.3.attention.q_proj.weight`, `mlp.fc1`, ...). An I-ViT adds, per layer,
`...attention.attention.interaction_query.{weight,bias}` and `...attention.attention.gate.{w1,
b1,w2,b2}` (gate tensors in our layout: w1 [H, 2, G], b1 [H, G], w2 [H, G, 2], b2 [H, 2]).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

Path = tuple  # an NNX flat-state path, e.g. ('encoder', 'layer', 3, 'attention', 'query', 'kernel')

_ATTN_INNER = ("query", "key", "value", "interaction_query", "gate")

# Tensors some checkpoints carry that our model does not have, and that are dropped.
IGNORED = (re.compile(r"^pooler\."), re.compile(r"^embeddings\.mask_token$"))


def path_name(path: Path) -> str:
    """The dotted name of a parameter path, e.g. `encoder.layer.3.attention.query.kernel`."""
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[Path, Any]:
    """{our path: value} of every parameter of a model."""
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def hf_name(path: Path) -> str:
    """HF (Hub) name of one of our parameters, without the `vit.` prefix of a classifier model."""
    parts = [str(p) for p in path]
    if parts[0] == "encoder" and len(parts) > 4 and parts[3] == "attention" and parts[4] in _ATTN_INNER:
        parts.insert(4, "attention")  # HF nests q/k/v in `attention.attention`
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _is_gate(path: Path) -> bool:
    return "gate" in [str(p) for p in path]


def to_hf_array(path: Path, x) -> np.ndarray:
    """Our layout -> torch layout (Linear weight [out, in], Conv2d weight [out, in, kh, kw])."""
    x = np.asarray(x)
    if path[-1] == "kernel" and not _is_gate(path):
        if x.ndim == 2:
            return np.ascontiguousarray(x.T)
        if x.ndim == 4:  # [kh, kw, in, out] -> [out, in, kh, kw]
            return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x


def from_hf_array(path: Path, x) -> np.ndarray:
    """Torch layout -> our layout (inverse of `to_hf_array`)."""
    x = np.asarray(x)
    if path[-1] == "kernel" and not _is_gate(path):
        if x.ndim == 2:
            return np.ascontiguousarray(x.T)
        if x.ndim == 4:  # [out, in, kh, kw] -> [kh, kw, in, out]
            return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    return x


def hf_shape(path: Path, shape: tuple) -> tuple:
    """The torch-layout shape of one of our parameters."""
    if path[-1] == "kernel" and not _is_gate(path):
        if len(shape) == 2:
            return (shape[1], shape[0])
        if len(shape) == 4:
            return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _prefixed(name: str, headless: bool) -> str:
    if headless or name.startswith("classifier."):
        return name
    return "vit." + name


def flat_to_hf(flat: Mapping[Path, Any], *, headless: bool = False) -> dict[str, np.ndarray]:
    """{our path: array} (params, or gradients of them) -> {HF name: np.ndarray (torch layout)}.

    headless=True gives `ViTModel` names (no `vit.` prefix); else `ViTForImageClassification`.
    """
    return {_prefixed(hf_name(p), headless): to_hf_array(p, x) for p, x in flat.items()}


def to_hf_state_dict(model) -> dict[str, np.ndarray]:
    """Our params -> HF-named state dict (float32 numpy, torch layouts)."""
    headless = model.classifier is None
    return flat_to_hf({p: np.asarray(v, np.float32) for p, v in flat_params(model).items()}, headless=headless)


_NEW_TO_HUB = (
    (re.compile(r"(^|\.)layers\.(\d+)\."), r"\1encoder.layer.\2."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
)


def normalize_hf_names(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
    """-> ({unprefixed Hub name: tensor}, had_vit_prefix). Newer transformers names are mapped."""
    prefixed = any(k.startswith("vit.") for k in sd)
    out = {}
    for k, v in sd.items():
        name = k[4:] if k.startswith("vit.") else k
        for pattern, repl in _NEW_TO_HUB:
            name = pattern.sub(repl, name)
        out[name] = v
    return out, prefixed


__all__ = ["IGNORED", "Path", "flat_params", "flat_to_hf", "from_hf_array", "hf_name", "hf_shape",
           "normalize_hf_names", "path_name", "to_hf_array", "to_hf_state_dict"]
