"""Parity of the JAX ViT / I-ViT with PyTorch, from the same weights (SPEC section 5).

`compare_vit(hf)`: our `load_hf_vit(hf)` against transformers' own `from_pretrained(hf)`.
`compare_ivit(cfg | hf=...)`: an I-ViT against `lfi_jax.reference.IViTReference`.

Both sides run the same random batch (and, for the I-ViT, a random teacher map) and compute
the logits, the CLS rows of C_agt, the loss (cross-entropy + alignment, SPEC section 2) and
its gradients; the report holds `max_abs_diff` per output, `max_abs` (the size of each
reference output, for scale) and `ok` (every difference within `tol`).

The I-ViT without `hf` has every parameter drawn at random (seeded), with gates far from
their initialisation, so no term is trivially zero. With `hf` the I-ViT starts from the
checkpoint with the pretrained initialisation (Wq' = Wq, gate bias [-4, +4]) and then its
new parameters (interaction queries, gates, a zero head) are perturbed at random; an I-ViT
checkpoint (written by `lfi_jax.models.convert.save_hf`) is compared as it is.
`perturb=True` adds noise to one weight of the PyTorch side only (a check that the check fails).

torch and transformers are imported only inside the functions that build the PyTorch side.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.losses import alignment_loss, cross_entropy
from lfi_jax.models.config import ModelConfig, ivit_config
from lfi_jax.models.convert.hf import CONFIG_KEY, hf_config_dict, is_ivit_checkpoint, load_hf_vit
from lfi_jax.models.convert.names import flat_to_hf, normalize_hf_names, to_hf_state_dict
from lfi_jax.models.vit import ViT

SMALL = dict(hidden_size=64, depth=3, num_heads=4, mlp_dim=128, patch_size=8, image_size=32, num_classes=10,
             gate_hidden=8)


def _highest_precision() -> None:
    """float32 matmuls at full precision (the default may use bf16 passes on accelerators)."""
    jax.config.update("jax_default_matmul_precision", "highest")


# --------------------------------------------------------------------------------------
# Parameters.


def randomize(model, seed: int, *, only_new: bool = False) -> None:
    """Draw parameters at random (seeded), at scales that make every term matter.

    only_new=False: every parameter (kernels ~ N(0, 1/fan_in), biases and LayerNorm offsets
    ~ N(0, 0.1^2), LayerNorm scales ~ 1 + N(0, 0.1^2), embeddings ~ N(0, 0.5^2)).
    only_new=True: the interaction queries get Wq' + noise of half Wq's spread, the gates
    random weights and biases; an all-zero classifier gets random weights.
    Gates always get w ~ N(0, 0.5^2) and biases ~ N(0, 1).
    """
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        names = [str(p) for p in path]
        shape, leaf = tuple(var.shape), names[-1]
        if "gate" in names:
            new = rng.normal(0, 1.0 if leaf.startswith("b") else 0.5, shape)
        elif "interaction_query" in names and only_new:
            x = np.asarray(var.get_value(), np.float32)
            new = x + rng.normal(0, 0.5 * (x.std() + 1e-3), shape)
        elif names[0] == "classifier" and only_new:
            if np.any(np.asarray(var.get_value())):
                continue
            new = rng.normal(0, 1.0 / np.sqrt(shape[0]), shape) if leaf == "kernel" else rng.normal(0, 0.1, shape)
        elif only_new:
            continue
        elif leaf == "kernel":
            new = rng.normal(0, 1.0 / np.sqrt(int(np.prod(shape[:-1]))), shape)
        elif leaf == "scale":
            new = 1.0 + rng.normal(0, 0.1, shape)
        elif leaf == "bias":
            new = rng.normal(0, 0.1, shape)
        else:  # cls token, position embeddings
            new = rng.normal(0, 0.5, shape)
        var.set_value(jnp.asarray(new, jnp.float32))
    nnx.update(model, nnx.from_flat_state(flat))


def make_inputs(cfg, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Images [B, H, W, 3], labels [B], teacher maps [B, P] (sum 1, with exact zeros)."""
    rng = np.random.default_rng(seed + 1)
    images = rng.normal(0, 1, (batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    labels = rng.integers(0, max(cfg.num_classes, 1), batch).astype(np.int32)
    p = cfg.grid[0] * cfg.grid[1]
    t = np.maximum(rng.normal(0, 1, (batch, p)), 0.0)
    t[:, 0] += 1e-3  # never all zero
    teacher = (t / t.sum(-1, keepdims=True)).astype(np.float32)
    readout = rng.normal(0, 1, (batch, cfg.hidden_size)).astype(np.float32)  # headless models
    return dict(images=images, labels=labels, teacher=teacher, readout=readout)


# --------------------------------------------------------------------------------------
# The two sides.


def jax_side(model, inputs, *, align_weight: float = 1.0) -> dict[str, Any]:
    """logits, cls_attn, loss and {HF name: grad} of our model."""
    _highest_precision()
    images = jnp.asarray(inputs["images"])
    headless = model.classifier is None

    def loss_fn(m):
        logits, aux = m(images)
        if headless:
            loss = jnp.sum(logits * inputs["readout"]) / logits.shape[0]
        else:
            loss = cross_entropy(logits, jnp.asarray(inputs["labels"]))
        cls_attn = aux.get("cls_attn")
        if cls_attn is not None:
            loss = loss + align_weight * alignment_loss(cls_attn, jnp.asarray(inputs["teacher"]))
        return loss, (logits, cls_attn)

    # A parity check runs once: on CPU, skip LLVM's optimisations (compiles ~3x faster).
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    step = jax.jit(nnx.value_and_grad(loss_fn, has_aux=True), compiler_options=opts)
    (loss, (logits, cls_attn)), grads = step(model)
    flat = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    return dict(
        logits=np.asarray(logits),
        cls_attn=None if cls_attn is None else np.asarray(cls_attn),
        loss=np.asarray(loss),
        grads=flat_to_hf(flat, headless=headless),
    )


def torch_side(module, inputs, *, align_weight: float = 1.0, hub_params=None) -> dict[str, Any]:
    """The same for a torch module whose forward returns (logits, cls_attn)."""
    import torch  # optional dependency, only for the PyTorch side

    from lfi_jax.reference import alignment_loss as torch_alignment_loss

    module.zero_grad(set_to_none=True)
    images = torch.tensor(inputs["images"].transpose(0, 3, 1, 2))
    logits, cls_attn = module(images)
    if getattr(module, "headless", False):
        loss = (logits * torch.tensor(inputs["readout"])).sum() / logits.shape[0]
    else:
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(inputs["labels"]).long())
    if cls_attn is not None:
        loss = loss + align_weight * torch_alignment_loss(cls_attn, torch.tensor(inputs["teacher"]))
    loss.backward()
    params = hub_params if hub_params is not None else module.hf_named_parameters()
    grads = {k: (p.grad.detach().numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
             for k, p in params.items()}
    return dict(
        logits=logits.detach().numpy(),
        cls_attn=None if cls_attn is None else cls_attn.detach().numpy(),
        loss=loss.detach().numpy(),
        grads=grads,
    )


def _group(name: str) -> str:
    if ".interaction_query." in name:
        return "grad/interaction_query"
    if ".gate." in name:
        return "grad/gate"
    if name.startswith("classifier."):
        return "grad/classifier"
    return "grad/backbone"


def differences(ours: dict, ref: dict) -> tuple[dict[str, float], dict[str, float]]:
    """-> (max_abs_diff per output, max_abs of the reference per output)."""
    diff, scale = {}, {}
    for key in ("logits", "cls_attn", "loss"):
        a, b = ours[key], ref[key]
        if (a is None) != (b is None):
            raise RuntimeError(f"compare: {key} is produced by only one side")
        if a is None:
            continue
        if a.shape != b.shape:
            raise RuntimeError(f"compare: {key} has shape {a.shape} (JAX) vs {b.shape} (PyTorch)")
        diff[key] = float(np.max(np.abs(a.astype(np.float64) - b)))
        scale[key] = float(np.max(np.abs(b)))
    if set(ours["grads"]) != set(ref["grads"]):
        only = sorted(set(ours["grads"]) ^ set(ref["grads"]))
        raise RuntimeError(f"compare: gradients of different parameters; not on both sides: {only[:10]}")
    for name in sorted(ours["grads"]):
        g = _group(name)
        a, b = ours["grads"][name], ref["grads"][name]
        diff[g] = max(diff.get(g, 0.0), float(np.max(np.abs(a.astype(np.float64) - b))))
        scale[g] = max(scale.get(g, 0.0), float(np.max(np.abs(b))))
    return diff, scale


def reference_from_model(model):
    """An `IViTReference` holding our model's weights (through the HF names)."""
    from transformers import ViTConfig  # optional dependencies: the PyTorch side

    from lfi_jax.reference import IViTReference

    raw = hf_config_dict(model.cfg)
    config = ViTConfig(**{k: v for k, v in raw.items() if k != CONFIG_KEY})
    config.architectures = raw["architectures"]
    setattr(config, CONFIG_KEY, raw.get(CONFIG_KEY))
    ref = IViTReference(config)
    ref.load_hf_state_dict(to_hf_state_dict(model), source="JAX model")
    return ref


def _perturb_torch(module, seed: int) -> str:
    import torch

    params = module.hf_named_parameters()
    name = next((k for k in params if ".interaction_query.weight" in k), None) or next(
        k for k in params if ".attention.attention.query.weight" in k)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params[name].add_(1e-2 * torch.randn(params[name].shape, generator=g))
    return name


def _report(mode, diff, scale, tol, extra) -> dict:
    bad = {k: v for k, v in diff.items() if not (v <= tol)}  # NaN counts as bad
    return dict(mode=mode, ok=not bad, tol=tol, max_abs_diff=diff, max_abs=scale, above_tol=sorted(bad), **extra)


# --------------------------------------------------------------------------------------
# The two comparisons.


def compare_ivit(cfg=None, *, hf: str | None = None, seed: int = 0, batch: int = 2, tol: float = 1e-4,
                 perturb: bool = False, align_weight: float = 1.0, num_classes: int | None = None,
                 **switches) -> dict:
    """An I-ViT against `lfi_jax.reference` (see the module docstring); returns the report.

    cfg: the architecture of the random model; default `SMALL` made an I-ViT with `switches`
      (ivit_config overrides: interaction_queries, gated_control, gate_hidden,
      interaction_constraint, attn_impl, ...).
    hf: a HF ViT directory instead; `switches` then shape the I-ViT made from it.
    """
    import torch  # optional dependency, only for the PyTorch side

    _highest_precision()
    torch.manual_seed(seed)
    if hf is not None:
        runtime = {k: switches.pop(k) for k in ("attn_impl", "interaction_constraint", "align_layers") if k in switches}
        if is_ivit_checkpoint(hf):  # compared as it is; its own config fixes the architecture
            interaction, fresh = None, False
        else:
            interaction, fresh = (switches or True), True
        model, cfg = load_hf_vit(hf, interaction=interaction, num_classes=num_classes, seed=seed, **runtime)
        if cfg.num_classes == 0:  # a headless checkpoint gets a head, so the loss is the real one
            model, cfg = load_hf_vit(hf, interaction=interaction, num_classes=10, seed=seed, **runtime)
        if fresh:
            randomize(model, seed, only_new=True)
    else:
        if cfg is None:
            base = ModelConfig(**{**SMALL, **({} if num_classes is None else {"num_classes": num_classes})})
            cfg = ivit_config(base, **switches)
        elif switches or num_classes is not None:
            raise ValueError("compare_ivit: pass either cfg or switches/num_classes, not both")
        model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(seed)))  # every value is drawn below
        randomize(model, seed)
    ref = reference_from_model(model)
    perturbed = _perturb_torch(ref, seed) if perturb else None
    inputs = make_inputs(cfg, batch, seed)
    ours = jax_side(model, inputs, align_weight=align_weight)
    theirs = torch_side(ref, inputs, align_weight=align_weight)
    diff, scale = differences(ours, theirs)
    conf = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k in ("hidden_size", "depth", "num_heads", "image_size", "patch_size", "num_classes",
                     "interaction_queries", "interaction_constraint", "gated_control", "gate_hidden", "attn_impl")}
    return _report("ivit", diff, scale, tol, dict(config=conf, hf=hf, seed=seed, batch=batch, perturbed=perturbed))


