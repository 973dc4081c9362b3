"""CAPI's two linear heads over L2-normalised features (linear beat MLP heads: CAPI paper, Table 1c).
They share nothing.

- ``StudentHead``: on the predictor output, weight-normalised, no bias; its scale g trains (unlike DINO).
- ``ClusteringHead``: the teacher's online clustering prototypes, with bias and N(0, 1) init, so that unit
  inputs give logits of std about 1. Trained only by its own loss and optimiser, never EMA'd.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


class StudentHead(nn.Module):
    """x [..., dim] -> logits [..., K]: L2-normalise (eps 1e-12), then w_k = g_k v_k / ||v_k||, no bias.

    Weight norm as explicit parameters ``weight_g`` [K, 1] (init 1) and ``weight_v`` [K, dim]
    (trunc-normal 0.02): both train with the main optimiser.
    """

    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(num_clusters, 1))
        self.weight_v = nn.Parameter(torch.empty(num_clusters, dim))
        trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * F.normalize(self.weight_v, dim=-1)  # [K, dim], rows of norm g_k
        return F.linear(F.normalize(x, dim=-1, eps=1e-12), weight)


class ClusteringHead(nn.Module):
    """x [..., dim] (e.g. teacher patch tokens [N, B, dim]) -> logits [..., K]: L2-normalise (eps 1e-7),
    then Linear with bias; weight N(0, 1), bias 0."""

    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_clusters)
        nn.init.normal_(self.linear.weight, std=1.0)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(x, dim=-1, eps=1e-7))
