import math

import pytest
import torch

from capi_core.config import OptimConfig, build_config
from capi_core.schedules import Schedules, ema_update_, warmup_cosine

COS_END = 0.5 * (1 + math.cos(0.8 * math.pi))  # 0.0955: where a 0.8-truncated cosine stops


def test_warmup_cosine_by_hand():
    total, warmup, base = 1000, 100, 2.0
    f = lambda s: warmup_cosine(s, total, warmup, start=0.0, base=base, final=0.0, truncate=0.8)  # noqa: E731
    assert f(0) == 0.0
    assert f(33) == pytest.approx(base * 33 / 99)  # linear, reaching base at step warmup-1
    assert f(99) == pytest.approx(base)
    assert f(100) == pytest.approx(base)  # cosine starts at base
    assert f(550) == pytest.approx(base * 0.5 * (1 + math.cos(0.4 * math.pi)))  # t = 0.5
    assert f(999) == pytest.approx(base * 0.5 * (1 + math.cos(0.8 * math.pi * 899 / 900)))
    assert f(1000) == pytest.approx(base * COS_END)
    assert f(5000) == pytest.approx(base * COS_END)  # past the end: held
    assert COS_END == pytest.approx(0.0955, abs=1e-4)


def test_untruncated_cosine_reaches_final_and_decreases():
    vals = [warmup_cosine(s, 200, 20, 0.0, 1.0, 0.1, truncate=1.0) for s in range(20, 201)]
    assert vals[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_lr_and_clustering_lr():
    sched = Schedules(OptimConfig(steps=1000, lr=1e-3, min_lr=0.0, warmup_fraction=0.1), lr_ratio=0.5)
    assert sched.lr(0) == 0.0
    assert sched.lr(99) == pytest.approx(1e-3)
    assert sched.lr(550) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(0.4 * math.pi)))
    assert sched.lr(1000) == pytest.approx(1e-3 * COS_END)  # about 9.55% of peak
    for s in (0, 50, 99, 550, 999):
        assert sched.clustering_lr(s) == pytest.approx(0.5 * sched.lr(s))


def test_lr_cosine_heads_to_min_lr():
    sched = Schedules(OptimConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_fraction=0.1), lr_ratio=0.5)
    assert sched.lr(100) == pytest.approx(1e-4 + 9e-4 * COS_END)


def test_tied_momentum_is_one_minus_lr():
    sched = Schedules(OptimConfig(steps=1000, lr=1e-3, warmup_fraction=0.1, ema_momentum=None), lr_ratio=0.5)
    assert sched.momentum(0) == 1.0  # teacher frozen at init at first
    assert sched.momentum(99) == pytest.approx(0.999)
    for s in (0, 37, 99, 100, 550, 999, 1000):
        assert sched.momentum(s) == 1.0 - sched.lr(s)


def test_explicit_momentum_warms_down_then_back_toward_one():
    sched = Schedules(OptimConfig(steps=1000, lr=1e-3, warmup_fraction=0.1, ema_momentum=0.99), lr_ratio=0.5)
    assert sched.momentum(0) == 1.0
    assert sched.momentum(99) == pytest.approx(0.99)
    assert sched.momentum(550) == pytest.approx(1 - 0.01 * 0.5 * (1 + math.cos(0.4 * math.pi)))
    assert sched.momentum(1000) == pytest.approx(1 - 0.01 * COS_END)
    # with ema_momentum = 1 - lr and min_lr 0 both forms are the same schedule
    tied = Schedules(OptimConfig(steps=1000, lr=1e-3, warmup_fraction=0.1), lr_ratio=0.5)
    same = Schedules(OptimConfig(steps=1000, lr=1e-3, warmup_fraction=0.1, ema_momentum=0.999), lr_ratio=0.5)
    for s in (0, 50, 99, 400, 1000):
        assert same.momentum(s) == pytest.approx(tied.momentum(s), abs=1e-12)


def test_from_config_uses_the_presets_values():
    cfg = build_config("cpu-tiny")
    sched = Schedules.from_config(cfg)
    warm = cfg.optim.warmup_steps
    assert sched.lr(warm) == pytest.approx(cfg.optim.lr)
    assert sched.clustering_lr(warm) == pytest.approx(cfg.clustering.lr_ratio * cfg.optim.lr)
    assert sched.momentum(warm) == pytest.approx(cfg.optim.ema_momentum)


def test_ema_update_exact_on_small_tensors():
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    student = [torch.nn.Parameter(torch.tensor([5.0, -3.0])), torch.nn.Parameter(torch.tensor([[4.5]]))]
    ema_update_(teacher, student, momentum=0.75)
    assert torch.equal(teacher[0], torch.tensor([2.0, 0.75]))  # 0.75*1 + 0.25*5, 0.75*2 + 0.25*(-3)
    assert torch.equal(teacher[1], torch.tensor([[1.5]]))
    assert torch.equal(student[0].detach(), torch.tensor([5.0, -3.0]))  # the student is untouched


def test_ema_update_matches_formula_and_edge_momenta():
    g = torch.Generator().manual_seed(0)
    xi, theta = torch.randn(64, generator=g), torch.randn(64, generator=g)
    t = [xi.clone()]
    ema_update_(t, [theta], momentum=0.996)
    torch.testing.assert_close(t[0], 0.996 * xi + 0.004 * theta, rtol=1e-6, atol=1e-7)
    t = [xi.clone()]
    ema_update_(t, [theta], momentum=1.0)
    assert torch.equal(t[0], xi)  # a frozen teacher stays bit-identical
    ema_update_(t, [theta], momentum=0.0)
    assert torch.equal(t[0], theta)


def test_ema_update_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="EMA over 1 teacher and 2 student"):
        ema_update_([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)], 0.9)


def test_ema_final_sets_where_the_momentum_ends():
    def momentum(**kw):
        return Schedules(OptimConfig(steps=100, warmup_fraction=0.1, ema_momentum=0.99, **kw), 0.5).momentum

    flat = momentum(ema_final=0.99)
    assert flat(0) == 1.0  # still frozen at its init on the first step
    assert all(flat(s) == pytest.approx(0.99) for s in (10, 50, 99))  # then it keeps moving to the end
    settling = momentum()  # the paper's shape: back toward 1.0
    assert settling(99) > 0.998 and settling(99) > settling(50) > settling(10)
