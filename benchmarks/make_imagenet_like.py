"""A synthetic ImageNet-like image folder: ROOT/<class>/<i>.JPEG, ~500x375 photo-like JPEGs, no download.

    .venv/bin/python benchmarks/make_imagenet_like.py /tmp/imagenet-like --images 2000 --classes 10

Nothing here is a real photograph, but the things that set decoding and import costs are made to
match photographs: the size (ImageNet's typical 500x375, a quarter of them portrait 375x500, some
other sizes), the bytes per pixel after JPEG compression (quality 90, 4:2:0 chroma, like most camera
and web JPEGs), and the statistics that drive those bytes:

- a "dead leaves" layout: opaque discs with power-law radii (density ~ r^-3), painted back to front,
  the standard model of occlusion that gives photographs their scale-invariant 1/f^2 power spectrum
  and their sharp edges;
- inside each region, 1/f ("pink") luminance texture;
- correlated colour channels (mostly luminance, weaker chroma), as in natural scenes;
- a slight optical blur and sensor noise.

Each image is a pure function of (seed, index), so the folder is the same on every machine.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (400, 300))  # (W, H)
SIZE_WEIGHTS = (0.55, 0.2, 0.1, 0.05, 0.05, 0.05)
QUALITY = 90


def _pink_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Zero-mean, unit-std noise with a 1/f amplitude spectrum, float32 [H, W]."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))
    spectrum = amplitude * np.exp(2j * np.pi * rng.random((height, width // 2 + 1)))
    noise = np.fft.irfft2(spectrum, s=(height, width)).astype(np.float32)
    return (noise - noise.mean()) / (noise.std() + 1e-8)


def make_image(seed: int, index: int) -> Image.Image:
    """One photo-like RGB image (see the module docstring)."""
    rng = np.random.default_rng([seed, index])
    width, height = SIZES[rng.choice(len(SIZES), p=SIZE_WEIGHTS)]
    # A per-image palette of a few scene colours; regions vary mostly in luminance, less in chroma.
    n_colours = int(rng.integers(3, 7))
    palette = rng.uniform(30, 220, (n_colours, 1)) + rng.normal(0, 22, (n_colours, 3))
    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in palette[0]))
    draw = ImageDraw.Draw(canvas)
    r_min, r_max = 2.0, 0.5 * max(width, height)
    n_discs = int(rng.integers(1500, 3000))
    # Radii with density ~ r^-3 on [r_min, r_max] (inverse-CDF sampling), largest painted first, so
    # small leaves lie on top and the canvas is covered.
    u = rng.random(n_discs)
    radii = np.sort(1.0 / np.sqrt(u / r_max**2 + (1 - u) / r_min**2))[::-1]
    for r in radii:
        cx, cy = rng.uniform(-r, width + r), rng.uniform(-r, height + r)
        colour = palette[rng.integers(len(palette))] * rng.uniform(0.6, 1.3) + rng.normal(0, 8, 3)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(np.clip(colour, 0, 255).astype(int).tolist()))
    pixels = np.asarray(canvas, np.float32)
    texture = _pink_noise(rng, height, width)
    pixels += (rng.uniform(10, 22) * texture)[..., None] * np.array([1.0, 0.95, 0.9], np.float32)
    blurred = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 0.9))))  # optics, then sensor noise
    noisy = np.asarray(blurred, np.float32) + rng.normal(0, 3.0, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write(args: tuple[Path, int, int, int]) -> int:
    root, seed, index, classes = args
    path = root / f"n{index % classes:08d}" / f"img_{index:07d}.JPEG"
    make_image(seed, index).save(path, format="JPEG", quality=QUALITY)
    return path.stat().st_size


def make_folder(root: str | Path, images: int, classes: int = 10, seed: int = 0, workers: int = 1) -> dict:
    """Write ``images`` JPEGs into ``classes`` class folders under ``root``; returns a summary."""
    root = Path(root)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(root, seed, i, classes) for i in range(images)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            sizes = list(pool.map(_write, jobs, chunksize=16))
    else:
        sizes = [_write(job) for job in jobs]
    return {"root": str(root), "images": images, "classes": classes, "bytes": int(sum(sizes)),
            "mean_kb": sum(sizes) / len(sizes) / 1e3, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    s = make_folder(args.root, args.images, args.classes, args.seed, args.workers)
    print(f"{s['images']} images in {s['classes']} classes under {s['root']}: {s['bytes'] / 1e6:.1f} MB, "
          f"{s['mean_kb']:.0f} KB per image, {s['seconds']:.1f} s")


if __name__ == "__main__":
    main()
