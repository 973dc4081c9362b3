"""CAPI's 2-D rotary position embedding, as the official model computes it.

The CAPI paper's Table 6 lists it as "RoPE, logspace(7e-4, 7), axial"; the details below are those
of the reference implementation (``model.py`` of facebookresearch/capi: ``Rope``, ``rotate_half``,
``EncoderDecoder.prepare_tokens_and_drop`` and ``get_edge_coordinates``).

- Coordinates: a patch at (row i, column j) of an h x w grid sits at ``(i / (h - 1), j / (w - 1))``
  (``linspace(0, 1, h)`` x ``linspace(0, 1, w)``), in raster order.
- Registers: ``R/4`` per side of the unit square at offsets ``c = 0, 4/R, 8/R, ...``, in the
  reference's order: left edge downwards ``(c, 0)``, bottom edge rightwards ``(1, c)``, right edge
  upwards ``(1 - c, 1)``, top edge leftwards ``(0, 1 - c)``. Each sample then rescales them into the
  bounding box of its *visible* patches, per axis: ``lo + reg * (hi - lo)``. A rope model therefore
  needs ``R`` to be a multiple of 4.
- Frequencies: ``head_dim / 4`` values ``7 * 1e4**(-t)`` for ``t = linspace(0, 1, head_dim / 4)``
  (log-spaced from 7 down to 7e-4), repeated twice, times 2 pi. ``freqs`` is ``[2, head_dim]``: row 0
  (the row coordinate) holds them in channels ``[0, hd/2)``, row 1 (the column coordinate) in
  ``[hd/2, hd)``, zeros elsewhere, so ``angle = coords @ freqs`` is ``[..., head_dim]``.
- Rotation: ``x * cos(angle) + rotate_half(x) * sin(angle)`` with ``rotate_half(x) = cat(-x2, x1)``
  over the two halves of the head. Channel ``i < hd/2`` is mixed with channel ``i + hd/2``, a row
  angle with a column angle. That is not the standard axial RoPE (timm's ``RotaryEmbeddingCat``
  rotates channel pairs that share one angle, on grid-index coordinates), which is why this is its
  own module.
- The reference keeps ``freqs`` as a parameter with learning-rate multiplier 0, so it never changes;
  here it is a buffer (saved in the state dict, never trained). Angles and their cos/sin are
  computed in float32 even under bf16 autocast (in the reference they follow its bf16 parameters, and
  with angles up to ``7 * 2 pi`` bf16 rounds an angle by up to ~0.1 rad); the rotation itself runs
  in q's and k's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

MAX_FREQ, MIN_FREQ = 7.0, 7e-4


def patch_coords(height: int, width: int | None = None) -> Tensor:
    """(row, column) of every patch of an ``height x width`` grid in raster order, on [0, 1]: [h*w, 2]."""
    width = height if width is None else width
    rows, cols = torch.linspace(0, 1, height), torch.linspace(0, 1, width)
    return torch.cartesian_prod(rows, cols)


def register_coords(num_registers: int) -> Tensor:
    """The registers' places on the unit square's edges, before rescaling: [R, 2] (see the module)."""
    if num_registers % 4:
        raise ValueError(f"CAPI's RoPE puts registers on 4 edges: their number must be a multiple of 4, "
                         f"got {num_registers}")
    c = torch.arange(num_registers // 4) / (num_registers // 4)
    zeros, ones = torch.zeros_like(c), torch.ones_like(c)
    left, bottom = torch.stack([c, zeros], -1), torch.stack([ones, c], -1)
    right, top = torch.stack([1 - c, ones], -1), torch.stack([zeros, 1 - c], -1)
    return torch.cat([left, bottom, right, top])


def token_coords(registers: Tensor, visible: Tensor) -> Tensor:
    """Coordinates of the whole sequence, registers first: registers ``[R, 2]`` rescaled into the bounding
    box of each sample's visible patch coordinates ``visible`` ``[B, n, 2]`` -> ``[B, R + n, 2]``."""
    lo, hi = visible.amin(dim=1, keepdim=True), visible.amax(dim=1, keepdim=True)
    return torch.cat([lo + registers * (hi - lo), visible], dim=1)


def rope_freqs(head_dim: int) -> Tensor:
    """The reference's initial (and, frozen, only) ``freqs`` [2, head_dim], angular (times 2 pi)."""
    if head_dim % 4:
        raise ValueError(f"CAPI's RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    f = MAX_FREQ * (MAX_FREQ / MIN_FREQ) ** torch.linspace(0, -1, quarter, dtype=torch.float64)
    f = torch.cat([f, f])
    freqs = torch.zeros(2, head_dim, dtype=torch.float64)
    freqs[0, :head_dim // 2] = f
    freqs[1, head_dim // 2:] = f
    return (freqs * 2 * math.pi).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` in ``x``'s dtype. x [B, H, T, hd]; cos and sin [B or 1, 1, T, hd].

    Written per half, ``[x1 c1 - x2 s1, x2 c2 + x1 s2]``: the same values as the formula with a third
    of its memory traffic (no rotated copy, no upcast of x), which is what RoPE costs on a GPU. Under
    bf16 autocast the rotation runs in bf16, as in the reference, from float32 angles.
    """
    x1, x2 = x.chunk(2, dim=-1)
    c1, c2 = cos.to(x.dtype).chunk(2, dim=-1)
    s1, s2 = sin.to(x.dtype).chunk(2, dim=-1)
    return torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], dim=-1)


class Rope(nn.Module):
    """``forward(coords [B, T, 2]) -> (cos, sin)``, each float32 [B, 1, T, head_dim] (broadcast over heads)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("freqs", rope_freqs(head_dim))

    def forward(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(coords.device.type, enabled=False):
            angle = (coords.float() @ self.freqs.float()).unsqueeze(1)
        return angle.cos(), angle.sin()
