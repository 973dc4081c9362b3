"""Register and attention diagnostics, after "Vision Transformers Need Registers" (Darcet et al., ICLR 2024;
"the Registers paper" below) and "Beyond [cls]" (Przewięźlikowski et al., ICCV 2025).

- ``norm_report``: the high-norm ("outlier") token detector of Darcet et al., a pure function of norms.
- ``norm_quantiles`` / ``layer_curves`` / ``norms_by_type``: token-norm profiles per layer and per token
  type (registers vs patches vs [cls]).
- ``attention_recorder`` / ``collect_attention``: materialised attention maps from timm attention
  modules; ``attention_flow_stats``: Beyond-[cls]'s information-flow statistics, generalised to models
  with registers and without [cls]; ``attention_maps``: per-register and mean patch attention.
- ``run_diagnostics``: all of the above on a batch of images, as a JSON-ready dict.

Fractions are in [0, 1]. Which tokens were measured (after the final norm or not) is part of every report.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capi_core.eval.features import (
    Tokens,
    backbone,
    extract_features,
    final_tokens,
    frozen,
    grid_shape,
    prefix_layout,
)

# -------------------------------------------------------------------------------------------- norms


def quantiles(x: Tensor, qs: Sequence[float]) -> Tensor:
    """Nearest-rank quantiles of any-size x (torch.quantile refuses more than 2^24 elements)."""
    s = x.detach().float().flatten().sort().values
    return s[(torch.tensor(qs) * (s.numel() - 1)).round().long()]


def norm_quantiles(norms: Tensor) -> dict[str, float]:
    """Summary of token norms of any shape: q50/q90/q99/q99.9, max, max/median, mean."""
    n = norms.detach().float().flatten()
    if n.numel() == 0:
        return {}
    q = quantiles(n, [0.5, 0.9, 0.99, 0.999])
    return {"q50": q[0].item(), "q90": q[1].item(), "q99": q[2].item(), "q99.9": q[3].item(),
            "max": n.max().item(), "max_over_median": (n.max() / q[0].clamp_min(1e-12)).item(),
            "mean": n.mean().item()}


def valley_threshold(norms: Tensor, bin_width: float = 0.02, smooth_bins: float = 2.0,
                     min_separation: float = 2.0, max_valley: float = 0.5, min_fraction: float = 1e-3,
                     min_count: int = 10) -> float | None:
    """τ at the valley between the main mode and a high-norm mode of the log-norm histogram, or None.

    The histogram of log n (bins of ``bin_width`` in log units, i.e. 2%) is smoothed with a Gaussian of
    Silverman's bandwidth (robust IQR form, so outliers do not widen it) and at least ``smooth_bins``
    bins. The main mode is the highest peak; the high-norm mode is the highest peak at
    least ``min_separation`` times larger in norm (outliers are ~10x the typical norm, says the
    Registers paper's introduction; noise bumps on the flank of a unimodal histogram are much closer).
    τ is the centre of the valley between them. It counts as bimodal only if the valley is at most
    ``max_valley`` times the smaller peak and at least ``min_count`` tokens and ``min_fraction`` of all
    lie above τ: a handful of far-tail tokens of a wide unimodal distribution make bumps that are not a
    population of outliers.
    """
    n = norms.detach().float().flatten().clamp_min(1e-12)
    logn = n.log()
    lo, hi = logn.min().item(), logn.max().item()
    if hi - lo < math.log(min_separation):
        return None
    nbins = min(4096, math.ceil((hi - lo) / bin_width) + 1)
    hist = torch.histc(logn, bins=nbins, min=lo, max=hi)
    q25, q75 = quantiles(logn, [0.25, 0.75]).tolist()
    sigma = max(smooth_bins, 0.9 * (q75 - q25) / 1.34 * logn.numel() ** -0.2 / bin_width)  # in bins
    radius = math.ceil(3 * sigma)
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    h = F.conv1d(hist.view(1, 1, -1), (kernel / kernel.sum()).view(1, 1, -1), padding=radius).flatten()
    centres = lo + (torch.arange(nbins) + 0.5) * (hi - lo) / nbins
    padded = F.pad(h, (1, 1))
    is_peak = (h > padded[:-2]) & (h >= padded[2:])
    main = int(h.argmax())
    far = is_peak & (centres >= centres[main] + math.log(min_separation))
    if not far.any():
        return None
    second = int(torch.where(far, h, torch.full_like(h, -1.0)).argmax())
    between = h[main:second + 1]
    lowest = (between == between.min()).nonzero().flatten()
    valley = main + int(lowest[len(lowest) // 2])  # middle of a flat (often empty) valley
    tau = math.exp(centres[valley].item())
    above = int((n > tau).sum())
    if h[valley] > max_valley * h[second] or above < max(min_count, min_fraction * n.numel()):
        return None
    return tau


def norm_report(norms: Tensor, mode: str = "valley", tau: float | None = None, k: float = 4.0) -> dict:
    """High-norm token detector (Registers paper, §2.1 and Fig. 3) on patch-token norms [M] or [B, N].

    Modes: ``valley`` (default; τ at the histogram valley, see ``valley_threshold``; no bimodality ->
    no outliers), ``fixed`` (the given τ), ``ratio`` (τ = k * median). ``bimodal`` is reported in every
    mode. Returns ``mode``, ``tau`` (None if undefined), ``bimodal``, ``mask`` (bool, shape of norms),
    ``count``, ``fraction`` and ``quantiles``; for [B, N] input also ``images_with_outlier`` (fraction of
    images with >= 1 outlier), ``outliers_per_image`` and ``position_frequency`` [N] (P_b[outlier at p]).
    """
    if norms.ndim not in (1, 2):
        raise ValueError(f"norms must be [M] or [B, N], got shape {tuple(norms.shape)}")
    norms = norms.detach().float()
    valley = valley_threshold(norms) if norms.numel() else None
    if mode == "valley":
        tau = valley
    elif mode == "fixed":
        if tau is None or tau <= 0:
            raise ValueError("mode 'fixed' needs a positive tau")
    elif mode == "ratio":
        if k <= 0:
            raise ValueError(f"mode 'ratio' needs k > 0, got {k}")
        tau = k * norms.median().item()
    else:
        raise ValueError(f"unknown mode {mode!r}; choose valley, fixed or ratio")
    mask = norms > tau if tau is not None else torch.zeros_like(norms, dtype=torch.bool)
    report = {"mode": mode, "tau": tau, "bimodal": valley is not None, "mask": mask,
              "count": int(mask.sum()), "fraction": mask.float().mean().item() if mask.numel() else 0.0,
              "quantiles": norm_quantiles(norms)}
    if norms.ndim == 2:
        report["images_with_outlier"] = mask.any(dim=1).float().mean().item()
        report["outliers_per_image"] = mask.sum(dim=1).float().mean().item()
        report["position_frequency"] = mask.float().mean(dim=0)
    return report


def norms_by_type(tokens: Tokens) -> dict[str, dict[str, float]]:
    """Norm summaries per token type (Registers paper, App. D.1): ``patches``, ``cls``, each ``reg_i``."""
    norms = tokens.norms()
    out = {"patches": norm_quantiles(norms["patches"])}
    if "cls" in norms:
        out["cls"] = norm_quantiles(norms["cls"])
    for i in range(norms["registers"].shape[1]):
        out[f"reg_{i}"] = norm_quantiles(norms["registers"][:, i])
    return out


def layer_curves(layers: dict[int, Tokens], mode: str = "ratio", tau: float | None = None,
                 k: float = 4.0) -> list[dict]:
    """Per-layer norm profile (Registers paper, Fig. 4a): quantiles per token type and the patch outlier
    fraction under the same detector rule, one dict per layer in block order."""
    curves = []
    for index in sorted(layers):
        norms = layers[index].norms()
        report = norm_report(norms["patches"], mode=mode, tau=tau, k=k)
        curves.append({"layer": index, "outlier_fraction": report["fraction"], "tau": report["tau"],
                       **{name: norm_quantiles(n) for name, n in norms.items() if n.numel()}})
    return curves


# ------------------------------------------------------------------------------------- attention


@contextlib.contextmanager
def attention_recorder(model: nn.Module):
    """Record every block's post-softmax attention [B, H, T, T] (float32) during forward passes.

    timm computes attention with fused SDPA, which never materialises the weights, so fused attention is
    switched off on the hooked modules only and restored on exit; ``attn_drop`` (identity in eval mode)
    then receives the softmax output. Yields a list with one slot per block, refilled by each forward.
    """
    blocks = backbone(model).blocks
    modules = [blk.attn for blk in blocks]
    for i, attn in enumerate(modules):
        if not (hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Module)):
            raise TypeError(f"block {i} has no timm-style attention (fused_attn + attn_drop) to hook")
    maps: list[Tensor | None] = [None] * len(modules)
    saved = [attn.fused_attn for attn in modules]
    handles = []
    try:
        for i, attn in enumerate(modules):
            attn.fused_attn = False
            handles.append(attn.attn_drop.register_forward_hook(
                lambda _m, _inp, out, i=i: maps.__setitem__(i, out.detach().float())))
        yield maps
    finally:
        for handle in handles:
            handle.remove()
        for attn, fused in zip(modules, saved):
            attn.fused_attn = fused


@torch.no_grad()
def collect_attention(model: nn.Module, images: Tensor, layers: Sequence[int] | None = None) -> Tensor:
    """Attention maps [B, L, H, T, T] of one batch of images [B, C, H, W], computed in float32.

    ``layers`` selects blocks (negative from the end; None = all). Memory grows with B*L*H*T^2: use
    ``run_diagnostics`` (which reduces per batch) for large sets.
    """
    # No autocast: bf16/fp16 softmax probabilities bias entropies.
    with frozen(model) as device, attention_recorder(model) as maps:
        final_tokens(model, images.to(device))
    chosen = range(len(maps)) if layers is None else [i % len(maps) for i in layers]
    return torch.stack([maps[i].cpu() for i in chosen], dim=1)


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(dim=-1)


def attention_flow_stats(attn: Tensor, has_cls: bool, num_registers: int) -> dict[str, Tensor]:
    """Per-image information-flow statistics from attention [B, L, H, T, T] (rows are queries).

    Token order is [cls?, registers, patches]. Each statistic is averaged over heads and over the query
    tokens of its group, giving [B, L]:

    - ``patch_entropy`` / ``register_entropy`` / ``cls_entropy``: entropy of the full attention row
      divided by log T (1 = uniform over all tokens);
    - ``patch_patch_entropy``: a patch's attention renormalised over patches, entropy / log N
      (Beyond-[cls] ``pos_pos_entropy``, normalised so that grids of any size compare);
    - ``patch_self``, ``register_self``, ``cls_self``: attention a token pays itself;
    - ``patch_to_patches``, ``patch_to_registers``, ``patch_to_cls``: where patches read from (sum to 1);
    - ``register_to_patches``, ``cls_to_patches``: how much registers/[cls] read from patches.

    Groups the model lacks (no registers, no [cls]) are left out.
    """
    if attn.ndim != 5 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be [B, L, H, T, T], got {tuple(attn.shape)}")
    a = attn.float()
    T = a.shape[-1]
    c = int(has_cls)
    groups = {"patch": slice(c + num_registers, T), "register": slice(c, c + num_registers), "cls": slice(0, c)}
    N = T - c - num_registers
    if N < 1:
        raise ValueError(f"{T} tokens leave no patch after {c} cls and {num_registers} registers")
    diag = a.diagonal(dim1=-2, dim2=-1)  # [B, L, H, T]
    full_entropy = _entropy(a) / math.log(T)  # [B, L, H, T]
    stats = {}
    for name, rows in groups.items():
        if rows.stop - rows.start == 0:
            continue
        stats[f"{name}_entropy"] = full_entropy[..., rows].mean(dim=(-1, -2))
        stats[f"{name}_self"] = diag[..., rows].mean(dim=(-1, -2))
        to_patches = a[..., rows, groups["patch"]]  # [B, L, H, rows, N]
        stats[f"{name}_to_patches"] = to_patches.sum(dim=-1).mean(dim=(-1, -2))
    patch_rows = a[..., groups["patch"], :]
    if num_registers:
        stats["patch_to_registers"] = patch_rows[..., groups["register"]].sum(dim=-1).mean(dim=(-1, -2))
    if has_cls:
        stats["patch_to_cls"] = patch_rows[..., 0].mean(dim=(-1, -2))
    within = patch_rows[..., groups["patch"]]
    within = within / within.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    stats["patch_patch_entropy"] = (_entropy(within) / math.log(N)).mean(dim=(-1, -2)) if N > 1 else \
        torch.zeros(a.shape[:2])
    return stats


def attention_maps(attn: Tensor, has_cls: bool, num_registers: int) -> dict[str, Tensor]:
    """Head-mean attention maps over patches from one layer's attention [B, H, T, T]:

    ``registers`` [B, R, N]: each register's attention to the patches, renormalised over patches;
    ``patches`` [B, N]: attention each patch receives from the patches on average, renormalised;
    ``cls`` [B, N] for models with a [cls] token.
    """
    a = attn.float().mean(dim=1)  # [B, T, T]
    c = int(has_cls)
    p0 = c + num_registers

    def renorm(x: Tensor) -> Tensor:
        return x / x.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    out = {"registers": renorm(a[:, c:p0, p0:]), "patches": renorm(a[:, p0:, p0:].mean(dim=1))}
    if has_cls:
        out["cls"] = renorm(a[:, 0, p0:])
    return out


# ------------------------------------------------------------------------------------ the runner


@torch.no_grad()
def run_diagnostics(model: nn.Module, images: Tensor, mode: str = "valley", tau: float | None = None,
                    k: float = 4.0, norm: bool = False, batch_size: int = 64) -> dict:
    """Token-norm and attention diagnostics of a model on images [B, C, H, W], as a JSON-ready dict.

    Norms are measured on block outputs before the final norm unless ``norm=True``. Why pre-norm by
    default: our final norm (CAPI's RMSNorm without affine, or a LayerNorm at init) gives every token
    the same norm sqrt(D), which would hide any artifact. The detector runs on the last block's patches.
    """
    has_cls, num_registers = prefix_layout(model)
    feats = extract_features(model, images, layers=None, norm=norm, batch_size=batch_size)
    last = feats.layers[max(feats.layers)]
    norms = last.norms()["patches"]  # [B, N]
    report = norm_report(norms, mode=mode, tau=tau, k=k)
    grid = grid_shape(norms.shape[1], tuple(images.shape[-2:]))
    flows: dict[str, list[Tensor]] = {}
    with frozen(model) as device, attention_recorder(model) as maps:
        for start in range(0, images.shape[0], batch_size):
            final_tokens(model, images[start:start + batch_size].to(device))
            for name, value in attention_flow_stats(torch.stack(maps, dim=1), has_cls, num_registers).items():
                flows.setdefault(name, []).append(value.cpu())
    measured_on = "block outputs " + ("after" if norm else "before") + " the final norm"
    return {
        "images": images.shape[0],
        "tokens": {"has_cls": has_cls, "registers": num_registers, "patches": norms.shape[1]},
        "measured_on": measured_on,
        "outliers": {
            "layer": max(feats.layers),
            **{key: report[key] for key in ("mode", "tau", "bimodal", "count", "fraction", "images_with_outlier",
                                            "outliers_per_image", "quantiles")},
            "position_frequency": report["position_frequency"].view(*grid).tolist(),  # [h, w]
        },
        "norms_by_type": norms_by_type(last),
        "layer_curves": layer_curves(feats.layers, mode=mode, tau=tau, k=k),
        # per layer: mean over images, heads and query tokens; entropies normalised (1 = uniform)
        "attention_flow": {name: torch.cat(values).mean(dim=0).tolist() for name, values in flows.items()},
    }


def diag_metrics(report: dict) -> dict[str, float]:
    """The scalars of a ``run_diagnostics`` report that a run logs as ``diag/`` metrics at its end:
    the high-norm token detector on the last block's patches (Darcet et al., "Vision Transformers Need
    Registers", ICLR 2024, Sec. 2: artifact tokens with ~10x the norm of the others), their norm
    quantiles, and where the patches' attention goes in the last block (to the registers, if any)."""
    out = report["outliers"]
    metrics = {"diag/high_norm_fraction": float(out["fraction"]),
               "diag/images_with_outlier": float(out.get("images_with_outlier") or 0.0)}
    for key in ("q50", "q90", "q99", "max", "max_over_median"):
        if key in out["quantiles"]:
            metrics[f"diag/norm_{key.replace('.', '_')}"] = float(out["quantiles"][key])
    for name in ("patch_to_registers", "register_to_patches", "patch_to_patches", "patch_patch_entropy"):
        per_layer = report["attention_flow"].get(name)
        if per_layer:
            metrics[f"diag/attn_{name}"] = float(per_layer[-1])
    return metrics
