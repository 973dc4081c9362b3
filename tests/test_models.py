"""CAPI networks: encoder (timm layout, visible-token gather, CPU attention), predictor, heads, student."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from capi_core.config import build_config
from capi_core.models import ClusteringHead, Encoder, Predictor, Student, StudentHead, param_groups
from capi_core.models.attention import (EXPLICIT_MAX_KEYS, TimmAttention, explicit_attention,
                                        scaled_dot_product_attention)
from capi_core.models.rope import Rope, apply_rope, patch_coords, register_coords, rope_freqs, token_coords
from capi_core.models.vit import residual

SCHEMES = ["learned", "rope"]


def tiny(pos_embed: str = "learned", **model):
    """cpu-tiny: 16x16 images, patch 4 (N = 16), dim 32, 2 heads, depth 2, K = 64."""
    return build_config("cpu-tiny", {"model": {"pos_embed": pos_embed, **model}})


def masks(batch: int, n: int, n_vis: int, n_pred: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample visible indices [B, n_vis] (sorted) and predicted indices [B, n_pred] among the rest."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    return order[:, :n_vis].sort(dim=1).values, order[:, n_vis:n_vis + n_pred]


class KeepIndices(nn.Module):
    """Stands in for timm's patch dropout: keeps the given patch indices after the prefix tokens."""

    def __init__(self, keep: torch.Tensor, num_prefix: int, with_indices: bool):
        super().__init__()
        self.keep, self.num_prefix, self.with_indices = keep, num_prefix, with_indices

    def forward(self, x):
        prefix, patches = x[:, :self.num_prefix], x[:, self.num_prefix:]
        kept = patches.gather(1, self.keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, kept], dim=1)
        return (x, self.keep) if self.with_indices else x


