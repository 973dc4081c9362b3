"""PCA pictures and PNG writers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from capi_core.config import build_config
from capi_core.eval.features import grid_shape
from capi_core.eval.pictures import pca_figure, pca_rgb, write_pictures
from capi_core.models.encoder import Encoder


def test_pca_rgb_shape_range_and_components():
    g = torch.Generator().manual_seed(0)
    # Patches vary along 3 orthogonal directions of decreasing scale plus small noise.
    directions = torch.linalg.qr(torch.randn(32, 3, generator=g))[0].T  # [3, 32]
    coeffs = torch.randn(5, 16, 3, generator=g) * torch.tensor([10.0, 5.0, 2.0])
    patches = coeffs @ directions + 0.01 * torch.randn(5, 16, 32, generator=g)
    rgb = pca_rgb(patches, (4, 4))
    assert rgb.shape == (5, 4, 4, 3)
    flat = rgb.reshape(-1, 3)
    assert torch.allclose(flat.min(0).values, torch.zeros(3)) and torch.allclose(flat.max(0).values, torch.ones(3))
    # Each colour channel follows one planted direction, in order of variance (up to sign).
    for c in range(3):
        corr = torch.corrcoef(torch.stack([flat[:, c], coeffs.reshape(-1, 3)[:, c]]))[0, 1]
        assert corr.abs() > 0.95  # not 1: sampled coefficients are slightly correlated
    assert torch.equal(pca_rgb(patches, (4, 4)), rgb)  # deterministic, signs included


def test_grid_shape_and_bad_grids():
    assert grid_shape(49, (28, 28)) == (7, 7)
    assert grid_shape(8, (16, 32)) == (2, 4)
    with pytest.raises(ValueError, match="patches"):
        grid_shape(10, (16, 16))
    with pytest.raises(ValueError, match="grid"):
        pca_rgb(torch.randn(2, 16, 8), (3, 5))


def test_pictures_are_valid_pngs(tmp_path):
    encoder = Encoder(build_config("cpu-tiny").model)
    images = torch.randn(4, 1, 16, 16)
    paths = write_pictures(encoder, images, tmp_path / "pics")
    assert [p.name for p in paths] == ["pca.png", "attention.png", "norms.png"]
    for path in paths:
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    # No temporary files are left behind.
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["attention.png", "norms.png", "pca.png"]


def test_pca_figure_writes_atomically_over_an_existing_file(tmp_path):
    path = tmp_path / "pca.png"
    path.write_bytes(b"old")
    pca_figure(torch.randn(2, 3, 16, 16), torch.randn(2, 16, 8), path)
    with Image.open(path) as im:
        assert im.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["pca.png"]
