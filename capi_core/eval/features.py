"""Frozen feature extraction: per-layer tokens split into [cls], registers and patches.

Works on our ``Encoder`` (its timm model is ``encoder.vit``) and on any timm ``VisionTransformer`` or
``Eva``. Sequence order is timm's: ``[cls?, reg_1..reg_R, patch_1..patch_N]``; our encoders have no
[cls], so ``Tokens.cls`` is None for them.

"Final" tokens are the encoder output after the final norm (what CAPI's reference probes and teacher
use). Intermediate layers come from timm ``forward_intermediates``, un-normalised unless ``norm=True``
(the Registers paper does not say which of the two its token norms are); every report says which one
it used.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Tokens:
    """One layer's tokens for a set of images, split by type."""

    patches: Tensor  # [B, N, D]
    registers: Tensor  # [B, R, D], R may be 0
    cls: Tensor | None = None  # [B, D]; None for models without a [cls] token (ours)

    def norms(self) -> dict[str, Tensor]:
        """L2 norms by token type: ``patches`` [B, N], ``registers`` [B, R] and ``cls`` [B] if present."""
        out = {"patches": self.patches.float().norm(dim=-1), "registers": self.registers.float().norm(dim=-1)}
        if self.cls is not None:
            out["cls"] = self.cls.float().norm(dim=-1)
        return out


@dataclass
class Features:
    """What ``extract_features`` returns."""

    final: Tokens  # encoder output after the final norm
    layers: dict[int, Tokens]  # block index (0-based) -> that block's output tokens
    norm: bool  # whether ``layers`` went through the final norm


def backbone(model: nn.Module) -> nn.Module:
    """The timm model inside our Encoder (``.vit``), or the model itself when it is a timm ViT."""
    return getattr(model, "vit", model)


def prefix_layout(model: nn.Module) -> tuple[bool, int]:
    """(has [cls] token, number of registers) of a timm ViT/Eva or of an Encoder wrapping one."""
    vit = backbone(model)
    has_cls = getattr(vit, "cls_token", None) is not None
    return has_cls, vit.num_prefix_tokens - int(has_cls)


def split_tokens(x: Tensor, has_cls: bool, num_registers: int) -> Tokens:
    """Split a full token sequence [B, T, D] (T = cls? + R + N) into ``Tokens``."""
    c = int(has_cls)
    return Tokens(patches=x[:, c + num_registers:], registers=x[:, c:c + num_registers],
                  cls=x[:, 0] if has_cls else None)


def grid_shape(num_patches: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) patch grid of N patches for an image of (H, W) pixels (square patches)."""
    H, W = image_hw
    patch = math.sqrt(H * W / num_patches)
    h, w = round(H / patch), round(W / patch)
    if h * w != num_patches:
        raise ValueError(f"{num_patches} patches do not tile a {H}x{W} image with square patches")
    return h, w


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def frozen(model: nn.Module, autocast_dtype: torch.dtype | None = None):
    """Eval mode, no grad and optional autocast for the duration; restores train mode afterwards.

    The trainer calls the online probe on a model mid-training, so its mode must come back unchanged.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        with torch.no_grad(), amp:
            yield device
    finally:
        model.train(was_training)


def final_tokens(model: nn.Module, x: Tensor) -> Tensor:
    """Final-normed tokens [B, T, D]: our Encoder's forward, or timm's ``forward_features``."""
    return model(x) if hasattr(model, "vit") else model.forward_features(x)


def _batches(images: Tensor, batch_size: int):
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch of images [N, C, H, W], got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, images.shape[0], batch_size):
        yield start, images[start:start + batch_size]


class _Buffer:
    """Preallocated CPU storage filled batch by batch, so that memory peaks at the result's size
    rather than twice that (list + torch.cat)."""

    def __init__(self, total: int, dtype: torch.dtype):
        self.total, self.dtype, self.data = total, dtype, None

    def put(self, start: int, value: Tensor) -> None:
        if self.data is None:
            self.data = torch.empty((self.total, *value.shape[1:]), dtype=self.dtype)
        self.data[start:start + value.shape[0]] = value.to("cpu", self.dtype)


class _TokenBuffer:
    """A ``_Buffer`` per token type."""

    def __init__(self, total: int, dtype: torch.dtype):
        self.parts = {name: _Buffer(total, dtype) for name in ("patches", "registers", "cls")}

    def put(self, start: int, tokens: Tokens) -> None:
        for name, buf in self.parts.items():
            if getattr(tokens, name) is not None:
                buf.put(start, getattr(tokens, name))

    def tokens(self) -> Tokens:
        return Tokens(**{name: buf.data for name, buf in self.parts.items()})


def _intermediate_tokens(item: Tensor | tuple[Tensor, Tensor], has_cls: bool) -> Tokens:
    # timm gives (patches [B, N, D], prefix [B, P, D]) for models with prefix tokens, else patches alone.
    patches, prefix = item if isinstance(item, tuple) else (item, item[:, :0])
    return Tokens(patches=patches, registers=prefix[:, int(has_cls):], cls=prefix[:, 0] if has_cls else None)


