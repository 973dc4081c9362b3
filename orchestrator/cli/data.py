"""``capi data``: import datasets into CAPI's Parquet format, show and verify them."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@click.group()
def data() -> None:
    """Import image datasets into Parquet shards (one row per encoded image)."""


@contextmanager
def _errors_and_progress():
    """Yield a ``progress(stage, done, total)`` callback drawing rich bars; dataset errors become CLI errors."""
    # deferred: pyarrow
    from capi_core.data import DatasetError

    bars = Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not sys.stderr.isatty())
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done)

    try:
        with bars:
            yield progress
    except DatasetError as err:
        raise click.ClickException(str(err)) from None


def _given(**kwargs):
    """Only the options the user gave: the importers' signatures hold the defaults."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _floats(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _summary(dataset_dir: Path, manifest) -> str:
    shards = {split: sum(s.split == split for s in manifest.shards) for split in manifest.splits}
    size = sum(s.bytes for s in manifest.shards)
    h, w = manifest.image_size
    return "\n".join([
        f"{manifest.name}  {dataset_dir}",
        f"  images    {h}x{w}, {manifest.channels} channel(s), format version {manifest.format_version}",
        f"  classes   {len(manifest.class_names)}: {', '.join(manifest.class_names)}",
        "  splits    " + ", ".join(f"{s} {n:,} ({shards[s]} shards)" for s, n in manifest.splits.items()),
        f"  mean/std  {_floats(manifest.mean)} / {_floats(manifest.std)} (on {manifest.stats_split})",
        f"  size      {size / 1e6:.1f} MB",
    ])


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
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Dataset directory.")
@click.option("--size", type=click.IntRange(min=1),
              help="Resize the shorter side to N and centre-crop NxN [default: keep the images if they all have "
                   "one size, else N = the smallest shorter side].")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Fraction of each class held out as split 'val' [default: 0].")
@click.option("--seed", type=int, help="Seed of the val split.")
@click.option("--shard-rows", type=click.IntRange(min=1), help="Images per Parquet shard.")
def imagefolder(root, out, size, val_fraction, seed, shard_rows) -> None:
    """A class-per-folder tree ROOT/<class>/*.{jpg,jpeg,png}; mixed grey/RGB becomes the majority mode."""
    # deferred: pyarrow
    from capi_core.data.importers import import_imagefolder

    with _errors_and_progress() as progress:
        manifest = import_imagefolder(root, out, progress=progress, **_given(size=size, val_fraction=val_fraction,
                                                                             seed=seed, shard_rows=shard_rows))
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
