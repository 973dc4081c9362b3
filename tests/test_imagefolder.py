"""The image-folder importer: what it stores, the plan, processes, resume after a kill or a full disk, bad files."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capi_core.data import DatasetError, load_manifest, verify_dataset
from capi_core.data.format import MANIFEST, read_shard
from capi_core.data.imagefolder import STATE_DIR, import_imagefolder, shard_files, split_files

def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth photo-like RGB image, uint8 [H, W, 3]: waves mostly in luminance, a little in colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width] / max(height, width)
    waves = sum(np.sin(2 * np.pi * (rng.uniform(0, 3) * yy + rng.uniform(0, 3) * xx) + rng.uniform(0, 6))[..., None]
                * (rng.uniform(-50, 50) + rng.uniform(-8, 8, 3)) for _ in range(5))
    return np.clip(128 + waves + rng.normal(0, 2, (height, width, 3)), 0, 255).astype(np.uint8)


def save(path: Path, pixels: np.ndarray, fmt: str, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt, **kwargs)
    return path


def jpeg_folder(root: Path, n: int = 24, classes: int = 3, seed: int = 0) -> Path:
    """``n`` JPEGs of a few sizes and both orientations in ``classes`` class folders."""
    sizes = [(48, 64), (64, 48), (40, 40), (36, 80)]
    for i in range(n):
        save(root / f"c{i % classes}" / f"{i:03d}.jpg", photo(*sizes[i % len(sizes)], seed + i), "JPEG", quality=90)
    return root


def in_last_shard(root: Path, shard_rows: int) -> Path:
    """A file of ``root`` that the plan puts in the last shard, so that the shards before it finish first."""
    from capi_core.data.imagefolder import list_files

    classes, files = list_files(root)
    train = split_files(files, len(classes), 0.0, seed=0)["train"]
    return root / shard_files(train, -(-len(train) // shard_rows), seed=0)[-1][0][0]


def rows(dataset: Path, split: str = "train") -> dict[str, tuple[bytes, int, int, int]]:
    """id -> (stored bytes, label, height, width) of every row of ``split``."""
    manifest = load_manifest(dataset)
    out = {}
    for shard in manifest.split_shards(split):
        t = read_shard(dataset / shard.file, shard)
        for id, data, label, h, w in zip(*(t.column(c).to_pylist() for c in ("id", "image", "label", "height",
                                                                              "width"))):
            out[id] = (data, label, h, w)
    return out


def pixels_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def files_state(dataset: Path) -> dict[str, tuple[int, int]]:
    """Shard file -> (inode, mtime_ns): unchanged values mean the file was not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dataset.glob("*.parquet")}


# ------------------------------------------------------------------------------------------- storing

def test_jpegs_keep_their_bytes_and_size_pngs_become_jpeg_unless_lossless(tmp_path):
    root = tmp_path / "pets"
    jpeg = save(root / "cat" / "a.jpg", photo(30, 50, 0), "JPEG", quality=85)
    png_pixels = photo(20, 16, 1)
    save(root / "dog" / "sub" / "b.PNG", png_pixels, "PNG")
    save(root / "dog" / "c.png", np.dstack([photo(10, 12, 2), np.full((10, 12), 7, np.uint8)]), "PNG")  # RGBA
    (root / "dog" / "notes.txt").write_text("ignored")

    manifest = import_imagefolder(root, tmp_path / "ds", workers=1)
    assert manifest.class_names == ["cat", "dog"] and manifest.splits == {"train": 3} and manifest.channels == 3
    assert manifest.image_size is None and manifest.encodings == {"jpeg-source": 1, "jpeg": 2}
    got = rows(tmp_path / "ds")
    assert got["cat/a.jpg"] == (jpeg.read_bytes(), 0, 30, 50)  # the original bytes, its own size
    data, label, h, w = got["dog/sub/b.PNG"]
    assert data[:2] == b"\xff\xd8" and (label, h, w) == (1, 20, 16)  # re-encoded as JPEG
    assert np.abs(pixels_of(data).astype(int) - png_pixels).mean() < 4
    assert verify_dataset(tmp_path / "ds") == manifest

    lossless = import_imagefolder(root, tmp_path / "lossless", lossless=True, workers=1)
    got = rows(tmp_path / "lossless")
    assert got["dog/sub/b.PNG"][0] == (root / "dog" / "sub" / "b.PNG").read_bytes()  # kept as it is
    np.testing.assert_array_equal(pixels_of(got["dog/c.png"][0]), np.asarray(Image.open(root / "dog/c.png"))[..., :3])
    assert lossless.encodings == {"jpeg-source": 1, "png-source": 1, "png": 1}


