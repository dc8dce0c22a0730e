"""Checkpoints in and out: Hugging Face / timm ViT weights <-> our ViT and I-ViT.

    model, cfg = load_hf_vit("path/to/vit-base-patch16-224")            # a ViT
    model, cfg = load_hf_vit(path, interaction=True, num_classes=200)  # an I-ViT from it
    model, cfg = load_timm_vit("vit_small.safetensors", image_size=384)
    save_hf(model, "out_dir")           # config.json + model.safetensors, HF names
    sd = to_hf_state_dict(model)        # {HF name: np.ndarray}

Names follow the checkpoints on the Hugging Face Hub (`vit.encoder.layer.3.attention.attention
.query.weight`, ...). Checkpoints written with transformers' newer module names (`vit.layers.3
.attention.q_proj.weight`, `mlp.fc1`, ...) are read as well. An I-ViT adds, per layer,
`...attention.attention.interaction_query.{weight,bias}` and `...attention.attention.gate.{w1,
b1,w2,b2}` (gate tensors in our layout: w1 [H, 2, G], b1 [H, G], w2 [H, G, 2], b2 [H, 2]), and
config.json gets an `lfi_interaction` entry with the I-ViT switches, so weights move both
ways between this package and `lfi_jax.reference` (PyTorch).

Any mismatch between a checkpoint and the architecture its config describes is reported in
one error that names the file and lists every missing, unexpected and mis-shaped tensor.

torch is imported only to read `.bin`/`.pt`/`.pth` files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.fileio import atomic_write_with, write_json_atomic
from lfi_jax.models.ivit import PRETRAINED_GATE_BIAS, ivit_config, ivit_from_vit
from lfi_jax.models.vit import VARIANTS, ModelConfig, ViT, interpolate_pos_embed

CONFIG_KEY = "lfi_interaction"  # config.json entry holding the I-ViT switches

# I-ViT fields stored in config.json (architecture-relevant ones first).
_INTERACTION_FIELDS = (
    "interaction_queries",
    "gated_control",
    "gate_hidden",
    "interaction_constraint",
    "gate_bias_init",
    "gate_init_scale",
    "align_layers",
)
# ModelConfig fields a caller may change at load time without touching the weights.
_RUNTIME_FIELDS = ("dtype", "remat", "attn_impl", "interaction_constraint", "align_layers")

# Tensors some checkpoints carry that our model does not have, and that are dropped.
_IGNORED = (re.compile(r"^pooler\."), re.compile(r"^embeddings\.mask_token$"))

# HF defaults (transformers' ViTConfig) for keys a config.json may leave out.
_HF_DEFAULTS = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    image_size=224,
    patch_size=16,
    num_channels=3,
    layer_norm_eps=1e-12,
    qkv_bias=True,
)

Path = tuple  # an NNX flat-state path, e.g. ('encoder', 'layer', 3, 'attention', 'query', 'kernel')


class CheckpointError(ValueError):
    """A checkpoint that does not fit the architecture (the message lists every problem)."""


# --------------------------------------------------------------------------------------
# Our parameter paths <-> HF names (without the "vit." prefix) and array layouts.

_ATTN_INNER = ("query", "key", "value", "interaction_query", "gate")


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


def _hf_shape(path: Path, shape: tuple) -> tuple:
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


def _flat_params(model: ViT) -> dict[Path, Any]:
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_hf_state_dict(model: ViT) -> dict[str, np.ndarray]:
    """Our params -> HF-named state dict (float32 numpy, torch layouts)."""
    headless = model.classifier is None
    return flat_to_hf({p: np.asarray(v, np.float32) for p, v in _flat_params(model).items()}, headless=headless)


def hf_config_dict(cfg: ModelConfig, *, id2label: Mapping[int, str] | None = None) -> dict:
    """A transformers `ViTConfig`-compatible config.json dict for an architecture."""
    headless = cfg.num_classes == 0
    d = dict(
        architectures=["ViTModel" if headless else "ViTForImageClassification"],
        model_type="vit",
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.02,
        layer_norm_eps=cfg.layer_norm_eps,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        qkv_bias=cfg.qkv_bias,
        encoder_stride=cfg.patch_size,
    )
    if not headless:
        labels = dict(id2label) if id2label else {i: f"LABEL_{i}" for i in range(cfg.num_classes)}
        if len(labels) != cfg.num_classes:
            raise ValueError(f"id2label has {len(labels)} entries, the model has {cfg.num_classes} classes")
        d["id2label"] = {str(int(k)): v for k, v in labels.items()}
        d["label2id"] = {v: int(k) for k, v in labels.items()}
    if cfg.interaction_queries or cfg.interaction_constraint:
        lfi = {f: getattr(cfg, f) for f in _INTERACTION_FIELDS}
        lfi["gate_bias_init"] = list(cfg.gate_bias_init)
        lfi["align_layers"] = None if cfg.align_layers is None else list(cfg.align_layers)
        d[CONFIG_KEY] = lfi
    return d


def save_hf(model: ViT, directory: str, *, id2label: Mapping[int, str] | None = None) -> None:
    """Write `config.json` + `model.safetensors` that transformers (and `load_hf_vit`) read.

    A plain ViT loads with `ViTForImageClassification.from_pretrained(directory)`; an I-ViT
    with `lfi_jax.reference.IViTReference.from_pretrained(directory)`.
    """
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = to_hf_state_dict(model)
    config = hf_config_dict(model.cfg, id2label=id2label)
    atomic_write_with(os.path.join(directory, "model.safetensors"), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json_atomic(os.path.join(directory, "config.json"), config, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------
# Reading files.


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:  # bfloat16 (numpy has no such dtype): decode the file by hand
        return _read_safetensors_raw(path)


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=dt).reshape(info["shape"])
    return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
    import torch  # only here: .bin / .pt / .pth files are pickled torch tensors

    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):  # common wrappers of a state dict
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        if v.dtype in (torch.bfloat16, torch.float16):
            v = v.float()
        out[k] = v.detach().cpu().numpy()
    return out


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def weights_file(path: str) -> str:
    """The weights file of a checkpoint directory (or `path` itself when it is a file)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"checkpoint directory {path} has none of {', '.join(_WEIGHT_FILES)}")


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], str]:
    """Read a state dict (safetensors, torch pickle, or a sharded index) -> (tensors, file)."""
    file = weights_file(path)
    if file.endswith(".index.json"):
        with open(file) as f:
            weight_map = json.load(f)["weight_map"]
        out = {}
        for shard in sorted(set(weight_map.values())):
            sd, _ = read_state_dict(os.path.join(os.path.dirname(file), shard))
            out.update(sd)
        return out, file
    if file.endswith(".safetensors"):
        return _read_safetensors(file), file
    if file.endswith((".bin", ".pt", ".pth")):
        return _read_torch(file), file
    raise CheckpointError(f"{file}: unknown weights format (expected .safetensors, .bin, .pt or .pth)")


