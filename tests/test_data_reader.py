"""The training reader: sharding, deterministic order and augmentation, resume, loader processes, eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import capi_core.data.reader as reader
from capi_core.config import DataConfig
from capi_core.data import DatasetError, load_manifest
from capi_core.data.format import ShardInfo
from capi_core.data.imagefolder import import_imagefolder
from capi_core.data.importers import import_idx
from capi_core.data.reader import (
    EncodedBatch,
    TrainBatches,
    crop,
    crop_boxes,
    decode_augment,
    decode_on_device,
    epoch_order,
    load_split,
    sample_uniforms,
    shard_paths,
    train_batches,
)
from synthetic import write_idx

N = 50  # images; label i is image i, so labels identify samples


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """50 random 12x12 grey images in 8 shards, labelled 0..49, plus the source pixels."""
    tmp = tmp_path_factory.mktemp("numbered")
    pixels = np.random.default_rng(0).integers(0, 256, (N, 12, 12), dtype=np.uint8)
    import_idx(write_idx(tmp / "images", pixels), write_idx(tmp / "labels", np.arange(N, dtype=np.uint8)),
               tmp / "ds", shard_rows=7)
    return tmp / "ds", pixels


@pytest.fixture
def small_windows(monkeypatch):
    """Shuffle windows of about two shards, so the windowed order and the shard cache are exercised."""
    monkeypatch.setattr(reader, "WINDOW_BYTES", 2 * 1400)


def take(cfg, steps, **kwargs):
    """``steps`` batches of ``train_batches``: images ``[steps, B, C, S, S]``, labels ``[steps, B]``."""
    it = train_batches(cfg, **kwargs)
    batches = [next(it) for _ in range(steps)]
    return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])


def cfg_for(dataset, **kwargs):
    return DataConfig(dataset=str(dataset), **{"loader_workers": 0, **kwargs})


@pytest.mark.parametrize("decode", ["cpu", "memory"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_get_disjoint_complete_shares_every_epoch(numbered, small_windows, world_size, decode):
    dataset, _ = numbered
    for epoch in (0, 1):
        shares = []
        for rank in range(world_size):
            share = len(range(rank, N, world_size))
            _, labels = take(cfg_for(dataset, decode=decode), -(-2 * share // 4), img_size=12, batch_size=4, rank=rank,
                             world_size=world_size)
            shares.append(set(labels.flatten()[epoch * share:(epoch + 1) * share].tolist()))
            assert len(shares[-1]) == share  # no repeat inside a rank's epoch
        assert set().union(*shares) == set(range(N)) and sum(map(len, shares)) == N


@pytest.mark.parametrize("decode", ["cpu", "memory"])
def test_order_is_a_function_of_seed_and_epoch(numbered, small_windows, decode):
    dataset, _ = numbered
    x, labels = take(cfg_for(dataset, decode=decode), 10, img_size=12, batch_size=10, seed=3)
    epochs = labels.reshape(2, N)
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist()) == list(range(N))
    assert not torch.equal(epochs[0], epochs[1])
    x2, labels2 = take(cfg_for(dataset, decode=decode), 10, img_size=12, batch_size=10, seed=3)
    assert torch.equal(labels, labels2) and torch.equal(x, x2)
    _, other = take(cfg_for(dataset, decode=decode), 5, img_size=12, batch_size=10, seed=4)
    assert not torch.equal(other.flatten(), epochs[0])


@pytest.mark.parametrize("decode", ["cpu", "memory"])
def test_start_step_resumes_the_uninterrupted_sequence(numbered, small_windows, decode):
    dataset, _ = numbered
    kwargs = dict(img_size=10, batch_size=8, rank=1, world_size=2, seed=7)  # 25 samples per epoch: batches straddle
    x, y = take(cfg_for(dataset, decode=decode), 9, **kwargs)
    x_resumed, y_resumed = take(cfg_for(dataset, decode=decode), 4, start_step=5, **kwargs)
    assert torch.equal(x[5:], x_resumed) and torch.equal(y[5:], y_resumed)


def test_loader_processes_do_not_change_batches(numbered, small_windows):
    dataset, _ = numbered
    kwargs = dict(img_size=12, batch_size=6, seed=1, start_step=2)
    x0, y0 = take(cfg_for(dataset, loader_workers=0, decode="cpu"), 5, **kwargs)
    x2, y2 = take(cfg_for(dataset, loader_workers=2, decode="cpu"), 5, **kwargs)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)


@pytest.mark.parametrize("decode", ["cpu", "memory"])
def test_batches_are_normalised_flipped_crops_of_the_source(numbered, decode):
    dataset, pixels = numbered
    manifest = load_manifest(dataset)
    normalised = (torch.from_numpy(pixels).float()[:, None] / 255 - manifest.mean[0]) / manifest.std[0]
    # scale (1, 1) on square images: every draw fails, torchvision's fallback is the whole image.
    x, y = take(cfg_for(dataset, crop_scale=(1.0, 1.0), hflip=True, decode=decode), 4, img_size=12, batch_size=25)
    x, y = x.flatten(0, 1), y.flatten()
    source = normalised[y]
    same = (x - source).abs().flatten(1).amax(1) < 1e-5
    mirrored = (x - source.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert torch.all(same | mirrored) and 0.25 < mirrored.float().mean() < 0.75
    x, y = take(cfg_for(dataset, crop_scale=(1.0, 1.0), hflip=False, decode=decode), 1, img_size=12, batch_size=25)
    torch.testing.assert_close(x[0], normalised[y[0]], atol=1e-5, rtol=0)


def test_crop_boxes_follow_random_resized_crop():
    u = sample_uniforms(0, np.zeros(4000, np.int64), np.arange(4000), 4 * reader.ATTEMPTS)
    top, left, h, w = crop_boxes(u, 20, 30, (0.3, 0.9)).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 20).all() and (left + w <= 30).all()
    area = h * w / 600
    assert area.min() > 0.3 - 0.05 and area.max() < 0.9 + 0.05
    assert (w / h).min() > 3 / 4 - 0.1 and (w / h).max() < 4 / 3 + 0.15
    # Same distribution as torchvision's (first fitting draw; small crops are favoured).
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    tv = np.array([RandomResizedCrop.get_params(torch.zeros(1, 20, 30), [0.3, 0.9], [3 / 4, 4 / 3])
                   for _ in range(4000)])
    assert abs(area.mean() - (tv[:, 2] * tv[:, 3] / 600).mean()) < 0.01
    assert abs(np.log(w / h).mean() - np.log(tv[:, 3] / tv[:, 2]).mean()) < 0.02
    assert len(set(top.tolist())) > 5 and len(set(left.tolist())) > 10
    # No draw fits a 10x20 image at full area: centre crop with the aspect clamped to 4/3.
    fallback = crop_boxes(u[:3], 10, 20, (1.0, 1.0))
    assert fallback.tolist() == [[0, 3, 10, 13]] * 3


def test_sample_uniforms_depend_on_every_key():
    index = np.arange(1000)
    base = sample_uniforms(0, np.zeros(1000), index, 3)
    assert base.shape == (1000, 3) and 0 <= base.min() and base.max() < 1 and abs(base.mean() - 0.5) < 0.03
    assert np.array_equal(base, sample_uniforms(0, np.zeros(1000), index, 3))
    for other in (sample_uniforms(1, np.zeros(1000), index, 3), sample_uniforms(0, np.ones(1000), index, 3),
                  sample_uniforms(0, np.zeros(1000), index + 1, 3)):
        assert (other != base).mean() > 0.99


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image: a few random low-frequency waves (no noise for bicubic to overshoot)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width] / max(height, width)
    waves = sum(np.sin(2 * np.pi * (rng.uniform(0, 4) * yy + rng.uniform(0, 4) * xx) + rng.uniform(0, 6))[..., None]
                * rng.uniform(-40, 40, 3) for _ in range(4))
    return np.clip(128 + waves, 0, 255).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("height,width,box,size", [(30, 40, (0, 0, 30, 40), 24), (40, 30, (2, 3, 35, 20), 12),
                                                   (20, 20, (5, 1, 10, 12), 20), (18, 27, (0, 0, 18, 27), 64)])
def test_crops_match_pil_bicubic_of_the_cropped_image(height, width, box, size):
    """torchvision's RandomResizedCrop on a PIL image: crop, then resize bicubic (PIL's antialiased kernel)."""
    pixels = smooth_image(height, width)
    top, left, h, w = box
    expected = np.asarray(Image.fromarray(pixels).crop((left, top, left + w, top + h)).resize(
        (size, size), Image.Resampling.BICUBIC)).astype(int)
    got = crop(encoded(pixels, "PNG"), box, size, 3).permute(1, 2, 0).numpy().astype(int)
    assert got.shape == (size, size, 3) and np.abs(got - expected).max() <= 2


def test_large_jpeg_crops_decode_at_a_reduced_scale_close_to_the_full_decode():
    pixels = smooth_image(600, 800, seed=1)
    blob = encoded(pixels, "JPEG", quality=95)
    box = (50, 100, 480, 600)  # >= 4x the output in both directions: decoded at 1/4
    full = np.asarray(Image.open(__import__("io").BytesIO(blob)).crop((100, 50, 700, 530)).resize(
        (112, 112), Image.Resampling.BICUBIC)).astype(float)
    got = crop(blob, box, 112, 3).permute(1, 2, 0).numpy().astype(float)
    assert np.abs(got - full).mean() < 1.5 and np.abs(got - full).max() < 12
    from capi_core.data.images import reduction

    assert reduction(480, 600, 112, 112) == 4 and reduction(200, 600, 112, 112) == 1


def test_decode_augment_is_a_pure_function(numbered):
    dataset, _ = numbered
    manifest = load_manifest(dataset)
    import pyarrow.parquet as pq

    blobs = pq.read_table(shard_paths(dataset, "train")[0], columns=["image"]).column("image").to_pylist()
    kwargs = dict(img_size=8, channels=1, mean=manifest.mean, std=manifest.std, crop_scale=(0.5, 1.0),
                  hflip=True, seed=0)
    a = decode_augment(blobs, np.zeros(7), np.arange(7), **kwargs)
    assert a.shape == (7, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, decode_augment(blobs, np.zeros(7), np.arange(7), **kwargs))
    assert not torch.equal(a, decode_augment(blobs, np.ones(7), np.arange(7), **kwargs))


def test_epoch_order_shuffles_within_windows_of_whole_shards():
    shards = [ShardInfo(file=f"s{i}", split="train", rows=5, bytes=100, sha256="0" * 64) for i in range(6)]
    order = epoch_order(shards, seed=0, epoch=0, window_bytes=200)
    assert sorted(order.tolist()) == list(range(30))
    windows = [set((order[i:i + 10] // 5).tolist()) for i in range(0, 30, 10)]
    assert all(len(w) == 2 for w in windows) and set().union(*windows) == set(range(6))
    assert not np.array_equal(order, epoch_order(shards, 0, 1, 200))
    full = epoch_order(shards, seed=0, epoch=0, window_bytes=10**9)
    assert sorted(full.tolist()) == list(range(30)) and len(set((full[:10] // 5).tolist())) > 2


def test_load_split_returns_exact_pixels_and_stratified_subsets(numbered, tmp_path):
    dataset, pixels = numbered
    manifest = load_manifest(dataset)
    x, y = load_split(dataset, "train", 12)
    assert y.tolist() == list(range(N))
    normalised = (torch.from_numpy(pixels).float()[:, None] / 255 - manifest.mean[0]) / manifest.std[0]
    torch.testing.assert_close(x, normalised)
    small, _ = load_split(dataset, "train", 6)
    assert small.shape == (N, 1, 6, 6)

    labels = np.random.default_rng(0).integers(0, 3, 60).astype(np.uint8)
    images = np.random.default_rng(1).integers(0, 256, (60, 4, 4), dtype=np.uint8)
    import_idx(write_idx(tmp_path / "i", images), write_idx(tmp_path / "l", labels), tmp_path / "three", shard_rows=9)
    _, sub = load_split(tmp_path / "three", "train", 4, limit=12, seed=0)
    assert torch.bincount(sub).tolist() == [4, 4, 4]
    x1, again = load_split(tmp_path / "three", "train", 4, limit=12, seed=0)
    x2, other = load_split(tmp_path / "three", "train", 4, limit=12, seed=1)
    assert torch.equal(sub, again) and not torch.equal(x1, x2)
    with pytest.raises(DatasetError, match="has no split 'val'"):
        load_split(tmp_path / "three", "val", 4)


def test_rgb_images_of_another_size(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(5):
            (tmp_path / "f" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / "f" / cls / f"{i}.jpg")
    import_imagefolder(tmp_path / "f", tmp_path / "ds")
    x, y = take(cfg_for(tmp_path / "ds"), 2, img_size=8, batch_size=4)
    assert x.shape == (2, 4, 3, 8, 8) and set(y.flatten().tolist()) <= {0, 1}
    x, y = load_split(tmp_path / "ds", "train", 8)
    assert x.shape == (10, 3, 8, 8) and sorted(y.tolist()) == [0] * 5 + [1] * 5


def test_damaged_shard_stops_training_with_its_name(numbered, tmp_path):
    import shutil

    dataset = tmp_path / "copy"
    shutil.copytree(numbered[0], dataset)
    shard = dataset / "train-00003.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="train-00003.parquet has sha256"):
        take(cfg_for(dataset), 2, img_size=12, batch_size=N)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        train_batches(cfg_for(dataset), 12, 4, rank=2, world_size=2)


# ------------------------------------------------------------------------------- images of their own sizes

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An image folder of JPEGs of three sizes (landscape, portrait, square), imported as they are."""
    tmp = tmp_path_factory.mktemp("photos")
    sizes = [(30, 40), (40, 30), (36, 36)]
    for i in range(12):
        path = tmp / "f" / f"c{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(*sizes[i % 3], seed=i)).save(path, quality=95)
    import_imagefolder(tmp / "f", tmp / "ds", workers=1)
    return tmp / "ds"


