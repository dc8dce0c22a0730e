"""The Interaction ViT in PyTorch, on transformers' ViT (a parity reference, not for training).

Every ViT layer of a `transformers.ViTForImageClassification` (or headless `ViTModel`) gets
its attention replaced by `InteractionAttention`, a direct transcription of SPEC section 1:

    C_vfm = softmax(q k^T / sqrt(d)),  C_agt = softmax(q' k^T / sqrt(d))      per head
    z = [N C_agt, N C_vfm];  g = sigmoid(gelu(z w1[h] + b1[h]) w2[h] + b2[h])  (exact gelu)
    C_f = g1 C_agt + g2 C_vfm   (GC off: (C_agt + C_vfm) / 2)
    o = (C_f v) heads concatenated, then the output projection

The rest (embeddings, LayerNorms, MLP, head) is transformers' own code. The forward returns
(logits, cls_attn) with cls_attn [B, L_align, H, N]: row 0 of C_agt (of C_vfm when the
interaction queries are off) for the alignment layers, or None without the constraint.

Weights use the Hub names of `lfi_jax.models.convert` (`vit.encoder.layer.3.attention
.attention.interaction_query.weight`, `...attention.attention.gate.w1`, ...), whatever the
installed transformers calls its modules: `hf_state_dict()` writes them and
`load_hf_state_dict()` / `from_pretrained()` read them.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from lfi_jax.fileio import atomic_write_with
from lfi_jax.models.convert.hf import CONFIG_KEY  # config.json entry of the I-ViT switches


class Gate(nn.Module):
    """Per-head gate parameters: w1 [H, 2, G], b1 [H, G], w2 [H, G, 2], b2 [H, 2] (G = 0: w2 [H, 2, 2])."""

    def __init__(self, heads: int, hidden: int, bias_init=(0.0, 0.0), scale: float = 0.02):
        super().__init__()
        if hidden > 0:
            self.w1 = nn.Parameter(torch.randn(heads, 2, hidden) * scale)
            self.b1 = nn.Parameter(torch.zeros(heads, hidden))
            self.w2 = nn.Parameter(torch.randn(heads, hidden, 2) * scale)
        else:
            self.w1 = self.b1 = None
            self.w2 = nn.Parameter(torch.randn(heads, 2, 2) * scale)
        self.b2 = nn.Parameter(torch.tensor(bias_init, dtype=torch.float32).repeat(heads, 1))

    def forward(self, c_agt: torch.Tensor, c_vfm: torch.Tensor) -> torch.Tensor:
        """Fused map C_f from maps [B, H, Nq, Nk]."""
        n = c_agt.shape[-1]
        z = torch.stack([n * c_agt, n * c_vfm], dim=-1)  # [B, H, Nq, Nk, 2]
        if self.w1 is not None:
            u = torch.einsum("bhqkz,hzg->bhqkg", z, self.w1) + self.b1[None, :, None, None, :]
            u = nn.functional.gelu(u, approximate="none")
            logits = torch.einsum("bhqkg,hgt->bhqkt", u, self.w2)
        else:
            logits = torch.einsum("bhqkz,hzt->bhqkt", z, self.w2)
        g = torch.sigmoid(logits + self.b2[None, :, None, None, :])
        return g[..., 0] * c_agt + g[..., 1] * c_vfm


class _SelfAttention(nn.Module):
    """Holds the projections, under the Hub's `attention.attention` names."""

    def __init__(self, config: ViTConfig, lfi: Mapping[str, Any]):
        super().__init__()
        d, bias = config.hidden_size, config.qkv_bias
        self.query = nn.Linear(d, d, bias=bias)
        self.key = nn.Linear(d, d, bias=bias)
        self.value = nn.Linear(d, d, bias=bias)
        if lfi.get("interaction_queries"):
            self.interaction_query = nn.Linear(d, d, bias=bias)
            if lfi.get("gated_control", True):
                bias = lfi.get("gate_bias_init") or (0.0, 0.0)  # None (unset): a fresh gate's (0, 0)
                self.gate = Gate(config.num_attention_heads, int(lfi.get("gate_hidden", 8)),
                                 tuple(bias), float(lfi.get("gate_init_scale", 0.02)))


