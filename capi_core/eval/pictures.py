"""Pictures of frozen features (PNG, matplotlib Agg): PCA of patch features, attention maps, token norms.

The PCA picture is the one CAPI is known for (CAPI's reference ``eval_visualizations.py``): one PCA
fitted across the patch tokens of all shown images, its first three components min-max scaled to [0, 1]
and shown as RGB next to each input. Every writer returns the path it wrote; files appear atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capi_core.atomic import atomic_write
from capi_core.eval.diagnostics import attention_maps, attention_recorder
from capi_core.eval.features import extract_features, final_tokens, frozen, grid_shape, prefix_layout


def pca_rgb(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """Patch features [B, N, D] -> RGB images [B, h, w, 3] in [0, 1] (N = h * w).

    One PCA over all B*N tokens (so colours mean the same thing across images); each component is
    min-max scaled over all images. Component signs are fixed (largest loading positive) so the picture
    is deterministic.
    """
    B, N, D = patches.shape
    if grid[0] * grid[1] != N:
        raise ValueError(f"grid {grid} does not hold {N} patches")
    x = patches.reshape(B * N, D).double()
    x = x - x.mean(dim=0)
    _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    top = vectors[:, -3:].flip(-1)  # [D, <=3], largest first
    top = top * torch.sign(top.gather(0, top.abs().argmax(dim=0, keepdim=True)))
    proj = x @ top  # [B*N, <=3]
    proj = F.pad(proj, (0, 3 - proj.shape[1]))  # D < 3: missing components stay black
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    rgb = (proj - lo) / (hi - lo).clamp_min(1e-12)
    return rgb.float().reshape(B, *grid, 3)


def _display(images: Tensor) -> Tensor:
    """Normalised images [B, C, H, W] -> [B, H, W, 3] in [0, 1] for display (min-max per image)."""
    x = images.float()[:, :3] if images.shape[1] >= 3 else images.float()[:, :1].expand(-1, 3, -1, -1)
    flat = x.flatten(1)
    lo, hi = flat.min(dim=1).values.view(-1, 1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1)


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, h, w, C] -> [B, H, W, C], nearest, so each patch stays a visible square."""
    return F.interpolate(maps.permute(0, 3, 1, 2), size=size, mode="nearest").permute(0, 2, 3, 1)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    # deferred: choosing a backend is a process-wide switch, made only once a picture is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: loaded only once the backend is chosen

    return plt


def _save(fig, path: Path) -> Path:
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _figure(rows: int, cols: int):
    fig, axes = pyplot().subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def pca_figure(images: Tensor, patches: Tensor, path: Path) -> Path:
    """Inputs [B, C, H, W] (top row) above the PCA-RGB of their patch features [B, N, D] (bottom row)."""
    size = tuple(images.shape[-2:])
    rgb = _upsample(pca_rgb(patches, grid_shape(patches.shape[1], size)), size)
    fig, axes = _figure(2, images.shape[0])
    for b, (img, pca) in enumerate(zip(_display(images), rgb)):
        axes[0, b].imshow(img.numpy())
        axes[1, b].imshow(pca.numpy())
    axes[1, 0].set_title("PCA of patch features", loc="left", fontsize=8)
    return _save(fig, path)


def attention_figure(images: Tensor, maps: dict[str, Tensor], path: Path) -> Path:
    """Inputs above their mean patch attention and each register's (and [cls]'s) attention over patches.

    ``maps`` as returned by ``diagnostics.attention_maps``: ``patches`` [B, N], ``registers`` [B, R, N],
    optionally ``cls`` [B, N].
    """
    size = tuple(images.shape[-2:])
    grid = grid_shape(maps["patches"].shape[-1], size)
    rows = [("mean patch attention", maps["patches"])]
    if "cls" in maps:
        rows.append(("[cls]", maps["cls"]))
    rows += [(f"register {r}", maps["registers"][:, r]) for r in range(maps["registers"].shape[1])]
    fig, axes = _figure(1 + len(rows), images.shape[0])
    for b, img in enumerate(_display(images)):
        axes[0, b].imshow(img.numpy())
    for i, (title, values) in enumerate(rows, start=1):
        up = _upsample(values.reshape(-1, *grid, 1), size)[..., 0]
        for b in range(images.shape[0]):
            axes[i, b].imshow(up[b].numpy(), cmap="inferno")
        axes[i, 0].set_title(title, loc="left", fontsize=8)
    return _save(fig, path)


def norm_figure(images: Tensor, norms: Tensor, path: Path, tau: float | None = None) -> Path:
    """Inputs above a heat map of their patch-token norms [B, N] (one colour scale for all), plus a
    log-y histogram of the norms with the detector threshold τ if given."""
    size = tuple(images.shape[-2:])
    grid = grid_shape(norms.shape[-1], size)
    up = _upsample(norms.float().reshape(-1, *grid, 1), size)[..., 0]
    B = images.shape[0]
    fig, axes = _figure(3, B)
    lo, hi = norms.min().item(), norms.max().item()
    for b, img in enumerate(_display(images)):
        axes[0, b].imshow(img.numpy())
        axes[1, b].imshow(up[b].numpy(), cmap="viridis", vmin=lo, vmax=hi)
    axes[1, 0].set_title(f"patch-token norm ({lo:.3g} to {hi:.3g})", loc="left", fontsize=8)
    for ax in axes[2, 1:]:
        ax.remove()
    hist = fig.add_subplot(3, 1, 3)
    hist.hist(norms.flatten().numpy(), bins=100, log=True)
    if tau is not None:
        hist.axvline(tau, color="red", linestyle="--", label=f"τ = {tau:.3g}")
        hist.legend(fontsize=8)
    hist.set_xlabel("token norm", fontsize=8)
    axes[2, 0].remove()
    return _save(fig, path)


@torch.no_grad()
def write_pictures(model: nn.Module, images: Tensor, out_dir: Path, tau: float | None = None) -> list[Path]:
    """PCA, attention and norm pictures of a model on a few images [B, C, H, W]; returns the PNG paths.

    PCA uses the final-normed patch tokens (CAPI's features); attention is the last block's; norms are
    the last block's output before the final norm (see ``diagnostics.run_diagnostics``).
    """
    out_dir = Path(out_dir)
    has_cls, num_registers = prefix_layout(model)
    feats = extract_features(model, images, layers=(-1,), norm=False)
    with frozen(model) as device, attention_recorder(model) as maps:
        final_tokens(model, images.to(device))
        last_attention = maps[-1].cpu()
    norms = feats.layers[max(feats.layers)].norms()["patches"]
    return [
        pca_figure(images, feats.final.patches, out_dir / "pca.png"),
        attention_figure(images, attention_maps(last_attention, has_cls, num_registers), out_dir / "attention.png"),
        norm_figure(images, norms, out_dir / "norms.png", tau=tau),
    ]
