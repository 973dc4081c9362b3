"""The encoder architecture of the official CAPI model (``pos_embed: rope``), written for this project.

As in the reference ``model.py`` (facebookresearch/capi): a conv patch embedding (with bias), learned
registers prepended, no [cls] token and no absolute position embedding, CAPI's 2-D RoPE on q and k
in every block (``rope.py``; registers included, on the visible bounding box's edges), pre-norm
blocks ``x + Attn(RMSNorm(x))``, ``x + MLP(RMSNorm(x))`` with RMSNorm eps 1e-5 and learnable weights,
separate q/k/v/out projections and a GELU MLP, all without biases, no layer scale, and a final
RMSNorm without affine parameters. Drop path is the reference's "efficient" variant
(``residual``): in training each residual branch runs on a random ``int(B * (1 - rate))`` of the
samples and is added back scaled by ``B / n_keep``, the same rate in every block.

The attribute names follow timm's VisionTransformer (``patch_embed.proj``, ``reg_token``, ``blocks[i]
.attn`` with ``fused_attn`` and ``attn_drop``, ``norm``, ``num_prefix_tokens``, ``forward_features``,
``forward_intermediates``), so the project's feature extraction and attention diagnostics read it as
they read a timm model. Plain timm cannot build it: no timm ViT has this RoPE (its rotary embeddings
pair channels differently and skip prefix tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from capi_core.models.attention import scaled_dot_product_attention
from capi_core.models.rope import Rope, apply_rope, patch_coords, register_coords, token_coords

NORM_EPS = 1e-5  # the reference's RMSNorm eps


def residual(x: Tensor, branch: Callable[..., Tensor], rate: float, training: bool, *per_sample: Tensor | None) -> Tensor:
    """``x + branch(x, *per_sample)``; in training with ``rate > 0``, CAPI's efficient drop path: the
    branch on a random subset of ``max(int(B * (1 - rate)), 1)`` samples, added at ``B / n_keep``.

    ``per_sample`` tensors with a batch dimension of B are subset with ``x``; those with 1 broadcast.
    """
    if not training or rate == 0.0:
        return x + branch(x, *per_sample)
    batch = x.shape[0]
    keep = max(int(batch * (1.0 - rate)), 1)
    index = torch.randperm(batch, device=x.device)[:keep]
    args = [a[index] if a is not None and a.shape[0] == batch else a for a in per_sample]
    return torch.index_add(x, 0, index, branch(x[index], *args).to(x.dtype), alpha=batch / keep)


class Attention(nn.Module):
    """Multi-head self-attention with CAPI's RoPE on q and k: x [B, T, D], (cos, sin) [B|1, 1, T, hd]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fused_attn = True  # False: explicit softmax through attn_drop (what attention diagnostics hook)
        self.attn_drop = nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.fused_attn:
            x = scaled_dot_product_attention(q, k, v)  # on CPU, the fastest measured form: attention.py
        else:
            x = self.attn_drop((q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """``x + Attn(RMSNorm(x))``, then ``x + MLP(RMSNorm(x))``, each under efficient drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = nn.RMSNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.RMSNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = residual(x, lambda y, c, s: self.attn(self.norm1(y), c, s), self.drop_path, self.training, cos, sin)
        return residual(x, lambda y: self.mlp(self.norm2(y)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    """Conv patch embedding (with bias, as the reference): [B, C, H, W] -> [B, N, D], raster order."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class CapiViT(nn.Module):
    """``forward_features(x [B, C, H, W], visible [B, n] | None) -> [B, R + n, D]``, final-normed, registers
    first (n = N when ``visible`` is None)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, registers: int, drop_path: float):
        super().__init__()
        self.grid_size = img_size // patch_size
        self.num_prefix_tokens = self.num_reg_tokens = registers
        self.cls_token = None
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.reg_token = nn.Parameter(torch.zeros(1, registers, embed_dim)) if registers else None
        self.rope = Rope(embed_dim // num_heads)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, drop_path) for _ in range(depth))
        self.norm = nn.RMSNorm(embed_dim, eps=NORM_EPS, elementwise_affine=False)
        self.register_buffer("patch_coords", patch_coords(self.grid_size), persistent=False)
        self.register_buffer("register_coords", register_coords(registers), persistent=False)

    def tokens(self, x: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The input sequence [B, R + n, D] (registers first) and its RoPE (cos, sin)."""
        patches = self.patch_embed(x)
        if visible is None:  # every patch: one coordinate table for the whole batch
            coords = token_coords(self.register_coords, self.patch_coords[None])
        else:
            patches = patches.gather(1, visible.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
            coords = token_coords(self.register_coords, self.patch_coords[visible])
        if self.reg_token is not None:
            patches = torch.cat([self.reg_token.expand(x.shape[0], -1, -1), patches], dim=1)
        return patches, *self.rope(coords)

    def forward_features(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        x, cos, sin = self.tokens(x, visible)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    forward = forward_features

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, output_fmt: str = "NLC",
                              intermediates_only: bool = False):
        """timm's ``forward_intermediates`` for token outputs (``output_fmt="NLC"``): the outputs of blocks
        ``indices`` (a list, negatives from the end, or an int: the last n), final-normed if ``norm``, as
        (patches, prefix) pairs with ``return_prefix_tokens``; and the final output unless
        ``intermediates_only``."""
        if output_fmt != "NLC":
            raise ValueError(f"CapiViT gives token outputs only (output_fmt 'NLC'), not {output_fmt!r}")
        depth = len(self.blocks)
        if indices is None:
            indices = range(depth)
        wanted = set(range(depth - indices, depth)) if isinstance(indices, int) else {i % depth for i in indices}
        r = self.num_prefix_tokens
        x, cos, sin = self.tokens(x, None)
        intermediates = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin)
            if i in wanted:
                y = self.norm(x) if norm else x
                intermediates.append((y[:, r:], y[:, :r]) if return_prefix_tokens else y[:, r:])
        return intermediates if intermediates_only else (self.norm(x), intermediates)
