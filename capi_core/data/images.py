"""Decoding, resizing and encoding single images: shared by the importers and the training reader.

Decoding is libjpeg-turbo / libpng through ``torchvision.io`` (uint8 ``[C, H, W]`` tensors), which was
the fastest decoder measured here (a 500x375 JPEG: ~950 images per CPU-second against ~860 with PIL,
benchmarks/README.md). PIL decodes what torchvision does not read, and JPEGs at a reduced DCT scale
(``decode_reduced``: 1/2, 1/4 or 1/8 of the size, far cheaper than decoding everything and then
shrinking it). Resizing is torch's antialiased bicubic (a = -0.5, PIL's kernel), which has a
vectorised uint8 path on CPU: about 3x faster than PIL's ``resize`` on this project's machines.

torchvision 0.29 deprecated its image decoders in favour of TorchCodec (not installed here). The
warning is silenced below, once for the process, so that every loader process does not print it;
everything that decodes goes through this module, so a move to another decoder is local to it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG"
DCT_SCALES = (8, 4, 2)  # libjpeg decodes at 1/8, 1/4 and 1/2 of the size (and at full size)
# Decompression-bomb guard: a few kilobytes of PNG or JPEG can declare 50,000 x 50,000 pixels, 7.5 GB
# once decoded. 64 Mpx (8192 x 8192, 192 MB as RGB) is above any camera this project trains on and
# well below what a worker can hold; PIL's own guard (89 Mpx) warns only, and torchvision's decoders
# have none, so the size in the header is checked before either decodes.
MAX_IMAGE_PIXELS = 1 << 26


class ImageTooLargeError(ValueError):
    """An image's header declares more than MAX_IMAGE_PIXELS pixels."""


def is_jpeg(blob: bytes) -> bool:
    return blob[:2] == JPEG_MAGIC


def read_mode(channels: int) -> ImageReadMode:
    return ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB


def decode(blob: bytes, channels: int) -> Tensor:
    """JPEG or PNG bytes (anything PIL reads as a fallback) -> uint8 ``[channels, H, W]``.

    Raises ``RuntimeError`` (torchvision) or ``OSError`` (PIL) on a truncated or corrupt image.
    """
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    if is_jpeg(blob):
        return decode_jpeg(data, mode=read_mode(channels))
    if blob[:4] == PNG_MAGIC:
        return decode_png(data, mode=read_mode(channels))
    return pil_to_tensor(pil_open(blob), channels)


def pil_open(blob: bytes) -> Image.Image:
    """The image, lazily: only its header is read, and refused if it declares too many pixels."""
    image = Image.open(io.BytesIO(blob))
    check_pixels(*image.size)
    return image


def check_pixels(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(f"it declares {width} x {height} = {width * height:,} pixels, above the limit of "
                                 f"{MAX_IMAGE_PIXELS:,} (a decompression bomb, or a scan to shrink before import)")


def pil_to_tensor(image, channels: int) -> Tensor:
    """A PIL image -> uint8 ``[channels, H, W]`` (converted to grey or RGB; alpha dropped)."""
    mode = "L" if channels == 1 else "RGB"
    pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    return torch.from_numpy(pixels.reshape(*pixels.shape[:2], channels).copy()).permute(2, 0, 1)


def reduction(height: int, width: int, min_height: float, min_width: float) -> int:
    """The largest DCT reduction (8, 4, 2 or 1) that keeps an image of ``height x width`` at least
    ``min_height x min_width``."""
    for scale in DCT_SCALES:
        if height // scale >= min_height and width // scale >= min_width:
            return scale
    return 1


def decode_reduced(blob: bytes, channels: int, scale: int) -> Tensor:
    """A JPEG decoded at 1/``scale`` of its size (``scale`` in 1, 2, 4, 8) -> uint8 ``[C, ~H/s, ~W/s]``.

    libjpeg scales in the DCT domain, so this costs a fraction of a full decode. The result's size
    is ``ceil(H / scale) x ceil(W / scale)``.
    """
    if scale == 1:
        return decode(blob, channels)
    image = pil_open(blob)
    width, height = image.size
    # PIL picks the reduction min(W // w, H // h) rounded down to 8, 4, 2 or 1: asking for W // scale
    # gets exactly ``scale`` (W // (W // s) lies in [s, 2s)).
    image.draft("L" if channels == 1 else "RGB", (width // scale, height // scale))
    image.load()
    return pil_to_tensor(image, channels)


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 ``[C, h, w]`` -> uint8 ``[C, *size]``, antialiased bicubic (a = -0.5, as PIL's BICUBIC).

    On CPU, torch resizes uint8 channels-last images directly (vectorised, rounded like PIL); on other
    devices it resizes in float32 and rounds. The two agree to within a level or two on photographs.
    """
    x = x[None]
    if x.device.type == "cpu":
        out = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=size, mode="bicubic",
                            antialias=True, align_corners=False)
    else:
        out = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out[0]


def hwc(pixels: Tensor) -> np.ndarray:
    """uint8 ``[C, H, W]`` -> a C-contiguous ``[H, W, C]`` array (torch transposes faster than PIL or numpy)."""
    return pixels.permute(1, 2, 0).contiguous().numpy()


def histogram(pixels: Tensor) -> np.ndarray:
    """How many pixels of each channel of uint8 ``[C, H, W]`` take each value: ``[C, 256]`` int64.

    Exact per-channel sums and sums of squares follow; measured ~10x faster than summing the pixels
    with numpy for a 500x375 RGB image.
    """
    flat = pixels.contiguous().view(pixels.shape[0], -1)
    return torch.stack([torch.bincount(channel, minlength=256) for channel in flat]).numpy()


def encode_jpeg(pixels: Tensor, quality: int) -> bytes:
    """uint8 ``[C, H, W]`` (C = 1 or 3) -> JPEG bytes (libjpeg-turbo via PIL, 4:2:0 chroma for RGB)."""
    array = hwc(pixels)
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
