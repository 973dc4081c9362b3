"""The CAPI predictor: mask-token queries that cross-attend to the student encoder's output.

Of the predictor layouts in the CAPI paper's Table 1a (fused, split + self-attention, split +
cross-attention), this last one was best.

Each predicted position starts from one shared learned mask token plus its position, then goes through
blocks of ``x <- x + CrossAttn(RMSNorm(x), ctx); x <- x + MLP(RMSNorm(x))``. There is no self-attention
among the queries, so a prediction does not depend on which other positions are queried: predicting a
random subset (prediction subsampling) or all positions at eval time is valid. ``ctx`` is the encoder's
final-normed output, registers included, the same tensor for every block and not re-normalised; k and v
are projected from the encoder width. No linear biases, final RMSNorm without affine (as in CAPI).

Position enters as in the encoder's scheme:

- ``"learned"``: a learned predictor position embedding [1, N, D_pred] gathered at the predicted
  indices is added to the mask token; the context already carries the encoder's positions.
- ``"rope"``: CAPI's RoPE (``rope.py``) on q at the predicted patches' coordinates and on k at the
  context's (registers on the visible bounding box's edges, then the visible patches), as the
  reference decoder does; its attention then has separate k and v projections of the context, as the
  reference's (the ``"learned"`` predictor keeps one fused kv projection).

Drop path is CAPI's efficient variant (``vit.residual``) in both schemes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Mlp, RmsNorm, trunc_normal_

from capi_core.config import ModelConfig
from capi_core.models.attention import scaled_dot_product_attention
from capi_core.models.rope import Rope, apply_rope, patch_coords, register_coords, token_coords
from capi_core.models.vit import NORM_EPS, residual

Rope2 = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [B|1, 1, T, head_dim]


class CrossAttention(nn.Module):
    """Multi-head attention of queries x [B, n, D_pred] over a context [B, T, D_ctx] -> [B, n, D_pred].

    ``separate_kv``: k and v from two projections (the reference's layout, ``k_proj``/``v_proj``) rather
    than one fused ``kv``; the difference is the layout and the xavier init's fan.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, separate_kv: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        if separate_kv:
            self.k_proj = nn.Linear(context_dim, dim, bias=False)
            self.v_proj = nn.Linear(context_dim, dim, bias=False)
            self.kv = None
        else:
            self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope_q: Rope2 | None = None,
                rope_k: Rope2 | None = None) -> torch.Tensor:
        """rope_q and rope_k (both or neither) rotate q and k with CAPI's RoPE."""
        B, n, D = x.shape
        T = context.shape[1]
        q = self.q(x).view(B, n, self.num_heads, -1).transpose(1, 2)  # [B, H, n, hd]
        if self.kv is None:
            k, v = (p(context).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        else:
            k, v = self.kv(context).view(B, T, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if rope_q is not None:
            q, k = apply_rope(q, *rope_q), apply_rope(k, *rope_k)
        x = scaled_dot_product_attention(q, k, v)  # [B, H, n, hd]
        return self.proj(x.transpose(1, 2).reshape(B, n, D))


class PredictorBlock(nn.Module):
    """x <- x + CrossAttn(RMSNorm(x), ctx); x <- x + MLP(RMSNorm(x)), under drop path. x [B, n, D_pred]."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                 separate_kv: bool = False):
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = RmsNorm(dim, eps=NORM_EPS)
        self.attn = CrossAttention(dim, context_dim, num_heads, separate_kv)
        self.norm2 = RmsNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope_q: Rope2 | None = None,
                rope_k: Rope2 | None = None) -> torch.Tensor:
        q_cos, q_sin = rope_q if rope_q is not None else (None, None)
        k_cos, k_sin = rope_k if rope_k is not None else (None, None)

        def attend(y, ctx, qc, qs, kc, ks):
            return self.attn(self.norm1(y), ctx, None if qc is None else (qc, qs), None if kc is None else (kc, ks))

        x = residual(x, attend, self.drop_path, self.training, context, q_cos, q_sin, k_cos, k_sin)
        return residual(x, lambda y: self.mlp(self.norm2(y)), self.drop_path, self.training)


class Predictor(nn.Module):
    """``forward(context [B, R + n_vis, D], visible [B, n_vis], predict [B, n_pred]) -> [B, n_pred, D_pred]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.predictor_dim or cfg.embed_dim
        num_heads = cfg.predictor_heads or cfg.num_heads
        self.embed_dim = dim
        self.num_registers = cfg.registers
        self.use_rope = cfg.pos_embed == "rope"
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        if self.use_rope:
            if (dim // num_heads) % 4:
                raise ValueError(f"pos_embed 'rope' needs predictor_dim/predictor_heads divisible by 4, got "
                                 f"{dim}/{num_heads}")
            self.rope = Rope(dim // num_heads)
            self.register_buffer("patch_coords", patch_coords(cfg.grid_size), persistent=False)
            self.register_buffer("register_coords", register_coords(cfg.registers), persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, dim))
        self.blocks = nn.ModuleList(
            PredictorBlock(dim, cfg.embed_dim, num_heads, cfg.mlp_ratio, cfg.drop_path, separate_kv=self.use_rope)
            for _ in range(cfg.predictor_depth)
        )
        self.norm = RmsNorm(dim, eps=NORM_EPS, affine=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        nn.init.normal_(self.mask_token, std=0.02)
        if not self.use_rope:
            trunc_normal_(self.pos_embed, std=0.02)

    def _rope(self, visible: torch.Tensor, predict: torch.Tensor) -> tuple[Rope2, Rope2]:
        """RoPE of the queries (predicted patches) and of the context (registers on the visible patches'
        bounding box, then the visible patches), as the encoder placed them."""
        return self.rope(self.patch_coords[predict]), self.rope(token_coords(self.register_coords,
                                                                             self.patch_coords[visible]))

    def forward(self, context: torch.Tensor, visible: torch.Tensor, predict: torch.Tensor,
                depth: int | None = None) -> torch.Tensor:
        """``depth``: run only the first ``depth`` blocks (predictor pooling reads the first one)."""
        B, n_pred = predict.shape
        if context.shape[1] != self.num_registers + visible.shape[1]:
            raise ValueError(f"context has {context.shape[1]} tokens, expected {self.num_registers} registers + "
                             f"{visible.shape[1]} visible patches")
        x = self.mask_token.expand(B, n_pred, -1)
        rope_q = rope_k = None
        if self.use_rope:
            rope_q, rope_k = self._rope(visible, predict)
        else:
            x = x + self.pos_embed[0, predict]  # [B, n_pred, D_pred]
        for block in self.blocks[:depth]:
            x = block(x, context, rope_q, rope_k)
        return self.norm(x)
