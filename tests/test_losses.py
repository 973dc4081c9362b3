import math

import pytest
import torch

from capi_core.losses import capi_loss, cluster_usage, clustering_loss, target_entropy


def _explicit_ce(logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean over rows of -sum_k T_k log softmax(z / temp)_k, in float64."""
    z = logits.double() / temp
    log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)
    return -(targets.double() * log_p).sum(-1).mean()


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_capi_loss_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; CE against [1/2, 1/2] = (ln 4 + ln 4/3) / 2
    loss = capi_loss(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.5, 0.5]]), temp=1.0)
    assert loss.item() == pytest.approx(0.5 * (math.log(4) + math.log(4 / 3)), rel=1e-6)


def test_capi_loss_matches_float64_formula_and_temperature():
    logits, targets = _rand(10, 32), _rand(10, 32, seed=1).softmax(-1)
    loss = capi_loss(logits, targets, temp=0.12)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(_explicit_ce(logits, targets, 0.12).item(), rel=1e-5)
    # the temperature divides the logits
    assert loss.item() == pytest.approx(capi_loss(logits / 0.12, targets, temp=1.0).item(), rel=1e-5)


def test_loss_is_computed_in_fp32_from_bf16_logits():
    logits, targets = _rand(6, 16).bfloat16(), _rand(6, 16, seed=1).softmax(-1).bfloat16()
    loss = capi_loss(logits, targets, temp=0.12)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_explicit_ce(logits.float(), targets.float(), 0.12).item(), rel=1e-5)


def test_gradient_reaches_logits_only_and_is_softmax_minus_target():
    m, k, temp = 5, 8, 0.12
    logits = _rand(m, k).requires_grad_()
    targets = _rand(m, k, seed=1).softmax(-1).requires_grad_()
    capi_loss(logits, targets, temp).backward()
    assert targets.grad is None
    expected = ((logits.detach() / temp).softmax(-1) - targets.detach()) / (m * temp)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-4, atol=1e-6)


def test_clustering_loss_averages_over_all_tokens():
    n, b, k = 3, 4, 16
    logits, assign = _rand(n, b, k), _rand(n, b, k, seed=1).softmax(-1)
    loss = clustering_loss(logits, assign, temp=0.12)
    assert loss.item() == pytest.approx(_explicit_ce(logits.reshape(-1, k), assign.reshape(-1, k), 0.12).item(),
                                        rel=1e-5)
    # mean over tokens, not over positions of per-position sums
    per_token = [_explicit_ce(logits[i, j : j + 1], assign[i, j : j + 1], 0.12) for i in range(n) for j in range(b)]
    assert loss.item() == pytest.approx(torch.stack(per_token).mean().item(), rel=1e-5)


def test_clustering_loss_gradient_never_reaches_assignments():
    logits = _rand(2, 3, 8).requires_grad_()
    assign = _rand(2, 3, 8, seed=1).softmax(-1).requires_grad_()
    clustering_loss(logits, assign, temp=0.12).backward()
    assert assign.grad is None and logits.grad is not None and logits.grad.abs().sum() > 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        capi_loss(torch.zeros(4, 8), torch.zeros(4, 16), temp=0.1)


def test_target_entropy():
    k = 16
    one_hot = torch.eye(k)[:5]
    uniform = torch.full((5, k), 1.0 / k)
    assert target_entropy(one_hot).item() == 0.0  # 0 log 0 counts as 0
    assert target_entropy(uniform).item() == pytest.approx(math.log(k), rel=1e-6)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert target_entropy(half).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_cluster_usage():
    k = 8
    assign = torch.eye(k)[torch.tensor([0, 2, 2, 5])]  # mean = [1/4, 0, 1/2, 0, 0, 1/4, 0, 0]
    used, perplexity = cluster_usage(assign)
    assert used == 3
    assert perplexity == pytest.approx(2**1.5, rel=1e-5)  # exp(H) with H = 1.5 ln 2
    # leading dims are flattened; a balanced mean gives perplexity K
    used, perplexity = cluster_usage(torch.eye(k).repeat(3, 1).view(2, 12, k))
    assert used == k and perplexity == pytest.approx(k, rel=1e-5)


def test_losses_stay_fp32_inside_bf16_autocast():
    # The trainer runs its forward under autocast; the CEs must stay fp32 there, as in the reference.
    logits, assign = _rand(2, 6, 32), _rand(2, 6, 32, seed=1).softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = clustering_loss(logits, assign, temp=0.12)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(_explicit_ce(logits.reshape(-1, 32), assign.reshape(-1, 32), 0.12).item(),
                                          rel=1e-5)
