import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from capi_core.sinkhorn import sinkhorn_knopp


def _logits(n=4, b=32, k=16, scale=1.0, seed=0) -> torch.Tensor:
    return torch.randn(n, b, k, generator=torch.Generator().manual_seed(seed)) * scale


def _reference_sk(logits: torch.Tensor, temp: float, iterations: int) -> torch.Tensor:
    """The reference's position-wise SK written out in float64, one position at a time."""
    out = []
    for s in logits.double() / temp:  # s: [B, K]
        q = torch.exp(s - s.max(dim=0).values)
        for _ in range(iterations):
            q = q / (q.sum(dim=0) + 1e-8)  # each prototype's column over the batch
            q = q / (q.sum(dim=1, keepdim=True) + 1e-8)  # each token's row over prototypes
        out.append(q)
    return torch.stack(out)


def test_matches_explicit_float64_formula():
    logits = _logits(scale=2.0)
    out = sinkhorn_knopp(logits, temp=0.5, iterations=3)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    torch.testing.assert_close(out.double(), _reference_sk(logits, 0.5, 3), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [4.0, 16.0])
def test_wide_logits_match_float64_without_underflow(scale):
    # logits / 0.06 spread over hundreds to thousands of nats: entries far below their column max are
    # cut to 0 (for CPU speed), which must not change the targets beyond fp32 precision.
    logits = _logits(n=8, b=64, k=256, scale=scale)
    out = sinkhorn_knopp(logits, temp=0.06, iterations=3)
    torch.testing.assert_close(out.double(), _reference_sk(logits, 0.06, 3), rtol=0, atol=1e-5)


def test_positionwise_normalises_each_position_independently():
    logits = _logits(scale=2.0)
    whole = sinkhorn_knopp(logits, temp=0.3, iterations=3)
    per_position = torch.cat([sinkhorn_knopp(logits[i : i + 1], temp=0.3, iterations=3) for i in range(4)])
    torch.testing.assert_close(whole, per_position)


def test_standard_sk_flattens_all_tokens_into_one_batch():
    logits = _logits(scale=2.0)
    flat = sinkhorn_knopp(logits, temp=0.3, iterations=3, positionwise=False)
    direct = sinkhorn_knopp(logits.reshape(1, -1, 16), temp=0.3, iterations=3).view(4, 32, 16)
    torch.testing.assert_close(flat, direct)
    assert not torch.allclose(flat, sinkhorn_knopp(logits, temp=0.3, iterations=3), atol=1e-3)


@pytest.mark.parametrize("positionwise", [True, False])
def test_rows_are_distributions_after_three_iterations(positionwise):
    # Init-like clustering logits (unit-norm features, N(0,1) weights) at the paper's teacher_temp 0.06.
    logits = _logits(n=8, b=64, k=256)
    out = sinkhorn_knopp(logits, temp=0.06, iterations=3, positionwise=positionwise)
    assert torch.isfinite(out).all() and (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(8, 64), rtol=0, atol=1e-5)


def test_column_marginals_converge_to_batch_over_k():
    # Rows sum to 1, so the B tokens carry mass B; balanced over K prototypes, each column holds B/K.
    n, b, k = 3, 48, 12
    logits = _logits(n, b, k, scale=1.0)
    few = sinkhorn_knopp(logits, temp=0.5, iterations=1).sum(1)
    many = sinkhorn_knopp(logits, temp=0.5, iterations=200).sum(1)
    target = torch.full((n, k), b / k)
    torch.testing.assert_close(many, target, rtol=1e-4, atol=0)
    assert (few - target).abs().max() > 10 * (many - target).abs().max()


def test_standard_sk_balances_over_all_tokens_not_per_position():
    n, b, k = 3, 48, 12
    logits = _logits(n, b, k, scale=1.0) + torch.randn(n, 1, k, generator=torch.Generator().manual_seed(1))
    out = sinkhorn_knopp(logits, temp=0.5, iterations=200, positionwise=False)
    torch.testing.assert_close(out.sum((0, 1)), torch.full((k,), n * b / k), rtol=1e-4, atol=0)
    assert (out.sum(1) - b / k).abs().max() > 0.1  # positions keep their own prototype preferences


def test_per_position_prototype_offsets_cancel():
    # Column normalisation over the batch removes any per-(position, prototype) offset: this pins the
    # axis of the first normalisation to the batch.
    logits = _logits(scale=2.0)
    offset = torch.randn(4, 1, 16, generator=torch.Generator().manual_seed(2)) * 5
    torch.testing.assert_close(
        sinkhorn_knopp(logits + offset, temp=0.5), sinkhorn_knopp(logits, temp=0.5), rtol=1e-5, atol=1e-7
    )


def test_input_untouched_no_grad_and_fp32_from_bf16():
    logits = _logits().requires_grad_()
    before = logits.detach().clone()
    out = sinkhorn_knopp(logits, temp=0.06)
    assert not out.requires_grad
    assert torch.equal(logits.detach(), before)
    out16 = sinkhorn_knopp(logits.detach().bfloat16(), temp=0.06)
    assert out16.dtype == torch.float32


def test_unchanged_inside_bf16_autocast():
    logits = _logits()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sinkhorn_knopp(logits, temp=0.06)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, sinkhorn_knopp(logits, temp=0.06))


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[N, B, K\]"):
        sinkhorn_knopp(torch.zeros(8, 16), temp=0.1)


# ---- distributed equivalence: 2 gloo processes on 2 shards == 1 process on the whole batch ----------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_worker(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        logits = torch.load(path)
        shard = logits.chunk(world, dim=1)[rank]
        out = {pw: sinkhorn_knopp(shard, temp=0.06, iterations=3, positionwise=pw) for pw in (True, False)}
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    # Shards with different statistics, so local column sums and maxima differ from the global ones.
    logits = _logits(n=4, b=64, k=32, seed=5)
    logits[:, 32:] += torch.randn(4, 1, 32, generator=torch.Generator().manual_seed(6))
    path = str(tmp_path / "logits.pt")
    torch.save(logits, path)
    mp.spawn(_shard_worker, args=(2, _free_port(), path), nprocs=2, join=True)

    shards = [torch.load(f"{path}.{r}") for r in range(2)]
    for pw in (True, False):
        single = sinkhorn_knopp(logits, temp=0.06, iterations=3, positionwise=pw)
        joined = torch.cat([s[pw] for s in shards], dim=1)
        torch.testing.assert_close(joined, single, rtol=1e-5, atol=1e-7)
        # and it is not what each shard alone would give (the all-reduce matters)
        alone = sinkhorn_knopp(logits[:, :32], temp=0.06, iterations=3, positionwise=pw)
        assert not torch.allclose(alone, single[:, :32], atol=1e-3)