class SdpaDtypes(TorchFunctionMode):
    """Records the dtypes that reach F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.dtypes.append(tuple(t.dtype for t in args[:3]))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------- encoder

@pytest.mark.parametrize("pos_embed,registers", [(s, r) for s in SCHEMES for r in (0, 1, 4, 16)
                                                 if not (s == "rope" and r % 4)])
def test_encoder_shapes(pos_embed, registers):
    enc = Encoder(tiny(pos_embed, registers=registers).model)
    assert (enc.num_registers, enc.num_patches, enc.grid_size, enc.embed_dim) == (registers, 16, 4, 32)
    x = torch.randn(3, 1, 16, 16)
    visible, _ = masks(3, 16, 6, 0)
    assert enc(x).shape == (3, registers + 16, 32)
    assert enc(x, visible).shape == (3, registers + 6, 32)


@pytest.mark.parametrize("pos_embed", SCHEMES)
def test_teacher_path_equals_timm_forward_features(pos_embed):
    enc = Encoder(tiny(pos_embed).model).eval()
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(enc(x), enc.vit.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(enc(x, torch.arange(16).expand(2, -1)), enc(x))


def test_visible_gather_equals_timm_on_gathered_tokens():
    # Reference: timm's own forward_features with its patch-dropout slot keeping exactly our visible indices.
    enc = Encoder(tiny("learned", registers=4).model).eval()
    x = torch.randn(3, 1, 16, 16)
    visible, _ = masks(3, 16, 6, 0, seed=1)
    enc.vit.patch_drop = KeepIndices(visible, num_prefix=4, with_indices=False)
    torch.testing.assert_close(enc(x, visible), enc.vit.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_embed", SCHEMES)
def test_visible_tokens_keep_their_positions_in_any_order(pos_embed):
    # Attention is permutation-equivariant, so listing the visible patches in another order must only
    # permute the outputs; positions that did not travel with their tokens would change them.
    enc = Encoder(tiny(pos_embed, registers=4).model).eval()
    x = torch.randn(2, 1, 16, 16)
    visible, _ = masks(2, 16, 6, 0, seed=3)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    out, shuffled = enc(x, visible), enc(x, visible[:, perm])
    torch.testing.assert_close(shuffled[:, :4], out[:, :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled[:, 4:], out[:, 4:][:, perm], rtol=1e-5, atol=1e-5)


def test_exported_state_dict_loads_in_plain_timm(tmp_path):
    enc = Encoder(tiny("learned").model).eval()
    state = enc.vit.state_dict()
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    args = json.loads(json.dumps(enc.timm_model_args()))  # must survive a JSON file
    model = timm.create_model(enc.timm_architecture, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **args).eval()
    loaded = model.state_dict()
    assert set(loaded) == set(state)  # no missing, no unexpected keys
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    x = torch.randn(2, 1, 16, 16)
    # timm's SDPA against our explicit attention product (attention.py): fp32 summation order only.
    torch.testing.assert_close(model.forward_features(x), enc(x), rtol=1e-5, atol=1e-5)
    # The default head is mean pooling over patch tokens, registers excluded.
    torch.testing.assert_close(model(x), enc(x)[:, enc.num_registers:].mean(1))


def test_learned_encoder_has_no_linear_biases_and_a_frozen_identity_final_norm():
    enc = Encoder(tiny("learned").model)
    assert all(m.bias is None for m in enc.vit.blocks.modules() if isinstance(m, nn.Linear))
    assert [n for n, _ in enc.named_parameters() if n.endswith("bias")] == ["vit.patch_embed.proj.bias"]
    assert not enc.vit.norm.weight.requires_grad
    assert torch.equal(enc.vit.norm.weight, torch.ones(32))


def test_drop_path_is_uniform_over_depth():
    enc = Encoder(tiny("learned", drop_path=0.2, depth=4).model)
    rates = [getattr(b, f"drop_path{i}").drop_prob for b in enc.vit.blocks for i in (1, 2)]
    assert rates == [0.2] * 8


def test_rope_needs_head_dim_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        Encoder(tiny("rope", embed_dim=36, num_heads=2).model)


def test_rope_encoder_has_no_timm_equivalent_and_says_how_to_load_it():
    with pytest.raises(ValueError, match="capi_core.checkpoint.load_encoder"):
        Encoder(tiny("rope").model).timm_model_args()


def test_vit_l_has_the_official_parameters():
    """The official ViT-L/14: no linear biases (only the patch embedding's), RMSNorm weights in the blocks,
    no position embedding (RoPE, frozen), 16 registers, a final norm without parameters."""
    cfg = build_config("vit-l").model
    with torch.device("meta"):
        enc = Encoder(cfg)
    D, L, N = 1024, 24, 256
    expected = (L * (12 * D * D + 2 * D)  # q, k, v, proj, fc1, fc2 (no biases) + two RMSNorm weights per block
                + 3 * 14 * 14 * D + D  # patch embed conv (keeps its bias)
                + 16 * D)  # 16 registers
    assert sum(p.numel() for p in enc.parameters()) == expected
    assert [n for n, _ in enc.named_parameters() if n.endswith("bias")] == ["vit.patch_embed.proj.bias"]
    assert enc.num_patches == N and enc.num_registers == 16 and cfg.pos_embed == "rope"
    assert all(b.norm1.eps == 1e-5 for b in enc.vit.blocks) and enc.vit.norm.weight is None
    assert enc.vit.blocks[0].attn.q_proj.weight.shape == (D, D)


# ------------------------------------------------------------------------------------ attention on CPU

class SoftmaxDtypes(TorchFunctionMode):
    """Records the input dtypes of every softmax (Tensor.softmax and F.softmax)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.softmax, F.softmax, torch.softmax):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pos_embed", SCHEMES)
