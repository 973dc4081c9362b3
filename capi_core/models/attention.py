"""Attention precision policy: the attention product runs in fp32 under CPU bf16 autocast.

CPU autocast casts ``F.scaled_dot_product_attention`` to bf16, and the bf16 backward of that op is very
slow on CPU. Running only the attention product in fp32, while the q/k/v/out projections and MLPs stay
in bf16, made bf16 training 1.5-2x faster on this project's Intel CPUs. Measured again on a 2-core AMD
EPYC (avx512_bf16, no AMX), forward + backward of one cpu-demo attention (4 heads of 32, 20 tokens):
batch 64 810 us in fp32 against 7,100 us in bf16, batch 256 4.6 ms against 29 ms. On CUDA (or without
autocast) nothing changes: bf16 flash attention is fast.

Every attention in the models calls ``scaled_dot_product_attention`` below: CapiViT's and the
predictor's directly, timm's through ``TimmAttention``, a subclass of timm's module that only swaps
that call (same parameters, same state-dict layout). An earlier version reached timm's call with a
TorchFunctionMode instead; its Python dispatch on every op of the encoder cost about 7 % of a cpu-demo
bf16 step (py-spy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, computed in fp32 when CPU autocast is on.

    q [B, H, Nq, hd], k and v [B, H, Nk, hd] -> [B, H, Nq, hd] in v's dtype.
    """
    if q.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return out.to(v.dtype)


class TimmAttention(Attention):
    """timm's ``Attention`` with its fused call replaced by ``scaled_dot_product_attention`` above:
    x [B, N, C] -> [B, N, C]. What timm's own forward does is kept for every option this project does
    not use (masks, causal, gating) and for ``fused_attn=False`` (the explicit softmax that attention
    diagnostics hook)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if not self.fused_attn or attn_mask is not None or is_causal or self.gate is not None:
            return super().forward(x, attn_mask, is_causal)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))
