"""`python -m lfi_jax.compare conditional_detr --hf DIR`: our Conditional-DETR against transformers'.

DIR is a `ConditionalDetrForObjectDetection` saved with `save_pretrained` (or by
`lfi_jax.models.convert.conditional_detr.save_hf_conditional_detr`). As `compare detr`: a
padded batch of images of different sizes (`--sizes`) with the pixel mask through both
sides; `max_abs_diff` of logits, pred_boxes and the earlier decoder layers' aux_logits and
aux_boxes (transformers' side: each decoder layer's output, captured by a hook, through the
final LayerNorm, the class head and the box head plus the reference points, as the original
code). transformers' model is loaded with `auxiliary_loss=False`: with True, its decoder
feeds the normalised state to the next layer, which the original Conditional-DETR does not.
`--perturb` adds noise to one PyTorch weight: the check must then fail.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from lfi_jax.compare.detr import OUTPUTS, jax_outputs, make_inputs, parse_sizes
from lfi_jax.models.convert.conditional_detr import load_hf_conditional_detr
from lfi_jax.models.convert.io import read_json


def torch_outputs(hf_model, pixels, mask, *, aux: bool) -> dict[str, np.ndarray]:
    import torch
    from transformers.models.conditional_detr.modeling_conditional_detr import inverse_sigmoid

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
                reference = decoder.ref_point_head(hf_model.model.query_position_embeddings.weight).sigmoid()
                raw = hf_model.bbox_predictor(states)
                raw[..., :2] += inverse_sigmoid(reference)
                res["aux_logits"] = hf_model.class_labels_classifier(states)
                res["aux_boxes"] = raw.sigmoid()
    finally:
        for h in handles:
            h.remove()
    return {k: v.detach().double().numpy() for k, v in res.items()}


def compare_conditional_detr(hf: str, *, sizes=((160, 192), (128, 176)), seed: int = 0, tol: float = 1e-4,
                             perturb: bool = False) -> dict:
    """Our `load_hf_conditional_detr(hf)` against `ConditionalDetrForObjectDetection.from_pretrained(hf)`."""
    import torch
    from transformers import ConditionalDetrForObjectDetection

    jax.config.update("jax_default_matmul_precision", "highest")
    conf = read_json(hf) or {}
    if (conf.get("lfi_interaction") or {}).get("interaction_queries"):
        raise ValueError(f"compare conditional_detr: {hf} holds an I-Conditional-DETR, which transformers cannot run")
    model, cfg = load_hf_conditional_detr(hf, seed=seed)
    hf_model = ConditionalDetrForObjectDetection.from_pretrained(
        hf, attn_implementation="eager", auxiliary_loss=False
    ).eval().float()
    perturbed = None
    if perturb:
        # the spatial query projection of the last decoder layer (moves the final logits directly)
        name, param = [(n, p) for n, p in hf_model.named_parameters() if "encoder_attn.q_pos_sine_proj.weight" in n][-1]
        with torch.no_grad():
            param.add_(1e-2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
        perturbed = name
    pixels, mask = make_inputs(sizes, seed, cfg.backbone.num_channels)
    ours = jax_outputs(model, pixels, mask)
    theirs = torch_outputs(hf_model, pixels, mask, aux="aux_logits" in ours)
    diff, scale = {}, {}
    for key in OUTPUTS:
        if (key in ours) != (key in theirs):
            raise RuntimeError(f"compare conditional_detr: {key} is produced by only one side")
        if key not in ours:
            continue
        if ours[key].shape != theirs[key].shape:
            raise RuntimeError(f"compare conditional_detr: {key} has shape {ours[key].shape} (JAX) vs "
                               f"{theirs[key].shape} (PyTorch)")
        diff[key] = float(np.max(np.abs(ours[key] - theirs[key])))
        scale[key] = float(np.max(np.abs(theirs[key])))
    bad = sorted(k for k, v in diff.items() if not v <= tol)  # NaN counts as bad
    config = dict(hidden_size=cfg.hidden_size, encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                  num_queries=cfg.num_queries, num_classes=cfg.num_classes, backbone_depths=list(cfg.backbone.depths))
    return dict(mode="conditional_detr", ok=not bad, tol=tol, max_abs_diff=diff, max_abs=scale, above_tol=bad,
                config=config, hf=hf, seed=seed, sizes=[list(s) for s in sizes], perturbed=perturbed)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `compare conditional_detr`."""
    p.add_argument("--hf", required=True,
                   help="a transformers ConditionalDetrForObjectDetection directory (save_pretrained)")
    p.add_argument("--sizes", type=parse_sizes, default=((160, 192), (128, 176)),
                   help="HxW of each image of the padded batch (default 160x192,128x176)")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs difference allowed (default 1e-4, float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", action="store_true", help="debug: perturb one PyTorch weight (the check must fail)")


def run(args: argparse.Namespace) -> dict:
    """`compare conditional_detr`: the report of `compare_conditional_detr` (with `seconds`)."""
    start = time.time()
    report = compare_conditional_detr(args.hf, sizes=args.sizes, seed=args.seed, tol=args.tol, perturb=args.perturb)
    report["seconds"] = round(time.time() - start, 2)
    return report


__all__ = ["add_arguments", "compare_conditional_detr", "run", "torch_outputs"]
