"""Training and evaluation batches from a Parquet dataset, with CAPI's one-view augmentation (crop + flip).

Training order and augmentation are pure functions of ``(seed, epoch, sample index)``:

- Epoch order: shards are shuffled, grouped into windows of about ``WINDOW_BYTES`` of encoded images,
  and the rows of each window shuffled (a full shuffle when the split fits in one window). Loader
  processes keep only a window's encoded bytes in memory, never the decoded split.
- Ranks: rank ``r`` of ``w`` takes positions ``r, r + w, ...`` of each epoch's order, so the ranks'
  shares are disjoint and together complete. Each rank reads its shares of epoch 0, 1, ... as one
  stream and batch ``s`` is positions ``[s*B, (s+1)*B)`` of it (a batch may straddle two epochs).
- Augmentation: RandomResizedCrop(scale=cfg.crop_scale, ratio=(3/4, 4/3)) of the whole stored image
  (stored images keep their aspect ratio), with torchvision's 10-attempt rule, then a horizontal flip
  with probability 0.5; the random numbers of a sample come from a counter-based hash of (seed,
  epoch, index). Each crop is cut from its decoded image and resized on its own (antialiased bicubic,
  rounded to uint8), as torchvision does on PIL images. A JPEG whose crop is at least twice the output
  size in both directions is decoded at a reduced DCT scale first (``images.decode_reduced``, the box
  scaled with it), which is much cheaper for large stored images.
- Where decoding runs (``DataConfig.decode``): ``"cpu"``, in the loader processes; ``"cuda"``, the
  loader processes only read the bytes and draw the boxes, and the training process decodes the whole
  batch with nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``) and crops on the GPU; ``"memory"``,
  the training process decodes the whole split once (a small dataset whose images share one size,
  such as Fashion-MNIST: 47 MB) and cuts every batch's crops from it in one batched product
  (``resample.crop_resize``, no loader process). ``"auto"`` is ``"memory"`` for a split that decodes
  to at most ``MEMORY_SPLIT_BYTES``, else ``"cuda"`` when training on a CUDA device from JPEGs, else
  ``"cpu"`` (``resolve_decode``). The decoder is part of the function: CPU and GPU decoding of a JPEG
  differ by IDCT rounding, and the batched resize by a grey level here and there, so a run resumes
  exactly under the same ``decode``.
- Batches travel as uint8 and are normalised (``(x / 255 - mean) / std``, float32) on the training
  device, a quarter of the bytes of float32 batches between processes and to the GPU.

So batch ``s`` is the same whatever the number of loader processes, and ``start_step=s`` resumes exactly.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.io import decode_jpeg

from capi_core.config import DataConfig
from capi_core.data import images, resolve_dataset
from capi_core.data.format import DatasetError, Manifest, ShardInfo, load_manifest, read_shard
from capi_core.data.resample import crop_resize
from capi_core.errors import CapiError

RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 boxes before falling back to a centre crop
WINDOW_BYTES = 256 << 20  # shuffle window, and half of each loader process's shard cache
# Splits that decode to at most this are held whole in the training process (decode "memory"). Measured
# on Fashion-MNIST (60,000 28x28 images, 47 MB, decoded in ~3 s once per process), a batch of 64 crops
# costs ~1 ms this way against ~7 ms decoded and resized image by image, which on 2 cores a loader
# process took from the training threads.
MEMORY_SPLIT_BYTES = 512 << 20


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


def crop_boxes(u: np.ndarray, height, width, scale: tuple[float, float],
               ratio: tuple[float, float] = RATIO) -> np.ndarray:
    """RandomResizedCrop boxes ``[B, 4]`` (top, left, h, w) from uniforms ``u`` ``[B, 4 * ATTEMPTS]``.

    ``height`` and ``width`` are each image's (``[B]``) or one for all. torchvision's rule,
    vectorised: the first of 10 (area, aspect) draws that fits, else a centre crop.
    """
    u = u.reshape(len(u), ATTEMPTS, 4)
    height = np.broadcast_to(np.asarray(height, np.float64), (len(u),))
    width = np.broadcast_to(np.asarray(width, np.float64), (len(u),))
    area = (height * width)[:, None] * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    aspect = np.exp(math.log(ratio[0]) + u[..., 1] * (math.log(ratio[1]) - math.log(ratio[0])))
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.argmax(1)
    pick = np.arange(len(u)), first
    h, w = h[pick], w[pick]
    top = np.floor(u[..., 2][pick] * (height - h + 1))
    left = np.floor(u[..., 3][pick] * (width - w + 1))
    boxes = np.stack([top, left, h, w], 1)
    # Fallback: the largest centred box whose aspect is clamped into ``ratio``.
    in_ratio = width / height
    cw = np.where(in_ratio < ratio[0], width, np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width))
    ch = np.where(in_ratio < ratio[0], np.round(width / ratio[0]), height)
    centre = np.stack([(height - ch) // 2, (width - cw) // 2, ch, cw], 1)
    return np.where(fits.any(1)[:, None], boxes, centre).astype(np.int64)


def centre_boxes(height, width) -> np.ndarray:
    """The central square of each image, its side the shorter side: ``[B, 4]`` (top, left, h, w)."""
    height, width = np.asarray(height, np.int64), np.asarray(width, np.int64)
    side = np.minimum(height, width)
    return np.stack([(height - side) // 2, (width - side) // 2, side, side], 1)


def decode_box(blob: bytes, box: Sequence[int], size: int, channels: int) -> tuple[Tensor, tuple[int, int, int, int]]:
    """``blob`` decoded, and ``box`` (top, left, h, w) in the decoded pixels: a JPEG is decoded at the
    largest DCT reduction that keeps the box at least ``size`` on each side, the box scaled with it."""
    top, left, h, w = (int(v) for v in box)
    scale = images.reduction(h, w, size, size) if images.is_jpeg(blob) else 1
    x = images.decode_reduced(blob, channels, scale)
    if scale > 1:
        top, left = top // scale, left // scale
        h, w = min(round(h / scale), x.shape[1] - top), min(round(w / scale), x.shape[2] - left)
    return x, (top, left, h, w)


def _put_crop(out: Tensor, i: int, x: Tensor, box: Sequence[int], flip: bool) -> None:
    """``out[i]`` (``out`` uint8 [B, S, S, C]) = box of ``x`` [C, H, W] resized, mirrored if ``flip``."""
    top, left, h, w = box
    y = images.resize(x[:, top:top + h, left:left + w], out.shape[1:3]).permute(1, 2, 0)
    out[i] = y.flip(1) if flip else y


def crop_batch(blobs: Sequence[bytes], boxes: np.ndarray, flips: np.ndarray | None, size: int,
               channels: int) -> Tensor:
    """uint8 ``[B, channels, size, size]`` (channels-last in memory): each box cut from its decoded image
    (``decode_box``), resized, and mirrored where ``flips`` says."""
    out = torch.empty(len(blobs), size, size, channels, dtype=torch.uint8)
    for i, (blob, box) in enumerate(zip(blobs, boxes)):
        x, box = decode_box(blob, box, size, channels)
        _put_crop(out, i, x, box, flips is not None and bool(flips[i]))
    return out.permute(0, 3, 1, 2)


def crop(blob: bytes, box: Sequence[int], size: int, channels: int) -> Tensor:
    """Box ``(top, left, h, w)`` of the stored image ``blob`` resized to uint8 ``[channels, size, size]``."""
    return crop_batch([blob], np.asarray([box]), None, size, channels)[0]


def normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (or 0-255 float) ``[B, C, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel, on x's device.

    Computed as ``x * (1 / (255 std)) - mean / std`` on a contiguous copy: two passes over the batch
    instead of three, and broadcasting over channels-last memory was 2x slower (measured on CPU).
    """
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).float().to(x.device)[:, None, None]
    shift = (-torch.tensor(mean, dtype=torch.float64) / std_t).float().to(x.device)[:, None, None]
    return x.contiguous().float().mul_(scale).add_(shift)


