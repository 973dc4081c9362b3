"""The CAPI encoder: a ViT with registers and no [cls] token that can run on visible patches only.

The student sees the visible patches of a masked view, the teacher (EMA) sees all of them. Both are
this module; ``visible`` selects which. The network is ``self.vit``. Two position schemes
(``ModelConfig.pos_embed``):

- ``"rope"`` (the ``vit-s/b/l`` presets): the official CAPI architecture (``vit.CapiViT``): CAPI's own
  2-D RoPE on q and k (``rope.py``: [0, 1] coordinates, log-spaced frequencies from 7 to 7e-4, the
  reference's channel layout, registers on the edges of the visible patches' bounding box), RMSNorm
  eps 1e-5, no linear biases, separate q/k/v projections, efficient drop path, no absolute position
  embedding. Plain timm cannot build it, so its weights load through ``capi_core.checkpoint.load_encoder``
  (``capi export`` refuses it with that advice).
- ``"learned"`` (the CPU presets): a timm ``VisionTransformer`` with a learned absolute position
  embedding over the N patches (``no_embed_class=True``: registers get none), gathered at the visible
  indices. CAPI's ablation (CAPI paper, Table 1h; ViT-L/16, 100k iterations) found it on par with RoPE:
  30.0 ADE / 81.6 IN1k vs 29.1 / 81.4. Its exported weights load in timm's plain VisionTransformer:
  ``timm.create_model(self.timm_architecture, **self.timm_model_args())`` builds it, and
  ``self.vit.state_dict()`` loads into it (pretrained_cfg_overlay=dict(file=...)).

Deviations from CAPI's block (reference ``model.py``) that timm forces on the ``"learned"`` encoder:

- The final norm has affine parameters in timm; they are frozen at identity (weight 1, bias 0), which is
  exactly CAPI's affine-free final norm and keeps timm's key layout.
- RMSNorm eps is timm's 1e-6 (CAPI 1e-5): ``norm_layer='rmsnorm'`` cannot carry an eps.
- q, k and v come from one fused projection, so its xavier-uniform init is over the fused [3D, D] weight.
- Drop path: timm ramps the rate linearly over depth; CAPI uses the same rate in every block, so the
  blocks' DropPath modules are replaced after construction (they have no parameters). timm's DropPath
  zeroes whole samples rather than computing the branch on a subset (CAPI's "efficient" variant).

Init follows CAPI's reference code: xavier-uniform linear and patch-embed weights (the latter on the
flattened [D, C*p*p] view), zero biases, registers N(0, 0.02); the learned position embedding keeps
timm's trunc-normal(0.02).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import DropPath

from capi_core.config import ModelConfig
from capi_core.models.attention import TimmAttention
from capi_core.models.vit import CapiViT

# The timm entry point the learned-position encoder is built from. timm_model_args overrides every size
# and switch it sets, so only the model class matters.
TIMM_ARCHITECTURE = "vit_base_patch16_reg4_gap_256"


class Encoder(nn.Module):
    """ViT encoder: ``forward(x [B, C, H, W], visible [B, n_vis] | None) -> [B, R + n, D]``.

    Output tokens are final-normed, registers first; n = n_vis, or N (all patches) when ``visible`` is None.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.pos_embed == "rope" and (cfg.embed_dim // cfg.num_heads) % 4:
            # CAPI's RoPE gives each axis half of a head's channels with head_dim/4 frequencies.
            raise ValueError(f"pos_embed 'rope' needs embed_dim/num_heads divisible by 4, got "
                             f"{cfg.embed_dim}/{cfg.num_heads}")
        self.cfg = cfg
        self.use_rope = cfg.pos_embed == "rope"
        self.num_registers = cfg.registers
        self.grid_size = cfg.grid_size
        self.num_patches = cfg.num_patches
        self.embed_dim = cfg.embed_dim
        if self.use_rope:
            self.timm_architecture = None  # no timm model has CAPI's RoPE
            self.vit = CapiViT(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads,
                               cfg.mlp_ratio, cfg.registers, cfg.drop_path)
        else:
            self.timm_architecture = TIMM_ARCHITECTURE
            # TimmAttention: timm's module with the attention product computed as attention.py measured
            # fastest on CPU; same parameters, so the weights still load into plain timm.
            self.vit = timm.create_model(self.timm_architecture, pretrained=False, attn_layer=TimmAttention,
                                         **self.timm_model_args())
            for block in self.vit.blocks:  # CAPI: one drop-path rate in every block, not timm's ramp over depth
                block.drop_path1 = DropPath(cfg.drop_path) if cfg.drop_path > 0 else nn.Identity()
                block.drop_path2 = DropPath(cfg.drop_path) if cfg.drop_path > 0 else nn.Identity()
        self._init_weights()
        for p in self.vit.norm.parameters():  # identity affine, frozen: CAPI's final norm has none
            p.requires_grad_(False)

    def timm_model_args(self) -> dict[str, Any]:
        """JSON-able kwargs for ``timm.create_model(self.timm_architecture, **args)`` (inference: no drop path)."""
        c = self.cfg
        if self.use_rope:
            raise ValueError("pos_embed 'rope' (CAPI's own RoPE ViT) has no plain-timm equivalent; load its "
                             "checkpoint with capi_core.checkpoint.load_encoder")
        # fc_norm=False keeps the final norm on the tokens (forward_features); the model's default
        # output is then the mean of the normed patch tokens, registers excluded.
        return dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, num_classes=0,
                    global_pool="avg", embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
                    mlp_ratio=c.mlp_ratio, qkv_bias=False, class_token=False, fc_norm=False, reg_tokens=c.registers,
                    no_embed_class=True, proj_bias=False, norm_layer="rmsnorm")

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.vit.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        proj = self.vit.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        if self.vit.reg_token is not None:
            nn.init.normal_(self.vit.reg_token, std=0.02)

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], visible [B, n_vis] patch indices (raster order) or None -> [B, R + n, D]."""
        vit = self.vit
        if self.use_rope:
            return vit.forward_features(x, visible)
        tokens = vit.patch_embed(x) + vit.pos_embed  # [B, N, D]
        if visible is not None:
            tokens = tokens.gather(1, visible.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        if vit.reg_token is not None:
            tokens = torch.cat([vit.reg_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return vit.norm(vit.blocks(tokens))
