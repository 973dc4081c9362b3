"""Training and evaluation batches from a Parquet dataset, with CAPI's one-view augmentation (crop + flip).

Training order and augmentation are pure functions of ``(seed, epoch, sample index)``:

- Epoch order: shards are shuffled, grouped into windows of about ``WINDOW_BYTES`` of encoded images,
  and the rows of each window shuffled (a full shuffle when the split fits in one window). Loader
  processes keep only a window's encoded bytes in memory, never the decoded split.
- Ranks: rank ``r`` of ``w`` takes positions ``r, r + w, ...`` of each epoch's order, so the ranks'
  shares are disjoint and together complete. Each rank reads its shares of epoch 0, 1, ... as one
  stream and batch ``s`` is positions ``[s*B, (s+1)*B)`` of it (a batch may straddle two epochs).
- Augmentation: RandomResizedCrop(scale=cfg.crop_scale, ratio=(3/4, 4/3)) with torchvision's
  10-attempt rule, then a horizontal flip with probability 0.5; the random numbers of a sample come
  from a counter-based hash of (seed, epoch, index). Crops are resized for a whole batch at once by
  separable bicubic (a=-0.5, antialiased when shrinking) resampling matrices: ``Wy @ x @ Wx^T``.

So batch ``s`` is the same whatever the number of loader processes, and ``start_step=s`` resumes exactly.
"""

from __future__ import annotations

import io
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from capi_core.config import DataConfig
from capi_core.data import resolve_dataset
from capi_core.data.format import ShardInfo, load_manifest, read_shard

RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 boxes before falling back to a centre crop
WINDOW_BYTES = 256 << 20  # shuffle window, and half of each loader process's shard cache


def shard_paths(dataset_dir: str | Path, split: str) -> list[Path]:
    """The shard files of ``split`` in order (for Ray Data's ``read_parquet``, say)."""
    dataset_dir = Path(dataset_dir)
    return [dataset_dir / s.file for s in load_manifest(dataset_dir).split_shards(split)]


# --------------------------------------------------------------------------------------------------
# Pure per-batch functions

def sample_uniforms(seed: int, epoch: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Uniforms in [0, 1) ``[B, n]``: a splitmix64 hash of (seed, epoch ``[B]``, index ``[B]``, 0..n-1)."""
    def mix(z: np.ndarray) -> np.ndarray:
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        key = mix(np.full(len(index), seed & 0xFFFFFFFFFFFFFFFF, np.uint64) + golden)
        key = mix(key ^ np.asarray(epoch, np.uint64)) + golden
        key = mix(key ^ np.asarray(index, np.uint64))
        z = mix(key[:, None] + golden * np.arange(1, n + 1, dtype=np.uint64))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_boxes(u: np.ndarray, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float] = RATIO) -> np.ndarray:
    """RandomResizedCrop boxes ``[B, 4]`` (top, left, h, w) from uniforms ``u`` ``[B, 4 * ATTEMPTS]``.

    torchvision's rule, vectorised: the first of 10 (area, aspect) draws that fits, else a centre crop.
    """
    u = u.reshape(len(u), ATTEMPTS, 4)
    area = height * width * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    aspect = np.exp(math.log(ratio[0]) + u[..., 1] * (math.log(ratio[1]) - math.log(ratio[0])))
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(1)
    pick = np.arange(len(u)), first
    h, w = h[pick], w[pick]
    top = np.floor(u[..., 2][pick] * (height - h + 1))
    left = np.floor(u[..., 3][pick] * (width - w + 1))
    boxes = np.stack([top, left, h, w], 1)
    # Fallback: the largest centred box whose aspect is clamped into ``ratio``.
    in_ratio = width / height
    cw, ch = (width, round(width / ratio[0])) if in_ratio < ratio[0] else \
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height)
    boxes[~fits.any(1)] = [(height - ch) // 2, (width - cw) // 2, ch, cw]
    return boxes


def _cubic(t: Tensor, a: float = -0.5) -> Tensor:
    """Keys' bicubic kernel (a=-0.5, as PIL)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = a * (((t - 5) * t + 8) * t - 4)
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros(())))


def resample_weights(start: Tensor, length: Tensor, n_in: int, size: int) -> Tensor:
    """Rows that resample the span ``[start, start + length)`` ``[B]`` of an ``n_in`` axis to ``size`` pixels.

    Returns ``[B, size, n_in]``. Pixel k covers [k, k + 1). As in PIL, the kernel widens by the shrink
    factor (antialiasing) and taps outside the axis are dropped and the rest renormalised. Only the
    kernel's taps are evaluated (``[B, size, taps]``), then scattered into the dense rows.
    """
    scale = length / size
    stretch = scale.clamp(min=1.0)
    taps = 2 * math.ceil(2 * float(stretch.max())) + 1
    centre = start[:, None] + (torch.arange(size) + 0.5) * scale[:, None]  # [B, size]
    index = (centre - 2 * stretch[:, None]).floor()[:, :, None] + torch.arange(taps)  # [B, size, taps]
    weights = _cubic((index + 0.5 - centre[:, :, None]) / stretch[:, None, None]) * ((index >= 0) & (index < n_in))
    weights = weights / weights.sum(-1, keepdim=True)
    rows = torch.zeros(len(start), size, n_in)
    return rows.scatter_add_(2, index.clamp(0, n_in - 1).long(), weights)