class _HFWrapper:
    """transformers' ViT as (logits, None) with Hub-named parameters."""

    def __init__(self, hf_model, headless: bool):
        self.model, self.headless = hf_model, headless
        params = dict(hf_model.named_parameters())
        names, _ = normalize_hf_names(dict.fromkeys(params))
        hub = list(names)
        self.hub = {}
        for hub_name, name in zip(hub, params):
            if hub_name.startswith("pooler."):
                continue
            key = hub_name if (headless or hub_name.startswith("classifier.")) else "vit." + hub_name
            self.hub[key] = params[name]

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    def hf_named_parameters(self):
        return self.hub

    def __call__(self, images):
        out = self.model(pixel_values=images)
        if self.headless:
            return out.last_hidden_state[:, 0], None
        return out.logits, None


def compare_vit(hf: str, *, seed: int = 0, batch: int = 2, tol: float = 1e-4, perturb: bool = False) -> dict:
    """Our `load_hf_vit(hf)` against transformers' own `from_pretrained(hf)`."""
    import torch  # optional dependencies: the PyTorch side
    from transformers import ViTForImageClassification, ViTModel

    _highest_precision()
    if is_ivit_checkpoint(hf):
        raise ValueError(f"compare vit: {hf} holds an I-ViT, which transformers cannot run; use `ivit --hf {hf}`")
    model, cfg = load_hf_vit(hf, seed=seed)
    headless = model.classifier is None
    cls = ViTModel if headless else ViTForImageClassification
    kwargs = {"add_pooling_layer": False} if headless else {}
    hf_model = cls.from_pretrained(hf, attn_implementation="eager", **kwargs).eval().float()
    wrapped = _HFWrapper(hf_model, headless)
    perturbed = None
    if perturb:
        name = next(k for k in wrapped.hub if ".attention.attention.query.weight" in k)
        noise = torch.randn(wrapped.hub[name].shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            wrapped.hub[name].add_(1e-2 * noise)
        perturbed = name
    inputs = make_inputs(cfg, batch, seed)
    ours = jax_side(model, inputs)
    theirs = torch_side(wrapped, inputs, hub_params=wrapped.hub)
    diff, scale = differences(ours, theirs)
    conf = dict(hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, image_size=cfg.image_size,
                patch_size=cfg.patch_size, num_classes=cfg.num_classes)
    return _report("vit", diff, scale, tol, dict(config=conf, hf=hf, seed=seed, batch=batch, perturbed=perturbed))


def _on_off(s: str) -> bool:
    if s not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {s!r}")
    return s == "on"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tol", type=float, default=1e-4, help="max abs difference allowed (default 1e-4, float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--perturb", action="store_true", help="debug: perturb one PyTorch weight (the check must fail)")


def add_vit_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `compare vit`."""
    p.add_argument("--hf", required=True, help="a transformers ViT checkpoint directory")
    _add_common(p)


def run_vit(args: argparse.Namespace) -> dict:
    """`compare vit`: the report of `compare_vit` (with `seconds`)."""
    start = time.time()
    report = compare_vit(args.hf, seed=args.seed, batch=args.batch, tol=args.tol, perturb=args.perturb)
    report["seconds"] = round(time.time() - start, 2)
    return report


def add_ivit_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `compare ivit`."""
    p.add_argument("--hf", help="a transformers ViT (or saved I-ViT) directory instead of the random model")
    _add_common(p)
    p.add_argument("--num-classes", type=int, default=None, help="head size (default: the checkpoint's, or 10)")
    p.add_argument("--interaction-queries", type=_on_off, default=True, metavar="on|off")
    p.add_argument("--interaction-constraint", type=_on_off, default=True, metavar="on|off")
    p.add_argument("--gated-control", type=_on_off, default=True, metavar="on|off")
    p.add_argument("--gate-hidden", type=int, default=None)
    p.add_argument("--impl", default="xla", help="attention impl of the JAX side (xla, chunked, ...)")
    p.add_argument("--depth", type=int, default=SMALL["depth"], help="without --hf: number of layers")


def run_ivit(args: argparse.Namespace) -> dict:
    """`compare ivit`: the report of `compare_ivit` (with `seconds`)."""
    if args.hf and not args.interaction_queries:
        raise ValueError("ivit --hf builds an I-ViT; --interaction-queries off is only for the random model")
    start = time.time()
    switches = dict(interaction_queries=args.interaction_queries, gated_control=args.gated_control,
                    interaction_constraint=args.interaction_constraint, attn_impl=args.impl)
    if args.gate_hidden is not None:
        switches["gate_hidden"] = args.gate_hidden
    cfg = None
    if not args.hf:
        small = dict(SMALL, depth=args.depth)
        if args.num_classes is not None:
            small["num_classes"] = args.num_classes
        cfg = ivit_config(ModelConfig(**small), **switches)
        switches = {}
    report = compare_ivit(cfg, hf=args.hf, seed=args.seed, batch=args.batch, tol=args.tol, perturb=args.perturb,
                          num_classes=args.num_classes if args.hf else None, **switches)
    report["seconds"] = round(time.time() - start, 2)
    return report


__all__ = [
    "SMALL",
    "add_ivit_arguments",
    "add_vit_arguments",
    "compare_ivit",
    "compare_vit",
    "differences",
    "jax_side",
    "make_inputs",
    "randomize",
    "reference_from_model",
    "run_ivit",
    "run_vit",
    "torch_side",
]
