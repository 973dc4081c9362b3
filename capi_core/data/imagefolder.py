"""Import a class-per-folder image tree at ImageNet scale: all cores, resumable, JPEG, aspect kept.

``ROOT/<class>/**/*.{jpg,jpeg,png}`` becomes a dataset (``format.py``) with split ``train`` (and
``val``). What is stored:

- Images keep their size and aspect ratio. With ``max_short_side``, an image whose shorter side is
  longer is resized (antialiased bicubic) so that its shorter side is ``max_short_side``; a large JPEG
  is first decoded at a reduced DCT scale that stays at or above the target. Nothing is cropped: the
  training reader's RandomResizedCrop sees the whole stored image, as in the CAPI paper.
- A JPEG that needs neither a resize nor a mode change is stored as its original bytes. Anything
  else is encoded as JPEG (``quality``, default 90). With ``lossless``, non-JPEG sources (PNG) are
  kept, or stored as PNG when they must change. JPEG by default because it decodes ~4-6x faster than
  PNG for the same photo and is ~5x smaller (benchmarks/README.md), which is what lets a few cores
  per GPU feed training.
- Mode: ``"auto"`` is grey when most image headers say grey, else RGB; every image is converted to
  it (alpha dropped).

The plan is a pure function of the file list, the seed and the options, and stable when files come
and go: each file gets two 64-bit keys, hashes of (seed, its relative path). ``val`` takes, per
class, the ``round(val_fraction * n)`` files with the smallest split keys. Within a split, a file's
shard is its shard key's bucket among ``ceil(n / shard_rows)`` shards (fixed at the first run), rows
ordered by key. So every shard is a random sample of all classes, which the reader's shuffle windows
of whole shards need, and a file removed after an interrupted import changes only its own shard.

Each shard is one task (``import_shard``): it writes ``{split}-{k:05d}.parquet`` atomically, then
its record ``.import/{split}-{k:05d}.json``. ``runner`` runs the tasks: processes on this machine
(``process_runner``, the default) or anything with the same protocol (Ray tasks:
``orchestrator.data_import``). The manifest is written last, from the records, and ``.import/`` is
then removed. An interrupted import (killed, disk full, stopped on a bad file) leaves its finished
shards, their records and ``.import/plan.json``; the same call again redoes only the unfinished
shards. A file that cannot be read stops the import, naming it (``on_error="stop"``), or is left out
and listed in the manifest's ``skipped`` (``"skip"``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from capi_core.atomic import atomic_write_text
from capi_core.data import images
from capi_core.data.format import (FORMAT_VERSION, MANIFEST, DatasetError, Manifest, PixelStats, ShardInfo, ShardRows,
                                   Skipped, encode_png, load_manifest, write_manifest)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SHARD_ROWS = 1024  # ~30 MB of 256-px JPEGs, ~100 MB of ImageNet originals: a few per shuffle window
QUALITY = 90  # 1.4x smaller and 1.2x faster to decode than 95 at 256 px (benchmarks/README.md)
STATE_DIR = ".import"
PLAN = "plan.json"
GREY_MODES = ("L", "LA", "I", "I;16", "1", "F")

Progress = Callable[[str, int, int], None]
OnError = Literal["stop", "skip"]


class BadImageError(DatasetError):
    """A source image cannot be read or decoded; the message names the file."""

    hint = ""  # the message itself says what to do: fix or remove the file, or --on-error skip


# --------------------------------------------------------------------------------------------------
# Tasks and what they return (picklable: they travel to processes and to Ray workers)

@dataclass(frozen=True)
class ShardTask:
    """One shard to write: ``files`` are (path relative to ``root``, label) in row order."""

    root: str
    out: str
    split: str
    index: int
    files: tuple[tuple[str, int], ...]
    mode: str  # "L" or "RGB"
    max_short_side: int | None
    quality: int
    lossless: bool
    on_error: OnError

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"

    @property
    def digest(self) -> str:
        """Identifies the shard's content: its files in order and every option that changes the bytes."""
        key = json.dumps([self.files, self.mode, self.max_short_side, self.quality, self.lossless])
        return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ScanTask:
    """Image headers to read, to choose the dataset's mode."""

    root: str
    files: tuple[str, ...]
    on_error: OnError


