"""The Parquet dataset format, the importers, resolve_dataset and the ``capi data`` commands."""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capi_core.data import BUILTIN_DATASETS, DatasetError, load_manifest, resolve_dataset, verify_dataset
from capi_core.data.format import MANIFEST, read_shard
from capi_core.data.importers import FASHION_MNIST_DIR, FASHION_MNIST_FILES, import_fashion_mnist, import_idx
from synthetic import write_idx


def idx_pair(tmp: Path, n: int, seed: int, shape=(12, 10), classes: int = 5, gz: bool = False):
    """Random IDX images ``[n, *shape]`` and labels written to ``tmp``; returns paths and arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % classes).astype(np.uint8)  # every class present when n >= classes
    paths = []
    for kind, array in (("images", images), ("labels", labels)):
        path = write_idx(tmp / f"{seed}-{kind}.idx", array)
        if gz:
            path = path.with_suffix(".idx.gz")
            path.write_bytes(gzip.compress((tmp / f"{seed}-{kind}.idx").read_bytes()))
        paths.append(path)
    return paths[0], paths[1], images, labels


def rows(dataset_dir: Path, split: str):
    """All (id, decoded pixels, label) of ``split``, read back with pyarrow and PIL."""
    manifest = load_manifest(dataset_dir)
    out = []
    for shard in manifest.split_shards(split):
        table = read_shard(dataset_dir / shard.file, shard)
        for id, data, label in zip(*(table.column(c).to_pylist() for c in ("id", "image", "label"))):
            out.append((id, np.asarray(Image.open(io.BytesIO(data))), label))
    return out


# --------------------------------------------------------------------------------------------------
# IDX import and the format

@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_keeps_pixels_labels_and_stats(tmp_path, gz):
    images_path, labels_path, images, labels = idx_pair(tmp_path, 23, seed=0, gz=gz)
    manifest = import_idx(images_path, labels_path, tmp_path / "ds", shard_rows=5)

    got = rows(tmp_path / "ds", "train")
    assert [g[0] for g in got] == [f"train/{i:06d}" for i in range(23)]
    np.testing.assert_array_equal(np.stack([g[1] for g in got]), images)
    assert [g[2] for g in got] == labels.tolist()
    assert manifest.splits == {"train": 23} and [s.rows for s in manifest.shards] == [5, 5, 5, 5, 3]
    assert manifest.image_size == (12, 10) and manifest.channels == 1
    assert manifest.class_names == [str(i) for i in range(labels.max() + 1)]
    np.testing.assert_allclose(manifest.mean, [images.mean() / 255], rtol=1e-12)
    np.testing.assert_allclose(manifest.std, [(images / 255).std()], rtol=1e-9)
    table = pq.read_table(tmp_path / "ds" / manifest.shards[0].file)
    assert table.schema.names == ["id", "image", "label", "split", "height", "width"]
    assert set(table.column("height").to_pylist()) == {12} and set(table.column("width").to_pylist()) == {10}
    assert verify_dataset(tmp_path / "ds") == manifest


def test_idx_adds_a_split_and_keeps_train_stats(tmp_path):
    out = tmp_path / "ds"
    test_images, test_labels, test_pixels, _ = idx_pair(tmp_path, 7, seed=1)
    first = import_idx(test_images, test_labels, out, split="test", class_names=list("abcde"))
    assert first.stats_split == "test"
    train_images, train_labels, train_pixels, _ = idx_pair(tmp_path, 11, seed=2)
    both = import_idx(train_images, train_labels, out)  # class names come from the existing dataset

    assert both.splits == {"test": 7, "train": 11} and both.class_names == list("abcde")
    assert both.stats_split == "train"
    np.testing.assert_allclose(both.mean, [train_pixels.mean() / 255], rtol=1e-12)
    np.testing.assert_array_equal(np.stack([r[1] for r in rows(out, "test")]), test_pixels)
    val_images, val_labels, _, _ = idx_pair(tmp_path, 4, seed=3)
    three = import_idx(val_images, val_labels, out, split="val")
    assert three.mean == both.mean and set(three.splits) == {"test", "train", "val"}
    assert load_manifest(out) == three

    with pytest.raises(DatasetError, match="already has a split 'train'"):
        import_idx(train_images, train_labels, out)


def test_idx_rejects_mismatched_and_truncated_files(tmp_path):
    images, labels, _, _ = idx_pair(tmp_path, 6, seed=0)
    _, other_labels, _, _ = idx_pair(tmp_path, 5, seed=1)
    with pytest.raises(DatasetError, match="6 images but .* 5 labels"):
        import_idx(images, other_labels, tmp_path / "a")
    truncated = tmp_path / "cut.idx"
    truncated.write_bytes(images.read_bytes()[:-7])
    with pytest.raises(DatasetError, match="cut.idx has .* data bytes"):
        import_idx(truncated, labels, tmp_path / "b")
    with pytest.raises(DatasetError, match="outside the 3 classes"):
        import_idx(images, labels, tmp_path / "c", class_names=["x", "y", "z"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_failed_add_leaves_existing_dataset_untouched(tmp_path):
    out = tmp_path / "ds"
    images, labels, _, _ = idx_pair(tmp_path, 9, seed=0)
    import_idx(images, labels, out, shard_rows=4)
    before = sorted(p.name for p in out.iterdir()), (out / MANIFEST).read_bytes()
    wide_images, wide_labels, _, _ = idx_pair(tmp_path, 9, seed=1, shape=(12, 11))
    with pytest.raises(DatasetError, match="image_size"):
        import_idx(wide_images, wide_labels, out, split="test")
    assert (sorted(p.name for p in out.iterdir()), (out / MANIFEST).read_bytes()) == before


def test_crash_while_writing_leaves_no_output(tmp_path, monkeypatch):
    """A failure after some shards were written removes them, their temp files and the new directory."""
    import capi_core.data.format as fmt

    images, labels, _, _ = idx_pair(tmp_path, 20, seed=0)
    real = fmt.encode_png
    calls = []

    def failing(pixels):
        calls.append(1)
        if len(calls) == 13:
            raise RuntimeError("disk full")
        return real(pixels)

    monkeypatch.setattr("capi_core.data.importers.encode_png", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        import_idx(images, labels, tmp_path / "ds", shard_rows=4)
    assert len(calls) == 13 and not (tmp_path / "ds").exists()
    existing = tmp_path / "existing"
    monkeypatch.setattr("capi_core.data.importers.encode_png", real)
    import_idx(images, labels, existing)
    calls.clear()
    monkeypatch.setattr("capi_core.data.importers.encode_png", failing)
    with pytest.raises(RuntimeError):
        import_idx(images, labels, existing, split="test", shard_rows=4)
    assert sorted(p.name for p in existing.iterdir()) == [MANIFEST, "train-00000.parquet"]


# --------------------------------------------------------------------------------------------------
# Damaged datasets

@pytest.fixture
def small_dataset(tmp_path) -> Path:
    images, labels, _, _ = idx_pair(tmp_path, 12, seed=0)
    import_idx(images, labels, tmp_path / "ds", shard_rows=5)
    return tmp_path / "ds"


def test_wrong_checksum_names_the_shard(small_dataset):
    from capi_core.data.reader import load_split

    shard = small_dataset / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    load_manifest(small_dataset)  # sizes still match: only the checksum can tell
    with pytest.raises(DatasetError, match="train-00001.parquet has sha256"):
        verify_dataset(small_dataset)
    with pytest.raises(DatasetError, match="train-00001.parquet has sha256"):
        load_split(small_dataset, "train", 12)


def test_truncated_or_missing_shard_names_the_file(small_dataset):
    shard = small_dataset / "train-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="train-00002.parquet has .* bytes, the manifest says"):
        resolve_dataset(str(small_dataset))
    shard.unlink()
    with pytest.raises(DatasetError, match="train-00002.parquet listed in .* is missing"):
        load_manifest(small_dataset)


def test_corrupt_shard_with_matching_checksum_names_the_file(small_dataset):
    """Garbage that the manifest vouches for still fails in pyarrow, and the error names the shard."""
    import hashlib

    shard = small_dataset / "train-00000.parquet"
    garbage = b"PAR1" + os.urandom(200) + b"PAR1"
    shard.write_bytes(garbage)
    manifest = json.loads((small_dataset / MANIFEST).read_text())
    manifest["shards"][0].update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    (small_dataset / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="train-00000.parquet is not a readable Parquet file"):
        verify_dataset(small_dataset)


def test_bad_manifest_and_unknown_dataset(small_dataset, tmp_path):
    (small_dataset / MANIFEST).write_text('{"format_version": 2, "name": "x"}')
    with pytest.raises(DatasetError, match="manifest.json is not a valid manifest: class_names"):
        load_manifest(small_dataset)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no manifest.json"):
        resolve_dataset(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="unknown dataset 'cifar-99'.*fashion-mnist"):
        resolve_dataset("cifar-99")


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST

def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPI_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError) as err:
        import_fashion_mnist(tmp_path / "out")
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "CAPI_FASHION_MNIST_DIR" in message
    assert "t10k-labels-idx1-ubyte.gz" in message and str(tmp_path / "nowhere") in message
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        resolve_dataset("fashion-mnist", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in (tmp_path / "cache" / "datasets").iterdir()] == [".fashion-mnist.lock"]


def test_fashion_mnist_files_with_wrong_md5_are_rejected(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for stem, _ in FASHION_MNIST_FILES.values():
        array = np.zeros((3, 28, 28) if "images" in stem else (3,), np.uint8)
        (source / f"{stem}.gz").write_bytes(gzip.compress(write_idx(tmp_path / stem, array).read_bytes()))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz has md5 \w+ \(decompressed\), expected f4a87"):
        import_fashion_mnist(tmp_path / "out", source=source)
    assert not (tmp_path / "out").exists()


def test_failed_builtin_import_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    def crashing(out, **kwargs):
        out.mkdir()
        (out / "train-00000.parquet").write_bytes(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setitem(BUILTIN_DATASETS, "fashion-mnist", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_dataset("fashion-mnist", cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == [".fashion-mnist.lock"]


def _resolve(cache: str, queue) -> None:
    queue.put(str(resolve_dataset("fashion-mnist", cache_dir=cache)))


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_imports_once_under_concurrent_first_use(tmp_path, monkeypatch):
    calls = tmp_path / "calls"

    def counted(out, **kwargs):
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        return import_fashion_mnist(out, **kwargs)

    monkeypatch.setitem(BUILTIN_DATASETS, "fashion-mnist", counted)  # forked children inherit it
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    paths = {queue.get(timeout=1) for _ in procs}
    assert paths == {str(tmp_path / "datasets" / "fashion-mnist")}
    assert len(calls.read_text().split()) == 1
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == [".fashion-mnist.lock", "fashion-mnist"]
    manifest = verify_dataset(tmp_path / "datasets" / "fashion-mnist")
    assert manifest.splits == {"train": 60000, "test": 10000}
    assert manifest.class_names[0] == "T-shirt/top" and manifest.image_size == (28, 28)
    assert manifest.mean[0] == pytest.approx(0.2860, abs=5e-5) and manifest.std[0] == pytest.approx(0.3530, abs=5e-5)


# --------------------------------------------------------------------------------------------------
# CLI

def test_cli_import_info_verify(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main

    train_images, train_labels, _, _ = idx_pair(tmp_path, 10, seed=0, gz=True)
    test_images, test_labels, _, _ = idx_pair(tmp_path, 4, seed=1)
    out = tmp_path / "mnistish"
    runner = CliRunner()
    result = runner.invoke(main, ["data", "import", "idx", str(train_images), str(train_labels), "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["data", "import", "idx", str(test_images), str(test_labels), "--out", str(out),
                                  "--split", "test", "--shard-rows", "3"])
    assert result.exit_code == 0, result.output
    assert "train 10 (1 shards), test 4 (2 shards)" in result.output
    info = runner.invoke(main, ["data", "info", str(out)])
    assert info.exit_code == 0 and "mnistish" in info.output and "12x10, 1 channel" in info.output
    verify = runner.invoke(main, ["data", "verify", str(out)])
    assert verify.exit_code == 0 and "OK: 3 shards, 14 images" in verify.output

    (out / "test-00001.parquet").write_bytes(b"x")
    verify = runner.invoke(main, ["data", "verify", str(out)])
    assert verify.exit_code == 1 and "test-00001.parquet has 1 bytes" in verify.output
    missing = runner.invoke(main, ["data", "import", "fashion-mnist", "--source", str(tmp_path / "none"),
                                   "--out", str(tmp_path / "fm")])
    assert missing.exit_code == 1 and "apt-get install dataset-fashion-mnist" in missing.output
    empty = runner.invoke(main, ["data", "import", "imagefolder", str(out), "--out", str(tmp_path / "x")])
    assert empty.exit_code == 1 and "has no class folders" in empty.output
