"""`python -m lfi_jax.compare detr --hf DIR`: our DETR against transformers' on the same weights.

DIR is a `DetrForObjectDetection` saved with `save_pretrained` (or by
`lfi_jax.models.convert.detr.save_hf_detr`). Both sides run a padded batch of images of
different sizes (`--sizes`, each padded to the largest, with the pixel mask); the report
holds `max_abs_diff` per output: logits, pred_boxes, and the auxiliary outputs of the
earlier decoder layers (aux_logits, aux_boxes; transformers' side: each layer's output,
captured by a hook, through the final LayerNorm and the heads, as the original DETR).
`--perturb` adds noise to one PyTorch weight: the check must then fail.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lfi_jax.models.convert.detr import load_hf_detr
from lfi_jax.models.convert.io import read_json

OUTPUTS = ("logits", "pred_boxes", "aux_logits", "aux_boxes")


def parse_sizes(s: str) -> tuple[tuple[int, int], ...]:
    """'160x192,128x176' -> ((160, 192), (128, 176)) (height x width of each image)."""
    try:
        sizes = tuple(tuple(int(v) for v in part.lower().split("x")) for part in s.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(len(hw) != 2 or min(hw) < 1 for hw in sizes):
        raise argparse.ArgumentTypeError(f"--sizes={s!r}: expected HxW[,HxW...], e.g. 160x192,128x176")
    return sizes


def make_inputs(sizes, seed: int, channels: int = 3):
    """Random images (standard normal, as after ImageNet normalisation) padded to the largest
    size with zeros -> (pixels [B, C, H, W] f32, mask [B, H, W] int64)."""
    rng = np.random.default_rng(seed)
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = np.zeros((len(sizes), channels, hmax, wmax), np.float32)
    mask = np.zeros((len(sizes), hmax, wmax), np.int64)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = rng.normal(size=(channels, h, w))
        mask[i, :h, :w] = 1
    return pixels, mask


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, pixel_values, pixel_mask):
    return nnx.merge(graphdef, state)(pixel_values, pixel_mask)


def forward(model, pixel_values, pixel_mask):
    """`model(pixel_values, pixel_mask)` under one jit per architecture and input shape."""
    graphdef, state = nnx.split(model)
    return _apply(graphdef, state, jnp.asarray(pixel_values), jnp.asarray(pixel_mask))


def jax_outputs(model, pixels, mask) -> dict[str, np.ndarray]:
    out = forward(model, pixels.transpose(0, 2, 3, 1), mask.astype(bool))
    res = {"logits": out.logits, "pred_boxes": out.pred_boxes}
    if out.aux_logits is not None and out.aux_logits.shape[0]:
        res.update(aux_logits=out.aux_logits, aux_boxes=out.aux_boxes)
    return {k: np.asarray(v, np.float64) for k, v in res.items()}


def torch_outputs(hf_model, pixels, mask, *, aux: bool, boxes=None) -> dict[str, np.ndarray]:
    """transformers' outputs; with `aux`, each earlier decoder layer's output (captured by a hook)
    through the final LayerNorm and the heads: `boxes(hf_model, states)` (default DETR's
    `bbox_predictor(states).sigmoid()`)."""
    import torch

    boxes = boxes or (lambda m, states: m.bbox_predictor(states).sigmoid())
    captured = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    decoder = hf_model.model.decoder
    handles = [layer.register_forward_hook(hook) for layer in decoder.layers]
    try:
        with torch.no_grad():
            out = hf_model(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask))
            res = {"logits": out.logits, "pred_boxes": out.pred_boxes}
            if aux and len(decoder.layers) > 1:
                states = decoder.layernorm(torch.stack(captured[:-1]))
                res["aux_logits"] = hf_model.class_labels_classifier(states)
                res["aux_boxes"] = boxes(hf_model, states)
    finally:
        for h in handles:
            h.remove()
    return {k: v.detach().double().numpy() for k, v in res.items()}


def perturb_weight(hf_model, pattern: str, seed: int, *, last: bool = False) -> str:
    """Noise (1e-2 x standard normal) added to the first (or `last`) PyTorch weight whose name
    holds `pattern`; -> its name."""
    import torch

    name, param = [(n, p) for n, p in hf_model.named_parameters() if pattern in n][-1 if last else 0]
    with torch.no_grad():
        param.add_(1e-2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
    return name


def compare_report(mode: str, model, cfg, hf_model, *, hf: str, sizes, seed: int, tol: float, perturbed, boxes=None):
    """Both sides on the padded batch of `sizes` -> the report (`max_abs_diff` per output, `ok`)."""
    pixels, mask = make_inputs(sizes, seed, cfg.backbone.num_channels)
    ours = jax_outputs(model, pixels, mask)
    theirs = torch_outputs(hf_model, pixels, mask, aux="aux_logits" in ours, boxes=boxes)
    diff, scale = {}, {}
    for key in OUTPUTS:
        if (key in ours) != (key in theirs):
            raise RuntimeError(f"compare {mode}: {key} is produced by only one side")
        if key not in ours:
            continue
        if ours[key].shape != theirs[key].shape:
            raise RuntimeError(
                f"compare {mode}: {key} has shape {ours[key].shape} (JAX) vs {theirs[key].shape} (PyTorch)"
            )
        diff[key] = float(np.max(np.abs(ours[key] - theirs[key])))
        scale[key] = float(np.max(np.abs(theirs[key])))
    bad = sorted(k for k, v in diff.items() if not v <= tol)  # NaN counts as bad
    config = dict(hidden_size=cfg.hidden_size, encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                  num_queries=cfg.num_queries, num_classes=cfg.num_classes, backbone_depths=list(cfg.backbone.depths))
    return dict(mode=mode, ok=not bad, tol=tol, max_abs_diff=diff, max_abs=scale, above_tol=bad, config=config,
                hf=hf, seed=seed, sizes=[list(s) for s in sizes], perturbed=perturbed)


def check_not_interaction(hf: str, mode: str, what: str) -> None:
    """transformers cannot run an interaction model: a ValueError naming the directory."""
    conf = read_json(hf) or {}
    if (conf.get("lfi_interaction") or {}).get("interaction_queries"):
        raise ValueError(f"compare {mode}: {hf} holds an I-{what}, which transformers cannot run")


def compare_detr(hf: str, *, sizes=((160, 192), (128, 176)), seed: int = 0, tol: float = 1e-4,
                 perturb: bool = False) -> dict:
    """Our `load_hf_detr(hf)` against transformers' `DetrForObjectDetection.from_pretrained(hf)`."""
    from transformers import DetrForObjectDetection

    jax.config.update("jax_default_matmul_precision", "highest")
    check_not_interaction(hf, "detr", "DETR")
    model, cfg = load_hf_detr(hf, seed=seed)
    hf_model = DetrForObjectDetection.from_pretrained(hf, attn_implementation="eager").eval().float()
    perturbed = perturb_weight(hf_model, "encoder_attn.q_proj.weight", seed) if perturb else None
    return compare_report("detr", model, cfg, hf_model, hf=hf, sizes=sizes, seed=seed, tol=tol, perturbed=perturbed)


