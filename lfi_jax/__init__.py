"""lfi-jax: Knowledge Transfer from Interaction Learning in JAX/Flax NNX."""

__version__ = "0.1.0"
