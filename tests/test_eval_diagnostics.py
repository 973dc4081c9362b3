"""High-norm token detector, norm profiles and attention statistics, on inputs whose answer is known."""

from __future__ import annotations

import json
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from capi_core.config import build_config
from capi_core.eval.diagnostics import (
    attention_flow_stats,
    attention_maps,
    attention_recorder,
    collect_attention,
    layer_curves,
    norm_report,
    norms_by_type,
    run_diagnostics,
)
from capi_core.eval.features import Tokens
from capi_core.models.encoder import Encoder


def injected_norms(seed: int = 0, fraction: float = 0.02):
    """Norms of N(0, 1) tokens [200, 64, 64] (about 8), a random 2% of them scaled by 10: outliers as the
    Registers paper describes them (about 2% of the tokens, about 10x the typical norm)."""
    g = torch.Generator().manual_seed(seed)
    norms = torch.randn(200, 64, 64, generator=g).norm(dim=-1)  # [200, 64]
    mask = torch.zeros(200 * 64, dtype=torch.bool)
    mask[torch.randperm(200 * 64, generator=g)[: round(fraction * 200 * 64)]] = True
    mask = mask.view(200, 64)
    return torch.where(mask, 10 * norms, norms), mask


# --------------------------------------------------------------------------------------- detector


@pytest.mark.parametrize("mode", ["valley", "ratio"])
def test_detector_finds_exactly_the_injected_tokens(mode):
    norms, injected = injected_norms()
    report = norm_report(norms, mode=mode)
    assert 8 < report["tau"] < 80
    assert torch.equal(report["mask"], injected)
    assert report["bimodal"] is True
    assert report["count"] == 256 and report["fraction"] == pytest.approx(0.02)
    assert torch.equal(report["position_frequency"], injected.float().mean(dim=0))
    assert report["images_with_outlier"] == pytest.approx(injected.any(dim=1).float().mean().item())
    assert report["outliers_per_image"] == pytest.approx(256 / 200)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detector_reports_nothing_on_unimodal_norms(seed):
    norms, _ = injected_norms(seed, fraction=0.0)
    report = norm_report(norms)
    assert report["bimodal"] is False and report["fraction"] == 0.0 and report["tau"] is None
    assert not report["mask"].any()
    # Wide unimodal (log-normal) norms, small and large samples: far-tail bumps are not outliers.
    g = torch.Generator().manual_seed(seed)
    for sigma in (0.3, 0.8, 1.2):
        for n in (500, 50_000):
            wide = 8 * (sigma * torch.randn(n, generator=g)).exp()
            assert norm_report(wide)["bimodal"] is False


def test_detector_fixed_mode_and_bad_arguments():
    norms, injected = injected_norms()
    assert torch.equal(norm_report(norms.flatten(), mode="fixed", tau=40.0)["mask"], injected.flatten())
    with pytest.raises(ValueError, match="tau"):
        norm_report(norms, mode="fixed")
    with pytest.raises(ValueError, match="mode"):
        norm_report(norms, mode="gmm")


def test_norms_by_type_and_layer_emergence():
    g = torch.Generator().manual_seed(0)
    layers = {}
    for layer in range(4):
        patches = torch.randn(50, 16, 32, generator=g)
        if layer >= 2:  # artifacts appear at block 2 and stay, at two fixed positions
            patches[:, [3, 12]] *= 20
        layers[layer] = Tokens(patches=patches, registers=5 * torch.randn(50, 2, 32, generator=g))
    curves = layer_curves(layers, mode="ratio")
    assert [c["outlier_fraction"] for c in curves] == [0.0, 0.0, 2 / 16, 2 / 16]
    assert curves[3]["patches"]["max_over_median"] > 10 > curves[1]["patches"]["max_over_median"]
    by_type = norms_by_type(layers[0])
    assert set(by_type) == {"patches", "reg_0", "reg_1"}
    assert by_type["reg_0"]["q50"] > 3 * by_type["patches"]["q50"]


# -------------------------------------------------------------------------------------- attention


def brute_force_flow(attn: torch.Tensor, has_cls: bool, R: int) -> dict[str, torch.Tensor]:
    """Per-image, per-layer loop version of a few statistics, for comparison."""
    B, L, H, T, _ = attn.shape
    p0 = int(has_cls) + R
    out = {k: torch.zeros(B, L) for k in ("patch_entropy", "patch_self", "patch_to_registers", "register_to_patches")}
    for b in range(B):
        for l in range(L):
            for h in range(H):
                a = attn[b, l, h].double()
                for i in range(p0, T):
                    row = a[i]
                    out["patch_entropy"][b, l] += -(row * row.log()).sum() / math.log(T) / H / (T - p0)
                    out["patch_self"][b, l] += row[i] / H / (T - p0)
                    out["patch_to_registers"][b, l] += row[int(has_cls):p0].sum() / H / (T - p0)
                for r in range(int(has_cls), p0):
                    out["register_to_patches"][b, l] += a[r, p0:].sum() / H / R
    return out


