"""The CAPI student (encoder + predictor + student head) and its AdamW parameter groups, as in CAPI's reference code.

The teacher is an EMA copy of the whole student (the trainer's job); only its encoder makes targets.
The mask token lives in the predictor.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import LayerNorm, RmsNorm

from capi_core.config import OptimConfig, TrainConfig
from capi_core.models.encoder import Encoder
from capi_core.models.heads import StudentHead
from capi_core.models.predictor import Predictor

NORM_LAYERS = (nn.LayerNorm, nn.RMSNorm, LayerNorm, RmsNorm)


class Student(nn.Module):
    """``forward(images [B, C, H, W], visible [B, n_vis], predict [B, n_pred]) -> logits [B * n_pred, K]``."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.encoder = Encoder(cfg.model)
        self.predictor = Predictor(cfg.model)
        self.head = StudentHead(self.predictor.embed_dim, cfg.clustering.num_clusters)

    def forward(self, images: torch.Tensor, visible: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
        context = self.encoder(images, visible)  # [B, R + n_vis, D]
        predictions = self.predictor(context, visible, predict)  # [B, n_pred, D_pred]
        return self.head(predictions.flatten(0, 1))


def param_groups(student: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups for the trainable parameters of ``student``, following CAPI's ``get_params_groups``.

    Weight decay x0 for biases, x``norm_wd_mult`` for norm weights, x1 for everything else (registers,
    mask token, position embeddings and the head's g and v included); lr x``patch_embed_lr_mult`` for the
    patch embedding. Each group carries ``lr_mult`` and ``wd_mult`` for the trainer's schedules, and
    ``weight_decay`` already multiplied. Frozen parameters (the final norm's identity affine) are left out;
    RoPE frequencies are buffers, so there is nothing to freeze for them.
    """
    norm_params = {id(p) for m in student.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(False)}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias"):
            wd_mult = 0.0
        elif id(p) in norm_params:
            wd_mult = cfg.norm_wd_mult
        else:
            wd_mult = 1.0
        lr_mult = cfg.patch_embed_lr_mult if "patch_embed" in name.split(".") else 1.0
        groups.setdefault((lr_mult, wd_mult), []).append(p)
    return [
        {"params": params, "lr_mult": lr_mult, "wd_mult": wd_mult, "weight_decay": cfg.weight_decay * wd_mult}
        for (lr_mult, wd_mult), params in groups.items()
    ]
