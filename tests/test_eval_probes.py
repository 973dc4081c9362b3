"""Probes on synthetic features whose answer is known: separable clusters and the "needle" task."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from capi_core.eval.features import Tokens
from capi_core.eval.knn import knn_predict, knn_top1
from capi_core.eval.probes import (
    AbMILPHead,
    AttentiveHead,
    EfficientProbe,
    ProbeProtocol,
    attentive_heads,
    ep_num_params,
    lr_factor,
    run_probe,
    run_probes,
    select_probe,
    train_head,
)

FAST = ProbeProtocol(epochs=20, batch_size=64)


@pytest.fixture(autouse=True, scope="module")  # module scope: also covers the module-scoped fixtures
def one_thread():
    """Probe heads here are tiny: one thread avoids OpenMP barrier stalls when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def separable(n: int, seed: int, num_classes: int = 4, dim: int = 16, tokens: int = 9) -> tuple[Tokens, torch.Tensor]:
    """Every token of an image = its class centre (fixed, far apart) + small noise: linearly separable."""
    centres = 2.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centres[y].unsqueeze(1) + 0.3 * torch.randn(n, tokens + 1, dim, generator=g)
    return Tokens(patches=x[:, 1:], registers=x[:, :0], cls=x[:, 0]), y


def needle(n: int, seed: int, num_tokens: int = 64, dim: int = 32, num_classes: int = 4, amp: float = 4.0):
    """A needle task: tokens are noise except one random patch carrying "object" + class-specific pattern.

    Mean pooling divides the needle by N; a selective pooling can find it. Returns (Tokens, labels,
    needle positions).
    """
    basis = torch.linalg.qr(torch.randn(dim, num_classes + 1, generator=torch.Generator().manual_seed(99)))[0].T
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, num_tokens, dim, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    pos = torch.randint(0, num_tokens, (n,), generator=g)
    x[torch.arange(n), pos] += amp * (basis[0] + basis[1 + y])
    registers = torch.randn(n, 4, dim, generator=g)
    return Tokens(patches=x, registers=registers), y, pos


# ------------------------------------------------------------------------------------------- k-NN


def test_knn_is_perfect_on_separated_clusters_and_chunking_changes_nothing():
    train, ytr = separable(200, seed=0)
    test, yte = separable(100, seed=1)
    assert knn_top1(train.cls, ytr, test.cls, yte, k=20) == 100.0
    whole = knn_predict(train.cls, ytr, test.cls, k=20)
    chunked = knn_predict(train.cls, ytr, test.cls, k=20, chunk_size=7)
    assert torch.equal(whole, chunked)


def test_knn_votes_are_weighted_by_similarity():
    # One very close neighbour of class 1 against two farther ones of class 0 (cosine 1 vs 0.6).
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    train_y = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train_x, train_y, query, k=3, temperature=0.07).item() == 1  # exp(1/T) dominates
    assert knn_predict(train_x, train_y, query, k=3, temperature=100.0).item() == 0  # ~uniform: majority


def test_knn_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="labels"):
        knn_top1(torch.randn(5, 4), torch.zeros(4, dtype=torch.long), torch.randn(3, 4), torch.zeros(3))


# ------------------------------------------------------------------------------ separable features


def test_linear_probes_are_perfect_on_separable_features():
    train, ytr = separable(400, seed=0)
    test, yte = separable(200, seed=1)
    results = {r.probe: r for r in run_probes(train, ytr, test, yte, probes=("knn", "linear_cls", "linear_mean"),
                                              protocol=FAST)}
    assert results["knn"].top1 == 100.0
    assert results["linear_cls"].top1 == 100.0
    assert results["linear_mean"].top1 == 100.0
    assert results["linear_mean"].params == 16 * 4 + 4  # BN without affine has no trainable parameters
    assert set(results["linear_mean"].selected) == {"lr"}


def test_cls_probe_is_not_applicable_without_cls_token():
    train, ytr = separable(100, seed=0)
    test, yte = separable(50, seed=1)
    train.cls = test.cls = None
    (result,) = run_probes(train, ytr, test, yte, probes=("linear_cls",), protocol=FAST)
    assert result.top1 is None and "n/a" in result.note


def test_probes_need_labels_and_known_names():
    train, ytr = separable(100, seed=0)
    test, yte = separable(50, seed=1)
    with pytest.raises(ValueError, match="no labels"):
        run_probes(train, ytr, test, torch.full_like(yte, -1), probes=("knn",))
    with pytest.raises(ValueError, match="unknown probe"):
        run_probes(train, ytr, test, yte, probes=("mlp",))


# ------------------------------------------------------------------------------ selection protocol


def test_selection_never_reads_the_test_split():
    # The selection API has no way to receive test data ...
    assert list(inspect.signature(select_probe).parameters) == ["name", "x", "y", "num_classes", "protocol"]
    # ... and scrambling the test labels changes the test score only, never what was selected.
    train, ytr, _ = needle(400, seed=0)
    test, yte, _ = needle(200, seed=1)
    wrong = (yte + 1) % 4  # every test label wrong
    for name in ("knn", "abmilp"):
        x_tr = train.patches.mean(1) if name == "knn" else train.patches
        x_te = test.patches.mean(1) if name == "knn" else test.patches
        honest = run_probe(name, x_tr, ytr, x_te, yte, 4, FAST)
        scrambled = run_probe(name, x_tr, ytr, x_te, wrong, 4, FAST)
        assert honest.selected == scrambled.selected
        assert honest.val_top1 == scrambled.val_top1
        assert scrambled.top1 < honest.top1


