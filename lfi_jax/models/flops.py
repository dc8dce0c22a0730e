"""Multiply-accumulate counts of the ViT / I-ViT forward pass (one image), and a cross-check
against XLA's own cost analysis.

    python -m lfi_jax.models.flops                       # the docs/models.md tables
    python -m lfi_jax.models.flops --xla S/16 --image-size 384

Counted the way the paper's Table 1 numbers come out (SPEC section 6), which is fvcore's
convention: every matmul and the patch convolution, one MAC per multiply-add, plus 5 per
element for each LayerNorm (2 per layer and the final one); softmax, GELU and residual adds
are left out. With the LayerNorms the ViT-S/B/L/16 counts at 384 px are exactly the paper's
15.5 / 55.5 / 191.2 (without them 15.49 / 55.48 / 191.07). The I-ViT adds the
interaction queries (N D^2 per layer) and the second Q K^T (N^2 D per layer). The gate is
counted separately (`gate`), since the paper leaves it out: per head and attention entry it
applies a 2 -> G -> 2 MLP (4 G MACs, G GELUs, 2 sigmoids) and the fusion (2 MACs).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from lfi_jax.models.config import ModelConfig, ivit_config, variant
from lfi_jax.models.vit import ViT, count_params


def macs(cfg: ModelConfig) -> dict[str, int]:
    """MACs of one forward pass on one image, by part.

    Keys: patch_embed, qkv, attn_scores (Q K^T), attn_values (C V), attn_out, mlp, head,
    layernorm (5 per element, fvcore's convention), interaction_query, interaction_scores
    (Q' K^T), gate (gate MLP + fusion, or the GC-off average), vit (the ViT parts), paper
    (vit + interaction_query + interaction_scores: the paper's count), total (paper + gate).
    """
    d, n, L, h, m = cfg.hidden_size, cfg.num_tokens, cfg.depth, cfg.num_heads, cfg.mlp_dim
    p = cfg.patch_size
    patches = n - 1
    out = dict(
        patch_embed=patches * p * p * 3 * d,
        qkv=L * 3 * n * d * d,
        attn_scores=L * n * n * d,
        attn_values=L * n * n * d,
        attn_out=L * n * d * d,
        mlp=L * 2 * n * d * m,
        head=d * cfg.num_classes,
        layernorm=(2 * L + 1) * n * d * 5,
        interaction_query=0,
        interaction_scores=0,
        gate=0,
    )
    if cfg.interaction_queries:
        out["interaction_query"] = L * n * d * d
        out["interaction_scores"] = L * n * n * d
        entries = L * h * n * n
        if not cfg.gated_control:
            out["gate"] = entries  # (C_agt + C_vfm) / 2
        else:
            g = cfg.gate_hidden
            per_entry = (4 * g if g > 0 else 4) + 2  # gate MLP + fusion g1 C_agt + g2 C_vfm
            out["gate"] = entries * per_entry
    out["vit"] = sum(out[k] for k in ("patch_embed", "qkv", "attn_scores", "attn_values", "attn_out", "mlp", "head",
                                     "layernorm"))
    out["paper"] = out["vit"] + out["interaction_query"] + out["interaction_scores"]
    out["total"] = out["paper"] + out["gate"]
    return out


def gate_transcendentals(cfg: ModelConfig) -> int:
    """GELU + sigmoid evaluations of the gate per image (0 without gated interaction)."""
    if not (cfg.interaction_queries and cfg.gated_control):
        return 0
    return cfg.depth * cfg.num_heads * cfg.num_tokens**2 * (cfg.gate_hidden + 2)


def xla_flops(cfg: ModelConfig, batch: int = 1) -> float:
    """FLOPs per image of the compiled forward, from XLA's cost analysis (current backend).

    XLA counts 2 FLOPs per MAC in dots and convolutions, and also every elementwise op
    (softmax, LayerNorm, GELU, the gate), so it reads somewhat above 2 x `macs()["total"]`.
    """
    abstract = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)[0]

    images = jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.float32)
    cost = jax.jit(forward).lower(state, images).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost["flops"]) / batch


def tables(names=("S/16", "B/16", "L/16"), *, params_image: int = 224, classes: int = 200,
           flops_image: int = 384, flops_classes: int = 1000) -> str:
    """The markdown tables of docs/models.md."""
    lines = [f"Parameters at {params_image} px, {classes} classes:", "",
             "| model | ViT | I-ViT | delta | of which gates |", "|---|---:|---:|---:|---:|"]
    for name in names:
        vit = variant(name, image_size=params_image, num_classes=classes)
        a, b = count_params(vit), count_params(ivit_config(vit))
        gates = (b - a) - vit.depth * (vit.hidden_size**2 + vit.hidden_size * vit.qkv_bias)  # the rest is Wq'
        lines.append(f"| {name} | {a / 1e6:.2f}M | {b / 1e6:.2f}M | +{(b - a) / 1e6:.2f}M | {gates:,} |")
    lines += ["", f"GMACs per image at {flops_image} px ({flops_classes}-class head):", "",
              "| model | ViT | I-ViT (paper's count) | delta | gate (G=8) | gate (G=0) | I-ViT with gate |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        vit = variant(name, image_size=flops_image, num_classes=flops_classes)
        iv = macs(ivit_config(vit))
        g0 = macs(ivit_config(vit, gate_hidden=0))["gate"]
        lines.append(
            f"| {name} | {iv['vit'] / 1e9:.2f} | {iv['paper'] / 1e9:.2f} | +{(iv['paper'] - iv['vit']) / 1e9:.2f} "
            f"| {iv['gate'] / 1e9:.2f} | {g0 / 1e9:.2f} | {iv['total'] / 1e9:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lfi_jax.models.flops", description=__doc__.split("\n\n")[0])
    p.add_argument("--xla", metavar="VARIANT", help="also compile VARIANT (e.g. S/16) and print XLA's count")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--gate-hidden", type=int, default=8)
    args = p.parse_args(argv)
    print(tables())
    if args.xla:
        vit = variant(args.xla, image_size=args.image_size, num_classes=1000)
        print(f"\nXLA cost analysis, {args.xla} at {args.image_size} px (GFLOPs per image; ours = 2 x MACs):\n")
        print("| model | XLA GFLOPs | 2 x our MACs (paper count) | 2 x our MACs (with gate) | XLA / ours |")
        print("|---|---:|---:|---:|---:|")
        for label, cfg in (("ViT", vit), ("I-ViT", ivit_config(vit, gate_hidden=args.gate_hidden)),
                           ("I-ViT, GC off", ivit_config(vit, gated_control=False))):
            x, m = xla_flops(cfg), macs(cfg)
            print(f"| {label} | {x / 1e9:.2f} | {2 * m['paper'] / 1e9:.2f} | {2 * m['total'] / 1e9:.2f} "
                  f"| {x / (2 * m['total']):.3f} |")
        print(f"\nGate transcendentals per image (GELU + sigmoid): "
              f"{gate_transcendentals(ivit_config(vit, gate_hidden=args.gate_hidden)) / 1e9:.2f} G")


if __name__ == "__main__":
    main()


__all__ = ["gate_transcendentals", "macs", "tables", "xla_flops"]
