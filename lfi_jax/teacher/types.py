"""Plain types shared by the teacher store, the exporters and the input pipeline."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the teacher grid lies on the original image.

    image_hw: (height, width) of the original image, in pixels.
    box: (y0, x0, y1, x1), in original-image pixels, of the region the *whole* teacher grid
      covers. It may extend past the image where the VLM padded the image to a square
      (LLaVA-1.5 "pad") or lie inside it where the VLM centre-cropped. Grid cell (i, j) of a
      [gh, gw] map covers rows y0 + i * (y1 - y0) / gh ... and columns likewise.
    """

    image_hw: tuple[int, int]
    box: tuple[float, float, float, float]

    @classmethod
    def full_image(cls, height: int, width: int) -> "Geometry":
        return cls((int(height), int(width)), (0.0, 0.0, float(height), float(width)))

    @classmethod
    def pad_to_square(cls, height: int, width: int) -> "Geometry":
        """LLaVA-1.5's 'pad' preprocessing: pad the short side symmetrically to a square."""
        side = max(height, width)
        y0 = -(side - height) / 2.0
        x0 = -(side - width) / 2.0
        return cls((int(height), int(width)), (y0, x0, y0 + side, x0 + side))

    def to_json(self) -> dict[str, Any]:
        return {"image_hw": list(self.image_hw), "box": list(self.box)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Geometry":
        return cls(tuple(int(x) for x in d["image_hw"]), tuple(float(x) for x in d["box"]))


@dataclasses.dataclass
class TeacherEntry:
    """One example's teacher map C_vlm on the teacher's own grid.

    map: float32 [gh, gw], non-negative, sums to 1; all zeros where `degenerate`.
    degenerate: the relu of Eq. 11 left nothing (flagged, never replaced).
    meta: free-form per-example provenance (e.g. generated background words).
    """

    map: np.ndarray
    geometry: Geometry
    degenerate: bool = False
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