def test_probe_training_is_deterministic():
    train, ytr, _ = needle(300, seed=0)
    test, yte, _ = needle(100, seed=1)
    first = run_probes(train, ytr, test, yte, probes=("ep",), protocol=FAST)[0]
    second = run_probes(train, ytr, test, yte, probes=("ep",), protocol=FAST)[0]
    assert first == second


# ---------------------------------------------------------------------------------- needle task


@pytest.fixture(scope="module")
def needle_results():
    train, ytr, _ = needle(1000, seed=0)
    test, yte, _ = needle(300, seed=1)
    return {r.probe: r for r in run_probes(train, ytr, test, yte, probes=("linear_mean", "attentive", "abmilp", "ep"),
                                           protocol=FAST)}


@pytest.mark.parametrize("probe", ["attentive", "abmilp", "ep"])
def test_selective_pooling_beats_mean_pooling_on_needle(needle_results, probe):
    assert needle_results[probe].top1 >= needle_results["linear_mean"].top1 + 10.0


def test_abmilp_puts_most_mass_on_the_needle():
    train, ytr, _ = needle(1000, seed=0)
    test, _, pos = needle(300, seed=1)
    selection = select_probe("abmilp", train.patches, ytr, 4, FAST)
    weights = selection.model.attention(test.patches)  # [B, N]
    assert torch.allclose(weights.sum(dim=1), torch.ones(300))
    assert weights[torch.arange(300), pos].mean() > 0.5


def test_registers_are_excluded_unless_asked():
    train, ytr, _ = needle(200, seed=0)
    test, yte, _ = needle(50, seed=1)
    captured = []

    class Spy(AbMILPHead):
        def forward(self, x):
            captured.append(x.shape[1])
            return super().forward(x)

    from capi_core.eval import probes

    original = probes.PROBES["abmilp"]
    probes.PROBES["abmilp"] = probes.Probe("tokens", Spy)
    try:
        run_probes(train, ytr, test, yte, probes=("abmilp",), protocol=ProbeProtocol(epochs=1, lrs=(1e-3,)))
        run_probes(train, ytr, test, yte, probes=("abmilp",), protocol=ProbeProtocol(epochs=1, lrs=(1e-3,)),
                   include_registers=True)
    finally:
        probes.PROBES["abmilp"] = original
    assert set(captured) == {64, 68}


# ------------------------------------------------------------------------------------ head shapes


def test_efficient_probe_parameter_count_matches_the_paper_formula():
    # ViT-B, M = 32, C = 1000: 589,824 + 24,576 + 769,000, the "Trainable Parameters" that
    # github.com/billpsomas/efficient-probing logs in logs/mae_base/ep.txt.
    assert ep_num_params(768, 1000, num_queries=32) == 1_383_400
    vit_b = EfficientProbe(768, 1000, num_queries=32)
    assert sum(p.numel() for p in vit_b.parameters() if p.requires_grad) == 1_383_400
    for d_out in (1, 2):
        head = EfficientProbe(64, 10, num_queries=8, d_out=d_out)
        assert sum(p.numel() for p in head.parameters()) == ep_num_params(64, 10, 8, d_out)
        assert sum(p.numel() for p in head.parameters()) - (64 // d_out * 10 + 10) == 64 * 64 // d_out + 8 * 64
        x = torch.randn(5, 64, 64)
        assert head(x).shape == (5, 10)
        assert head.attention(x).shape == (5, 8, 64)


def test_efficient_probe_rejects_indivisible_settings():
    with pytest.raises(ValueError, match="divisible"):
        EfficientProbe(64, 10, num_queries=6)
    with pytest.raises(ValueError, match="divisible"):
        EfficientProbe(64, 10, num_queries=8, d_out=3)


def test_attentive_head_follows_capi():
    assert attentive_heads(768) == 12 and attentive_heads(192) == 3 and attentive_heads(32) == 1
    head = AttentiveHead(192, 7)
    assert head.kv.in_features == 192 and head.kv.out_features == 384 and head.kv.bias is not None
    assert head.query.shape == (192,)
    assert head(torch.randn(3, 49, 192)).shape == (3, 7)


# ------------------------------------------------------------------------------------ lr schedule

def test_probe_lr_warms_up_linearly_then_follows_a_cosine_to_zero():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[:10] == pytest.approx([s / 9 for s in range(10)])  # from 0, as the reference's linspace
    assert f[10] == 1.0 and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    # Without warmup: the cosine from step 0, the schedule before warmup existed.
    assert [lr_factor(s, 50, 0) for s in range(50)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * s / 50)) for s in range(50)])


def test_the_protocols_warmup_reaches_the_training_loop():
    x, y = torch.randn(128, 4, 8), torch.randint(0, 3, (128,))
    heads = []
    for warmup in (0.0, 0.5):
        torch.manual_seed(0)
        protocol = ProbeProtocol(epochs=2, batch_size=32, warmup_fraction=warmup)
        heads.append(train_head(AttentiveHead(8, 3), x, y, lr=0.1, protocol=protocol))
    assert not torch.equal(heads[0].fc.weight, heads[1].fc.weight)