def _read_json(directory: str, name: str = "config.json") -> dict | None:
    p = os.path.join(directory, name)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------
# HF names: normalise to the Hub's layout, without the "vit." prefix.

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


# --------------------------------------------------------------------------------------
# Building a model from {unprefixed HF name: tensor} and an architecture.


def _expected(cfg: ModelConfig) -> dict[str, tuple[Path, tuple]]:
    """{unprefixed HF name: (our path, torch-layout shape)} of an architecture (no allocation)."""
    abstract = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        path = tuple(path)
        out[hf_name(path)] = (path, _hf_shape(path, var.shape))
    return out


def _check_tensors(sd: Mapping[str, np.ndarray], cfg: ModelConfig, source: str, what: str) -> dict[str, tuple]:
    expected = _expected(cfg)
    given = {k: v for k, v in sd.items() if not any(p.search(k) for p in _IGNORED)}
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


def _build(cfg: ModelConfig, params: Mapping[Path, np.ndarray], seed: int) -> ViT:
    """A ViT of `cfg` whose parameters come from `params` (ours layout); others stay fresh."""
    abstract = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(seed)))
    complete = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(abstract))} <= set(params)
    # With every variable given nothing needs initialising (no random init to compile/run).
    model = abstract if complete else ViT(cfg, rngs=nnx.Rngs(seed))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        path = tuple(path)
        if path in params:
            value = params[path]
            if tuple(value.shape) != tuple(var.shape):
                raise CheckpointError(f"{'.'.join(map(str, path))}: {value.shape} vs model {var.shape}")
            var.set_value(jnp.asarray(np.asarray(value, np.float32), var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _finish(
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
    expected = _check_tensors(sd, cfg, source, what)
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
    bad = sorted(set(overrides) - set(_RUNTIME_FIELDS))
    if bad:
        raise ValueError(f"load: {bad} cannot be changed at load time; allowed: {list(_RUNTIME_FIELDS)}")

    model = _build(final, params, seed)
    if interaction:
        extra = dict(interaction) if isinstance(interaction, Mapping) else {}
        if final.interaction_queries:
            if extra:
                raise ValueError(f"{source} is already an I-ViT; pass its switches as overrides instead of {extra}")
        else:
            extra.setdefault("gate_bias_init", PRETRAINED_GATE_BIAS)
            final = ivit_config(final, **extra)
            model = ivit_from_vit(model, final, seed=seed)
    if overrides:
        final = dataclasses.replace(final, **overrides)
        model = _build(final, _flat_params(model), seed)
    return model, final


def _square(v, key: str, source: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise CheckpointError(f"{source}: {key}={v} is not square; only square images/patches are supported")
        v = v[0]
    return int(v)


def hf_model_config(hf: Mapping[str, Any], *, num_classes: int, source: str) -> ModelConfig:
    """ModelConfig of a transformers ViT config.json (plus our `lfi_interaction` entry)."""
    c = {**_HF_DEFAULTS, **hf}
    if c["hidden_act"] != "gelu":
        raise CheckpointError(f"{source}: hidden_act={c['hidden_act']!r}; only 'gelu' (exact erf) is supported")
    if int(c["num_channels"]) != 3:
        raise CheckpointError(f"{source}: num_channels={c['num_channels']}; only RGB (3) is supported")
    kw = dict(
        hidden_size=int(c["hidden_size"]),
        depth=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
        mlp_dim=int(c["intermediate_size"]),
        patch_size=_square(c["patch_size"], "patch_size", source),
        image_size=_square(c["image_size"], "image_size", source),
        layer_norm_eps=float(c["layer_norm_eps"]),
        qkv_bias=bool(c["qkv_bias"]),
        num_classes=num_classes,
    )
    lfi = hf.get(CONFIG_KEY)
    if lfi:
        unknown = sorted(set(lfi) - set(_INTERACTION_FIELDS))
        if unknown:
            raise CheckpointError(f"{source}: unknown keys {unknown} in config.json's {CONFIG_KEY}")
        for f in _INTERACTION_FIELDS:
            if f in lfi and lfi[f] is not None:
                kw[f] = tuple(lfi[f]) if f in ("gate_bias_init", "align_layers") else lfi[f]
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _hf_num_classes(hf: Mapping[str, Any], has_head: bool) -> int:
    if not has_head:
        return 0
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def load_hf_vit(
    path: str,
    *,
    image_size: int | None = None,
    num_classes: int | None = None,
    interaction: bool | Mapping[str, Any] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    **overrides: Any,
) -> tuple[ViT, ModelConfig]:
    """Load a transformers `ViTForImageClassification` / `ViTModel` directory (or an I-ViT
    written by `save_hf`).

    path: a directory with config.json and model.safetensors (or pytorch_model.bin, or a
      sharded index).
    image_size: run at another resolution; the position embeddings are interpolated (bicubic,
      the CLS embedding kept).
    num_classes: a new head of that size (freshly initialised) when it differs from the
      checkpoint's; a `ViTModel` (no head) gives a headless model (features) unless given.
    interaction: True (or a dict of `ivit_config` overrides, e.g. {"gate_hidden": 0}) turns
      a ViT into an I-ViT with the pretrained initialisation: Wq' = Wq, gate bias [-4, +4].
    dtype: compute dtype (parameters stay float32).
    overrides: runtime fields of ModelConfig (attn_impl, remat, interaction_constraint,
      align_layers).
    Returns (model, config).
    """
    hf = _read_json(path) if os.path.isdir(path) else _read_json(os.path.dirname(os.path.abspath(path)))
    raw, file = read_state_dict(path)
    if hf is None:
        raise CheckpointError(f"{path}: no config.json beside the weights (needed for heads, eps, sizes)")
    sd, _ = normalize_hf_names(raw)
    has_head = any(k.startswith("classifier.") for k in sd)
    cfg = hf_model_config(hf, num_classes=_hf_num_classes(hf, has_head), source=file)
    what = "HF ViT of its config.json"
    return _finish(cfg, sd, file, what, image_size=image_size, num_classes=num_classes,
                   interaction=interaction, dtype=dtype, seed=seed, overrides=overrides)


# --------------------------------------------------------------------------------------
# timm naming.

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
    hf = flat_to_hf({p: np.asarray(v, np.float32) for p, v in _flat_params(model).items()}, headless=True)
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
    layer_norm_eps: float = 1e-6,
    **overrides: Any,
) -> tuple[ViT, ModelConfig]:
    """Load a timm ViT state dict (a .safetensors/.bin/.pth file, or a directory with one).

    No timm package is needed. The architecture is read off the tensor shapes; the number
    of heads (not visible in shapes) comes from `num_heads`, else the directory's timm
    config.json (`model_args.num_heads` or an architecture name like
    `vit_small_patch16_224`), else the standard variant with that hidden size.
    The other arguments are those of `load_hf_vit`.
    """
    raw, file = read_state_dict(path)
    timm_cfg = _read_json(path) if os.path.isdir(path) else None
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
    return _finish(cfg, sd, file, "timm ViT read off its shapes", image_size=image_size,
                   num_classes=num_classes, interaction=interaction, dtype=dtype, seed=seed, overrides=overrides)


def save_timm(model: ViT, path: str) -> None:
    """Write `to_timm_state_dict(model)` to a .safetensors file (atomically)."""
    from safetensors.numpy import save_file

    tensors = to_timm_state_dict(model)
    atomic_write_with(path, lambda p: save_file(tensors, p, metadata={"format": "pt"}))


__all__ = [
    "CONFIG_KEY",
    "CheckpointError",
    "flat_to_hf",
    "hf_config_dict",
    "hf_model_config",
    "hf_name",
    "load_hf_vit",
    "load_timm_vit",
    "normalize_hf_names",
    "read_state_dict",
    "save_hf",
    "save_timm",
    "timm_to_hf_names",
    "to_hf_state_dict",
    "to_timm_state_dict",
]
