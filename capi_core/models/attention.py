"""How the models compute attention on CPU: an explicit product for short sequences, SDPA for long ones.

Every attention in the models calls ``scaled_dot_product_attention`` below: CapiViT's and the
predictor's directly, timm's through ``TimmAttention``, a subclass of timm's module that only swaps
that call (same parameters, same state-dict layout). An earlier version reached timm's call with a
TorchFunctionMode instead; its Python dispatch on every op of the encoder cost about 7 % of a cpu-demo
bf16 step (py-spy).

Why not always ``F.scaled_dot_product_attention``: on CPU it runs a flash-attention kernel whose
per-block overhead dominates at the CPU presets' 20 tokens, and whose bf16 backward is very slow.
Forward + backward of one attention, 2-core AMD EPYC (avx512_bf16, no AMX), torch 2.14.1, ~16k
tokens a call (e.g. 780 sequences of 21 tokens), milliseconds:

=======  ===================  ================  ================  ==========  ================
tokens   SDPA in fp32, from   explicit, bf16    explicit, bf16,   SDPA, fp32  explicit, fp32,
         bf16 (under autocast)                  compiled                      compiled
=======  ===================  ================  ================  ==========  ================
21       44                   13                12                43          15
53       41                   17                15                41          31
101      141                  55                52                123         120
197      167                  156               90                160         209
261      197                  268               256               185         281
=======  ===================  ================  ================  ==========  ================

So on CPU, up to ``EXPLICIT_MAX_KEYS`` keys, the product is computed explicitly: q k^T and the
weighted sum in the autocast dtype (bf16 matmuls are fast), the softmax in fp32 for its accuracy.
Beyond that, and on CUDA, SDPA; under CPU bf16 autocast it runs in fp32, because CPU autocast would
cast it to bf16 and its bf16 backward is slow (at 20 tokens: batch 64 810 us in fp32 against 7,100 us
in bf16). The explicit form scales q before the product: written with the scale after q k^T, Inductor
recognises the pattern and swaps SDPA back in (measured: the compiled explicit form then ran as slow as
SDPA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention

# Keys up to which the explicit product beats SDPA on CPU (table above): with bf16 autocast 2.3-3.4x
# faster up to 101 tokens, level at 197; without autocast (fp32) 2.8x at 21 tokens, level at 101.
EXPLICIT_MAX_KEYS = {True: 128, False: 64}  # keyed by "CPU autocast is on"


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with the softmax in fp32: q [B, H, Nq, hd], k and v [B, H, Nk, hd] ->
    [B, H, Nq, hd] in the dtype of the matmuls (autocast's, else the inputs')."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, Nq, Nk]
    return logits.float().softmax(dim=-1).to(logits.dtype) @ v


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` for this project's calls (no mask, no causal, default scale),
    computed the fastest measured way on CPU (module docstring).

    q [B, H, Nq, hd], k and v [B, H, Nk, hd] -> [B, H, Nq, hd].
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    autocast = torch.is_autocast_enabled("cpu")
    plain = not kwargs or (set(kwargs) == {"dropout_p"} and kwargs["dropout_p"] == 0.0)
    if plain and k.shape[-2] <= EXPLICIT_MAX_KEYS[autocast]:
        return explicit_attention(q, k, v)
    if not autocast:
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