def test_short_attention_is_explicit_with_an_fp32_softmax_under_cpu_bf16_autocast(pos_embed):
    # 20 tokens: every attention of the student (encoder and predictor) takes the explicit product, whose
    # matmuls run in bf16 and whose softmax runs in fp32; none reaches SDPA (slow on CPU at this length).
    cfg = tiny(pos_embed)
    student = Student(cfg)
    visible, predict = masks(2, 16, 6, 4)
    x = torch.randn(2, 1, 16, 16)
    sdpa, softmax = SdpaDtypes(), SoftmaxDtypes()
    with sdpa, softmax, torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(x, visible, predict)
    assert sdpa.dtypes == []
    assert softmax.dtypes == [torch.float32] * (cfg.model.depth + cfg.model.predictor_depth)
    assert logits.dtype == torch.bfloat16  # the rest still runs in bf16


def test_explicit_attention_is_sdpa_up_to_rounding():
    # fp32: the same sums in another order (fp32 rounding, ~1e-7 relative); bf16 autocast: the two
    # matmuls round to bf16 (8 significant bits, ~4e-3 relative), the softmax does not.
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 20, 16).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(explicit_attention(q, k, v), ref, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("autocast", [False, True])
def test_long_or_masked_attention_still_goes_to_sdpa_in_fp32(autocast):
    long = torch.randn(1, 2, EXPLICIT_MAX_KEYS[autocast] + 1, 8)
    short = torch.randn(1, 2, 5, 8)
    recorder = SdpaDtypes()
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        scaled_dot_product_attention(long, long, long)  # beyond the explicit form's measured gain
        scaled_dot_product_attention(short, short, short, dropout_p=0.5)  # an option it does not have
        scaled_dot_product_attention(short, short, short, is_causal=True)
    assert recorder.dtypes == [(torch.float32,) * 3] * 3
    # Without the policy, autocast would have run SDPA in bf16, whose backward is slow on CPU.
    q = torch.randn(1, 2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.scaled_dot_product_attention(q, q, q).dtype == torch.bfloat16


def test_timm_attention_is_timms_forward_up_to_rounding():
    torch.manual_seed(0)
    ours = TimmAttention(32, num_heads=2, proj_bias=False).eval()
    plain = timm.layers.Attention(32, num_heads=2, proj_bias=False).eval()
    assert list(ours.state_dict()) == list(plain.state_dict())  # same layout: exports load into timm
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 32)
    # fp32: timm's SDPA and our explicit product differ by summation order only.
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), plain(x), rtol=3e-2, atol=3e-2)  # bf16 projections and product
    ours.fused_attn = False  # what attention diagnostics switch to: timm's explicit softmax
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pos_embed", SCHEMES)
def test_the_student_runs_without_a_torch_function_mode(pos_embed):
    # The previous policy wrapped the encoder in a TorchFunctionMode; its per-op Python dispatch cost
    # ~7 % of a bf16 step. No mode may be active inside any block.
    student = Student(tiny(pos_embed))
    depths = []
    for block in [*student.encoder.vit.blocks, *student.predictor.blocks]:
        block.register_forward_pre_hook(lambda m, a: depths.append(torch._C._len_torch_function_stack()))
    visible, predict = masks(2, 16, 6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student(torch.randn(2, 1, 16, 16), visible, predict)
    assert depths == [0] * (len(student.encoder.vit.blocks) + len(student.predictor.blocks))


# ------------------------------------------------------------------------------------------- predictor

@pytest.mark.parametrize("pos_embed", SCHEMES)
def test_prediction_is_independent_of_the_other_queries(pos_embed):
    cfg = tiny(pos_embed, registers=4, predictor_depth=2)
    predictor = Predictor(cfg.model).eval()
    visible, rest = masks(2, 16, 6, 10, seed=2)
    context = torch.randn(2, 4 + 6, 32)
    everything = predictor(context, visible, rest)
    assert everything.shape == (2, 10, 32)
    subset = predictor(context, visible, rest[:, [7, 2]])
    torch.testing.assert_close(subset, everything[:, [7, 2]], rtol=1e-5, atol=1e-5)


def test_predictor_uses_its_context():
    predictor = Predictor(tiny("learned").model).eval()
    visible, predict = masks(1, 16, 6, 3)
    context = torch.randn(1, 4 + 6, 32)
    assert not torch.allclose(predictor(context, visible, predict), predictor(context + 1, visible, predict))


def test_predictor_rejects_a_context_of_the_wrong_length():
    predictor = Predictor(tiny("learned", registers=4).model)
    visible, predict = masks(1, 16, 6, 3)
    with pytest.raises(ValueError, match="4 registers"):
        predictor(torch.randn(1, 6, 32), visible, predict)


# ------------------------------------------------------------------------------------------------ RoPE

def reference_rope(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """CAPI's RoPE written out from its definition, one channel at a time.

    head_dim hd, q = hd/4 frequencies f_j = 2 pi * 7 * (7e-4 / 7)^(j / (q - 1)); channel i < hd/2 uses the
    row angle a = row * f_(i mod q) and is mixed with channel i + hd/2, which uses the column angle
    b = col * f_(i mod q): out_i = x_i cos a - x_(i+hd/2) sin a, out_(i+hd/2) = x_(i+hd/2) cos b + x_i sin b.
    x [T, hd] (float64), coords [T, 2].
    """
    T, hd = x.shape
    q, half = hd // 4, hd // 2
    f = [2 * math.pi * 7.0 * (7e-4 / 7.0) ** (j / (q - 1)) for j in range(q)]
    out = torch.empty_like(x)
    for t in range(T):
        row, col = coords[t].tolist()
        for i in range(half):
            a, b = row * f[i % q], col * f[i % q]
            out[t, i] = x[t, i] * math.cos(a) - x[t, i + half] * math.sin(a)
            out[t, i + half] = x[t, i + half] * math.cos(b) + x[t, i] * math.sin(b)
    return out


def test_rope_is_the_official_formula():
    x = torch.randn(1, 1, 7, 16, dtype=torch.float64)
    coords = torch.rand(1, 7, 2)
    cos, sin = Rope(16)(coords)
    got = apply_rope(x, cos.double(), sin.double())[0, 0]
    torch.testing.assert_close(got, reference_rope(x[0, 0], coords[0]), rtol=1e-5, atol=1e-5)
    freqs = rope_freqs(16) / (2 * math.pi)
    expected = [7.0 * 1e-4 ** (j / 3) for j in range(4)]  # 7 down to 7e-4, log-spaced
    assert freqs[0, :4].tolist() == pytest.approx(expected, rel=1e-6) and freqs[0, 8:].abs().sum() == 0
    assert torch.equal(freqs[0, :8], freqs[1, 8:]) and torch.equal(freqs[0, :4], freqs[0, 4:8])


def test_patch_and_register_coordinates_are_the_references():
    assert patch_coords(3).tolist() == [[0, 0], [0, .5], [0, 1], [.5, 0], [.5, .5], [.5, 1], [1, 0], [1, .5], [1, 1]]
    # 2 per side: left edge down, bottom edge right, right edge up, top edge left.
    assert register_coords(8).tolist() == [[0, 0], [.5, 0], [1, 0], [1, .5], [1, 1], [.5, 1], [0, 1], [0, .5]]
    assert register_coords(0).shape == (0, 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        register_coords(6)
    visible = torch.tensor([[[0.25, 0.5], [0.5, 0.75], [0.75, 0.5]]])  # bounding box rows .25-.75, cols .5-.75
    coords = token_coords(register_coords(4), visible)
    assert coords[0, :4].tolist() == [[0.25, 0.5], [0.75, 0.5], [0.75, 0.75], [0.25, 0.75]]
    assert torch.equal(coords[0, 4:], visible[0])


def reference_encoder(enc: Encoder, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The official encoder's forward written out with the encoder's weights: patch embedding, the visible
    patches, registers first with coordinates on the visible bounding box's edges, then per block
    x + proj(attn(RoPE(q), RoPE(k), v)) on RMSNorm(x) and x + fc2(gelu(fc1(RMSNorm(x)))), final RMSNorm."""
    vit = enc.vit
    g = enc.grid_size
    patches = torch.nn.functional.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=4)
    patches = patches.flatten(2).transpose(1, 2)
    out = []
    for b in range(x.shape[0]):
        cells = visible[b].tolist()
        coords = torch.tensor([[(c // g) / (g - 1), (c % g) / (g - 1)] for c in cells], dtype=torch.float64)
        lo, hi = coords.min(0).values, coords.max(0).values
        side = torch.arange(enc.num_registers // 4) / (enc.num_registers // 4)
        edge = [(c, 0.0) for c in side] + [(1.0, c) for c in side] + [(1 - c, 1.0) for c in side] + \
            [(0.0, 1 - c) for c in side]
        reg = torch.tensor([[lo[0] + r * (hi[0] - lo[0]), lo[1] + c * (hi[1] - lo[1])] for r, c in edge])
        all_coords = torch.cat([reg, coords]).double()
        h = torch.cat([vit.reg_token[0], patches[b, cells]]).double()

        def rms(v, w=None):
            v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)
            return v if w is None else v * w.double()

        for block in vit.blocks:
            a = block.attn
            y = rms(h, block.norm1.weight)
            heads = []
            for i in range(a.num_heads):
                sl = slice(i * 16, (i + 1) * 16)
                q = reference_rope((y @ a.q_proj.weight.double().T)[:, sl], all_coords)
                k = reference_rope((y @ a.k_proj.weight.double().T)[:, sl], all_coords)
                v = (y @ a.v_proj.weight.double().T)[:, sl]
                heads.append(((q @ k.T) / 4.0).softmax(-1) @ v)
            h = h + torch.cat(heads, -1) @ a.proj.weight.double().T
            y = rms(h, block.norm2.weight)
            h = h + torch.nn.functional.gelu(y @ block.mlp.fc1.weight.double().T) @ block.mlp.fc2.weight.double().T
        out.append(rms(h))
    return torch.stack(out).float()


def test_rope_encoder_is_the_official_architecture():
    enc = Encoder(tiny("rope", registers=8).model).eval()  # dim 32, 2 heads of 16, depth 2
    x = torch.randn(2, 1, 16, 16)
    visible, _ = masks(2, 16, 6, 0, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, visible), reference_encoder(enc, x, visible), rtol=1e-4, atol=1e-4)
        every = torch.arange(16).expand(2, -1)
        torch.testing.assert_close(enc(x), reference_encoder(enc, x, every), rtol=1e-4, atol=1e-4)


def test_predictor_places_the_context_as_the_encoder_does():
    cfg = tiny("rope", registers=4).model
    enc, predictor = Encoder(cfg), Predictor(cfg)
    visible, predict = masks(3, 16, 6, 2, seed=5)
    _, enc_cos, enc_sin = enc.vit.tokens(torch.randn(3, 1, 16, 16), visible)
    (q_cos, _), (k_cos, k_sin) = predictor._rope(visible, predict)
    assert torch.equal(k_cos, enc_cos) and torch.equal(k_sin, enc_sin)
    assert torch.equal(q_cos, predictor.rope(patch_coords(4)[predict])[0])
    assert not torch.allclose(predictor(torch.randn(1, 10, 32), visible[:1], predict[:1]),
                              predictor(torch.randn(1, 10, 32), visible[:1], predict[:1] + 1))


def test_efficient_drop_path_runs_each_branch_on_a_subset_and_rescales():
    torch.manual_seed(0)
    x, extra = torch.randn(10, 3, 4), torch.randn(10, 5)
    seen = []

    def branch(y, e):
        seen.append((y.clone(), e.clone()))
        return torch.ones_like(y)

    out = residual(x, branch, 0.3, True, extra)
    (y, e), = seen
    assert y.shape[0] == 7  # int(10 * 0.7) samples through the branch
    rows = [next(i for i in range(10) if torch.equal(x[i], r)) for r in y]
    assert torch.equal(e, extra[rows])  # per-sample inputs follow their samples
    changed = [i for i in range(10) if not torch.equal(out[i], x[i])]
    assert sorted(changed) == sorted(rows)
    torch.testing.assert_close(out[rows], x[rows] + 10 / 7)
    assert torch.equal(residual(x, lambda y, e: y, 0.3, False, extra), 2 * x)  # eval: every sample, no scale


# ----------------------------------------------------------------------------------------------- heads

def test_clustering_head_init():
    head = ClusteringHead(64, 1024)
    assert abs(head.linear.weight.std().item() - 1.0) < 0.02
    assert torch.count_nonzero(head.linear.bias) == 0
    logits = head(torch.randn(8, 32, 64) * 5)  # [N, B, D] -> [N, B, K]; input scale is normalised away
    assert logits.shape == (8, 32, 1024)
    assert abs(logits.std().item() - 1.0) < 0.05


def test_student_head_weight_norm():
    head = StudentHead(64, 256)
    assert torch.equal(head.weight_g, torch.ones(256, 1))
    assert abs(head.weight_v.std().item() - 0.02) < 0.002
    assert {n for n, _ in head.named_parameters()} == {"weight_g", "weight_v"}  # no bias
    x = torch.randn(10, 64)
    torch.testing.assert_close(head(3 * x), head(x))
    with torch.no_grad():
        head.weight_g.fill_(2.0)
    # Rows of the effective weight have norm g, so a unit input along a row's direction gives logit g.
    direction = F.normalize(head.weight_v[5], dim=0)
    torch.testing.assert_close(head(direction)[5], torch.tensor(2.0))
    head(x).square().sum().backward()
    assert head.weight_g.grad.abs().sum() > 0 and head.weight_v.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- student

@pytest.mark.parametrize("pos_embed", SCHEMES)
@pytest.mark.parametrize("registers", [0, 4])
def test_student_forward_backward_reaches_every_trainable_param(pos_embed, registers):
    cfg = tiny(pos_embed, registers=registers)
    student = Student(cfg)
    visible, predict = masks(3, 16, 6, 4)
    logits = student(torch.randn(3, 1, 16, 16), visible, predict)
    assert logits.shape == (3 * 4, cfg.clustering.num_clusters)
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


@pytest.mark.parametrize("pos_embed", SCHEMES)
def test_param_groups(pos_embed):
    cfg = tiny(pos_embed)
    student = Student(cfg)
    groups = param_groups(student, cfg.optim)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)) and set(seen) == trainable

    where = {id(p): g for g in groups for p in g["params"]}
    params = dict(student.named_parameters())
    o = cfg.optim

    def mults(name):
        g = where[id(params[name])]
        assert g["weight_decay"] == pytest.approx(o.weight_decay * g["wd_mult"])
        return g["lr_mult"], g["wd_mult"]

    assert mults("encoder.vit.patch_embed.proj.weight") == (o.patch_embed_lr_mult, 1.0)
    assert mults("encoder.vit.patch_embed.proj.bias") == (o.patch_embed_lr_mult, 0.0)
    assert mults("encoder.vit.blocks.0.norm1.weight") == (1.0, o.norm_wd_mult)
    assert mults("encoder.vit.blocks.1.attn." + ("q_proj" if pos_embed == "rope" else "qkv") + ".weight") == (1.0, 1.0)
    assert mults("encoder.vit.reg_token") == (1.0, 1.0)
    assert mults("predictor.mask_token") == (1.0, 1.0)
    assert mults("predictor.blocks.0.norm2.weight") == (1.0, o.norm_wd_mult)
    assert mults("head.weight_g") == mults("head.weight_v") == (1.0, 1.0)
    if pos_embed == "rope":  # no biases but the patch embedding's; RoPE frequencies are a buffer, never trained
        assert [n for n in params if n.endswith(".bias")] == ["encoder.vit.patch_embed.proj.bias"]
        assert "encoder.vit.rope.freqs" in student.state_dict() and "encoder.vit.norm.weight" not in params
    else:  # the final norm's identity affine is frozen
        assert "encoder.vit.norm.weight" in params and id(params["encoder.vit.norm.weight"]) not in where
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input