class _SelfOutput(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class InteractionAttention(nn.Module):
    """Replaces a ViT layer's attention module (SPEC section 1)."""

    def __init__(self, config: ViTConfig, lfi: Mapping[str, Any], want_cls: bool):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.iq = bool(lfi.get("interaction_queries"))
        self.want_cls = want_cls
        self.attention = _SelfAttention(config, lfi)
        self.output = _SelfOutput(config)
        self.cls_row: torch.Tensor | None = None

    def _split(self, x):  # [B, N, D] -> [B, H, N, d]
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, *args, **kwargs):
        a = self.attention
        q, k, v = (self._split(lin(hidden_states)) for lin in (a.query, a.key, a.value))
        scale = 1.0 / math.sqrt(self.head_dim)
        c_vfm = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        if self.iq:
            q2 = self._split(a.interaction_query(hidden_states))
            c_agt = torch.softmax(q2 @ k.transpose(-1, -2) * scale, dim=-1)
            gate = getattr(a, "gate", None)
            c_f = gate(c_agt, c_vfm) if gate is not None else 0.5 * (c_agt + c_vfm)
            row = c_agt[:, :, 0, :]
        else:
            c_f, row = c_vfm, c_vfm[:, :, 0, :]
        self.cls_row = row if self.want_cls else None
        o = (c_f @ v).transpose(1, 2).reshape(hidden_states.shape)
        return self.output.dense(o), None


def _lfi_of(config: ViTConfig) -> dict:
    lfi = getattr(config, CONFIG_KEY, None) or {}
    return dict(lfi)