def test_crops_are_cut_from_the_whole_stored_image(tmp_path):
    """A 4:3 image at crop scale (1, 1): no draw fits, and torchvision's fallback is the whole image, both
    halves of it, not a centre square."""
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    (tmp_path / "f" / "a").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "f" / "a" / "0.png")
    import_imagefolder(tmp_path / "f", tmp_path / "ds", lossless=True, workers=1)
    manifest = load_manifest(tmp_path / "ds")
    assert manifest.image_size == (30, 40)
    x, _ = take(cfg_for(tmp_path / "ds", crop_scale=(1.0, 1.0), hflip=False), 1, img_size=16, batch_size=2)
    raw = x[0, 0, 0] * manifest.std[0] + manifest.mean[0]  # first channel, back on the 0-1 scale
    assert (raw[:, :7] < 0.01).all() and (raw[:, -7:] > 0.99).all()


def test_images_of_several_sizes_make_batches_of_one_size(photos):
    x, y = take(cfg_for(photos), 3, img_size=24, batch_size=8)
    assert x.shape == (3, 8, 3, 24, 24) and x.dtype == torch.float32 and torch.isfinite(x).all()
    x2, y2 = take(cfg_for(photos, loader_workers=2), 3, img_size=24, batch_size=8)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    evaluation, labels = load_split(photos, "train", 20)
    assert evaluation.shape == (12, 3, 20, 20) and sorted(labels.tolist()) == [0] * 6 + [1] * 6


