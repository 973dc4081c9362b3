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
- ``"rope"``: 2D axial RoPE on q at the predicted coordinates and on k at the context coordinates, in the
  encoder's convention (timm's grid-index coordinates and frequency bands, interleaved layout). Registers
  get CAPI's edge layout: R/4 per side of the unit square, clockwise from the top-left corner, rescaled
  per sample into the bounding box of the visible patches (as in the reference ``model.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, RmsNorm, apply_rot_embed_cat, freq_bands, trunc_normal_

from capi_core.config import ModelConfig
from capi_core.models.attention import scaled_dot_product_attention

NORM_EPS = 1e-5  # CAPI's RMSNorm eps


def grid_coords(grid_size: int) -> torch.Tensor:
    """(row, column) of each patch in raster order, in patch units: [N, 2] float32."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2).float()


def register_edge_coords(num_registers: int) -> torch.Tensor:
    """CAPI's register layout on the unit square's border: [R, 2] (row, column), R a multiple of 4.

    R/4 per side at offsets 0, 4/R, 8/R, ... along it, going top -> right -> bottom -> left (clockwise).
    """
    t = torch.arange(num_registers // 4) / (num_registers // 4)
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    top, right = torch.stack([zeros, t], -1), torch.stack([t, ones], -1)
    bottom, left = torch.stack([ones, 1 - t], -1), torch.stack([1 - t, zeros], -1)
    return torch.cat([top, right, bottom, left])


def rope_embed(coords: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    """Axial RoPE table for arbitrary coordinates, in timm's ``apply_rot_embed_cat`` layout.

    coords [..., 2] (row, column), bands [F] -> [..., 8F] = sin | cos, each [..., 4F = head_dim] with the
    F row angles then the F column angles, every angle repeated for its channel pair. On the integer grid
    this equals timm's ``RotaryEmbeddingCat`` table (in_pixels=False), so encoder and predictor agree.
    """
    angles = (coords.unsqueeze(-1) * bands).flatten(-2).repeat_interleave(2, dim=-1)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class CrossAttention(nn.Module):
    """Multi-head attention of queries x [B, n, D_pred] over a context [B, T, D_ctx] -> [B, n, D_pred]."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope_q: torch.Tensor | None = None,
                rope_k: torch.Tensor | None = None) -> torch.Tensor:
        """rope_q [B, 1, n, 2*hd] and rope_k [B, 1, T, 2*hd] (both or neither) rotate q and k."""
        B, n, D = x.shape
        q = self.q(x).view(B, n, self.num_heads, -1).transpose(1, 2)  # [B, H, n, hd]
        k, v = self.kv(context).view(B, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if rope_q is not None:
            q, k = apply_rot_embed_cat(q, rope_q), apply_rot_embed_cat(k, rope_k)
        x = scaled_dot_product_attention(q, k, v)  # [B, H, n, hd]
        return self.proj(x.transpose(1, 2).reshape(B, n, D))


class PredictorBlock(nn.Module):
    """x <- x + DropPath(CrossAttn(RMSNorm(x), ctx)); x <- x + DropPath(MLP(RMSNorm(x))). x [B, n, D_pred]."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = RmsNorm(dim, eps=NORM_EPS)
        self.attn = CrossAttention(dim, context_dim, num_heads)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = RmsNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=False)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope_q: torch.Tensor | None = None,
                rope_k: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), context, rope_q, rope_k))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


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
            # Buffers, not parameters: fixed like timm's RoPE bands (CAPI freezes its freqs with lr x0).
            self.register_buffer("bands", freq_bands(dim // num_heads // 4, step=1), persistent=False)
            self.register_buffer("patch_coords", grid_coords(cfg.grid_size), persistent=False)
            self.register_buffer("register_coords", register_edge_coords(cfg.registers), persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, dim))
        self.blocks = nn.ModuleList(
            PredictorBlock(dim, cfg.embed_dim, num_heads, cfg.mlp_ratio, cfg.drop_path)
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

    def _rope(self, visible: torch.Tensor, predict: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for the queries [B, 1, n_pred, 2*hd] and the context [B, 1, R + n_vis, 2*hd]."""
        visible_coords = self.patch_coords[visible]  # [B, n_vis, 2]
        lo = visible_coords.amin(dim=1, keepdim=True)
        hi = visible_coords.amax(dim=1, keepdim=True)
        registers = lo + self.register_coords * (hi - lo)  # [B, R, 2]: edges of the visible bounding box
        context_coords = torch.cat([registers, visible_coords], dim=1)
        rope_q = rope_embed(self.patch_coords[predict], self.bands)
        return rope_q.unsqueeze(1), rope_embed(context_coords, self.bands).unsqueeze(1)

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
