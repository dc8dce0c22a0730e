"""Evaluation pieces shared by the trainer, `lfi_jax.evaluate`, the experiment runner and the figures.

- `metrics`: numpy metrics (top-1, per-class accuracy, confusion, ECE, NLL) and class maps.
- `predict`: logits of a restored run over one pass of an eval split, on any device count.
- `curves`: accuracy-against-step curves from a run's metrics.jsonl, and the first step at
  which a curve reaches a target.
- `figures`: one colour and one label per model for every plot.
- `attention`, `examples`: the attention maps and the examples (with their teacher maps) of the figures.
- `coco`: COCO-style box evaluation of the detection task.
"""