def test_decoding_in_the_training_process_gives_the_loader_processes_batches(photos):
    """The ``decode="cuda"`` path (loader processes hand over bytes and boxes; the training process decodes
    the batch with decode_jpeg and crops on its device), run on the CPU: the same batches, through
    loader processes too. (At 24 px no crop is twice the output, so the loader processes decode at full
    scale as the device path always does.)"""
    cfg = cfg_for(photos, crop_scale=(0.3, 1.0))
    kwargs = dict(dataset_dir=photos, cfg=cfg, img_size=24, batch_size=8, rank=0, world_size=1, seed=3)
    host = TrainBatches(**kwargs)
    loader = torch.utils.data.DataLoader(TrainBatches(**kwargs, encoded=True), batch_size=None, num_workers=2,
                                         sampler=range(3))
    for step, batch in enumerate(loader):
        assert isinstance(batch, EncodedBatch)
        x, labels = host[step]
        assert torch.equal(decode_on_device(batch, 24, 3, torch.device("cpu")), x)
        assert torch.equal(batch.labels, labels)
    with pytest.raises(ValueError, match="data.decode 'cuda' needs training on a CUDA device"):
        train_batches(cfg_for(photos, decode="cuda"), 16, 4)


def test_auto_decodes_on_the_gpu_only_for_jpeg_datasets_on_cuda(photos, numbered):
    from capi_core.data.reader import resolve_decode

    jpegs, pngs = load_manifest(photos), load_manifest(numbered[0])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device name: no GPU needed for the rule
    assert resolve_decode("auto", cuda, jpegs) == "cuda" and resolve_decode("auto", cpu, jpegs) == "cpu"
    # An IDX import is small and of one size: held decoded in memory, on any device.
    assert resolve_decode("auto", cuda, pngs) == "memory" and resolve_decode("auto", cpu, pngs) == "memory"
    assert resolve_decode("cpu", cuda, jpegs) == "cpu" and resolve_decode("cuda", cuda, pngs) == "cuda"


