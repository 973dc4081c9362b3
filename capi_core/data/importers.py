"""Importers into CAPI's Parquet format (``format.py``): IDX pairs and Fashion-MNIST (image folders:
``imagefolder.py``).

Each importer reads its source, then writes shards split by split and the manifest last. On any
failure it removes the shards it wrote (and the output directory if it created it), so a failed
import leaves the output as it found it. ``progress(stage, done, total)`` is an optional callback.
Images are stored as lossless PNG: IDX datasets are small and exact pixels matter more than speed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from capi_core.data.format import (FORMAT_VERSION, MANIFEST, SHARD_ROWS, DatasetError, Manifest, PixelStats,
                                   SplitWriter, check_split_name, encode_png, load_manifest, write_manifest)

Progress = Callable[[str, int, int], None]
Record = tuple[str, bytes, int, np.ndarray]  # id, encoded image, label, pixels uint8 [H, W, C]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# md5 of the decompressed files (the Debian package recompressed the originals).
FASHION_MNIST_FILES = {
    ("train", "images"): ("train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965"),
}


# --------------------------------------------------------------------------------------------------
# Writing a dataset (shared by every importer)

def write_dataset(out: Path, name: str, class_names: list[str], image_size: tuple[int, int], channels: int,
                  splits: dict[str, tuple[int, Iterable[Record]]], shard_rows: int = SHARD_ROWS,
                  progress: Progress | None = None) -> Manifest:
    """Write ``splits`` (``{split: (count, records)}``) into ``out``, a new directory or an existing dataset.

    Adding splits to an existing dataset needs the same image size, channels and class names; the
    manifest is rebuilt with the old and new shards, and mean/std are taken from ``train``.
    """
    out = Path(out)
    old = load_manifest(out) if (out / MANIFEST).exists() else None
    if old is None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"output {out} exists and is neither an empty directory nor a dataset")
    if old is not None:
        if old.format_version != FORMAT_VERSION:
            raise DatasetError(f"cannot add to {out}: it is in format {old.format_version}, this code writes "
                               f"{FORMAT_VERSION}; import all its splits into a new --out")
        for field, new in (("image_size", tuple(image_size)), ("channels", channels), ("class_names", class_names)):
            if getattr(old, field) != new:
                raise DatasetError(f"cannot add to {out}: its {field} is {getattr(old, field)}, "
                                   f"the new split's is {new}")
        for split in splits:
            if split in old.splits:
                raise DatasetError(f"dataset {out} already has a split {split!r}; import into a new --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writers: list[SplitWriter] = []
    try:
        stats: dict[str, PixelStats] = {}
        for split, (total, records) in splits.items():
            writer = SplitWriter(out, check_split_name(split), shard_rows)
            writers.append(writer)
            stats[split] = PixelStats(channels)
            for id, data, label, pixels in records:
                if pixels.shape != (*image_size, channels):
                    raise DatasetError(f"image {id} has shape {pixels.shape}, expected {(*image_size, channels)}")
                writer.add(id, data, label, *image_size)
                stats[split].add(pixels)
                if progress and writer.count % 512 == 0:
                    progress(split, writer.count, total)
            writer.flush()
            if writer.count == 0:
                raise DatasetError(f"split {split!r} of {name} has no images")
            if progress:
                progress(split, writer.count, total)
        all_splits = [*(old.splits if old else {}), *splits]
        stats_split = "train" if "train" in all_splits else all_splits[0]
        if stats_split in stats:
            mean, std = stats[stats_split].mean_std()
        else:
            mean, std = old.mean, old.std
        manifest = Manifest(
            format_version=FORMAT_VERSION, name=old.name if old else name, class_names=class_names,
            image_size=tuple(image_size), channels=channels, mean=mean, std=std, stats_split=stats_split,
            splits={**(old.splits if old else {}), **{w.split: w.count for w in writers}},
            shards=[*(old.shards if old else []), *(s for w in writers for s in w.shards)],
        )
        write_manifest(out, manifest)
        return manifest
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for shard in (s for w in writers for s in w.shards):
                (out / shard.file).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST, ...)

def read_idx(path: str | Path) -> tuple[np.ndarray, str]:
    """An unsigned-byte IDX file (gzip or not) as an array, plus the md5 of its decompressed bytes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"cannot read IDX file {path}: {err}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DatasetError(f"{path} holds IDX type 0x{raw[2]:02x}; only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is truncated (incomplete IDX header)")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(raw) != offset + int(np.prod(dims)):
        raise DatasetError(f"{path} has {len(raw) - offset} data bytes, its header {dims} says {int(np.prod(dims))}")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims), hashlib.md5(raw).hexdigest()