def test_max_short_side_resizes_large_images_only_and_keeps_the_aspect(tmp_path):
    root = tmp_path / "f"
    save(root / "a" / "wide.jpg", photo(300, 400, 0), "JPEG")
    save(root / "a" / "tall.jpg", photo(200, 120, 1), "JPEG")  # shorter side 120 <= 128: kept
    save(root / "b" / "big.jpg", photo(1100, 1500, 2), "JPEG")  # decoded at 1/8 first (137 >= 128)
    manifest = import_imagefolder(root, tmp_path / "ds", max_short_side=128, quality=95, workers=1)
    got = rows(tmp_path / "ds")
    assert {k: v[2:] for k, v in got.items()} == {"a/wide.jpg": (128, 171), "a/tall.jpg": (200, 120),
                                                   "b/big.jpg": (128, 175)}
    assert got["a/tall.jpg"][0] == (root / "a" / "tall.jpg").read_bytes()
    assert manifest.max_short_side == 128 and manifest.encodings == {"jpeg-source": 1, "jpeg": 2}
    # Resized means resized, not cropped: the whole picture, shrunk.
    expected = np.asarray(Image.open(root / "a" / "wide.jpg").resize((171, 128), Image.Resampling.BICUBIC))
    assert np.abs(pixels_of(got["a/wide.jpg"][0]).astype(int) - expected).mean() < 3
    expected = np.asarray(Image.open(root / "b" / "big.jpg").resize((175, 128), Image.Resampling.BICUBIC))
    assert np.abs(pixels_of(got["b/big.jpg"][0]).astype(int) - expected).mean() < 3


def test_grey_majority_becomes_a_grey_dataset_and_stats_are_of_the_stored_pixels(tmp_path):
    root = tmp_path / "f"
    grey = [photo(16, 24, i)[..., 0] for i in range(2)]
    save(root / "a" / "0.png", grey[0], "PNG")
    save(root / "a" / "1.png", grey[1], "PNG")
    save(root / "b" / "rgb.png", photo(16, 16, 5), "PNG")
    manifest = import_imagefolder(root, tmp_path / "ds", lossless=True, workers=1)
    assert manifest.channels == 1 and manifest.encodings == {"png-source": 2, "png": 1}
    stored = [pixels_of(v[0]) for v in rows(tmp_path / "ds").values()]
    assert all(p.ndim == 2 for p in stored)
    everything = np.concatenate([p.ravel() for p in stored]) / 255
    np.testing.assert_allclose(manifest.mean, [everything.mean()], rtol=1e-9)
    np.testing.assert_allclose(manifest.std, [everything.std()], rtol=1e-6)
    assert import_imagefolder(root, tmp_path / "rgb", mode="rgb", workers=1).channels == 3


def test_val_fraction_is_stratified_and_seeded(tmp_path):
    root = tmp_path / "f"
    for cls, n in (("a", 10), ("b", 20)):
        for i in range(n):
            save(root / cls / f"{i}.png", np.full((4, 4), i, np.uint8), "PNG")
    m = import_imagefolder(root, tmp_path / "ds", val_fraction=0.2, workers=1)
    assert m.splits == {"train": 24, "val": 6}
    val = rows(tmp_path / "ds", "val")
    assert sorted(v[1] for v in val.values()) == [0, 0, 1, 1, 1, 1]
    import_imagefolder(root, tmp_path / "ds2", val_fraction=0.2, workers=1)
    assert rows(tmp_path / "ds2", "val").keys() == val.keys()
    import_imagefolder(root, tmp_path / "ds3", val_fraction=0.2, seed=1, workers=1)
    assert rows(tmp_path / "ds3", "val").keys() != val.keys()


def test_the_plan_mixes_classes_in_every_shard_and_survives_removing_a_file():
    files = [(f"c{c}/{i}.jpg", c) for c in range(10) for i in range(200)]
    splits = split_files(files, 10, 0.1, seed=0)
    assert len(splits["val"]) == 200 and len(splits["train"]) == 1800
    shards = shard_files(splits["train"], 8, seed=0)
    assert sorted(f for s in shards for f in s) == sorted(splits["train"])
    assert all(180 < len(s) < 270 for s in shards)  # hash buckets: about 225 each
    assert all(len({label for _, label in s}) == 10 for s in shards)  # not one class per shard
    removed = splits["train"][123]
    smaller = shard_files([f for f in splits["train"] if f != removed], 8, seed=0)
    changed = [i for i, (a, b) in enumerate(zip(shards, smaller)) if a != b]
    assert len(changed) == 1 and removed in shards[changed[0]]