def test_memory_batches_are_the_loader_batches_within_a_grey_level_or_two(numbered, small_windows):
    """Same samples, boxes and flips; the batched resize rounds like torch's uint8 kernel up to its
    fixed-point weights (random 12x12 noise is the hardest case: the cubic overshoots everywhere)."""
    dataset, _ = numbered
    std = load_manifest(dataset).std[0]
    kwargs = dict(img_size=16, batch_size=10, seed=5, start_step=3)
    x_cpu, y_cpu = take(cfg_for(dataset, decode="cpu", crop_scale=(0.3, 1.0)), 5, **kwargs)
    x_mem, y_mem = take(cfg_for(dataset, decode="memory", crop_scale=(0.3, 1.0)), 5, **kwargs)
    assert torch.equal(y_cpu, y_mem)
    levels = ((x_cpu - x_mem).abs() * std * 255).round()
    assert levels.max() <= 2 and (levels > 0).float().mean() < 0.02


def test_memory_decoding_needs_one_image_size_and_a_small_split(photos, numbered, monkeypatch):
    with pytest.raises(ValueError, match="data.decode 'memory' needs a dataset whose images share one size"):
        train_batches(cfg_for(photos, decode="memory"), 16, 4)
    monkeypatch.setattr(reader, "MEMORY_SPLIT_BYTES", 1000)  # the numbered split is 50 x 144 bytes
    assert reader.resolve_decode("auto", torch.device("cpu"), load_manifest(numbered[0])) == "cpu"
    with pytest.raises(ValueError, match="decodes to 0 MiB, above the 0 MiB held in memory"):
        train_batches(cfg_for(numbered[0], decode="memory"), 12, 4)


