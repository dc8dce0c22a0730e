"""Image files: decoding, content fingerprints and the small checks the file-based sources share."""

from __future__ import annotations

import hashlib
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def decode_image(path: str) -> np.ndarray:
    """The image file at `path` as uint8 [H, W, 3] RGB; an unreadable file names itself."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as e:  # PIL raises several types for corrupt/truncated files
        raise ValueError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e
    return arr


def file_fingerprint(path: str) -> str:
    """A short digest (blake2b, 8 bytes, hex) of a file's bytes: the content of an example's
    image file as a teacher store records it (independent of the decoder's version)."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_index(src, index: int) -> int:
    i = int(index)
    if not 0 <= i < len(src):
        raise IndexError(f"{src.name}/{src.split}: index {index} out of range [0, {len(src)})")
    return i


def require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: directory not found: {path}")


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


__all__ = ["IMAGE_EXTENSIONS", "check_index", "decode_image", "file_fingerprint", "is_image", "require_dir"]
