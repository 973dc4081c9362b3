"""Weighted k-NN classification of frozen features (DINO protocol: cosine similarity, exp(sim / T) votes).

This is both an offline probe and the trainer's online metric ``probe/knn_top1``. Accuracies are
percentages (0-100), like every accuracy in ``capi_core.eval``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Class predictions [M] for test_x [M, D] from neighbours in train_x [N, D] with labels train_y [N].

    Each of the k most cosine-similar training samples votes for its class with weight exp(sim / T).
    Deterministic: ties in the vote go to the lowest class index. Test rows are processed in chunks so
    that the [chunk, N] similarity matrix, not [M, N], bounds the memory.
    """
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"expected train [N, D] and test [M, D] features, got {tuple(train_x.shape)} "
                         f"and {tuple(test_x.shape)}")
    if train_y.shape != (train_x.shape[0],):
        raise ValueError(f"train labels {tuple(train_y.shape)} do not match {train_x.shape[0]} train features")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train_y = train_y.long()
    num_classes = num_classes or int(train_y.max()) + 1
    k = min(k, train_x.shape[0])
    # Cosine similarity = dot product of unit vectors; fp32 so bf16 features do not quantise the ranking.
    train_n = F.normalize(train_x.float(), dim=1)
    preds = []
    for start in range(0, test_x.shape[0], chunk_size):
        sim = F.normalize(test_x[start:start + chunk_size].float(), dim=1) @ train_n.T  # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_top1(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy in % of the weighted k-NN classifier (see ``knn_predict``) on test_x [M, D]."""
    if test_y.shape != (test_x.shape[0],):
        raise ValueError(f"test labels {tuple(test_y.shape)} do not match {test_x.shape[0]} test features")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    preds = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes)
    return 100.0 * (preds == test_y.long()).float().mean().item()
