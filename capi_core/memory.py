"""A lower bound on one training process's memory, checked against the machine before any work.

A mistyped ``optim.batch_size=256000`` or ``clustering.num_clusters=10000000`` would otherwise
allocate until the kernel kills the process (or the whole machine swaps), minutes in. The bound
counts only what a CAPI step must hold at once, in the cheapest precision it could use, so a
configuration refused here cannot run; one accepted may still not fit:

- weights: student (with its gradient and AdamW's two moments), EMA teacher, clustering head (same
  four copies), all fp32;
- the student's activations kept for backward: per visible token and block, at least the attention
  input, q, k, v and output (5 x dim) and the MLP's hidden layer before and after GELU (2 x
  mlp_ratio x dim), in bf16 (2 bytes);
- the teacher's cluster scores of every patch (batch x patches x K, fp32; Sinkhorn-Knopp normalises
  them) and the student's predicted scores (batch x predicted patches x K, fp32);
- the batch of images (fp32).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch

from capi_core.config import ConfigError, TrainConfig

GIB = 1 << 30


@dataclass(frozen=True)
class Estimate:
    """Bytes of each term of the bound, keyed by the field that drives it."""

    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def largest(self) -> str:
        return max(self.terms, key=self.terms.__getitem__)


def estimate(config: TrainConfig, world_size: int = 1) -> Estimate:
    """The lower bound for one rank of a run over ``world_size`` ranks (the module docstring's terms)."""
    m, optim, k = config.model, config.optim, config.clustering.num_clusters
    batch = optim.batch_size // max(world_size * optim.grad_accumulation, 1)
    patches = m.num_patches
    visible = patches - int(patches * config.masking.ratio) + m.registers
    predicted = max(1, int(int(patches * config.masking.ratio) * config.masking.prediction_subsampling))
    dim, pdim = m.embed_dim, m.predictor_dim or m.embed_dim
    block = 4 * dim * dim + 2 * m.mlp_ratio * dim * dim  # attention and MLP weights of one block
    student = m.depth * block + m.predictor_depth * (4 * pdim * pdim + 2 * m.mlp_ratio * pdim * pdim) + pdim * k
    weights = 4 * (4 * student + student + 4 * (dim * k + k))
    activations = 2 * batch * visible * dim * m.depth * (5 + 2 * m.mlp_ratio)
    return Estimate({
        "model.embed_dim": int(weights),
        "optim.batch_size": int(activations + 4 * batch * m.in_chans * m.img_size**2),
        "clustering.num_clusters": int(4 * batch * (patches + predicted) * k),
    })


def available(device: torch.device) -> tuple[int | None, str]:
    """(bytes this process can still use, where) on ``device``; None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"GPU {torch.cuda.get_device_name(device)}"
    limits = []
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        limits.append((int(info["MemAvailable"].split()[0]) * 1024, "this machine (available memory)"))
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else -1
        if pages > 0:
            limits.append((pages * os.sysconf("SC_PAGE_SIZE"), "this machine (available memory)"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((soft, "this process (its address-space limit, ulimit -v)"))
    return min(limits) if limits else (None, "")


def check_fits(config: TrainConfig, world_size: int, device: torch.device) -> None:
    """ConfigError when the lower bound exceeds what ``device`` has, naming the field that dominates."""
    need = estimate(config, world_size)
    have, where = available(device)
    if have is None or need.total <= have:
        return
    terms = ", ".join(f"{field} {size / GIB:.1f}" for field, size in need.terms.items())
    raise ConfigError(f"this configuration needs at least {need.total / GIB:.1f} GiB per training process "
                      f"({terms} GiB), more than the {have / GIB:.1f} GiB of {where}; lower {need.largest} "
                      f"(for the batch: raise optim.grad_accumulation, or train on more --workers)")
