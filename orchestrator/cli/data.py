"""``capi data``: import datasets into CAPI's Parquet format, show and verify them."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@click.group()
def data() -> None:
    """Import image datasets into Parquet shards (one row per encoded image)."""


@contextmanager
def _errors_and_progress():
    """Yield a ``progress(stage, done, total)`` callback (a dataset error ends the bars on its way out).

    On a terminal it draws rich bars with the rate and the time left; otherwise (a batch job's log) it
    prints a line with the same figures every ``LOG_EVERY_S`` seconds and when a stage ends.
    """
    tty = sys.stderr.isatty()
    bars = Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                    TimeElapsedColumn(), disable=not tty)
    tasks: dict[str, int] = {}
    rates: dict[str, _Rate] = {}

    def progress(stage: str, done: int, total: int) -> None:
        rate = rates.setdefault(stage, _Rate(done))
        line = rate.update(done, total)
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, completed=done, rate="")
        bars.update(tasks[stage], completed=done, rate=f"{rate.per_s:,.0f} img/s" if rate.per_s else "")
        if not tty and line:
            click.echo(f"{stage}: {line}", err=True)

    with bars:
        yield progress


class _Rate:
    """Images per second since a stage started (a resumed import's finished part left out), and the time
    left at that rate; ``update`` returns a log line when one is due."""

    LOG_EVERY_S = 10.0

    def __init__(self, start: int):
        self.start, self.t0 = start, time.monotonic()
        self.per_s, self.logged = 0.0, self.t0

    def update(self, done: int, total: int) -> str | None:
        now = time.monotonic()
        self.per_s = (done - self.start) / (now - self.t0) if now > self.t0 and done > self.start else 0.0
        if done < total and now - self.logged < self.LOG_EVERY_S:
            return None
        self.logged = now
        left = f", ETA {_duration((total - done) / self.per_s)}" if self.per_s and done < total else ""
        return f"{done:,}/{total:,} images ({done / max(total, 1):.1%}), {self.per_s:,.0f} img/s{left}"


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


def _given(**kwargs):
    """Only the options the user gave: the importers' signatures hold the defaults."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _floats(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _summary(dataset_dir: Path, manifest) -> str:
    shards = {split: sum(s.split == split for s in manifest.shards) for split in manifest.splits}
    size = sum(s.bytes for s in manifest.shards)
    if manifest.image_size is not None:
        images = f"{manifest.image_size[0]}x{manifest.image_size[1]}"
    else:
        images = "own sizes" + (f" (shorter side at most {manifest.max_short_side})" if manifest.max_short_side
                                else "")
    classes = manifest.class_names
    lines = [
        f"{manifest.name}  {dataset_dir}",
        f"  images    {images}, {manifest.channels} channel(s), format version {manifest.format_version}",
        f"  classes   {len(classes)}: {', '.join(classes[:20])}" + (" ..." if len(classes) > 20 else ""),
        "  splits    " + ", ".join(f"{s} {n:,} ({shards[s]} shards)" for s, n in manifest.splits.items()),
        f"  mean/std  {_floats(manifest.mean)} / {_floats(manifest.std)} (on {manifest.stats_split})",
        f"  size      {size / 1e6:.1f} MB",
    ]
    if manifest.encodings:
        lines.append("  stored    " + ", ".join(f"{k} {v:,}" for k, v in sorted(manifest.encodings.items())))
    if manifest.skipped:
        lines.append(f"  skipped   {len(manifest.skipped):,} unreadable files (listed in the manifest), e.g. "
                     f"{manifest.skipped[0].file}: {manifest.skipped[0].reason}")
    return "\n".join(lines)


@data.group("import")
def import_() -> None:
    """Import a dataset: fashion-mnist, an IDX pair, or a folder of images."""


@import_.command("fashion-mnist")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path),
              help="Directory with the four IDX files [default: $CAPI_FASHION_MNIST_DIR or "
                   "/usr/share/datasets/fashion-mnist, from `apt-get install dataset-fashion-mnist`].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset directory [default: the cache, where `data.dataset=fashion-mnist` finds it].")
@click.option("--shard-rows", type=click.IntRange(min=1), help="Images per Parquet shard.")
def fashion_mnist(source, out, shard_rows) -> None:
    """Fashion-MNIST: 60,000 train + 10,000 test 28x28 grey images, checked against their md5."""
    # deferred: pyarrow
    from capi_core.data import builtin_dir, import_builtin, load_manifest
    from capi_core.data.format import MANIFEST
    from capi_core.data.importers import import_fashion_mnist

    with _errors_and_progress() as progress:
        kwargs = _given(source=source, shard_rows=shard_rows)
        if out is None:
            out = builtin_dir("fashion-mnist")
            if (out / MANIFEST).is_file():
                click.echo(f"already imported at {out}")
            import_builtin("fashion-mnist", progress=progress, **kwargs)
            manifest = load_manifest(out)
        else:
            manifest = import_fashion_mnist(out, progress=progress, **kwargs)
    click.echo(_summary(out, manifest))