def test_a_memory_split_is_decoded_once_per_process(numbered):
    reader.decoded_split.cache_clear()
    for _ in range(2):
        take(cfg_for(numbered[0], decode="memory"), 2, img_size=12, batch_size=4)
    info = reader.decoded_split.cache_info()
    assert info.misses == 1 and info.hits >= 3


def test_format_1_datasets_still_read(tmp_path):
    """A dataset written before images kept their own sizes: no height/width columns, one image_size."""
    import hashlib
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 10), dtype=np.uint8)
    blobs = [encoded(p, "PNG") for p in pixels]
    table = pa.table({"id": [str(i) for i in range(6)], "image": blobs, "label": list(range(6)), "split": ["train"] * 6})
    (tmp_path / "old").mkdir()
    pq.write_table(table, tmp_path / "old" / "train-00000.parquet")
    data = (tmp_path / "old" / "train-00000.parquet").read_bytes()
    manifest = {"format_version": 1, "name": "old", "class_names": [str(i) for i in range(6)], "image_size": [10, 10],
                "channels": 1, "mean": [0.5], "std": [0.25], "stats_split": "train", "splits": {"train": 6},
                "shards": [{"file": "train-00000.parquet", "split": "train", "rows": 6, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()}]}
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    x, y = load_split(tmp_path / "old", "train", 10)
    torch.testing.assert_close(x[:, 0], (torch.from_numpy(pixels).float() / 255 - 0.5) / 0.25)
    batches, _ = take(cfg_for(tmp_path / "old"), 2, img_size=8, batch_size=3)
    assert batches.shape == (2, 3, 1, 8, 8)
