"""PyTorch references for parity checks (imports torch and transformers).

`IViTReference`: the I-ViT (and plain ViT) on transformers' ViT modules, with the weight names
of `lfi_jax.models.convert`; `alignment_loss`: SPEC section 2 in torch.
"""

from lfi_jax.reference.ivit_torch import Gate, InteractionAttention, IViTReference, alignment_loss

__all__ = ["Gate", "IViTReference", "InteractionAttention", "alignment_loss"]