def _idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[N, H, W, C]`` and labels int64 ``[N]`` from an IDX pair, checked to agree."""
    images, _ = read_idx(images_path)
    labels, _ = read_idx(labels_path)
    return _check_pair(images, labels, images_path, labels_path)


def _check_pair(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path):
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DatasetError(f"{images_path} has shape {images.shape}; expected [N, H, W] or [N, H, W, 1 or 3]")
    if labels.ndim != 1:
        raise DatasetError(f"{labels_path} has shape {labels.shape}; expected [N]")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels.astype(np.int64)


def _array_records(split: str, images: np.ndarray, labels: np.ndarray) -> Iterator[Record]:
    for i, (pixels, label) in enumerate(zip(images, labels)):
        yield f"{split}/{i:06d}", encode_png(pixels[..., 0] if pixels.shape[-1] == 1 else pixels), int(label), pixels


def import_idx(images: str | Path, labels: str | Path, out: str | Path, split: str = "train",
               name: str | None = None, class_names: list[str] | None = None, shard_rows: int = SHARD_ROWS,
               progress: Progress | None = None) -> Manifest:
    """Import one IDX pair as ``split`` into ``out`` (new, or an existing dataset to add a split to).

    Class names: ``class_names``, else those of the existing dataset, else ``"0"``, ``"1"``, ...
    """
    out = Path(out)
    pixels, targets = _idx_pair(Path(images), Path(labels))
    if class_names is None and (out / MANIFEST).exists():
        class_names = load_manifest(out).class_names
    if class_names is None:
        class_names = [str(i) for i in range(int(targets.max()) + 1)] if len(targets) else []
    if len(targets) and (targets.min() < 0 or targets.max() >= len(class_names)):
        raise DatasetError(f"{labels} has labels in {targets.min()}..{targets.max()}, "
                           f"outside the {len(class_names)} classes 0..{len(class_names) - 1}")
    return write_dataset(out, name or out.name, class_names, pixels.shape[1:3], pixels.shape[3],
                         {split: (len(pixels), _array_records(split, pixels, targets))}, shard_rows, progress)


def fashion_mnist_source(source: str | Path | None = None) -> Path:
    """Where the Fashion-MNIST files are: ``source``, else ``$CAPI_FASHION_MNIST_DIR``, else the Debian path."""
    return Path(source or os.environ.get("CAPI_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)


def import_fashion_mnist(out: str | Path, source: str | Path | None = None, shard_rows: int = SHARD_ROWS,
                         progress: Progress | None = None) -> Manifest:
    """Import Fashion-MNIST (60,000 train + 10,000 test, 28x28 grey) after checking the files' md5."""
    source = fashion_mnist_source(source)
    found: dict[tuple[str, str], Path] = {}
    for key, (stem, _) in FASHION_MNIST_FILES.items():
        found |= {key: p for p in (source / stem, source / f"{stem}.gz") if p.is_file()}  # .gz wins
    names = [stem + ".gz" for stem, _ in FASHION_MNIST_FILES.values()]
    missing = [name for key, name in zip(FASHION_MNIST_FILES, names) if key not in found]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST files not found in {source}: missing {', '.join(missing)}. Install them with "
            f"`sudo apt-get update && sudo apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_DIR}), "
            f"or put the four files {', '.join(names)} (gzip or not) into one directory and pass --source DIR "
            "or set CAPI_FASHION_MNIST_DIR=DIR."
        )
    arrays = {}
    for key, (_, md5) in FASHION_MNIST_FILES.items():
        arrays[key], digest = read_idx(found[key])
        if digest != md5:
            raise DatasetError(f"{found[key]} has md5 {digest} (decompressed), expected {md5}: "
                               "not the Fashion-MNIST file")
    splits = {}
    for split in ("train", "test"):
        images, labels = _check_pair(arrays[split, "images"], arrays[split, "labels"],
                                     found[split, "images"], found[split, "labels"])
        splits[split] = (len(images), _array_records(split, images, labels))
    return write_dataset(Path(out), "fashion-mnist", FASHION_MNIST_CLASSES, (28, 28), 1, splits, shard_rows, progress)