def resized_crops(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crop ``boxes`` ``[B, 4]`` (top, left, h, w) out of ``images`` ``[B, C, H, W]``, resize to ``size``.

    Returns float32 ``[B, C, size, size]`` on the input's 0-255 scale, clamped; ``flip`` ``[B]`` mirrors.
    """
    _, _, height, width = images.shape
    boxes = boxes.float()
    wy = resample_weights(boxes[:, 0], boxes[:, 2], height, size)
    wx = resample_weights(boxes[:, 1], boxes[:, 3], width, size)
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    out = wy[:, None] @ images.float() @ wx[:, None].transpose(-1, -2)
    return out.clamp_(0, 255)


def decode_images(blobs: Sequence[bytes], channels: int) -> Tensor:
    """PNG/JPEG bytes -> uint8 ``[B, C, H, W]`` (all images of a dataset share one size)."""
    mode = "L" if channels == 1 else "RGB"
    images = []
    for blob in blobs:
        image = Image.open(io.BytesIO(blob))
        images.append(np.asarray(image if image.mode == mode else image.convert(mode)))
    return torch.from_numpy(np.stack(images).reshape(len(images), *images[0].shape[:2], channels)).permute(0, 3, 1, 2)


def normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """0-255 ``[B, C, H, W]`` -> ``(x / 255 - mean) / std`` per channel, in place."""
    mean_t = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    std_t = torch.tensor(std, dtype=x.dtype)[:, None, None]
    return x.div_(255.0).sub_(mean_t).div_(std_t)


def decode_augment(blobs: Sequence[bytes], epoch: np.ndarray, index: np.ndarray, *, img_size: int, channels: int,
                   mean: Sequence[float], std: Sequence[float], crop_scale: tuple[float, float], hflip: bool,
                   seed: int) -> Tensor:
    """Decoded, augmented, normalised images float32 ``[B, C, img_size, img_size]``.

    A pure function of its arguments: ``epoch`` and ``index`` ``[B]`` pick each sample's random numbers
    (``train_batches`` passes the sample's row in its split; any per-sample integer key works), so a
    Ray Data ``map_batches`` over ``shard_paths`` can call it as well.
    """
    images = decode_images(blobs, channels)
    u = sample_uniforms(seed, epoch, index, 4 * ATTEMPTS + 1)
    boxes = torch.from_numpy(crop_boxes(u[:, :-1], images.shape[2], images.shape[3], crop_scale))
    flip = torch.from_numpy(u[:, -1] < 0.5) if hflip else None
    return normalise(resized_crops(images, boxes, img_size, flip), mean, std)


# --------------------------------------------------------------------------------------------------
# Order and sharding

def epoch_order(shards: Sequence[ShardInfo], seed: int, epoch: int, window_bytes: int) -> np.ndarray:
    """The split's sample indices ``[N]`` in the order of ``epoch``: shuffled shards, then rows per window."""
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch])
    offsets = np.cumsum([0] + [s.rows for s in shards])
    windows, current, size = [], [], 0
    for s in rng.permutation(len(shards)):
        if current and size + shards[s].bytes > window_bytes:
            windows.append(current)
            current, size = [], 0
        current.append(s)
        size += shards[s].bytes
    windows.append(current)
    rows = [np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in w]) for w in windows]
    return np.concatenate([rng.permutation(r) for r in rows])


