"""Warmup + truncated-cosine schedules for lr, clustering lr and EMA momentum; the EMA update (CAPI paper, Table 6).

One shape everywhere (the reference's WarmupThenCosine): linear warmup from ``start`` to ``base``,
then a cosine from ``base`` toward ``final`` whose argument stops at ``truncate * pi``. With
truncate 0.8 and final 0 the lr ends at (1 + cos 0.8 pi) / 2 = 9.55% of its peak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from capi_core.config import OptimConfig, TrainConfig


def warmup_cosine(
    step: int, total: int, warmup: int, start: float, base: float, final: float, truncate: float = 0.8
) -> float:
    """Schedule value at ``step`` of ``total``.

    Warmup as the reference's ``linspace(start, base, warmup)``: ``start`` at step 0, ``base`` at step
    warmup-1. Then ``final + (base - final) * (1 + cos(pi * truncate * t)) / 2`` with
    t = (step - warmup) / (total - warmup), so ``base`` again at step ``warmup``. Steps past ``total``
    hold the value at t = 1 (the reference jumps to ``final`` there; continuity is kinder to resumes).
    """
    if step < warmup:
        return start + (base - start) * step / max(warmup - 1, 1)
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * truncate * t))


@dataclass(frozen=True)
class Schedules:
    """lr, clustering-head lr (a fixed fraction of the lr) and EMA momentum at an optimiser step."""

    optim: OptimConfig
    lr_ratio: float  # clustering-head lr as a fraction of the main lr

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Schedules:
        return cls(cfg.optim, cfg.clustering.lr_ratio)

    def lr(self, step: int) -> float:
        o = self.optim
        return warmup_cosine(step, o.steps, o.warmup_steps, 0.0, o.lr, o.min_lr, o.truncate_cos)

    def clustering_lr(self, step: int) -> float:
        return self.lr_ratio * self.lr(step)

    def momentum(self, step: int) -> float:
        """1.0 at step 0 (the teacher starts frozen at its init), ``ema_momentum`` at the end of warmup,
        then toward ``ema_final`` (1.0 by default); with ``ema_momentum`` None it is the paper's m = 1 - lr."""
        o = self.optim
        if o.ema_momentum is None:
            return 1.0 - self.lr(step)
        return warmup_cosine(step, o.steps, o.warmup_steps, 1.0, o.ema_momentum, o.ema_final, o.truncate_cos)


@torch.no_grad()
def ema_update_(teacher_params: Sequence[Tensor], student_params: Sequence[Tensor], momentum: float) -> None:
    """In place xi <- m * xi + (1 - m) * theta for each (teacher xi, student theta) pair.

    One fused foreach lerp, xi + (1 - m) * (theta - xi): the same value, one pass over memory, and
    m = 1 leaves the teacher bit-for-bit unchanged.
    """
    if len(teacher_params) != len(student_params):
        raise ValueError(f"EMA over {len(teacher_params)} teacher and {len(student_params)} student tensors")
    torch._foreach_lerp_(list(teacher_params), list(student_params), 1.0 - momentum)
