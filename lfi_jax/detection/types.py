"""Typed detection batches and predictions (NamedTuple pytrees, usable under jit/vmap).

Targets are padded to a fixed number of boxes T per image with a validity mask, so a batch
has static shapes; boxes are normalised cxcywh (fractions of the unpadded image's width and
height, as DETR predicts them), labels contiguous class ids in [0, num_classes) (the
no-object class is `num_classes`, the last logit).
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class DetectionTargets(NamedTuple):
    labels: jax.Array  # [B, T] int32, contiguous class ids (any value where not valid)
    boxes: jax.Array  # [B, T, 4] float32 normalised cxcywh (any finite value where not valid)
    valid: jax.Array  # [B, T] bool


class DetectionPredictions(NamedTuple):
    """A detector's outputs; `logits`/`boxes` of the last decoder layer, `aux_*` of the others.

    aux_logits [L-1, B, Q, C+1] and aux_boxes [L-1, B, Q, 4] in decoder order (None: no
    auxiliary losses).
    """

    logits: jax.Array  # [B, Q, C+1]
    boxes: jax.Array  # [B, Q, 4] normalised cxcywh (after the sigmoid)
    aux_logits: jax.Array | None = None
    aux_boxes: jax.Array | None = None


class Match(NamedTuple):
    """A one-to-one assignment of targets to queries, per image."""

    query_index: jax.Array  # [B, T] int32: the query matched to target slot t (0 where not matched)
    matched: jax.Array  # [B, T] bool: slot t is a valid target and has a query
    query_target: jax.Array  # [B, Q] int32: the target slot matched to query q, -1 where none


__all__ = ["DetectionPredictions", "DetectionTargets", "Match"]