def rank_positions(step: int, batch_size: int, split_size: int, rank: int,
                   world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and positions in the epoch order ``[B]`` of batch ``step`` of ``rank``'s stream."""
    share = len(range(rank, split_size, world_size))
    p = step * batch_size + np.arange(batch_size)
    return p // share, rank + (p % share) * world_size


class TrainBatches(torch.utils.data.Dataset):
    """Item ``s`` is batch ``s`` of one rank: (images float32 ``[B, C, S, S]``, labels int64 ``[B]``)."""

    def __init__(self, dataset_dir: Path, cfg: DataConfig, img_size: int, batch_size: int, rank: int,
                 world_size: int, seed: int):
        self.dir, self.cfg, self.img_size, self.batch_size = dataset_dir, cfg, img_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.manifest = load_manifest(dataset_dir)
        self.shards = self.manifest.split_shards(cfg.split)
        self.offsets = np.cumsum([0] + [s.rows for s in self.shards])
        if self.offsets[-1] < world_size:
            raise ValueError(f"split {cfg.split!r} of {dataset_dir} has {self.offsets[-1]} images, "
                             f"fewer than the {world_size} ranks")
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache: OrderedDict[int, tuple[list[bytes], np.ndarray]] = OrderedDict()

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders[epoch] = epoch_order(self.shards, self.seed, epoch, WINDOW_BYTES)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def _shard(self, i: int) -> tuple[list[bytes], np.ndarray]:
        if i in self._cache:
            self._cache.move_to_end(i)
        else:
            table = read_shard(self.dir / self.shards[i].file, self.shards[i], columns=["image", "label"])
            self._cache[i] = table.column("image").to_pylist(), table.column("label").to_numpy()
            while sum(self.shards[j].bytes for j in self._cache) > 2 * WINDOW_BYTES and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return self._cache[i]

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        epochs, positions = rank_positions(step, self.batch_size, int(self.offsets[-1]), self.rank, self.world_size)
        index = np.empty_like(positions)
        for e in np.unique(epochs):
            index[epochs == e] = self._order(int(e))[positions[epochs == e]]
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        row = index - self.offsets[shard]
        blobs, labels = [], np.empty(len(index), np.int64)
        for k, (s, r) in enumerate(zip(shard, row)):
            images, shard_labels = self._shard(int(s))
            blobs.append(images[r])
            labels[k] = shard_labels[r]
        x = decode_augment(blobs, epochs, index, img_size=self.img_size, channels=self.manifest.channels,
                           mean=self.manifest.mean, std=self.manifest.std, crop_scale=self.cfg.crop_scale,
                           hflip=self.cfg.hflip, seed=self.seed)
        return x, torch.from_numpy(labels)


class _Steps(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def train_batches(cfg: DataConfig, img_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                  seed: int = 0, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Infinite (images float32 ``[B, C, img_size, img_size]``, labels int64 ``[B]``) for one rank.

    ``B = batch_size`` per rank. Batches are decoded and augmented by ``cfg.loader_workers`` processes
    (0: in this process); batch ``s`` depends only on (dataset, cfg, seed, rank, world_size, s).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    dataset = TrainBatches(resolve_dataset(cfg.dataset, cfg.cache_dir), cfg, img_size, batch_size, rank,
                           world_size, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=_Steps(start_step),
                                         num_workers=cfg.loader_workers)
    return iter(loader)


# --------------------------------------------------------------------------------------------------
# Evaluation

def stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of ``limit`` samples, classes as balanced as they allow, drawn with ``seed``."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    lab = labels[perm]
    by_class = np.argsort(lab, kind="stable")
    rank_sorted = np.arange(len(lab)) - np.searchsorted(lab[by_class], lab[by_class], side="left")
    rank_in_class = np.empty_like(rank_sorted)
    rank_in_class[by_class] = rank_sorted
    return np.sort(perm[np.lexsort((lab, rank_in_class))[:limit]])


def load_split(dataset_dir: str | Path, split: str, img_size: int, limit: int | None = None,
               seed: int = 0) -> tuple[Tensor, Tensor]:
    """Evaluation images float32 ``[N, C, img_size, img_size]`` (resized, normalised) and labels ``[N]``.

    With ``limit``, a class-stratified subset of ``limit`` samples drawn with ``seed``, in split order.
    """
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    shards = manifest.split_shards(split)
    tables = [read_shard(dataset_dir / s.file, s, columns=["label"]) for s in shards]
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
    keep = np.arange(len(labels)) if limit is None or limit >= len(labels) else stratified_subset(labels, limit, seed)
    offsets = np.cumsum([0] + [s.rows for s in shards])
    x = torch.empty(len(keep), manifest.channels, img_size, img_size)
    h, w = manifest.image_size
    done = 0
    for i, s in enumerate(shards):
        rows = keep[(keep >= offsets[i]) & (keep < offsets[i + 1])] - offsets[i]
        if not len(rows):
            continue
        blobs = read_shard(dataset_dir / s.file, s, columns=["image"]).column("image").take(rows).to_pylist()
        for chunk in range(0, len(blobs), 1024):
            images = decode_images(blobs[chunk:chunk + 1024], manifest.channels)
            n = len(images)
            if (h, w) != (img_size, img_size):
                full = torch.tensor([[0.0, 0.0, h, w]]).expand(n, 4)
                out = resized_crops(images, full, img_size)
            else:
                out = images.float()
            x[done:done + n] = normalise(out, manifest.mean, manifest.std)
            done += n
    return x, torch.from_numpy(labels[keep])
