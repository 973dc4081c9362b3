"""CAPI's on-disk image dataset: Parquet shards of encoded images plus a ``manifest.json``.

A dataset is one directory::

    manifest.json            written last: a dataset without it does not exist
    train-00000.parquet      one row per image: id (str), image (JPEG or PNG bytes), label (int64),
    train-00001.parquet      split (str), height and width (int32, of the stored image)
    test-00000.parquet

Every image of a dataset has the same ``channels`` (1 grey, 3 RGB). Format 2 lets images keep their
own size and aspect ratio (an image folder's photos); ``image_size`` is their common ``(H, W)`` when
they share one (IDX datasets) and None otherwise. Format 1 (fixed size, no height/width columns) is
still read. The manifest records the class names, the per-split counts, per-channel ``mean``/``std``
of the stored pixels on a 0-1 scale (of the ``train`` split; of the first imported split while there
is no ``train``), the source files an import skipped and why, and per shard its file, split, rows,
size in bytes and sha256. Shards and manifest are written to a temporary file in the same directory
and moved into place with ``os.replace``, so a crash never leaves a manifest that points at a missing
or partial shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from capi_core.atomic import atomic_write, atomic_write_text
from capi_core.errors import CapiError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: one image size for the whole dataset, no height/width columns
MANIFEST = "manifest.json"
SHARD_ROWS = 4096  # a few MB of 28x28 PNGs; about 300 MB of 224x224 ones
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64()), ("split", pa.string()),
                    ("height", pa.int32()), ("width", pa.int32())])
# Encoded images do not compress further; the small columns do.
_COMPRESSION = {"id": "zstd", "image": "none", "label": "zstd", "split": "zstd", "height": "zstd", "width": "zstd"}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class DatasetError(CapiError, ValueError):
    """A dataset, a shard or a source file is missing or invalid; the message names the file."""

    hint = "re-import the dataset with `capi data import ...` (an interrupted import resumes); " \
           "`capi data verify DIR` checks one"


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    split: str
    rows: int = Field(ge=1)
    bytes: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Skipped(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(description="path relative to the imported folder")
    reason: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int
    name: str
    class_names: list[str]
    image_size: tuple[int, int] | None = Field(description="(H, W) shared by every image; None: sizes vary")
    channels: int = Field(description="1 (grey) or 3 (RGB)")
    mean: list[float] = Field(description="per channel, 0-1 scale")
    std: list[float]
    stats_split: str = Field(description="the split mean and std were computed on")
    splits: dict[str, int] = Field(description="images per split")
    shards: list[ShardInfo]
    max_short_side: int | None = Field(None, description="images whose shorter side was longer were resized to it")
    encodings: dict[str, int] = Field(default_factory=dict, description="stored images by how they were stored")
    skipped: list[Skipped] = Field(default_factory=list, description="source files left out, with the reason")

    def split_shards(self, split: str) -> list[ShardInfo]:
        """The shards of ``split`` in order; their rows concatenated are the split's sample indices."""
        if split not in self.splits:
            raise DatasetError(f"dataset {self.name!r} has no split {split!r}; it has {', '.join(self.splits)}")
        return [s for s in self.shards if s.split == split]


def check_split_name(split: str) -> str:
    """Split names end up in file names, so they are restricted to ``[A-Za-z0-9_-]``."""
    if not _SPLIT_NAME.match(split):
        raise DatasetError(f"split name {split!r} must match [A-Za-z0-9_-]+")
    return split


