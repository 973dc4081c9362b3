import math

import pytest
import torch

from capi_core.config import MaskingConfig
from capi_core.masking import STRATEGIES, mask_ratio_at, sample_masks


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bool_grid(idx: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, k] flat indices -> bool [B, grid, grid]."""
    out = torch.zeros(idx.shape[0], grid * grid, dtype=torch.bool).scatter_(1, idx, True)
    return out.view(-1, grid, grid)


def _is_truncated_rectangle(cells: torch.Tensor) -> bool:
    """cells: bool [grid, grid]. True iff they are the first k cells, in raster order, of their bounding box."""
    rows = cells.any(1).nonzero().flatten()
    cols = cells.any(0).nonzero().flatten()
    box = cells[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].flatten()
    k = int(cells.sum())
    return bool(box[:k].all()) and not bool(box[k:].any())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("grid,ratio,subsample", [(2, 0.5, 1.0), (7, 0.65, 0.25), (8, 0.9, 0.05), (16, 0.65, 0.05),
                                                  (16, 0.3, 0.5), (5, 0.1, 0.2)])
def test_counts_order_and_disjointness(strategy, grid, ratio, subsample):
    n = grid * grid
    n_masked = int(n * ratio)
    n_vis, n_pred = n - n_masked, max(1, int(n_masked * subsample))
    visible, predict = sample_masks(strategy, grid, ratio, subsample, 64, _gen())

    assert visible.dtype == predict.dtype == torch.long
    assert visible.shape == (64, n_vis) and predict.shape == (64, n_pred)
    for idx in (visible, predict):
        assert idx.min() >= 0 and idx.max() < n
        assert (idx[:, 1:] > idx[:, :-1]).all()  # sorted ascending, hence no duplicates
    # predicted cells are masked cells
    assert not (_bool_grid(visible, grid) & _bool_grid(predict, grid)).any()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_given_generator(strategy):
    a = sample_masks(strategy, 8, 0.65, 0.25, 16, _gen(3))
    b = sample_masks(strategy, 8, 0.65, 0.25, 16, _gen(3))
    c = sample_masks(strategy, 8, 0.65, 0.25, 16, _gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_inverse_block_is_a_truncated_rectangle_within_aspect_bounds():
    grid, ratio = 16, 0.65
    n_vis = grid * grid - int(grid * grid * ratio)  # 90, as in the reference (ViT-L/14 at 224 px)
    visible, _ = sample_masks("inverse_block", grid, ratio, 0.05, 256, _gen())
    cells = _bool_grid(visible, grid)
    heights = cells.any(2).sum(1)
    widths = cells.any(1).sum(1)
    assert all(_is_truncated_rectangle(c) for c in cells)
    # h <= ceil(sqrt(n*2)) and w <= ceil(sqrt(n/0.5)), the aspect bounds [0.5, 2]
    assert heights.max() <= math.ceil(math.sqrt(n_vis * 2.0))
    assert widths.max() <= math.ceil(math.sqrt(n_vis / 0.5))
    assert len(set(heights.tolist())) > 1  # the aspect is actually random


def test_inverse_block_with_fixed_aspect_has_the_spec_shape():
    # aspect 1: h = w = ceil(sqrt(90)) = 10, truncated to 90 cells -> 9 full rows of 10.
    visible, _ = sample_masks("inverse_block", 16, 0.65, 0.05, 32, _gen(), min_aspect=1.0, max_aspect=1.0)
    cells = _bool_grid(visible, 16)
    assert (cells.any(2).sum(1) == 9).all() and (cells.any(1).sum(1) == 10).all()


def test_block_masks_a_truncated_rectangle():
    grid, ratio = 8, 0.65
    visible, predict = sample_masks("block", grid, ratio, 1.0, 128, _gen(), block_roll=False)
    masked = ~_bool_grid(visible, grid)
    assert all(_is_truncated_rectangle(m) for m in masked)
    assert (masked.flatten(1).sum(1) == int(grid * grid * ratio)).all()
    # prediction_subsampling 1.0 predicts every masked cell
    assert torch.equal(_bool_grid(predict, grid), masked)


def test_block_rolls_its_masked_rectangle_by_default_as_the_reference():
    grid, ratio = 8, 0.4
    masked = ~_bool_grid(sample_masks("block", grid, ratio, 1.0, 64, _gen())[0], grid)
    shifts = [(dy, dx) for dy in range(grid) for dx in range(grid)]
    assert all(any(_is_truncated_rectangle(torch.roll(m, s, (0, 1))) for s in shifts) for m in masked)
    assert not all(_is_truncated_rectangle(m) for m in masked)  # some wrap across the borders
    p_masked = int(grid * grid * ratio) / grid**2
    freq = (~_bool_grid(sample_masks("block", grid, ratio, 1.0, 8000, _gen())[0], grid)).float().mean(0)
    assert (freq - p_masked).abs().max() < 0.03  # every position equally likely masked


def test_roll_is_a_cyclic_shift_of_a_truncated_rectangle():
    grid = 8
    visible, _ = sample_masks("inverse_block_roll", grid, 0.65, 0.25, 16, _gen())
    for cells in _bool_grid(visible, grid):
        shifts = [(dy, dx) for dy in range(grid) for dx in range(grid)]
        assert any(_is_truncated_rectangle(torch.roll(cells, (dy, dx), (0, 1))) for dy, dx in shifts)


def test_roll_makes_every_position_equally_likely_visible():
    grid, ratio, batch = 8, 0.65, 8000
    p_vis = (grid * grid - int(grid * grid * ratio)) / grid**2
    rolled = _bool_grid(sample_masks("inverse_block_roll", grid, ratio, 0.25, batch, _gen())[0], grid).float().mean(0)
    plain = _bool_grid(sample_masks("inverse_block", grid, ratio, 0.25, batch, _gen())[0], grid).float().mean(0)
    # std of one cell's frequency is about 0.005 here
    assert (rolled - p_vis).abs().max() < 0.03
    # without the roll a rectangle covers the centre far more often than the corners
    assert plain[3:5, 3:5].mean() > plain[[0, 0, -1, -1], [0, -1, 0, -1]].mean() + 0.3


def test_random_visible_set_is_uniform():
    grid, ratio, batch = 6, 0.5, 8000
    freq = _bool_grid(sample_masks("random", grid, ratio, 0.25, batch, _gen())[0], grid).float().mean(0)
    assert (freq - 0.5).abs().max() < 0.03


@pytest.mark.parametrize("strategy", ["block", "inverse_block_roll"])
def test_predictions_are_a_uniform_subset_of_masked_cells(strategy):
    grid, ratio, sub, batch = 8, 0.65, 0.25, 8000
    n_masked = int(grid * grid * ratio)
    n_pred = int(n_masked * sub)
    visible, predict = sample_masks(strategy, grid, ratio, sub, batch, _gen())
    masked = ~_bool_grid(visible, grid)
    predicted = _bool_grid(predict, grid)
    # P(predicted | masked) is the same at every cell that is masked often enough to measure
    often = masked.sum(0) > 2000
    rate = predicted.sum(0)[often] / masked.sum(0)[often]
    assert (rate - n_pred / n_masked).abs().max() < 0.04


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown masking strategy"):
        sample_masks("checkerboard", 8, 0.5, 0.5, 2, _gen())
    with pytest.raises(ValueError, match="no masked or no visible"):
        sample_masks("random", 4, 0.01, 0.5, 2, _gen())
    with pytest.raises(ValueError, match="aspect bounds"):
        sample_masks("inverse_block", 8, 0.1, 0.5, 2, _gen(), min_aspect=3.0, max_aspect=4.0)


def test_mask_ratio_constant():
    cfg = MaskingConfig(ratio=0.6)
    assert [mask_ratio_at(cfg, s, 100) for s in (0, 50, 99)] == [0.6, 0.6, 0.6]


def test_mask_ratio_linear_and_cosine_ramps():
    lin = MaskingConfig(ratio=0.5, ratio_end=0.7, schedule="linear")
    cos = MaskingConfig(ratio=0.5, ratio_end=0.7, schedule="cosine")
    total = 101  # steps 0..100, so step 50 is the middle
    assert mask_ratio_at(lin, 0, total) == pytest.approx(0.5)
    assert mask_ratio_at(lin, 25, total) == pytest.approx(0.55)
    assert mask_ratio_at(lin, 100, total) == pytest.approx(0.7)
    assert mask_ratio_at(lin, 500, total) == pytest.approx(0.7)  # past the end: stays at ratio_end
    assert mask_ratio_at(cos, 0, total) == pytest.approx(0.5)
    assert mask_ratio_at(cos, 50, total) == pytest.approx(0.6)
    assert mask_ratio_at(cos, 25, total) == pytest.approx(0.5 + 0.2 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert mask_ratio_at(cos, 100, total) == pytest.approx(0.7)
