"""The embedded default dataset: scikit-learn's 1,797 handwritten digits (bundled, no download).

The 8x8 images (values 0..16, scaled to 0..255) are upsampled to ``size`` by the same
``build_shards`` code as any image folder (PIL bicubic) and cached in
``$ARCEE_CACHE/digits-{size}px-{channels}c-v1``. Labels are the digit classes 0..9; source names
are ``sklearn-digits/{i:04d}`` with ``i`` the index in ``sklearn.datasets.load_digits()``.
Concurrent first uses (e.g. several accelerate ranks) are safe: the build holds a file lock and
a finished folder is reused.

``ensure_mirrored_digits`` builds "mirrored digits" (``data=digits_mirrored``): each digit resized
to ``size/2`` rows x ``size`` columns in the bottom half, its vertical mirror in the top half, so
that the top half is a fixed function of the bottom half (``image[r] == image[size - 1 - r]``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from PIL import Image

from .shards import MANIFEST, build_shards

# data.name -> builder (size, channels) -> shard folder, for the datasets built on first use (data.path: null)
EMBEDDED = {"digits": lambda size, channels: ensure_digits(size, channels),
            "digits_mirrored": lambda size, channels: ensure_mirrored_digits(size, channels)}


def cache_dir() -> Path:
    """``$ARCEE_CACHE`` or ``~/.cache/arcee``."""
    return Path(os.environ.get("ARCEE_CACHE") or "~/.cache/arcee").expanduser()


def digit_sources() -> list[tuple[str, int, np.ndarray]]:
    """``(name, label, uint8 8x8 image)`` for the 1,797 digits, in sklearn's order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return [(f"sklearn-digits/{i:04d}", int(t), img) for i, (img, t) in enumerate(zip(images, d.target))]


def ensure_digits(size: int = 16, channels: int = 1) -> Path:
    """Shard folder of the digits at ``size x size`` (1 = grayscale, 3 = gray replicated to RGB)."""
    out = cache_dir() / f"digits-{size}px-{channels}c-v1"
    if not (out / MANIFEST).is_file():
        build_shards(digit_sources(), out, size=size, channels=channels, fmt="raw", num_shards=1, workers=0,
                     class_names=[str(c) for c in range(10)], progress=False)
    return out


def mirrored_digit(img: np.ndarray, size: int = 16) -> np.ndarray:
    """uint8 8x8 digit -> uint8 ``(size, size)``: the digit resized to ``size/2`` rows x ``size`` columns
    (PIL bicubic) in rows ``size/2 ..``, its vertical mirror in rows ``0 .. size/2 - 1``."""
    if size < 2 or size % 2:
        raise ValueError(f"mirrored digits need an even image_size >= 2, got {size}")
    bottom = np.asarray(Image.fromarray(img).resize((size, size // 2), Image.Resampling.BICUBIC), dtype=np.uint8)
    return np.concatenate([bottom[::-1], bottom])


def ensure_mirrored_digits(size: int = 16, channels: int = 1) -> Path:
    """Shard folder of the mirrored digits at ``size x size`` (see ``mirrored_digit``); same source
    names, labels and therefore train/val split as ``ensure_digits``."""
    out = cache_dir() / f"digits-mirrored-{size}px-{channels}c-v1"
    if not (out / MANIFEST).is_file():
        sources = [(name, label, mirrored_digit(img, size)) for name, label, img in digit_sources()]
        build_shards(sources, out, size=size, channels=channels, fmt="raw", num_shards=1, workers=0,
                     class_names=[str(c) for c in range(10)], progress=False)
    return out