def load_manifest(dataset_dir: str | Path) -> Manifest:
    """The validated manifest of ``dataset_dir``; every shard it lists must exist with its recorded size.

    Sizes catch truncated shards cheaply; checksums are checked when a shard is read (``read_shard``)
    and by ``verify_dataset``.
    """
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST
    if not path.is_file():
        what = "does not exist" if not dataset_dir.exists() else f"has no {MANIFEST} (not an imported dataset)"
        raise DatasetError(f"dataset directory {dataset_dir} {what}; import one with `capi data import ...`")
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not valid JSON: {err}") from None
    except ValidationError as err:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise DatasetError(f"{path} is not a valid manifest: {fields}") from None
    if manifest.format_version not in READABLE_VERSIONS:
        raise DatasetError(f"{path} has format version {manifest.format_version}; this code reads "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")
    if manifest.format_version == 1 and manifest.image_size is None:
        raise DatasetError(f"{path} is a format-1 manifest without an image_size")
    check_counts(manifest, path)
    inside = dataset_dir.resolve()
    for shard in manifest.shards:
        file = dataset_dir / shard.file
        # A shard is a file of the dataset directory itself: a manifest naming ../x or /etc/x (written by
        # hand, or copied from elsewhere) would make training read, and a re-import replace, files
        # outside the dataset.
        if Path(shard.file).name != shard.file or shard.file in ("", ".", "..") or file.resolve().parent != inside:
            raise DatasetError(f"{path}: shard path {shard.file!r} points outside the dataset directory "
                               f"{dataset_dir}; shards must be plain file names inside it")
        if not file.is_file():
            raise DatasetError(f"shard {file} listed in {path} is missing")
        if file.stat().st_size != shard.bytes:
            raise DatasetError(f"shard {file} has {file.stat().st_size} bytes, the manifest says {shard.bytes} "
                               "(truncated or replaced)")
    return manifest


def check_counts(manifest: Manifest, path: Path) -> None:
    """The per-split counts, the shards' rows and the class list must agree: the reader sizes epochs
    from the shards and the probes their heads from the class list, so a disagreement would train on
    a silently different dataset."""
    files = [s.file for s in manifest.shards]
    if len(set(files)) != len(files):
        raise DatasetError(f"{path}: shard {next(f for f in files if files.count(f) > 1)!r} is listed twice")
    for split in {s.split for s in manifest.shards} - manifest.splits.keys():
        raise DatasetError(f"{path}: shards of split {split!r}, which splits does not list")
    for split, count in manifest.splits.items():
        rows = sum(s.rows for s in manifest.shards if s.split == split)
        if rows != count:
            raise DatasetError(f"{path}: splits.{split} is {count} but its shards hold {rows} rows")
    if manifest.channels not in (1, 3) or len(manifest.mean) != manifest.channels or \
            len(manifest.std) != manifest.channels:
        raise DatasetError(f"{path}: channels must be 1 or 3 with one mean and std each, got {manifest.channels} "
                           f"with {len(manifest.mean)} and {len(manifest.std)}")
    if not manifest.class_names:
        raise DatasetError(f"{path}: class_names is empty")


def check_labels(table: pa.Table, num_classes: int, path: Path) -> None:
    """Every label of a shard's table indexes the class list (training keeps labels for the probes)."""
    if "label" not in table.column_names or not table.num_rows:
        return
    labels = table.column("label").to_numpy()
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DatasetError(f"shard {path} has label {int(bad[0])} outside the class list 0..{num_classes - 1}")


def read_shard(path: Path, shard: ShardInfo, columns: list[str] | None = None,
               num_classes: int | None = None) -> pa.Table:
    """Read one shard after checking its sha256; any failure names the file. With ``num_classes``,
    labels outside ``0..num_classes - 1`` are an error too."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read shard {path}: {err}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise DatasetError(f"shard {path} has sha256 {digest}, the manifest says {shard.sha256} (corrupt or replaced)")
    try:
        # use_threads=False: shards are small, and no Arrow thread pool is running when loaders fork.
        table = pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"shard {path} is not a readable Parquet file: {err}") from None
    if table.num_rows != shard.rows:
        raise DatasetError(f"shard {path} has {table.num_rows} rows, the manifest says {shard.rows}")
    if num_classes is not None:
        check_labels(table, num_classes, path)
    return table


def verify_dataset(dataset_dir: str | Path) -> Manifest:
    """Check the manifest (``load_manifest``: counts, paths, sizes), then every shard's checksum,
    readability, labels and split."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    for shard in manifest.shards:
        table = read_shard(dataset_dir / shard.file, shard, columns=["label", "split"],
                           num_classes=len(manifest.class_names))
        if set(table.column("split").unique().to_pylist()) != {shard.split}:
            raise DatasetError(f"shard {dataset_dir / shard.file} holds rows of another split than {shard.split!r}")
    return manifest


def write_manifest(dataset_dir: Path, manifest: Manifest) -> None:
    atomic_write_text(dataset_dir / MANIFEST, manifest.model_dump_json(indent=2) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of ``pixels`` uint8 ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class PixelStats:
    """Running per-channel mean and std (0-1 scale) of uint8 pixels, exact (integer sums)."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = np.zeros(channels, np.uint64)
        self.sumsq = np.zeros(channels, np.uint64)

    def add(self, pixels: np.ndarray) -> None:
        """``pixels`` uint8 ``[..., C]`` (any leading shape)."""
        flat = pixels.reshape(-1, pixels.shape[-1])
        self.count += flat.shape[0]
        self.sum += flat.sum(0, dtype=np.uint64)
        self.sumsq += (flat.astype(np.uint32) ** 2).sum(0, dtype=np.uint64)

    def add_histogram(self, counts: np.ndarray) -> None:
        """``counts`` ``[C, 256]``: how many pixels of each channel have each value (the same sums, exactly)."""
        counts = counts.astype(np.uint64)
        values = np.arange(256, dtype=np.uint64)
        self.count += int(counts[0].sum())
        self.sum += counts @ values
        self.sumsq += counts @ (values * values)

    def mean_std(self) -> tuple[list[float], list[float]]:
        mean = self.sum / (self.count * 255.0)
        var = self.sumsq / (self.count * 255.0**2) - mean**2
        return mean.tolist(), np.sqrt(np.maximum(var, 0.0)).tolist()


class SplitWriter:
    """Writes the rows of one split into ``{split}-{i:05d}.parquet`` shards of ``shard_rows`` rows.

    Each shard goes to a temporary file and is moved into place when complete; ``shards`` lists the
    finished ones (the caller removes them if the import fails later).
    """

    def __init__(self, dataset_dir: Path, split: str, shard_rows: int = SHARD_ROWS):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.dataset_dir, self.split, self.shard_rows = dataset_dir, check_split_name(split), shard_rows
        self.shards: list[ShardInfo] = []
        self.count = 0
        self._rows = ShardRows()

    def add(self, id: str, image: bytes, label: int, height: int, width: int) -> None:
        self._rows.add(id, image, label, height, width)
        self.count += 1
        if len(self._rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if len(self._rows) == 0:
            return
        path = self.dataset_dir / f"{self.split}-{len(self.shards):05d}.parquet"
        self.shards.append(self._rows.write(path, self.split))
        self._rows = ShardRows()


class ShardRows:
    """The rows of one shard being built; ``write`` stores them atomically and describes the file."""

    def __init__(self):
        self.columns: dict[str, list] = {"id": [], "image": [], "label": [], "height": [], "width": []}

    def __len__(self) -> int:
        return len(self.columns["id"])

    def add(self, id: str, image: bytes, label: int, height: int, width: int) -> None:
        for key, value in (("id", id), ("image", image), ("label", int(label)), ("height", int(height)),
                           ("width", int(width))):
            self.columns[key].append(value)

    def write(self, path: Path, split: str) -> ShardInfo:
        table = pa.table({**self.columns, "split": [split] * len(self)}, schema=SCHEMA)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression=_COMPRESSION))
        return ShardInfo(file=path.name, split=split, rows=len(self), bytes=path.stat().st_size,
                         sha256=sha256_file(path))
