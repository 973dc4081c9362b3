"""Small learnable image datasets written as real IDX files and imported into Parquet shards."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array in the IDX format (magic 0x08 = unsigned byte, then big-endian dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return path


def bars(n: int, size: int, seed: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Grey images of one bright bar whose orientation is the class, at a random place, with noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.int32)
    yy, xx = np.mgrid[:size, :size]
    for i, c in enumerate(labels):
        o = rng.integers(2, size - 2)
        mask = [yy == o, xx == o, yy == xx + o - size // 2, yy == -xx + o + size // 2][c % 4]
        images[i][mask | np.roll(mask, 1, axis=c % 2)] = 230
    return np.clip(images, 0, 255).astype(np.uint8), labels


def make_dataset(root: Path, size: int = 16, n_train: int = 512, n_test: int = 128) -> Path:
    """A two-split Parquet dataset in ``root/bars`` made through the real IDX importer."""
    from capi_core.data.importers import import_idx

    out = root / "bars"
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = bars(n, size, seed)
        import_idx(write_idx(root / f"{split}-images.idx", images), write_idx(root / f"{split}-labels.idx", labels),
                   out, split=split, class_names=["h", "v", "d", "a"])
    return out
