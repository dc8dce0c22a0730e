"""torch-side helpers of the LLaVA teacher: lazy torch import, device/dtype, the checkpoint
fingerprint and the attention-capturing forward hook (lfi_jax/teacher/llava.py uses them)."""

from __future__ import annotations

import hashlib
import os

DTYPES = ("auto", "float32", "float16", "bfloat16")


def _torch():
    try:
        import torch
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the llava teacher needs torch and transformers: pip install 'lfi-jax[teacher]'"
        ) from e
    return torch, transformers


def resolve_device_dtype(device: str | None, dtype: str | None):
    """('auto' | 'cpu' | 'cuda[:i]', 'auto' | float32 | float16 | bfloat16) -> torch objects."""
    torch, _ = _torch()
    device = (device or "auto").strip()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    dtype = (dtype or "auto").strip()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        if dev.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return dev, getattr(torch, dtype), dtype


def model_fingerprint(model_dir: str | None) -> str | None:
    """sha256 of config.json and the weight files' names, sizes and (safetensors) headers."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        p = os.path.join(model_dir, name)
        if name == "config.json":
            with open(p, "rb") as f:
                h.update(f.read())
        elif name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{os.path.getsize(p)}".encode())
            if name.endswith(".safetensors"):
                with open(p, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    h.update(f.read(min(n, 1 << 24)))
    return h.hexdigest()


class Capture:
    """Forward hook state: reduces one layer's attention weights to spans x image tokens."""

    def __init__(self):
        self.row_idx = None  # (B, R) long: span-token positions, all spans concatenated
        self.row_w = None  # (B, P, R) float32: 1/len(span) where the token belongs to span p
        self.img_idx = None  # (B, N) long: image-token positions
        self.acc = None  # (B, P, N) float32, summed over hooked layers
        self.calls = 0

    def hook(self, module, args, output):
        if self.acc is None:  # not capturing (e.g. generating background words)
            return None
        attn_out, w = output[0], output[1]
        if w is None:
            raise RuntimeError(
                "the language model's attention returned no weights; it must run eager attention"
            )
        import torch

        b, h, s, _ = w.shape
        r, n = self.row_idx.shape[1], self.img_idx.shape[1]
        rows = torch.gather(w, 2, self.row_idx[:, None, :, None].expand(b, h, r, s))
        rows = rows.float().mean(1)  # (B, R, S): average over heads, in float32
        cols = torch.gather(rows, 2, self.img_idx[:, None, :].expand(b, r, n))  # (B, R, N)
        self.acc += torch.bmm(self.row_w, cols)
        self.calls += 1
        return (attn_out, None) + tuple(output[2:])


__all__ = ["DTYPES", "Capture", "model_fingerprint", "resolve_device_dtype"]
