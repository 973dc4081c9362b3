"""Position-wise Sinkhorn-Knopp: the teacher's soft cluster assignments (CAPI paper, Table 1i).

For each patch position independently, the [B, K] matrix exp(logits / temp) is alternately normalised
over the batch (each prototype's column) and over prototypes (each token's row), so that at every
position the prototypes share the batch evenly and cluster identity cannot encode position.

Under torch.distributed the batch axis spans every process: the max shift and the column sums are
all-reduced, so G processes on G shards return what one process returns on the whole batch (to fp32
rounding of the sums). Computed in fp32, unlike the reference's bf16, whose 8 bits of precision round
the normalising sums coarsely.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

# Entries more than _CUT nats below their column's max are set to exactly 0 instead of exp(-_CUT) or
# less. Why: on x86 CPUs, exp that underflows and arithmetic on subnormal floats (< 2^-126 = e^-87.3)
# are 30-100x slower than normal floats, which made SK 5-15x slower once logits / temp spread over
# more than ~90 nats (common at temp 0.06). The reference (bf16, +50 offset before exp) loses the
# same entries at its first column division, where they fall below bf16's smallest subnormal
# (about e^-92); the cut keeps a margin of e^7 so later divisions stay in the normal range too.
# The cut entries are below 2e-35 of their column's max.
_CUT = 80.0
_CUT_VALUE = math.exp(-_CUT) * (1 + 1e-4)  # above fp32's rounding of exp(-_CUT): those become 0
_EPS = 1e-8


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3, positionwise: bool = True) -> Tensor:
    """Soft assignments [N, B, K] of ``logits`` [N, B, K] (positions, per-process batch, prototypes).

    ``positionwise=False`` is the standard SK of the CAPI paper's Table 1i ablation: all N*B tokens form
    one batch. Input is detached and cast to fp32; the output is a new fp32 tensor whose rows sum to 1
    over K. Each of ``iterations`` rounds divides by the (global) batch sum, then by the row sum.
    """
    if logits.ndim != 3:
        raise ValueError(f"sinkhorn_knopp expects logits [N, B, K], got shape {tuple(logits.shape)}")
    n, b, k = logits.shape
    q = logits.detach().to(torch.float32, copy=True).div_(temp)
    if not positionwise:
        q = q.view(1, n * b, k)

    # Subtract the per-(position, prototype) max over the global batch: exp cannot overflow, and the
    # shift cancels exactly in the first column normalisation.
    shift = q.amax(dim=1, keepdim=True)  # [N, 1, K]
    if _distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q.sub_(shift).clamp_(min=-_CUT).exp_()
    F.threshold_(q, _CUT_VALUE, 0.0)

    # In place on the [N, B, K] layout: both reductions broadcast back without transposed copies.
    # Multiplying by the reciprocal is ~25% faster on CPU than div_ (it may differ in the last bit).
    # eps is added to the already global column sum, so it is the same for 1 or G processes.
    for _ in range(iterations):
        col = q.sum(dim=1, keepdim=True)  # [N, 1, K]
        if _distributed():
            dist.all_reduce(col, op=dist.ReduceOp.SUM)
        q.mul_(col.add_(_EPS).reciprocal_())
        q.mul_(q.sum(dim=2, keepdim=True).add_(_EPS).reciprocal_())
    return q.view(n, b, k)