def test_processes_write_the_same_dataset_as_one_process(tmp_path):
    root = jpeg_folder(tmp_path / "f", n=30)
    one = import_imagefolder(root, tmp_path / "one", max_short_side=44, shard_rows=4, workers=1)
    two = import_imagefolder(root, tmp_path / "two", max_short_side=44, shard_rows=4, workers=2)
    assert one == two and len(one.shards) >= 6
    assert not (tmp_path / "two" / STATE_DIR).exists()  # the import state goes once the manifest is written


# ------------------------------------------------------------------------------------------- bad input

def test_a_bad_file_stops_the_import_naming_it_and_the_rest_resumes(tmp_path):
    root = jpeg_folder(tmp_path / "f", n=24)
    good = import_imagefolder(root, tmp_path / "reference", shard_rows=4, workers=1)
    bad = in_last_shard(root, 4)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    out = tmp_path / "ds"
    with pytest.raises(DatasetError, match=rf"cannot read image .*{bad.name}.*shards are done.*run the same import"):
        import_imagefolder(root, out, shard_rows=4, workers=1)
    assert not (out / MANIFEST).exists()
    done = files_state(out)
    assert 0 < len(done) < len(good.shards)  # the shards before the bad file's are finished and kept

    bad.unlink()  # the folder fixed: the finished shards stay, only the bad file's own shard changes
    fixed = import_imagefolder(root, out, shard_rows=4, workers=1)
    assert fixed.splits == {"train": 23} and not fixed.skipped
    assert {k: v for k, v in files_state(out).items() if k in done} == done  # not redone
    assert verify_dataset(out) == fixed