def test_attention_flow_stats_invariants():
    B, L, H, R, N = 2, 3, 2, 4, 16
    T = R + N
    uniform = attention_flow_stats(torch.full((B, L, H, T, T), 1 / T), has_cls=False, num_registers=R)
    assert torch.allclose(uniform["patch_entropy"], torch.ones(B, L))
    assert torch.allclose(uniform["patch_patch_entropy"], torch.ones(B, L))
    assert torch.allclose(uniform["patch_self"], torch.full((B, L), 1 / T))
    assert torch.allclose(uniform["patch_to_registers"], torch.full((B, L), R / T))
    assert "cls_self" not in uniform
    diagonal = attention_flow_stats((20 * torch.eye(T + 1)).expand(B, L, H, -1, -1).softmax(-1), True, R)
    assert diagonal["cls_self"].min() > 0.99 and diagonal["patch_self"].min() > 0.99
    assert diagonal["patch_entropy"].max() < 0.01
    random = torch.randn(B, L, H, T + 1, T + 1).softmax(-1)
    stats = attention_flow_stats(random, True, R)
    total = stats["patch_to_patches"] + stats["patch_to_registers"] + stats["patch_to_cls"]
    assert torch.allclose(total, torch.ones(B, L), atol=1e-6)
    random = torch.randn(B, L, H, T, T).softmax(-1)
    stats, reference = attention_flow_stats(random, False, R), brute_force_flow(random, False, R)
    for name, value in reference.items():
        assert torch.allclose(stats[name], value.float(), atol=1e-6), name


def test_attention_maps_are_distributions_over_patches():
    attn = torch.randn(3, 2, 21, 21).softmax(-1)  # 1 cls + 4 registers + 16 patches
    maps = attention_maps(attn, has_cls=True, num_registers=4)
    assert maps["registers"].shape == (3, 4, 16) and maps["patches"].shape == (3, 16) and maps["cls"].shape == (3, 16)
    for m in maps.values():
        assert torch.allclose(m.sum(-1), torch.ones(m.shape[:-1]))


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_recorded_attention_is_the_models_attention(pos_embed):
    encoder = Encoder(build_config("cpu-tiny", {"model": {"pos_embed": pos_embed}}).model)
    x = torch.randn(3, 1, 16, 16)
    attn = collect_attention(encoder, x)
    assert attn.shape == (3, 2, 2, 20, 20) and attn.dtype == torch.float32
    assert torch.allclose(attn.sum(-1), torch.ones(3, 2, 2, 20), atol=1e-5)
    assert all(block.attn.fused_attn for block in encoder.vit.blocks)  # restored
    with torch.no_grad():  # q = k = 0 -> uniform attention, normalised entropy 1 in every block
        for block in encoder.vit.blocks:
            if pos_embed == "rope":  # CAPI's layout: separate q, k and v projections
                block.attn.q_proj.weight.zero_()
                block.attn.k_proj.weight.zero_()
            else:
                block.attn.qkv.weight[: 2 * 32].zero_()
    stats = attention_flow_stats(collect_attention(encoder, x), has_cls=False, num_registers=4)
    assert torch.allclose(stats["patch_entropy"], torch.ones(3, 2), atol=1e-5)


def test_recorder_matches_softmax_of_qk():
    encoder = Encoder(build_config("cpu-tiny").model).eval()
    inputs = []
    attn_module = encoder.vit.blocks[1].attn
    handle = attn_module.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad(), attention_recorder(encoder) as maps:
        encoder(torch.randn(2, 1, 16, 16))
    handle.remove()
    x = inputs[0]
    q, k, _ = attn_module.qkv(x).view(2, 20, 3, 2, 16).permute(2, 0, 3, 1, 4)
    expected = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)
    assert torch.allclose(maps[1], expected, atol=1e-6)


# ------------------------------------------------------------------------------------ the runner


def test_run_diagnostics_finds_artifacts_planted_in_a_model():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=4, num_heads=2, num_classes=0,
                            reg_tokens=4, class_token=False, no_embed_class=True, global_pool="")
    planted = [4 + 5, 4 + 10]  # sequence indices (after 4 registers) of grid cells 5 and 10
    vit.blocks[2].register_forward_hook(lambda _m, _i, out: out.index_add(
        1, torch.tensor(planted), torch.full((out.shape[0], 2, 32), 50.0)))
    report = run_diagnostics(vit, torch.randn(40, 1, 16, 16), batch_size=16)
    json.dumps(report)  # JSON-ready
    assert report["outliers"]["bimodal"] is True and report["outliers"]["fraction"] == pytest.approx(2 / 16)
    frequency = torch.tensor(report["outliers"]["position_frequency"])
    assert frequency.shape == (4, 4)
    assert torch.equal(frequency.flatten().nonzero().flatten(), torch.tensor([5, 10]))
    assert [c["outlier_fraction"] for c in report["layer_curves"]] == [0.0, 0.0, 2 / 16, 2 / 16]
    assert len(report["attention_flow"]["patch_to_registers"]) == 4
    assert report["norms_by_type"].keys() == {"patches", "reg_0", "reg_1", "reg_2", "reg_3"}
