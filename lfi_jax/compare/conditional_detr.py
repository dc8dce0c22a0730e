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

import jax
import numpy as np

from lfi_jax.compare import detr as compare_detr_mod
from lfi_jax.compare.detr import check_not_interaction, compare_report, perturb_weight, run_compare
from lfi_jax.models.convert.conditional_detr import load_hf_conditional_detr


def _boxes(hf_model, states):
    """Conditional-DETR's boxes of decoder states: the box head plus the reference points."""
    from transformers.models.conditional_detr.modeling_conditional_detr import inverse_sigmoid

    reference = hf_model.model.decoder.ref_point_head(hf_model.model.query_position_embeddings.weight).sigmoid()
    raw = hf_model.bbox_predictor(states)
    raw[..., :2] += inverse_sigmoid(reference)
    return raw.sigmoid()


def torch_outputs(hf_model, pixels, mask, *, aux: bool) -> dict[str, np.ndarray]:
    """transformers' outputs (`lfi_jax.compare.detr.torch_outputs` with Conditional-DETR's boxes)."""
    return compare_detr_mod.torch_outputs(hf_model, pixels, mask, aux=aux, boxes=_boxes)


def compare_conditional_detr(hf: str, *, sizes=((160, 192), (128, 176)), seed: int = 0, tol: float = 1e-4,
                             perturb: bool = False) -> dict:
    """Our `load_hf_conditional_detr(hf)` against `ConditionalDetrForObjectDetection.from_pretrained(hf)`."""
    from transformers import ConditionalDetrForObjectDetection

    jax.config.update("jax_default_matmul_precision", "highest")
    check_not_interaction(hf, "conditional_detr", "Conditional-DETR")
    model, cfg = load_hf_conditional_detr(hf, seed=seed)
    hf_model = ConditionalDetrForObjectDetection.from_pretrained(
        hf, attn_implementation="eager", auxiliary_loss=False
    ).eval().float()
    # the spatial query projection of the last decoder layer (moves the final logits directly)
    perturbed = perturb_weight(hf_model, "encoder_attn.q_pos_sine_proj.weight", seed, last=True) if perturb else None
    return compare_report("conditional_detr", model, cfg, hf_model, hf=hf, sizes=sizes, seed=seed, tol=tol,
                          perturbed=perturbed, boxes=_boxes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `compare conditional_detr` (those of `compare detr`)."""
    compare_detr_mod.add_arguments(p, "ConditionalDetrForObjectDetection")


def run(args: argparse.Namespace) -> dict:
    """`compare conditional_detr`: the report of `compare_conditional_detr` (with `seconds`)."""
    return run_compare(compare_conditional_detr, args)


__all__ = ["add_arguments", "compare_conditional_detr", "run", "torch_outputs"]