class ShardRecord(BaseModel):
    """What a finished shard task wrote; ``.import/<shard>.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: str
    index: int
    digest: str
    shard: ShardInfo | None  # None: every file of the shard was skipped
    count: int  # pixels, for the mean and std
    sum: list[int]
    sumsq: list[int]
    size: tuple[int, int] | None  # (H, W) shared by the shard's images; None if they differ or none
    encodings: dict[str, int]
    skipped: list[Skipped]

    @property
    def rows(self) -> int:
        return self.shard.rows if self.shard else 0


# --------------------------------------------------------------------------------------------------
# Runners: run tasks, yield (result or None, files done so far) while they run

Runner = Callable[[Callable[[Any], Any], Sequence[Any]], Iterator[tuple[Any, int]]]

_counter = None  # per process: a shared count of files done, for progress between task ends


def _init_worker(counter) -> None:
    global _counter
    _counter = counter
    torch.set_num_threads(1)  # one thread per process: the processes are the parallelism (and a forked
    # OpenMP pool would hang)


def _tick() -> None:
    if _counter is not None:
        with _counter.get_lock():
            _counter.value += 1


def process_runner(workers: int | None = None) -> Runner:
    """Run tasks in ``workers`` processes on this machine (default: every core; 1: in this process)."""
    workers = workers or os.cpu_count() or 1

    def run(fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[Any, int]]:
        global _counter
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        counter = ctx.Value("q", 0)
        if workers == 1 or len(tasks) <= 1:
            saved = _counter
            _counter = counter
            try:
                for task in tasks:
                    result = fn(task)
                    yield result, counter.value
            finally:
                _counter = saved
            return
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(counter,)) as pool:
            pending = {pool.submit(fn, task) for task in tasks}
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result(), counter.value  # re-raises the task's error
                    if not done:
                        yield None, counter.value
            finally:  # an error or an abandoned import: drop what has not started, let the rest finish
                for future in pending:
                    future.cancel()

    return run


# --------------------------------------------------------------------------------------------------
# One image, one shard

def store_image(path: Path, mode: str, max_short_side: int | None, quality: int,
                lossless: bool) -> tuple[bytes, Tensor, str]:
    """(stored bytes, stored pixels uint8 [C, H, W], how it was stored) for one source image."""
    channels = 1 if mode == "L" else 3
    try:
        data = path.read_bytes()
        image = images.pil_open(data)
        fmt, (width, height) = image.format, image.size
        target = None
        if max_short_side and min(width, height) > max_short_side:
            s = max_short_side / min(width, height)
            target = (max_short_side, max(1, round(s * width))) if height <= width else \
                (max(1, round(s * height)), max_short_side)  # (H, W)
        unchanged = image.mode == mode and target is None
        if fmt == "JPEG" and unchanged:
            # Stored as it is; checked with the reader's own decoder, so what trains is what was checked.
            pixels = images.decode(data, channels)
        elif fmt == "JPEG" and target is not None:
            pixels = images.decode_reduced(data, channels, images.reduction(height, width, *target))
        else:
            image.load()
            pixels = images.pil_to_tensor(image, channels)
    except Image.UnidentifiedImageError:
        raise BadImageError(f"cannot read image {path}: not an image format PIL knows (empty or garbage?)") from None
    except (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot read image {path}: {err}") from None
    if target is not None:
        pixels = images.resize(pixels, target)
    if fmt == "JPEG" and unchanged:
        stored, kind = data, "jpeg-source"
    elif lossless and fmt != "JPEG":
        if fmt == "PNG" and unchanged:
            stored, kind = data, "png-source"
        else:
            array = images.hwc(pixels)
            stored, kind = encode_png(array[..., 0] if channels == 1 else array), "png"
    else:
        stored, kind = images.encode_jpeg(pixels, quality), "jpeg"
    return stored, pixels, kind


def record_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / f"{name}.json"


def import_shard(task: ShardTask) -> ShardRecord:
    """Write one shard and its record; returns the record. Raises DatasetError naming a bad file
    (``on_error="stop"``) or a shard that cannot be written (disk full)."""
    root, out = Path(task.root), Path(task.out)
    channels = 1 if task.mode == "L" else 3
    rows, stats = ShardRows(), PixelStats(channels)
    encodings: Counter[str] = Counter()
    sizes: set[tuple[int, int]] = set()
    skipped: list[Skipped] = []
    for rel, label in task.files:
        try:
            data, pixels, kind = store_image(root / rel, task.mode, task.max_short_side, task.quality, task.lossless)
        except BadImageError as err:
            if task.on_error == "stop":
                raise
            skipped.append(Skipped(file=rel, reason=str(err)))
        else:
            height, width = pixels.shape[1:]
            rows.add(rel, data, label, height, width)
            stats.add_histogram(images.histogram(pixels))
            encodings[kind] += 1
            sizes.add((height, width))
        _tick()
    info = None
    try:
        if len(rows):
            info = rows.write(out / f"{task.name}.parquet", task.split)
        record = ShardRecord(split=task.split, index=task.index, digest=task.digest, shard=info,
                             count=stats.count, sum=stats.sum.tolist(), sumsq=stats.sumsq.tolist(),
                             size=next(iter(sizes)) if len(sizes) == 1 else None, encodings=dict(encodings),
                             skipped=skipped)
        atomic_write_text(record_path(out, task.name), record.model_dump_json())
    except OSError as err:
        raise DatasetError(f"cannot write shard {out / task.name}.parquet: {err}") from None
    return record


def scan_headers(task: ScanTask) -> tuple[int, int]:
    """(grey headers, readable headers) among ``task.files``."""
    grey = readable = 0
    for rel in task.files:
        try:
            with Image.open(Path(task.root) / rel) as image:
                images.check_pixels(*image.size)
                grey += image.mode in GREY_MODES
                readable += 1
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            if task.on_error == "stop":
                raise BadImageError(f"cannot read image {Path(task.root) / rel}: {err}") from None
        _tick()
    return grey, readable


# --------------------------------------------------------------------------------------------------
# The plan

def list_files(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (relative path, label) of every image, sorted."""
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise DatasetError(f"{root} has no class folders (expected one sub-folder of images per class)")
    files: list[tuple[str, int]] = []
    for label, cls in enumerate(class_names):
        found = sorted(p.relative_to(root).as_posix() for p in (root / cls).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DatasetError(f"class folder {root / cls} has no {'/'.join(IMAGE_SUFFIXES)} images")
        files += [(rel, label) for rel in found]
    return class_names, files


def file_key(seed: int, purpose: str, rel: str) -> int:
    """A 64-bit key of (seed, purpose, path): the plan's only source of randomness."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{purpose}\0{rel}".encode(), digest_size=8).digest(), "big")


def split_files(files: list[tuple[str, int]], n_classes: int, val_fraction: float,
                seed: int) -> dict[str, list[tuple[str, int]]]:
    """``{"train": [...], "val": [...]}``: per class, the round(val_fraction * n) smallest split keys go to val."""
    val: set[str] = set()
    for label in range(n_classes):
        members = sorted((file_key(seed, "split", rel), rel) for rel, lab in files if lab == label)
        val.update(rel for _, rel in members[:round(val_fraction * len(members))])
    splits = {"train": [f for f in files if f[0] not in val]}
    if val:
        splits["val"] = [f for f in files if f[0] in val]
    return splits


def shard_files(members: list[tuple[str, int]], n_shards: int, seed: int) -> list[list[tuple[str, int]]]:
    """``n_shards`` lists of files: each file in its shard key's bucket, rows ordered by key."""
    shards: list[list[tuple[int, str, int]]] = [[] for _ in range(n_shards)]
    for rel, label in members:
        key = file_key(seed, "shard", rel)
        shards[key * n_shards >> 64].append((key, rel, label))
    return [[(rel, label) for _, rel, label in sorted(s)] for s in shards]


# --------------------------------------------------------------------------------------------------
# The import

def import_imagefolder(root: str | Path, out: str | Path, max_short_side: int | None = None,
                       quality: int = QUALITY, lossless: bool = False, mode: str = "auto",
                       val_fraction: float = 0.0, seed: int = 0, shard_rows: int = SHARD_ROWS,
                       on_error: OnError = "stop", workers: int | None = None, runner: Runner | None = None,
                       progress: Progress | None = None) -> Manifest:
    """Import ``root`` into ``out`` (new, empty, or an interrupted import of the same call); see the module.

    ``progress(stage, done, total)`` is called with stage ``"scan"`` (headers, ``mode="auto"`` only)
    and ``"import"`` (files; a resumed import starts at the files of its finished shards).
    """
    root, out = Path(root).expanduser().resolve(), Path(out).expanduser().absolute()
    _check_options(root, max_short_side, quality, mode, val_fraction, shard_rows, on_error)
    runner = runner or process_runner(workers)
    class_names, files = list_files(root)
    if (out / MANIFEST).exists():
        return _already_imported(out, root, class_names, files, max_short_side)
    if out.exists() and (not out.is_dir() or any(p.name != STATE_DIR for p in out.iterdir())) \
            and not (out / STATE_DIR / PLAN).is_file():
        raise DatasetError(f"output {out} exists and is neither empty nor an interrupted import")
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with open(out / STATE_DIR / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"another import into {out} is running") from None
        _remove_temporaries(out)
        options = {"root": str(root), "max_short_side": max_short_side, "quality": quality, "lossless": lossless,
                   "mode": mode, "val_fraction": val_fraction, "seed": seed, "shard_rows": shard_rows}
        splits = split_files(files, len(class_names), val_fraction, seed)
        plan = _load_or_make_plan(out, options, class_names, splits, files, runner, progress)
        tasks = [ShardTask(str(root), str(out), split, i, tuple(members), plan["mode"], max_short_side, quality,
                           lossless, on_error)
                 for split in splits for i, members in enumerate(shard_files(splits[split], plan["shards"][split],
                                                                            seed))]
        records = {t.name: r for t in tasks if (r := _finished(out, t)) is not None}
        todo = [t for t in tasks if t.name not in records]
        total, before = len(files), sum(len(t.files) for t in tasks if t.name in records)
        if progress:
            progress("import", before, total)
        try:
            for record, done in runner(import_shard, todo):
                if record is not None:
                    records[f"{record.split}-{record.index:05d}"] = record
                if progress:
                    progress("import", before + done, total)
        except DatasetError as err:
            then = "fix or remove the file, or skip bad files (on_error='skip'; --on-error skip), then " \
                if isinstance(err, BadImageError) else ""
            raise type(err)(f"{err}. {len(records)} of {len(tasks)} shards are done and kept in {out}; {then}run "
                            f"the same import again to resume") from None
        manifest = _manifest(root.name, class_names, plan["mode"], max_short_side, splits, tasks, records)
        write_manifest(out, manifest)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest


def _already_imported(out: Path, root: Path, class_names: list[str], files: list, max_short_side) -> Manifest:
    """The manifest of ``out`` when it is this import, finished: the same folder name, classes, file
    count and size limit. Running a finished import again is then a no-op (and clears the state a
    kill between the manifest and the clean-up left); anything else in ``out`` is refused."""
    manifest = load_manifest(out)
    imported = sum(manifest.splits.values()) + len(manifest.skipped)
    if (manifest.name, manifest.class_names, manifest.max_short_side, imported) != \
            (root.name, class_names, max_short_side, len(files)):
        raise DatasetError(f"{out} is already a dataset of another import ({manifest.name}, {imported} images); "
                           f"import into a new --out")
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest


def _check_options(root: Path, max_short_side, quality, mode, val_fraction, shard_rows, on_error) -> None:
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    if max_short_side is not None and max_short_side < 1:
        raise DatasetError(f"max_short_side must be >= 1, got {max_short_side}")
    if not 1 <= quality <= 100:
        raise DatasetError(f"quality must be in 1..100, got {quality}")
    if mode not in ("auto", "rgb", "grey"):
        raise DatasetError(f"mode must be auto, rgb or grey, got {mode!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_rows < 1:
        raise DatasetError(f"shard_rows must be >= 1, got {shard_rows}")
    if on_error not in ("stop", "skip"):
        raise DatasetError(f"on_error must be stop or skip, got {on_error!r}")


def _remove_temporaries(out: Path) -> None:
    """Temporary files of writes that a killed import left half done (``atomic_write``'s names)."""
    for folder in (out, out / STATE_DIR):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _load_or_make_plan(out: Path, options: dict, class_names: list[str], splits: dict, files: list,
                       runner: Runner, progress: Progress | None) -> dict:
    """The plan of an interrupted import (checked against this call), or a new one (mode scanned)."""
    path = out / STATE_DIR / PLAN
    if path.is_file():
        plan = json.loads(path.read_text())
        for key, value in options.items():
            if plan["options"].get(key) != value:
                raise DatasetError(f"{out} holds an interrupted import with {key}={plan['options'].get(key)!r}, "
                                   f"not {value!r}: run it with the same options to resume, or use a new --out")
        if plan["class_names"] != class_names:
            raise DatasetError(f"the class folders of {options['root']} changed since the interrupted import into "
                               f"{out}; import into a new --out")
        return plan
    if options["mode"] == "auto":
        chunks = [ScanTask(options["root"], tuple(rel for rel, _ in files[i:i + 4096]), "skip")
                  for i in range(0, len(files), 4096)]
        grey = readable = 0
        for result, done in runner(scan_headers, chunks):
            if result is not None:
                grey, readable = grey + result[0], readable + result[1]
            if progress:
                progress("scan", done, len(files))
        chosen = "L" if grey > readable - grey else "RGB"
    else:
        chosen = "L" if options["mode"] == "grey" else "RGB"
    plan = {"options": options, "class_names": class_names, "mode": chosen,
            "shards": {split: math.ceil(len(members) / options["shard_rows"]) for split, members in splits.items()}}
    atomic_write_text(path, json.dumps(plan, indent=1))
    return plan


def _finished(out: Path, task: ShardTask) -> ShardRecord | None:
    """The record of ``task`` if an earlier run finished exactly this shard and its file is intact."""
    path = record_path(out, task.name)
    if not path.is_file():
        return None
    try:
        record = ShardRecord.model_validate_json(path.read_text())
    except (ValidationError, OSError):
        return None
    if record.digest != task.digest:
        return None
    if record.shard is not None:
        file = out / record.shard.file
        if not file.is_file() or file.stat().st_size != record.shard.bytes:
            return None
    return record


def _manifest(name: str, class_names: list[str], mode: str, max_short_side: int | None, splits: dict,
              tasks: list[ShardTask], records: dict[str, ShardRecord]) -> Manifest:
    ordered = [records[t.name] for t in tasks]
    counts = {split: sum(r.rows for r in ordered if r.split == split) for split in splits}
    for split, count in counts.items():
        if count == 0:
            raise DatasetError(f"split {split!r} of {name} has no readable images")
    channels = 1 if mode == "L" else 3
    stats_split = "train"
    stats = PixelStats(channels)
    for r in ordered:
        if r.split == stats_split:
            stats.count += r.count
            stats.sum += np.array(r.sum, np.uint64)
            stats.sumsq += np.array(r.sumsq, np.uint64)
    mean, std = stats.mean_std()
    sizes = {r.size for r in ordered if r.rows}
    encodings: Counter[str] = Counter()
    for r in ordered:
        encodings.update(r.encodings)
    return Manifest(format_version=FORMAT_VERSION, name=name, class_names=class_names,
                    image_size=next(iter(sizes)) if len(sizes) == 1 and None not in sizes else None,
                    channels=channels, mean=mean, std=std, stats_split=stats_split, splits=counts,
                    shards=[r.shard for r in ordered if r.shard is not None], max_short_side=max_short_side,
                    encodings=dict(encodings), skipped=[s for r in ordered for s in r.skipped])
