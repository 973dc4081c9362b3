"""The batched crop-and-resize of in-memory splits against torch's own antialiased bicubic."""

import pytest
import torch
import torch.nn.functional as F

from capi_core.data import images
from capi_core.data.resample import bicubic_weights, crop_resize


@pytest.mark.parametrize("n_in, n_out", [(20, 28), (17, 28), (28, 28), (28, 12), (90, 28), (7, 3)])
def test_weights_are_torchs_antialiased_bicubic(n_in, n_out):
    """torch's weights read off by resizing one-hot rows: enlarging, equal, and shrinking by up to 3x."""
    eye = torch.eye(n_in, dtype=torch.float64)[:, None, :, None].expand(-1, 1, -1, 2).contiguous()
    expected = F.interpolate(eye, size=(n_out, 2), mode="bicubic", antialias=True, align_corners=False)[:, 0, :, 0].T
    weights = bicubic_weights(torch.tensor([0]), torch.tensor([n_in]), n_in, n_out)[0]
    torch.testing.assert_close(weights.double(), expected, atol=2e-6, rtol=0)


def test_a_span_gets_weights_only_inside_it():
    weights = bicubic_weights(torch.tensor([3, 0]), torch.tensor([10, 10]), 16, 7)
    assert weights[0, :, :3].eq(0).all() and weights[0, :, 13:].eq(0).all()
    torch.testing.assert_close(weights[0, :, 3:13], weights[1, :, :10])
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7))


@pytest.mark.parametrize("size", [28, 12])
def test_crops_are_torchs_uint8_resize_within_a_grey_level_or_two(size):
    """Per image: the box cut out, resized by ``images.resize`` (torch's uint8 kernel), mirrored."""
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (32, 3, 28, 30), generator=gen, dtype=torch.uint8)  # noise: overshoot everywhere
    tops, lefts = torch.randint(0, 10, (32,), generator=gen), torch.randint(0, 10, (32,), generator=gen)
    boxes = torch.stack([tops, lefts, 28 - tops - torch.randint(0, 4, (32,), generator=gen),
                         30 - lefts - torch.randint(0, 4, (32,), generator=gen)], 1)
    flips = torch.arange(32) % 3 == 0
    out = crop_resize(batch, boxes, flips, size)
    for i, (t, left, h, w) in enumerate(boxes.tolist()):
        expected = images.resize(batch[i, :, t:t + h, left:left + w], (size, size))
        expected = expected.flip(-1) if flips[i] else expected
        assert (out[i].int() - expected.int()).abs().max() <= 2
    assert out.dtype == torch.uint8 and out.shape == (32, 3, size, size)


def test_a_whole_image_at_its_own_size_is_itself():
    batch = torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 12, 12]] * 4)
    assert torch.equal(crop_resize(batch, boxes, None, 12), batch)
    assert torch.equal(crop_resize(batch, boxes, torch.tensor([True] * 4), 12), batch.flip(-1))