def predictor_pool(predictor: nn.Module, context: Tensor) -> Tensor:
    """CAPI's "predictor pooling" (CAPI paper, Table 5): [B, D_pred] from the encoder's final output on
    every patch, context [B, R + N, D].

    The predictor runs with a mask-token query at every position, and the output of its first block
    (after the predictor's final norm) is averaged over positions. The paper measures this well above
    average pooling of the patch tokens (IN-1k k-NN 73.8 vs 57.1).
    """
    n = context.shape[1] - predictor.num_registers
    everywhere = torch.arange(n, device=context.device).expand(context.shape[0], n)
    return predictor(context, everywhere, everywhere, depth=1).mean(dim=1)


@torch.no_grad()
def predictor_pooled_tokens(predictor: nn.Module, tokens: Tokens, batch_size: int = 256,
                            autocast_dtype: torch.dtype | None = None) -> Tensor:
    """``predictor_pool`` [N, D_pred] of already extracted final tokens (``extract_features(...).final``),
    so an evaluation that has them does not run the encoder again."""
    out = _Buffer(tokens.patches.shape[0], torch.float32)
    with frozen(predictor, autocast_dtype) as device:
        for start in range(0, tokens.patches.shape[0], batch_size):
            context = torch.cat([tokens.registers[start:start + batch_size],
                                 tokens.patches[start:start + batch_size]], dim=1)
            out.put(start, predictor_pool(predictor, context.to(device)).float())
    return out.data


POOLS = ("mean", "cls", "predictor")


@torch.no_grad()
def pooled_features(model: nn.Module, images: Tensor, batch_size: int = 256, pool: str = "mean",
                    autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Image-level features [N, D] from images [N, C, H, W].

    ``pool="mean"``: mean of the final-normed patch tokens, registers excluded; ``pool="cls"``: the
    [cls] token of models that have one; ``pool="predictor"``: CAPI's predictor pooling
    (``predictor_pool``), for a whole CAPI model (``Student``, e.g. from ``load_student``).
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if pool == "predictor" and not hasattr(model, "predictor"):
        raise ValueError("pool='predictor' needs a whole CAPI model (encoder + predictor), not an encoder alone")
    has_cls, num_registers = prefix_layout(getattr(model, "encoder", model))
    if pool == "cls" and not has_cls:
        raise ValueError("pool='cls' needs a model with a [cls] token; this one has none")
    out = _Buffer(images.shape[0], torch.float32)
    encoder = getattr(model, "encoder", model)
    with frozen(model, autocast_dtype) as device:
        for start, x in _batches(images, batch_size):
            x = final_tokens(encoder, x.to(device))
            if pool == "predictor":
                out.put(start, predictor_pool(model.predictor, x).float())
            else:
                tokens = split_tokens(x, has_cls, num_registers)
                out.put(start, tokens.patches.float().mean(dim=1) if pool == "mean" else tokens.cls)
    return out.data


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[int] | None = (),
    norm: bool = False,
    batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
    store_dtype: torch.dtype = torch.float32,
) -> Features:
    """Final tokens and the outputs of the requested blocks for images [N, C, H, W].

    Args:
        layers: block indices (negative counts from the end); ``None`` = every block; ``()`` = final
            output only (one plain forward pass).
        norm: apply the final norm to the intermediate layers too (the Registers paper does not say
            which it measured).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward under autocast (pays off on GPUs and
            AMX CPUs; on AVX-512 CPUs at demo size it is no faster). Features are stored in
            ``store_dtype`` on the CPU, and only for the requested layers.
    """
    vit = backbone(model)
    has_cls, num_registers = prefix_layout(model)
    depth = len(vit.blocks)
    if layers is None:
        layers = range(depth)
    for i in layers:
        if not -depth <= i < depth:
            raise ValueError(f"layer index {i} is out of range for a {depth}-block model")
    indices = sorted({i % depth for i in layers})
    final = _TokenBuffer(images.shape[0], store_dtype)
    inter = {i: _TokenBuffer(images.shape[0], store_dtype) for i in indices}
    with frozen(model, autocast_dtype) as device:
        for start, x in _batches(images, batch_size):
            x = x.to(device)
            if indices:
                # Ours are timm models, so the intermediates and the final norm come from timm itself.
                out, per_layer = vit.forward_intermediates(
                    x, indices=indices, return_prefix_tokens=True, norm=norm, output_fmt="NLC")
                for i, item in zip(indices, per_layer):
                    inter[i].put(start, _intermediate_tokens(item, has_cls))
            else:
                out = final_tokens(model, x)
            final.put(start, split_tokens(out, has_cls, num_registers))
    return Features(final=final.tokens(), layers={i: buf.tokens() for i, buf in inter.items()}, norm=norm)
