"""CAPI networks: encoder (timm layout, visible-token gather, fp32 attention), predictor, heads, student."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from capi_core.config import build_config
from capi_core.models import ClusteringHead, Encoder, Predictor, Student, StudentHead, param_groups
from capi_core.models.predictor import grid_coords, register_edge_coords, rope_embed

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


@pytest.mark.parametrize("pos_embed", SCHEMES)
def test_visible_gather_equals_timm_on_gathered_tokens(pos_embed):
    # Reference: timm's own forward_features with its patch-dropout slot keeping exactly our visible
    # indices (timm then also gathers the RoPE table itself, with apply_keep_indices_nlc).
    enc = Encoder(tiny(pos_embed, registers=4).model).eval()
    x = torch.randn(3, 1, 16, 16)
    visible, _ = masks(3, 16, 6, 0, seed=1)
    enc.vit.patch_drop = KeepIndices(visible, num_prefix=4, with_indices=pos_embed == "rope")
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


@pytest.mark.parametrize("pos_embed", SCHEMES)
def test_exported_state_dict_loads_in_plain_timm(pos_embed, tmp_path):
    enc = Encoder(tiny(pos_embed).model).eval()
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
    torch.testing.assert_close(model.forward_features(x), enc(x), rtol=0, atol=0)
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


def test_vit_l_constructs_without_biases():
    cfg = build_config("vit-l").model
    with torch.device("meta"):
        enc = Encoder(cfg)
    D, L, N = 1024, 24, 256
    expected = (L * (12 * D * D + 2 * D)  # qkv, proj, fc1, fc2 (no biases) + two RMSNorm weights per block
                + 3 * 14 * 14 * D + D  # patch embed conv (keeps its bias)
                + N * D + 16 * D + D)  # pos embed, 16 registers, final norm
    assert sum(p.numel() for p in enc.parameters()) == expected
    assert enc.num_patches == N and enc.num_registers == 16


# -------------------------------------------------------------------------------------- fp32 attention

@pytest.mark.parametrize("pos_embed", SCHEMES)
def test_attention_runs_in_fp32_under_cpu_bf16_autocast(pos_embed):
    cfg = tiny(pos_embed)
    student = Student(cfg)
    visible, predict = masks(2, 16, 6, 4)
    x = torch.randn(2, 1, 16, 16)
    recorder = SdpaDtypes()
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(x, visible, predict)
    assert len(recorder.dtypes) == cfg.model.depth + cfg.model.predictor_depth
    assert set(recorder.dtypes) == {(torch.float32,) * 3}
    assert logits.dtype == torch.bfloat16  # the rest still runs in bf16
    # Without the policy, autocast would have run attention in bf16.
    q = torch.randn(1, 2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.scaled_dot_product_attention(q, q, q).dtype == torch.bfloat16


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


def test_predictor_rope_table_matches_timm_encoder_rope():
    enc = Encoder(tiny("rope").model)
    predictor = Predictor(tiny("rope").model)
    torch.testing.assert_close(rope_embed(grid_coords(4), predictor.bands), enc.vit.rope.get_embed())


def test_register_edge_layout():
    expected = torch.tensor([[0, 0], [0, .5], [0, 1], [.5, 1], [1, 1], [1, .5], [1, 0], [.5, 0]])
    torch.testing.assert_close(register_edge_coords(8), expected)
    assert register_edge_coords(0).shape == (0, 2)


def test_rope_predictor_is_translation_invariant():
    # RoPE is relative and the registers sit on the visible bounding box, so moving the visible block
    # and the queries together changes nothing. Fixed register coordinates would break this.
    predictor = Predictor(tiny("rope", registers=4).model).eval()
    context = torch.randn(1, 4 + 4, 32)
    visible, predict = torch.tensor([[0, 1, 4, 5]]), torch.tensor([[2, 8, 10]])  # a 2x2 block and 3 queries
    moved = predictor(context, visible + 5, predict + 5)  # one row down, one column right
    torch.testing.assert_close(moved, predictor(context, visible, predict), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(predictor(context, visible, predict + 1), predictor(context, visible, predict))


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
    assert mults("encoder.vit.blocks.1.attn.qkv.weight") == (1.0, 1.0)
    assert mults("encoder.vit.reg_token") == (1.0, 1.0)
    assert mults("predictor.mask_token") == (1.0, 1.0)
    assert mults("predictor.blocks.0.norm2.weight") == (1.0, o.norm_wd_mult)
    assert mults("head.weight_g") == mults("head.weight_v") == (1.0, 1.0)
    if pos_embed == "rope":
        assert mults("encoder.vit.blocks.0.mlp.fc1.bias") == (1.0, 0.0)
        assert mults("encoder.vit.blocks.0.norm1.bias") == (1.0, 0.0)
    assert "encoder.vit.norm.weight" in params and id(params["encoder.vit.norm.weight"]) not in where
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input