def add_arguments(p: argparse.ArgumentParser, hf_class: str = "DetrForObjectDetection") -> None:
    """Flags of `compare detr` (and `compare conditional_detr`, naming its `hf_class`)."""
    p.add_argument("--hf", required=True, help=f"a transformers {hf_class} directory (save_pretrained)")
    p.add_argument("--sizes", type=parse_sizes, default=((160, 192), (128, 176)),
                   help="HxW of each image of the padded batch (default 160x192,128x176)")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs difference allowed (default 1e-4, float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", action="store_true", help="debug: perturb one PyTorch weight (the check must fail)")


def run_compare(compare, args: argparse.Namespace) -> dict:
    """The report of `compare(args.hf, ...)` with the flags of `add_arguments` (and `seconds`)."""
    start = time.time()
    report = compare(args.hf, sizes=args.sizes, seed=args.seed, tol=args.tol, perturb=args.perturb)
    report["seconds"] = round(time.time() - start, 2)
    return report


def run(args: argparse.Namespace) -> dict:
    """`compare detr`: the report of `compare_detr` (with `seconds`)."""
    return run_compare(compare_detr, args)


__all__ = [
    "OUTPUTS",
    "add_arguments",
    "check_not_interaction",
    "compare_detr",
    "compare_report",
    "forward",
    "jax_outputs",
    "make_inputs",
    "parse_sizes",
    "perturb_weight",
    "run",
    "run_compare",
    "torch_outputs",
]
