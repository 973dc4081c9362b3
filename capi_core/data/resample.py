"""Crop-and-resize of a whole batch as two matrix products: the augmentation of an in-memory split.

Antialiased bicubic resizing is separable: resizing a box of ``h x w`` pixels to ``S x S`` is
``Wy @ box @ Wx^T``, where each row of ``Wy`` [S, h] holds the kernel weights of one output row over
the input rows (and ``Wx`` likewise over columns). Written over the whole stored image, with the
weights zero outside the box, a batch of crops of different boxes becomes one batched product
(``crop_resize``), where cutting each crop and calling ``F.interpolate`` on it cost ~60 us an image in
Python and dispatch (Fashion-MNIST, 64 images a batch: 4 ms of a 33 ms training step).

The weights are torch's own for ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``
(PIL's BICUBIC): Keys' cubic with a = -0.5, stretched by the scale when shrinking, each output's
weights normalised to sum to 1 over the input pixels of its window. Each pass is computed in
float32, then rounded and clipped; torch's uint8 kernel does the same with fixed-point weights, so
the two differ by at most one grey level here and there (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

A = -0.5  # Keys' cubic convolution parameter of torch's and PIL's antialiased bicubic


def _cubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = ``A``, elementwise."""
    x = x.abs()
    near = ((A + 2) * x - (A + 3)) * x * x + 1
    far = ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_weights(start: Tensor, length: Tensor, full: int, out: int) -> Tensor:
    """Per sample, the weights ``[B, out, full]`` that resize the span ``[start, start + length)`` of an
    axis of ``full`` pixels to ``out`` pixels (start, length int64 ``[B]``), as torch's antialiased
    bicubic computes them: output ``i`` centred at ``scale (i + 0.5)`` in the span, the kernel's argument
    divided by ``scale`` when shrinking, weights normalised over the span's pixels.

    torch also cuts each output's window to ``[centre - support + 0.5, centre + support + 0.5)``; the
    kernel is zero outside it, so cutting to the span is enough (checked against ``F.interpolate``)."""
    scale = length.float() / out  # [B]
    invscale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))[:, None, None]
    centre = scale[:, None, None] * (torch.arange(out, dtype=torch.float32)[None, :, None] + 0.5)  # [B, out, 1]
    j = torch.arange(full, dtype=torch.float32)[None, None, :] - start[:, None, None]  # [B, 1, full], in the span
    w = _cubic((j + 0.5 - centre) * invscale)  # [B, out, full]
    w = w * ((j >= 0) & (j < length[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def crop_resize(images: Tensor, boxes: Tensor, flips: Tensor | None, size: int) -> Tensor:
    """uint8 ``images`` [B, C, H, W] -> uint8 [B, C, size, size]: each image's box (top, left, h, w;
    int64 [B, 4]) resized with antialiased bicubic, mirrored left-right where ``flips`` [B] is true."""
    _, _, height, width = images.shape
    wy = bicubic_weights(boxes[:, 0], boxes[:, 2], height, size)  # [B, size, H]
    wx = bicubic_weights(boxes[:, 1], boxes[:, 3], width, size)  # [B, size, W]
    if flips is not None:
        wx = torch.where(flips[:, None, None], wx.flip(1), wx)  # mirrored output columns
    # Two passes, columns then rows, each rounded and clipped to 0-255 as torch's uint8 kernel (and PIL)
    # do: the cubic overshoots at edges, and clipping between the passes changes the result by up to
    # 20 levels on noisy images against one unclipped product.
    rows = torch.matmul(images.float(), wx.transpose(1, 2)[:, None]).round_().clamp_(0, 255)  # [B, C, H, size]
    return torch.matmul(wy[:, None], rows).round_().clamp_(0, 255).to(torch.uint8)
