"""CAPI's two cross-entropies (clustering head and student) and the health metrics of its targets.

Both losses are soft-target cross-entropies computed in fp32, as the reference does even under bf16.
Targets are constants: gradients reach only the logits (the student head for ``capi_loss``, the
clustering head for ``clustering_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _soft_cross_entropy(logits: Tensor, targets: Tensor, temp: float) -> Tensor:
    """Mean over rows of -sum_k T_k log softmax(logits / temp)_k; logits, targets [M, K]."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    return F.cross_entropy(logits.float() / temp, targets.detach().float())


def capi_loss(student_logits: Tensor, targets: Tensor, temp: float) -> Tensor:
    """Student loss: CE of softmax(student_logits / temp) [M, K] against SK targets [M, K], M = B*n_pred."""
    return _soft_cross_entropy(student_logits, targets, temp)


def clustering_loss(logits: Tensor, assignments: Tensor, temp: float) -> Tensor:
    """Clustering-head loss: CE of its own logits [N, B, K] / temp against its SK output [N, B, K],
    averaged over all N*B tokens."""
    return _soft_cross_entropy(logits.flatten(0, -2), assignments.flatten(0, -2), temp)


@torch.no_grad()
def target_entropy(targets: Tensor) -> Tensor:
    """Mean over rows of -sum T log T (nats), a 0-dim tensor; targets [..., K]. Stable near 0.5 in the
    authors' runs (facebookresearch/capi issue #11); ln K means uniform targets."""
    t = targets.float()
    return -torch.special.xlogy(t, t).sum(-1).mean()


@torch.no_grad()
def cluster_usage(assignments: Tensor) -> tuple[int, float]:
    """(distinct argmax clusters, perplexity exp(H(mean assignment))) of assignments [..., K].

    Perplexity is K for a perfectly balanced mean and 1 when every row puts all mass on one cluster.
    On Sinkhorn outputs the mean is near-uniform by construction; the argmax count is the telling one.
    """
    flat = assignments.detach().flatten(0, -2).float()
    used = int(flat.argmax(dim=-1).unique().numel())
    mean = flat.mean(dim=0)
    mean = mean / mean.sum()  # rows of SK output sum to 1 only up to fp32 rounding
    return used, float(torch.exp(-torch.special.xlogy(mean, mean).sum()))