def augment_params(seed: int, epoch: np.ndarray, index: np.ndarray, height, width,
                   crop_scale: tuple[float, float], hflip: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Each sample's crop box ``[B, 4]`` and flip ``[B]`` (None without hflip): the whole augmentation."""
    u = sample_uniforms(seed, epoch, index, 4 * ATTEMPTS + 1)
    return crop_boxes(u[:, :-1], height, width, crop_scale), (u[:, -1] < 0.5) if hflip else None


def image_sizes(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) of encoded images, from their headers."""
    sizes = [images.pil_open(b).size for b in blobs]
    return np.array([s[1] for s in sizes]), np.array([s[0] for s in sizes])


def decode_augment(blobs: Sequence[bytes], epoch: np.ndarray, index: np.ndarray, *, img_size: int, channels: int,
                   mean: Sequence[float], std: Sequence[float], crop_scale: tuple[float, float], hflip: bool,
                   seed: int, sizes: tuple[np.ndarray, np.ndarray] | None = None) -> Tensor:
    """Decoded, augmented, normalised images float32 ``[B, C, img_size, img_size]`` on the CPU.

    A pure function of its arguments: ``epoch`` and ``index`` ``[B]`` pick each sample's random numbers
    (``train_batches`` passes the sample's row in its split; any per-sample integer key works), so a
    Ray Data ``map_batches`` over ``shard_paths`` can call it as well. ``sizes`` (heights, widths) are
    read from the headers when not given.
    """
    heights, widths = sizes if sizes is not None else image_sizes(blobs)
    boxes, flips = augment_params(seed, epoch, index, heights, widths, crop_scale, hflip)
    return normalise(crop_batch(blobs, boxes, flips, img_size, channels), mean, std)


@dataclass
class EncodedBatch:
    """A batch still encoded, for decoding in the training process (``decode="cuda"``)."""

    data: Tensor  # uint8 [total bytes]: the images' bytes end to end
    offsets: Tensor  # int64 [B + 1]
    boxes: Tensor  # int64 [B, 4] (top, left, h, w) in the stored images
    flips: Tensor | None  # bool [B]
    labels: Tensor  # int64 [B]

    @classmethod
    def pack(cls, blobs: Sequence[bytes], boxes: np.ndarray, flips: np.ndarray | None,
             labels: np.ndarray) -> EncodedBatch:
        offsets = np.cumsum([0] + [len(b) for b in blobs])
        return cls(torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8), torch.from_numpy(offsets),
                   torch.from_numpy(boxes), None if flips is None else torch.from_numpy(flips),
                   torch.from_numpy(labels))

    def blobs(self) -> list[Tensor]:
        o = self.offsets.tolist()
        return [self.data[o[i]:o[i + 1]] for i in range(len(o) - 1)]


def decode_on_device(batch: EncodedBatch, size: int, channels: int, device: torch.device) -> Tensor:
    """uint8 ``[B, channels, size, size]`` on ``device``: JPEGs decoded there as one batch (nvJPEG on
    CUDA), other images on the CPU and moved; then each box cropped and resized on ``device``."""
    blobs = batch.blobs()
    is_jpeg = [images.is_jpeg(bytes(b[:2].tolist())) for b in blobs]
    jpegs = [b for b, j in zip(blobs, is_jpeg) if j]
    decoded = iter(decode_jpeg(jpegs, mode=images.read_mode(channels), device=device) if jpegs else [])
    flips = batch.flips.tolist() if batch.flips is not None else [False] * len(blobs)
    out = torch.empty(len(blobs), size, size, channels, dtype=torch.uint8, device=device)
    for i, (blob, jpeg, box) in enumerate(zip(blobs, is_jpeg, batch.boxes.tolist())):
        x = next(decoded) if jpeg else images.decode(blob.numpy().tobytes(), channels).to(device)
        _put_crop(out, i, x, box, flips[i])
    return out.permute(0, 3, 1, 2)


def decoded_bytes(manifest: Manifest, split: str) -> int | None:
    """What ``split`` takes decoded (uint8), or None when its images do not share one size."""
    if manifest.image_size is None:
        return None
    height, width = manifest.image_size
    return manifest.splits.get(split, 0) * manifest.channels * height * width


def resolve_decode(decode: str, device: torch.device, manifest: Manifest, split: str = "train") -> str:
    """``DataConfig.decode`` for a run on ``device``. ``"auto"``: ``"memory"`` for a split that decodes to at
    most ``MEMORY_SPLIT_BYTES`` (IDX imports such as Fashion-MNIST); else ``"cuda"`` when training on a
    CUDA device from a dataset of JPEGs (an image-folder import); else the loader processes (``"cpu"``)."""
    size = decoded_bytes(manifest, split)
    if decode == "auto":
        if size is not None and size <= MEMORY_SPLIT_BYTES:
            return "memory"
        jpeg = bool(manifest.encodings) and all(kind.startswith("jpeg") for kind in manifest.encodings)
        return "cuda" if device.type == "cuda" and jpeg else "cpu"
    if decode == "cuda" and device.type != "cuda":
        raise ValueError(f"data.decode 'cuda' needs training on a CUDA device, not {device}")
    if decode == "memory" and size is None:
        raise ValueError(f"data.decode 'memory' needs a dataset whose images share one size; {manifest.name}'s "
                         f"vary: use 'cpu'")
    if decode == "memory" and size > MEMORY_SPLIT_BYTES:
        raise ValueError(f"data.decode 'memory': split {split!r} of {manifest.name} decodes to {size / 2**20:,.0f} "
                         f"MiB, above the {MEMORY_SPLIT_BYTES >> 20} MiB held in memory; use 'cpu'")
    return decode


@functools.lru_cache(maxsize=1)
def decoded_split(dataset_dir: Path, split: str, shards: tuple[str, ...]) -> tuple[Tensor, np.ndarray]:
    """uint8 ``[N, C, H, W]`` and labels ``[N]`` of a whole split, in row order (``shards``: their
    checksums, so a changed dataset is decoded again). Kept for the process's next call: a sweep's
    trial process trains one trial after another on the same split."""
    manifest = load_manifest(dataset_dir)
    infos = manifest.split_shards(split)
    height, width = manifest.image_size
    x = torch.empty(manifest.splits[split], manifest.channels, height, width, dtype=torch.uint8)
    labels, done = [], 0
    for info in infos:
        table = read_shard(dataset_dir / info.file, info, columns=["image", "label"],
                           num_classes=len(manifest.class_names))
        for row, blob in enumerate(table.column("image").to_pylist()):
            try:
                x[done] = images.decode(blob, manifest.channels)
            except (RuntimeError, OSError) as err:
                raise DatasetError(f"image {row} of shard {dataset_dir / info.file} does not decode to "
                                   f"{manifest.channels} x {height} x {width}: {err}") from None
            done += 1
        labels.append(table.column("label").to_numpy())
    return x, np.concatenate(labels).astype(np.int64)


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


def shard_columns(manifest: Manifest, table) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) of a shard's images: its columns in format 2, the dataset's one size in format 1."""
    if manifest.format_version >= 2:
        return table.column("height").to_numpy().astype(np.int64), table.column("width").to_numpy().astype(np.int64)
    h, w = manifest.image_size
    return np.full(table.num_rows, h, np.int64), np.full(table.num_rows, w, np.int64)


def read_columns(manifest: Manifest) -> list[str]:
    return ["image", "label", "height", "width"] if manifest.format_version >= 2 else ["image", "label"]


class TrainBatches(torch.utils.data.Dataset):
    """Item ``s`` is batch ``s`` of one rank: (images uint8 ``[B, C, S, S]``, labels int64 ``[B]``), or
    its ``EncodedBatch`` when the training process decodes (``decode="cuda"``)."""

    def __init__(self, dataset_dir: Path, cfg: DataConfig, img_size: int, batch_size: int, rank: int,
                 world_size: int, seed: int, encoded: bool = False, in_memory: bool = False):
        self.dir, self.cfg, self.img_size, self.batch_size = dataset_dir, cfg, img_size, batch_size
        self.rank, self.world_size, self.seed, self.encoded = rank, world_size, seed, encoded
        self.in_memory = in_memory
        self.manifest = load_manifest(dataset_dir)
        self.shards = self.manifest.split_shards(cfg.split)
        self.offsets = np.cumsum([0] + [s.rows for s in self.shards])
        if self.offsets[-1] < world_size:
            raise ValueError(f"split {cfg.split!r} of {dataset_dir} has {self.offsets[-1]} images, "
                             f"fewer than the {world_size} ranks")
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache: OrderedDict[int, tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders[epoch] = epoch_order(self.shards, self.seed, epoch, WINDOW_BYTES)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def _shard(self, i: int) -> tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray]:
        """(encoded images, labels, heights, widths) of shard ``i``, through a cache of recent shards."""
        if i in self._cache:
            self._cache.move_to_end(i)
        else:
            table = read_shard(self.dir / self.shards[i].file, self.shards[i], columns=read_columns(self.manifest),
                               num_classes=len(self.manifest.class_names))
            self._cache[i] = (table.column("image").to_pylist(), table.column("label").to_numpy(),
                              *shard_columns(self.manifest, table))
            while sum(self.shards[j].bytes for j in self._cache) > 2 * WINDOW_BYTES and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return self._cache[i]

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor] | EncodedBatch:
        epochs, positions = rank_positions(step, self.batch_size, int(self.offsets[-1]), self.rank, self.world_size)
        index = np.empty_like(positions)
        for e in np.unique(epochs):
            index[epochs == e] = self._order(int(e))[positions[epochs == e]]
        if self.in_memory:
            return self._from_memory(epochs, index)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        row = index - self.offsets[shard]
        blobs, labels = [], np.empty(len(index), np.int64)
        heights, widths = np.empty(len(index), np.int64), np.empty(len(index), np.int64)
        for k, (s, r) in enumerate(zip(shard, row)):
            data, shard_labels, shard_heights, shard_widths = self._shard(int(s))
            blobs.append(data[r])
            labels[k], heights[k], widths[k] = shard_labels[r], shard_heights[r], shard_widths[r]
        boxes, flips = augment_params(self.seed, epochs, index, heights, widths, self.cfg.crop_scale, self.cfg.hflip)
        if self.encoded:
            return EncodedBatch.pack(blobs, boxes, flips, labels)
        return crop_batch(blobs, boxes, flips, self.img_size, self.manifest.channels), torch.from_numpy(labels)

    def _from_memory(self, epochs: np.ndarray, index: np.ndarray) -> tuple[Tensor, Tensor]:
        """The batch of samples ``index`` [B] cut from the decoded split: the same boxes and flips as from
        the encoded images, all resized in one batched product."""
        x, labels = decoded_split(self.dir, self.cfg.split, tuple(s.sha256 for s in self.shards))
        height, width = self.manifest.image_size
        n = len(index)
        boxes, flips = augment_params(self.seed, epochs, index, np.full(n, height), np.full(n, width),
                                      self.cfg.crop_scale, self.cfg.hflip)
        crops = crop_resize(x[torch.from_numpy(index)], torch.from_numpy(boxes),
                            None if flips is None else torch.from_numpy(flips), self.img_size)
        return crops, torch.from_numpy(labels[index])


class _Steps(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def train_batches(cfg: DataConfig, img_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                  seed: int = 0, start_step: int = 0,
                  device: torch.device | str = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
    """Infinite (images float32 ``[B, C, img_size, img_size]`` on ``device``, labels int64 ``[B]``) for one rank.

    ``B = batch_size`` per rank. Batches are read (and, with ``decode="cpu"``, decoded and augmented)
    by ``cfg.loader_workers`` processes (0, or ``decode="memory"``: in this process); batch ``s`` depends only on (dataset,
    cfg, seed, rank, world_size, s) and, through the decoder, on where decoding runs.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    device = torch.device(device)
    dataset_dir = resolve_dataset(cfg.dataset, cfg.cache_dir)
    decode = resolve_decode(cfg.decode, device, load_manifest(dataset_dir), cfg.split)
    dataset = TrainBatches(dataset_dir, cfg, img_size, batch_size, rank, world_size, seed,
                           encoded=decode == "cuda", in_memory=decode == "memory")
    # An in-memory split is cut in this process: a loader process would hold a copy of the split for
    # work that takes ~1 ms a batch.
    workers = 0 if decode == "memory" else cfg.loader_workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=_Steps(start_step),
                                         num_workers=workers, pin_memory=device.type == "cuda")
    return _on_device(iter(loader), dataset.manifest, img_size, device)


def _without_worker_traceback(err: CapiError) -> CapiError:
    """The error a loader process raised, with its own message: torch re-raises it in the training
    process as the same type whose message is "Caught ... in DataLoader worker process N" plus the
    worker's whole traceback, which the CLI would print for what is a plain dataset error."""
    text, name = str(err), f"{type(err).__module__}.{type(err).__qualname__}: "
    if "Original Traceback" not in text or name not in text:
        return err
    return type(err)(text[text.rindex(name) + len(name):].strip())


def _on_device(loader: Iterator, manifest: Manifest, img_size: int,
               device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        try:
            item = next(loader)
        except StopIteration:
            return
        except CapiError as err:
            raise _without_worker_traceback(err) from None
        if isinstance(item, EncodedBatch):
            x, labels = decode_on_device(item, img_size, manifest.channels, device), item.labels
        else:
            x, labels = item[0].to(device, non_blocking=True), item[1]
        yield normalise(x, manifest.mean, manifest.std), labels


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
    """Evaluation images float32 ``[N, C, img_size, img_size]`` and labels ``[N]``.

    Each image's central square (its shorter side) resized to ``img_size`` and normalised: the usual
    resize + centre crop of evaluation, exact pixels when the stored images are already that size.
    With ``limit``, a class-stratified subset of ``limit`` samples drawn with ``seed``, in split order.
    """
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    shards = manifest.split_shards(split)
    tables = [read_shard(dataset_dir / s.file, s, columns=["label"], num_classes=len(manifest.class_names))
              for s in shards]
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
    keep = np.arange(len(labels)) if limit is None or limit >= len(labels) else stratified_subset(labels, limit, seed)
    offsets = np.cumsum([0] + [s.rows for s in shards])
    x = torch.empty(len(keep), manifest.channels, img_size, img_size)
    done = 0
    for i, s in enumerate(shards):
        rows = keep[(keep >= offsets[i]) & (keep < offsets[i + 1])] - offsets[i]
        if not len(rows):
            continue
        table = read_shard(dataset_dir / s.file, s, columns=read_columns(manifest)).take(rows)
        blobs = table.column("image").to_pylist()
        boxes = centre_boxes(*shard_columns(manifest, table))
        for chunk in range(0, len(blobs), 1024):
            out = crop_batch(blobs[chunk:chunk + 1024], boxes[chunk:chunk + 1024], None, img_size, manifest.channels)
            x[done:done + len(out)] = normalise(out, manifest.mean, manifest.std)
            done += len(out)
    return x, torch.from_numpy(labels[keep])
