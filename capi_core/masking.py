"""Which patches the student sees and which it predicts, and the mask-ratio schedule.

The strategies are those of the CAPI paper's masking ablation (Table 1b); Table 1e ablates the ratio.

Every image of a batch gets exactly the same number of visible and predicted patches, because the
encoder and predictor gather tokens with one fixed-width index tensor per batch.

Deviation from the reference: the reference draws masks with Python ``random`` and numpy in the
DataLoader collate, one image at a time. Here every draw comes from a ``torch.Generator`` and the
whole batch is built with batched tensor ops, so masks are reproducible from one seed and cheap.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import Tensor

from capi_core.config import MaskingConfig

# The config's Literal is the one list of strategies.
STRATEGIES: tuple[str, ...] = get_args(MaskingConfig.model_fields["strategy"].annotation)


def mask_ratio_at(cfg: MaskingConfig, step: int, total: int) -> float:
    """Masked fraction at ``step`` of ``total``: ``cfg.ratio`` at step 0, ``cfg.ratio_end`` at step total-1."""
    if cfg.schedule == "constant" or cfg.ratio_end is None:
        return cfg.ratio
    t = min(max(step / max(total - 1, 1), 0.0), 1.0)
    if cfg.schedule == "cosine":
        t = 0.5 * (1.0 - math.cos(math.pi * t))
    return cfg.ratio + (cfg.ratio_end - cfg.ratio) * t


def sample_masks(
    strategy: str,
    grid: int,
    mask_ratio: float,
    prediction_subsampling: float,
    batch_size: int,
    generator: torch.Generator,
    min_aspect: float = 0.5,
    max_aspect: float = 2.0,
    block_roll: bool = True,
) -> tuple[Tensor, Tensor]:
    """Visible and predicted patch indices for a batch on a ``grid x grid`` patch grid.

    With N = grid², n_masked = int(N * mask_ratio), n_vis = N - n_masked and
    n_pred = max(1, int(n_masked * prediction_subsampling)):

    - ``random``: a uniformly random set of n_vis visible patches.
    - ``block``: one rectangle of exactly n_masked *masked* cells (the same geometry as below, built
      for n_masked instead of n_vis), the rest visible: the reference's ``BlockMasking``, for the
      "block" row of the paper's ablation. Cyclically shifted like ``inverse_block_roll`` when
      ``block_roll`` (the reference's ``BlockMasking`` rolls by default; the paper does not say whether
      its "block" row did, so ``masking.block_roll=false`` gives the unrolled variant).
    - ``inverse_block``: one rectangle of exactly n_vis *visible* cells (the reference's InverseBlockMasking).
    - ``inverse_block_roll``: the same, cyclically shifted by a uniform (dy, dx), so the block wraps across
      the borders and every position is equally likely to be visible.

    Returns ``visible`` LongTensor [B, n_vis] and ``predict`` LongTensor [B, n_pred], flat indices into
    the raster-ordered grid (row * grid + col), each row sorted ascending. ``predict`` is a uniform
    subset, without replacement, of each image's masked positions. Deterministic given ``generator``.
    """
    n = grid * grid
    n_masked = int(n * mask_ratio)
    n_vis = n - n_masked
    if n_masked < 1 or n_vis < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no masked or no visible patch on a {grid}x{grid} grid")
    if not 0.0 < prediction_subsampling <= 1.0:
        raise ValueError(f"prediction_subsampling must be in (0, 1], got {prediction_subsampling}")
    n_pred = max(1, int(n_masked * prediction_subsampling))

    if strategy == "random":
        # The n_vis smallest of N i.i.d. uniforms form a uniformly random n_vis-subset.
        keys = torch.rand(batch_size, n, generator=generator, dtype=torch.float64)
        chosen = keys.topk(n_vis, dim=1, largest=False, sorted=False).indices
        visible = torch.zeros(batch_size, n, dtype=torch.bool).scatter_(1, chosen, True)
    elif strategy == "block":
        visible = ~_block(grid, n_masked, batch_size, generator, min_aspect, max_aspect, roll=block_roll)
    elif strategy in ("inverse_block", "inverse_block_roll"):
        roll = strategy == "inverse_block_roll"
        visible = _block(grid, n_vis, batch_size, generator, min_aspect, max_aspect, roll=roll)
    else:
        raise ValueError(f"unknown masking strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")

    # nonzero() lists cells row-major, so each image's visible cells come out in raster order.
    visible_idx = visible.nonzero()[:, 1].view(batch_size, n_vis)
    # Random keys, with visible cells pushed past every masked one: the n_pred smallest keys are a
    # uniform subset of the masked cells (float64 keys make ties, hence bias, negligible).
    keys = torch.rand(batch_size, n, generator=generator, dtype=torch.float64).masked_fill_(visible, 2.0)
    predict_idx = keys.topk(n_pred, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
    return visible_idx, predict_idx


def _block(
    grid: int,
    count: int,
    batch_size: int,
    generator: torch.Generator,
    min_aspect: float,
    max_aspect: float,
    roll: bool,
) -> Tensor:
    """Boolean [B, grid*grid]: per image one rectangle truncated to exactly ``count`` cells.

    Aspect a = h/w is log-uniform in [min_aspect, max_aspect], narrowed so the rectangle fits the grid;
    h = ceil(sqrt(count*a)), w = ceil(sqrt(count/a)), so h*w >= count; its corner is uniform among the
    positions where it fits; the first ``count`` cells in raster order are kept; then optionally a
    uniform cyclic roll by (dy, dx). Draw order: aspect, top, left, (dy, dx).
    """
    lo = max(math.log(min_aspect), math.log(count / grid**2))
    hi = min(math.log(max_aspect), math.log(grid**2 / (count + 1e-5)))
    if lo > hi:
        raise ValueError(
            f"aspect bounds [{min_aspect}, {max_aspect}] admit no rectangle of {count} cells on a {grid}x{grid} grid"
        )
    # float64 so that the ceil at the edge of the aspect range cannot overshoot by rounding;
    # the clamp guards the last ulp.
    log_aspect = lo + (hi - lo) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
    aspect = log_aspect.exp()
    h = (count * aspect).sqrt().ceil().long().clamp_(max=grid)
    w = (count / aspect).sqrt().ceil().long().clamp_(max=grid)
    # Uniform integers in {0..grid-h}: floor(u * (grid-h+1)) with u in [0, 1).
    top = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * (grid - h + 1)).long()
    left = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * (grid - w + 1)).long()

    pos = torch.arange(grid)
    rows = (pos >= top[:, None]) & (pos < (top + h)[:, None])  # [B, grid]
    cols = (pos >= left[:, None]) & (pos < (left + w)[:, None])  # [B, grid]
    rect = (rows[:, :, None] & cols[:, None, :]).flatten(1)  # [B, N]
    # Keep the first `count` rectangle cells in raster order: the exact count, a ragged last row.
    block = rect & (rect.cumsum(dim=1) <= count)
    if not roll:
        return block

    # torch.roll semantics per image: out[r, c] = block[(r - dy) % grid, (c - dx) % grid].
    dy = torch.randint(0, grid, (batch_size, 1), generator=generator)
    dx = torch.randint(0, grid, (batch_size, 1), generator=generator)
    src_r = (pos - dy) % grid  # [B, grid]
    src_c = (pos - dx) % grid  # [B, grid]
    src = (src_r[:, :, None] * grid + src_c[:, None, :]).flatten(1)  # [B, N]
    return block.gather(1, src)