@import_.command("idx")
@click.argument("images", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("labels", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset directory: new, or an existing dataset to add a split to.")
@click.option("--split", help="Split name [default: train].")
@click.option("--name", help="Dataset name [default: the --out directory's name].")
@click.option("--shard-rows", type=click.IntRange(min=1), help="Images per Parquet shard.")
def idx(images, labels, out, split, name, shard_rows) -> None:
    """An IDX pair (gzip or not), e.g. MNIST; run again with --split test to add the test split."""
    # deferred: pyarrow
    from capi_core.data.importers import import_idx

    with _errors_and_progress() as progress:
        manifest = import_idx(images, labels, out, progress=progress,
                              **_given(split=split, name=name, shard_rows=shard_rows))
    click.echo(_summary(out, manifest))


@import_.command("imagefolder")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset directory: new, or an interrupted import of the same folder and options to resume.")
@click.option("--max-short-side", type=click.IntRange(min=1), metavar="N",
              help="Shrink images whose shorter side is longer than N so that it is N, keeping the aspect "
                   "ratio (e.g. 256 or 512) [default: keep every image's size].")
@click.option("--quality", type=click.IntRange(1, 100), help="JPEG quality of re-encoded images [default: 90].")
@click.option("--lossless", is_flag=True, default=None,
              help="Keep PNG sources (or store them as PNG when they change) instead of re-encoding them as JPEG.")
@click.option("--mode", type=click.Choice(["auto", "rgb", "grey"]),
              help="Channels [default: auto, grey if most images are grey, else RGB].")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Fraction of each class held out as split 'val' [default: 0].")
@click.option("--seed", type=int, help="Seed of the val split and of the shard assignment.")
@click.option("--shard-rows", type=click.IntRange(min=1), help="Images per Parquet shard, on average [default: 1024].")
@click.option("--on-error", type=click.Choice(["stop", "skip"]),
              help="An unreadable image stops the import, naming it (resume after fixing it), or is skipped and "
                   "listed in the manifest [default: stop].")
@click.option("--workers", type=click.IntRange(min=1), help="Processes on this machine [default: every core].")
@click.option("--address", metavar="ADDR",
              help="Run the shards as Ray tasks on the cluster at ADDR (e.g. 'auto' or ray://head:10001); ROOT and "
                   "--out must be the same paths on every node.")
def imagefolder(root, out, max_short_side, quality, lossless, mode, val_fraction, seed, shard_rows, on_error, workers,
                address) -> None:
    """A class-per-folder tree ROOT/<class>/**/*.{jpg,jpeg,png}, on all cores, resumable.

    JPEGs that need no change are stored as they are, everything else as JPEG; images keep their
    aspect ratio (the training crops see the whole image). Run the same command again to resume an
    interrupted import: finished shards are kept.
    """
    # deferred: pyarrow and torch
    from capi_core.data.imagefolder import import_imagefolder

    runner = None
    if address is not None:
        # deferred: Ray
        from orchestrator.data_import import ray_runner

        runner = ray_runner(address)
    with _errors_and_progress() as progress:
        manifest = import_imagefolder(root, out, progress=progress, runner=runner, **_given(
            max_short_side=max_short_side, quality=quality, lossless=lossless, mode=mode, val_fraction=val_fraction,
            seed=seed, shard_rows=shard_rows, on_error=on_error, workers=workers))
    click.echo(_summary(out, manifest))


def _dataset_dir(dataset: str) -> Path:
    """A directory as given, or where a built-in name was imported."""
    # deferred: pyarrow
    from capi_core.data import BUILTIN_DATASETS, builtin_dir

    path = Path(dataset)
    return builtin_dir(dataset) if dataset in BUILTIN_DATASETS and not path.is_dir() else path


@data.command()
@click.argument("dataset")
def info(dataset) -> None:
    """Summarise DATASET (a directory, or a built-in name already imported)."""
    # deferred: pyarrow
    from capi_core.data import load_manifest

    with _errors_and_progress():
        dataset_dir = _dataset_dir(dataset)
        click.echo(_summary(dataset_dir, load_manifest(dataset_dir)))


@data.command()
@click.argument("dataset")
def verify(dataset) -> None:
    """Check every shard of DATASET against the manifest's sha256, rows and labels."""
    # deferred: pyarrow
    from capi_core.data import verify_dataset

    with _errors_and_progress():
        dataset_dir = _dataset_dir(dataset)
        manifest = verify_dataset(dataset_dir)
    click.echo(f"OK: {len(manifest.shards)} shards, {sum(manifest.splits.values()):,} images in {dataset_dir}")
