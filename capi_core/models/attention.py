"""Attention precision policy: the attention product runs in fp32 under CPU bf16 autocast.

CPU autocast casts ``F.scaled_dot_product_attention`` to bf16, and the bf16 backward of that op is very
slow on CPU (about half of a ViT step, measured on this project's 2-core CPUs). Running only the attention
product in fp32, while the q/k/v/out projections and MLPs stay in bf16, made bf16 training 1.5-2x
faster there. On CUDA (or without autocast) nothing changes: bf16 flash attention is fast.

timm's attention modules call ``F.scaled_dot_product_attention`` themselves, so the encoder reaches
them with a TorchFunctionMode that reroutes only that call; timm's modules, and so its state-dict
layout, stay untouched. The predictor's own cross-attention calls ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, computed in fp32 when CPU autocast is on.

    q [B, H, Nq, hd], k and v [B, H, Nk, hd] -> [B, H, Nq, hd] in v's dtype.
    """
    if q.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return out.to(v.dtype)


class _Fp32CpuAttention(TorchFunctionMode):
    """Reroutes every ``F.scaled_dot_product_attention`` call made inside it; other ops pass through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


def fp32_attention(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context for a forward pass on ``x``: the rerouting mode under CPU autocast, else a no-op
    (so GPU runs and fp32 runs pay nothing for the mode's per-op dispatch)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return _Fp32CpuAttention()
    return contextlib.nullcontext()