def test_garbage_and_unreadable_files_are_skipped_and_listed(tmp_path):
    root = jpeg_folder(tmp_path / "f", n=9)
    (root / "c0" / "zz.jpg").write_bytes(b"not an image at all")
    (root / "c2" / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cannot read image .*(zz.jpg|empty.png): not an image format"):
        import_imagefolder(root, tmp_path / "stop", workers=2)
    m = import_imagefolder(root, tmp_path / "ds", on_error="skip", workers=2)
    assert sorted(s.file for s in m.skipped) == ["c0/zz.jpg", "c2/empty.png"] and m.splits == {"train": 9}


def test_bad_folders_and_outputs_are_named(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    with pytest.raises(DatasetError, match="has no class folders"):
        import_imagefolder(root, tmp_path / "out")
    (root / "empty_class").mkdir()
    save(root / "ok" / "1.png", np.zeros((5, 5), np.uint8), "PNG")
    with pytest.raises(DatasetError, match="class folder .*empty_class has no"):
        import_imagefolder(root, tmp_path / "out")
    (root / "empty_class").rmdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("someone's file")
    with pytest.raises(DatasetError, match="neither empty nor an interrupted import"):
        import_imagefolder(root, tmp_path / "full")
    with pytest.raises(DatasetError, match="quality"):
        import_imagefolder(root, tmp_path / "out", quality=0)


def test_running_a_finished_import_again_is_a_no_op_and_another_import_is_refused(tmp_path):
    root = jpeg_folder(tmp_path / "f", n=6)
    out = tmp_path / "out"
    first = import_imagefolder(root, out, workers=1)
    before = files_state(out)
    # As a kill between writing the manifest and removing the import's state leaves it.
    (out / STATE_DIR).mkdir()
    (out / STATE_DIR / "plan.json").write_text("{}")
    assert import_imagefolder(root, out, workers=1) == first
    assert files_state(out) == before and not (out / STATE_DIR).exists()  # nothing rewritten, state gone
    other = jpeg_folder(tmp_path / "g", n=4)
    with pytest.raises(DatasetError, match="already a dataset of another import"):
        import_imagefolder(other, out, workers=1)


# ------------------------------------------------------------------------------------------- resume

def _child_import(root: Path, out: Path, errors, limit_bytes: int | None, slow: bool) -> None:
    import resource

    import torch

    import capi_core.data.imagefolder as imf

    torch.set_num_threads(1)  # as the import's own processes do: a forked OpenMP pool would hang

    if limit_bytes is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    if slow:
        real = imf.import_shard
        imf.import_shard = lambda task: (time.sleep(0.3), real(task))[1]
    try:
        imf.import_imagefolder(root, out, shard_rows=4, workers=1)
    except DatasetError as err:
        errors.send(str(err))
        os._exit(1)


def _import_in_child(root: Path, out: Path, limit_bytes: int | None = None, slow: bool = False):
    """``import_imagefolder`` in a forked process, optionally with a file-size limit (writes past it fail
    with EFBIG, as on a full disk) or slowed down between shards so that it can be killed between them.
    Returns the process and a connection that receives its error message."""
    ctx = multiprocessing.get_context("fork")
    errors, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_import, args=(root, out, child_end, limit_bytes, slow))
    proc.start()
    return proc, errors


def test_a_killed_import_resumes_without_redoing_finished_shards(tmp_path):
    root = jpeg_folder(tmp_path / "f", n=40)
    reference = import_imagefolder(root, tmp_path / "reference", shard_rows=4, workers=1)
    out = tmp_path / "ds"
    proc, _ = _import_in_child(root, out, slow=True)
    deadline = time.monotonic() + 60
    while len(list((out / STATE_DIR).glob("train-*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert not (out / MANIFEST).exists()
    done = files_state(out)
    assert 3 <= len(done) < len(reference.shards)

    resumed = import_imagefolder(root, out, shard_rows=4, workers=2)
    assert resumed == reference  # byte-identical shards: same checksums
    assert {k: v for k, v in files_state(out).items() if k in done} == done


def test_a_full_disk_stops_with_the_shard_named_and_resumes(tmp_path):
    root = tmp_path / "f"
    for i in range(24):  # shards of ~4 small JPEGs (a few KB) and one, the last, with a large noisy image
        save(root / "c0" / f"{i:02d}.jpg", photo(24, 32, i), "JPEG", quality=95)
    save(in_last_shard(root, 4), np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8), "JPEG",
         quality=95)
    out = tmp_path / "ds"
    proc, errors = _import_in_child(root, out, limit_bytes=30_000)  # writes past 30 KB fail, as on a full disk
    assert errors.poll(120)
    err = errors.recv()
    proc.join(10)
    assert proc.exitcode == 1 and "cannot write shard" in err and "File too large" in err, err
    assert not (out / MANIFEST).exists() and not list(out.glob(".*.tmp"))
    done = files_state(out)
    assert len(done) >= 1
    records = {json.loads(p.read_text())["shard"]["file"] for p in (out / STATE_DIR).glob("train-*.json")}
    assert records == set(done)  # a record for exactly the shards on disk
    manifest = import_imagefolder(root, out, shard_rows=4, workers=1)
    assert manifest.splits == {"train": 24} and {k: v for k, v in files_state(out).items() if k in done} == done


def test_resuming_with_other_options_is_refused(tmp_path):
    root = jpeg_folder(tmp_path / "f", n=6)
    out = tmp_path / "ds"
    (root / "c0" / "bad.jpg").write_bytes(b"\xff\xd8broken")
    with pytest.raises(DatasetError):
        import_imagefolder(root, out, max_short_side=32, workers=1)
    with pytest.raises(DatasetError, match="interrupted import with max_short_side=32, not 40"):
        import_imagefolder(root, out, max_short_side=40, workers=1)
    assert import_imagefolder(root, out, max_short_side=32, workers=1, on_error="skip").splits == {"train": 6}


# ------------------------------------------------------------------------------------------- the CLI

def test_cli_imports_on_several_processes_with_progress_and_skips_on_request(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main

    root = jpeg_folder(tmp_path / "f", n=12)
    (root / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "ds"
    args = ["data", "import", "imagefolder", str(root), "--out", str(out), "--max-short-side", "40",
            "--shard-rows", "3", "--workers", "2"]
    stopped = CliRunner().invoke(main, args)
    assert stopped.exit_code == 1 and "broken.jpg" in stopped.output and "--on-error skip" in stopped.output
    result = CliRunner().invoke(main, [*args, "--on-error", "skip"])
    assert result.exit_code == 0, result.output
    assert "import: 13/13 images (100.0%)" in result.stderr and "img/s" in result.stderr
    assert "own sizes (shorter side at most 40)" in result.output and "train 12 (" in result.output
    assert "skipped   1 unreadable files" in result.output and "c1/broken.jpg" in result.output
