"""The CAPI encoder: a timm ViT with registers and no [cls] token that can run on visible patches only.

The student sees the visible patches of a masked view, the teacher (EMA) sees all of them. Both are
this module; ``visible`` selects which. The timm model is kept as ``self.vit`` and is
built by ``timm.create_model(self.timm_architecture, **self.timm_model_args())``, so
``self.vit.state_dict()`` loads into plain timm with the same call (pretrained_cfg_overlay=dict(file=...)).

Two position schemes (``ModelConfig.pos_embed``):

- ``"learned"`` (default): timm ``VisionTransformer`` with a learned absolute position embedding over the
  N patches (``no_embed_class=True``: registers get none), gathered at the visible indices. CAPI's
  ablation (CAPI paper, Table 1h; ViT-L/16, 100k iterations) found it on par with RoPE: 30.0 ADE / 81.6 IN1k vs
  29.1 / 81.4. It is the default because the exported weights load in timm's plain VisionTransformer
  (the most widely supported ViT), and gathering a learned embedding at the visible indices is free.
- ``"rope"``: timm ``Eva`` with 2D axial RoPE on q and k (timm's ``RotaryEmbeddingCat``, grid-index
  coordinates) and no absolute embedding; the per-patch RoPE table is gathered at the visible indices,
  as timm's own patch-dropout path does. Deviations from CAPI's RoPE: timm's standard axial layout rather
  than CAPI's coupled one (it pairs row-angle with column-angle channels, which timm cannot express), and
  registers get no RoPE in the encoder (timm's Eva skips prefix tokens), whereas CAPI places them on the
  edges of the visible bounding box.

Deviations from CAPI's block (reference ``model.py``) that timm forces, both schemes:

- The final norm has affine parameters in timm; they are frozen at identity (weight 1, bias 0), which is
  exactly CAPI's affine-free final norm and keeps timm's key layout.
- RMSNorm eps is timm's 1e-6 (CAPI 1e-5): ``norm_layer='rmsnorm'`` cannot carry an eps.
- ``"learned"``: no linear biases at all (timm's ``proj_bias=False`` also removes the MLP biases).
- ``"rope"``: timm's Eva takes ``norm_layer`` only as a Python callable, which JSON model args cannot
  name, so the RoPE encoder keeps Eva's LayerNorm (with bias) to stay loadable by plain
  ``timm.create_model``. Eva also has no switch for the attention-output and MLP biases, so they remain
  (zero-initialised); only the qkv projection is bias-free.
- Drop path: timm ramps the rate linearly over depth; CAPI uses the same rate in every block, so the
  blocks' DropPath modules are replaced after construction (they have no parameters). timm's DropPath
  zeroes whole samples rather than computing the branch on a subset (CAPI's "efficient" variant).

Init follows CAPI's reference code where it is cheap: xavier-uniform linear and patch-embed weights (the
latter on the flattened [D, C*p*p] view), zero biases, registers N(0, 0.02); the learned position
embedding keeps timm's trunc-normal(0.02).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import DropPath

from capi_core.config import ModelConfig
from capi_core.models.attention import fp32_attention

# timm entry points to build from. timm_model_args overrides every size and switch they set, so only the
# model class matters; but timm.create_model drops None-valued kwargs, so an entry must not set anything
# that only None would switch off (layer scale, RoPE reference grid): the Eva entry is a plain EVA-g.
TIMM_ARCHITECTURES = {"learned": "vit_base_patch16_reg4_gap_256", "rope": "eva_giant_patch14_224"}


class Encoder(nn.Module):
    """ViT encoder: ``forward(x [B, C, H, W], visible [B, n_vis] | None) -> [B, R + n, D]``.

    Output tokens are final-normed, registers first; n = n_vis, or N (all patches) when ``visible`` is None.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.pos_embed == "rope" and (cfg.embed_dim // cfg.num_heads) % 4:
            # Axial 2D RoPE gives each axis half of a head's channels, rotated in pairs: head_dim/4 frequencies.
            raise ValueError(f"pos_embed 'rope' needs embed_dim/num_heads divisible by 4, got "
                             f"{cfg.embed_dim}/{cfg.num_heads}")
        self.cfg = cfg
        self.use_rope = cfg.pos_embed == "rope"
        self.num_registers = cfg.registers
        self.grid_size = cfg.grid_size
        self.num_patches = cfg.num_patches
        self.embed_dim = cfg.embed_dim
        self.timm_architecture = TIMM_ARCHITECTURES[cfg.pos_embed]
        self.vit = timm.create_model(self.timm_architecture, pretrained=False, **self.timm_model_args())
        for block in self.vit.blocks:  # CAPI: one drop-path rate in every block, not timm's ramp over depth
            block.drop_path1 = DropPath(cfg.drop_path) if cfg.drop_path > 0 else nn.Identity()
            block.drop_path2 = DropPath(cfg.drop_path) if cfg.drop_path > 0 else nn.Identity()
        self._init_weights()
        for p in self.vit.norm.parameters():  # identity affine, frozen: CAPI's final norm has none
            p.requires_grad_(False)

    def timm_model_args(self) -> dict[str, Any]:
        """JSON-able kwargs for ``timm.create_model(self.timm_architecture, **args)`` (inference: no drop path)."""
        c = self.cfg
        common = dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, num_classes=0,
                      global_pool="avg", embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
                      mlp_ratio=c.mlp_ratio, qkv_bias=False, class_token=False)
        if c.pos_embed == "learned":
            # fc_norm=False keeps the final norm on the tokens (forward_features); the model's default
            # output is then the mean of the normed patch tokens, registers excluded.
            return dict(common, fc_norm=False, reg_tokens=c.registers, no_embed_class=True, proj_bias=False,
                        norm_layer="rmsnorm")
        return dict(common, use_fc_norm=False, num_reg_tokens=c.registers, use_abs_pos_emb=False,
                    use_rot_pos_emb=True)

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
        with fp32_attention(x):
            tokens = vit.patch_embed(x)  # [B, N, D]
            rope = None
            if self.use_rope:
                rope = vit.rope.get_embed()  # [N, 2 * head_dim]: sin | cos
            else:
                tokens = tokens + vit.pos_embed
            if visible is not None:
                tokens = tokens.gather(1, visible.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
                if rope is not None:
                    rope = rope[visible].unsqueeze(1)  # [B, 1, n_vis, 2 * head_dim], broadcast over heads
            if vit.reg_token is not None:
                tokens = torch.cat([vit.reg_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            if rope is None:
                tokens = vit.blocks(tokens)
            else:
                for block in vit.blocks:
                    tokens = block(tokens, rope=rope)
            return vit.norm(tokens)
