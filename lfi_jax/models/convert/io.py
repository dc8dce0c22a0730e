"""Reading and writing checkpoint files: safetensors, torch pickles, sharded indexes, config.json.

torch is imported only to read `.bin`/`.pt`/`.pth` files, always with `weights_only=True`;
safetensors (an optional dependency, the `teacher` extra) only when a .safetensors file is read
or written.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import ml_dtypes
import numpy as np

from lfi_jax.errors import UserError
from lfi_jax.fileio import atomic_write_with, write_json_atomic


class CheckpointError(UserError):
    """A checkpoint that does not fit the architecture (the message lists every problem)."""


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:  # bfloat16 (numpy has no such dtype): decode the file by hand
        return _read_safetensors_raw(path)


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
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


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Write {name: array} as a .safetensors file (atomically), with the `format: pt` metadata."""
    from safetensors.numpy import save_file

    atomic_write_with(path, lambda p: save_file(dict(tensors), p, metadata={"format": "pt"}))


def read_torch(path: str) -> dict[str, np.ndarray]:
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


def weights_file(path: str) -> str:
    """The weights file of a checkpoint directory (or `path` itself when it is a file)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"checkpoint directory {path} has none of {', '.join(WEIGHT_FILES)}")


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
        return read_safetensors(file), file
    if file.endswith((".bin", ".pt", ".pth")):
        return read_torch(file), file
    raise CheckpointError(f"{file}: unknown weights format (expected .safetensors, .bin, .pt or .pth)")


def read_json(directory: str, name: str = "config.json") -> dict | None:
    """`directory/name` parsed, or None when there is no such file."""
    p = os.path.join(directory, name)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


def write_checkpoint(directory: str, tensors: Mapping[str, np.ndarray], config: Mapping) -> None:
    """A `save_pretrained`-style directory: model.safetensors and config.json (sorted, indented)."""
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    write_json_atomic(os.path.join(directory, "config.json"), config, indent=2, sort_keys=True)


def interaction_entry(cfg, fields) -> dict:
    """config.json's interaction entry: `fields` of `cfg`, the tuple-valued ones as lists."""
    lfi = {f: getattr(cfg, f) for f in fields}
    for f in ("gate_bias_init", "align_layers"):
        if f in lfi:
            lfi[f] = None if lfi[f] is None else list(lfi[f])
    return lfi


__all__ = ["CheckpointError", "WEIGHT_FILES", "interaction_entry", "read_json", "read_safetensors", "read_state_dict",
           "read_torch", "weights_file", "write_checkpoint", "write_safetensors"]