class IViTReference(nn.Module):
    """transformers ViT with interaction attention. `forward(pixel_values NCHW)` -> (logits, cls_attn).

    config: a `ViTConfig`; its `lfi_interaction` entry (as `save_hf` writes it) gives the
    I-ViT switches: interaction_queries, gated_control, gate_hidden, interaction_constraint,
    gate_bias_init, align_layers. Without it the model is the plain ViT.
    A config with no labels (`architectures == ["ViTModel"]`) gives a headless model whose
    "logits" are the final normalised CLS features, as in `lfi_jax.models.ViT`.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.lfi = _lfi_of(config)
        self.headless = "ViTModel" in (config.architectures or [])
        if self.headless:
            self.vit = ViTModel(config, add_pooling_layer=False)
            self.classifier = None
        else:
            full = ViTForImageClassification(config)
            self.vit, self.classifier = full.vit, full.classifier
        depth = config.num_hidden_layers
        align = self.lfi.get("align_layers")
        align = range(depth) if align is None else [i % depth for i in align]
        want = set(align) if self.lfi.get("interaction_constraint") else set()
        self.align_layers = sorted(want)
        for i, layer in enumerate(self._layers()):
            layer.attention = InteractionAttention(config, self.lfi, i in want)
        self.eval()

    def _layers(self):
        return self.vit.layers if hasattr(self.vit, "layers") else self.vit.encoder.layer

    def forward(self, pixel_values: torch.Tensor):
        out = self.vit(pixel_values)
        cls = out.last_hidden_state[:, 0]
        logits = cls if self.classifier is None else self.classifier(cls)
        rows = [layer.attention.cls_row for layer in self._layers() if layer.attention.want_cls]
        cls_attn = torch.stack(rows, dim=1) if rows else None  # [B, L, H, N]
        return logits, cls_attn

    # ---- weights under the Hub names ------------------------------------------------
    def _hub_to_module(self) -> dict[str, str]:
        """{Hub name: this module's state-dict name}."""
        new_layout = hasattr(self.vit, "layers")
        out = {}
        for name in self.state_dict():
            hub = name
            if new_layout:  # transformers >= 5 module names -> Hub names
                hub = re.sub(r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2.", hub)
                hub = hub.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense.")
            if self.headless:
                hub = hub[len("vit."):] if hub.startswith("vit.") else hub
            out[hub] = name
        return out

    def hf_state_dict(self) -> dict[str, np.ndarray]:
        sd = self.state_dict()
        return {hub: sd[name].detach().cpu().float().numpy() for hub, name in self._hub_to_module().items()}

    def hf_named_parameters(self) -> dict[str, nn.Parameter]:
        params = dict(self.named_parameters())
        return {hub: params[name] for hub, name in self._hub_to_module().items() if name in params}

    def load_hf_state_dict(self, sd: Mapping[str, Any], *, source: str = "state dict") -> None:
        """Load Hub-named tensors; every missing, unexpected or mis-shaped one is an error."""
        names = self._hub_to_module()
        own = self.state_dict()
        given = {k: v for k, v in sd.items() if not k.startswith(("vit.pooler.", "pooler."))}
        missing = sorted(set(names) - set(given))
        unexpected = sorted(set(given) - set(names))
        misshaped = [f"{k}: {tuple(given[k].shape)} vs {tuple(own[names[k]].shape)}"
                     for k in sorted(set(names) & set(given)) if tuple(given[k].shape) != tuple(own[names[k]].shape)]
        if missing or unexpected or misshaped:
            raise ValueError(f"{source}: missing {missing}, unexpected {unexpected}, mis-shaped {misshaped}")
        with torch.no_grad():
            for hub, name in names.items():
                own[name].copy_(torch.from_numpy(np.array(given[hub], dtype=np.float32)))

    def save(self, directory: str) -> None:
        """Write config.json + model.safetensors (Hub names), as `convert.save_hf` does."""
        os.makedirs(directory, exist_ok=True)
        raw = self.config.to_dict()
        raw.pop(CONFIG_KEY, None)
        raw["architectures"] = ["ViTModel" if self.headless else "ViTForImageClassification"]
        if self.lfi:
            raw[CONFIG_KEY] = self.lfi

        def write_json(path):
            with open(path, "w") as f:
                json.dump(raw, f, indent=2, sort_keys=True)

        def write_weights(path):
            save_file(self.hf_state_dict(), path, metadata={"format": "pt"})

        for name, write in (("model.safetensors", write_weights), ("config.json", write_json)):
            atomic_write_with(os.path.join(directory, name), write)

    @classmethod
    def from_pretrained(cls, directory: str) -> "IViTReference":
        """Read a directory written by `lfi_jax.models.convert.save_hf` (or transformers)."""
        with open(os.path.join(directory, "config.json")) as f:
            raw = json.load(f)
        config = ViTConfig(**{k: v for k, v in raw.items() if k != CONFIG_KEY})
        config.architectures = raw.get("architectures")
        setattr(config, CONFIG_KEY, raw.get(CONFIG_KEY))
        model = cls(config)
        file = os.path.join(directory, "model.safetensors")
        model.load_hf_state_dict(load_file(file), source=file)
        return model


def alignment_loss(cls_attn: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, *,
                   direction: str = "teacher_student", eps: float = 1e-6) -> torch.Tensor:
    """SPEC section 2 in torch. cls_attn [B, L, H, N]; teacher [B, N-1]; mask [B] or None.

    a_l = head-mean CLS row over the patch keys, renormalised; KL(teacher || a_l) with
    0 log 0 = 0 (direction "paper": KL(a_l || (1-eps) teacher + eps/P)); mean over layers,
    then over the (masked) batch.
    """
    a = cls_attn.float().mean(dim=2)[..., 1:]
    a = a / a.sum(-1, keepdim=True)
    t = teacher.float()[:, None, :].expand_as(a)
    if direction == "teacher_student":
        kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-38)) - torch.log(a)), torch.zeros_like(t)).sum(-1)
    elif direction == "paper":
        te = (1 - eps) * t + eps / t.shape[-1]
        kl = torch.where(a > 0, a * (torch.log(a.clamp_min(1e-38)) - torch.log(te)), torch.zeros_like(a)).sum(-1)
    else:
        raise ValueError(f"direction={direction!r}; expected 'teacher_student' or 'paper'")
    per = kl.mean(dim=1)
    if mask is None:
        return per.mean()
    m = mask.float()
    return (per * m).sum() / m.sum().clamp_min(1.0)
