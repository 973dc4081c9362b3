"""Frozen feature extraction on our Encoder and on plain timm ViTs (with and without [cls])."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from capi_core.config import build_config
from capi_core.eval.features import extract_features, pooled_features, prefix_layout
from capi_core.models.encoder import Encoder


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_final_tokens_are_the_encoder_output_split_by_type(pos_embed):
    encoder = Encoder(build_config("cpu-tiny", {"model": {"pos_embed": pos_embed}}).model)
    encoder.train()
    x = torch.randn(7, 1, 16, 16)
    feats = extract_features(encoder, x, layers=None, norm=True, batch_size=3)
    assert encoder.training  # mode restored
    with torch.no_grad():
        reference = encoder.eval()(x)  # [B, R + N, D]
    assert torch.allclose(feats.final.registers, reference[:, :4])
    assert torch.allclose(feats.final.patches, reference[:, 4:])
    assert feats.final.cls is None
    assert sorted(feats.layers) == [0, 1]
    assert torch.allclose(feats.layers[1].patches, reference[:, 4:], atol=1e-6)  # last block + final norm
    assert torch.allclose(pooled_features(encoder, x, batch_size=2), reference[:, 4:].mean(1), atol=1e-6)


def test_only_requested_layers_are_kept_and_prenorm_differs():
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=4, num_heads=2, num_classes=0,
                            reg_tokens=2, class_token=True, no_embed_class=True, global_pool="")
    x = torch.randn(5, 1, 16, 16)
    feats = extract_features(vit, x, layers=[-1, 1], norm=False)
    assert sorted(feats.layers) == [1, 3]
    assert prefix_layout(vit) == (True, 2)
    layer = feats.layers[3]
    assert layer.cls.shape == (5, 32) and layer.registers.shape == (5, 2, 32) and layer.patches.shape == (5, 16, 32)
    with torch.no_grad():
        out = vit.forward_features(x)
    assert torch.allclose(feats.final.cls, out[:, 0]) and torch.allclose(feats.final.patches, out[:, 3:])
    assert torch.allclose(vit.norm(layer.patches), feats.final.patches, atol=1e-5)
    assert torch.allclose(pooled_features(vit, x, pool="cls"), out[:, 0])
    with pytest.raises(ValueError, match="out of range"):
        extract_features(vit, x, layers=[4])


def test_pooled_cls_needs_a_cls_token():
    encoder = Encoder(build_config("cpu-tiny").model)
    with pytest.raises(ValueError, match="cls"):
        pooled_features(encoder, torch.randn(2, 1, 16, 16), pool="cls")


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_predictor_pooling_reads_the_first_predictor_block_at_every_position(pos_embed):
    """As CAPI's reference ``EncoderDecoder.forward``: encoder on all patches, a mask-token query at every
    position, the first predictor block's output after the final norm, averaged over positions; deeper
    blocks are not used."""
    from capi_core.models.student import Student

    cfg = build_config("cpu-tiny", {"model": {"pos_embed": pos_embed, "predictor_depth": 2}})
    torch.manual_seed(0)
    student = Student(cfg).eval()
    x = torch.randn(5, 1, 16, 16)
    pooled = pooled_features(student, x, batch_size=2, pool="predictor")
    with torch.no_grad():
        context = student.encoder(x)
        everywhere = torch.arange(16).expand(5, 16)
        first = student.predictor(context, everywhere, everywhere, depth=1)
        full = student.predictor(context, everywhere, everywhere)
    assert pooled.shape == (5, student.predictor.embed_dim)
    assert torch.allclose(pooled, first.mean(1), atol=1e-6)
    assert not torch.allclose(pooled, full.mean(1), atol=1e-4)
    # a query's output does not depend on the other queries (cross-attention only)
    with torch.no_grad():
        one = student.predictor(context, everywhere, everywhere[:, 3:4], depth=1)
    assert torch.allclose(one[:, 0], first[:, 3], atol=1e-5)
    with pytest.raises(ValueError, match="whole CAPI model"):
        pooled_features(student.encoder, x, pool="predictor")
