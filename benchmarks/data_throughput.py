"""Data-path throughput: decoded + augmented images per second, and, at ImageNet scale, the import.

    python benchmarks/data_throughput.py [--dataset fashion-mnist] [--runs 3] [--batches 30]
    python benchmarks/data_throughput.py --imagenet-like [--images 2000] [--folder DIR]

Default: ``train_batches`` on a Parquet dataset (Fashion-MNIST) in-process (one torch thread: one
core) and with 1 and 2 loader processes, batch 256, the median of a few timed runs after warm-up;
in-process it also prints images per CPU-second of this process, the per-core rate that a machine
shared with other jobs does not hide.

``--imagenet-like``: a synthetic folder of ~500x375 photo-like JPEGs (``make_imagenet_like.py``;
generated unless ``--folder`` already holds them), then

- the import (``capi data import imagefolder --max-short-side 256``) with 1 and 2 processes: images
  per second, per process, and per CPU-second;
- decode + augment of the stored 256-px JPEGs to 224-px crops (RandomResizedCrop scale 0.6-1 + flip,
  uint8 out, the loader processes' whole job) in 1 and 2 independent processes started together:
  images per second in all, per process and per CPU-second; plus the same from the original
  500x375 JPEGs (no ``--max-short-side``) in one process, and the float normalisation that the
  training device does;
- an estimate for importing ImageNet-1k (1,281,167 images) on a 64-core node, from these figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from capi_core.config import DataConfig
from capi_core.data.reader import train_batches

IMAGENET_TRAIN = 1_281_167
IMAGENET_MEAN_KB = 110  # the ImageNet-1k train set's ~140 GB over its 1.28 M files


def images_per_s(cfg: DataConfig, img_size: int, batch_size: int, batches: int, runs: int,
                 warmup: int) -> tuple[float, float]:
    """Median images per wall-second and per CPU-second of this process over ``runs`` timings of ``batches``."""
    it = train_batches(cfg, img_size, batch_size)
    for _ in range(warmup):
        next(it)
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(it)
        wall.append(batches * batch_size / (time.perf_counter() - start))
        cpu.append(batches * batch_size / (time.process_time() - start_cpu))
    return statistics.median(wall), statistics.median(cpu)


# --------------------------------------------------------------------------------------------------
# ImageNet-like

def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def import_rate(folder: Path, out: Path, processes: int, max_short_side: int | None = 256) -> dict[str, float]:
    """One import of ``folder`` with ``processes`` processes, timed as a whole (plan, scan, shards, manifest)."""
    from capi_core.data.imagefolder import import_imagefolder

    start, cpu = time.perf_counter(), _cpu_seconds()
    manifest = import_imagefolder(folder, out, max_short_side=max_short_side, workers=processes)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    n = sum(manifest.splits.values())
    return {"processes": processes, "images": n, "seconds": wall, "images_per_s": n / wall,
            "images_per_s_per_process": n / wall / processes, "images_per_cpu_s": n / cpu,
            "stored_mb": sum(s.bytes for s in manifest.shards) / 1e6}


def _decode_worker(dataset: str, img_size: int, batch: int, batches: int, rank: int, world: int, start,
                   results) -> None:
    from capi_core.data.reader import TrainBatches

    torch.set_num_threads(1)
    cfg = DataConfig(dataset=dataset, loader_workers=0)
    source = TrainBatches(Path(dataset), cfg, img_size, batch, rank, world, seed=0)
    source[0]  # warm-up: reads (and checksums) the shards into the cache, first decodes
    start.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(1, batches + 1):
        source[step]
    results.put((batch * batches, time.perf_counter() - t0, time.process_time() - c0))


def decode_rate(dataset: Path, processes: int, img_size: int = 224, batch: int = 128,
                batches: int = 8) -> dict[str, float]:
    """Decode + augment (uint8 crops) in ``processes`` processes, each its own rank's batches, timed together."""
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    start, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_decode_worker, args=(str(dataset), img_size, batch, batches, r, processes, start,
                                                      results)) for r in range(processes)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    n, wall = sum(g[0] for g in got), max(g[1] for g in got)
    return {"processes": processes, "images_per_s": n / wall, "images_per_s_per_process": n / wall / processes,
            "images_per_cpu_s": n / sum(g[2] for g in got)}


def normalise_rate(img_size: int = 224, batch: int = 128, repeats: int = 5) -> float:
    """Images per second of the float normalisation of uint8 crops, on this CPU (the device does it)."""
    from capi_core.data.reader import normalise

    x = torch.randint(0, 256, (batch, img_size, img_size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    normalise(x, [0.45] * 3, [0.22] * 3)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        normalise(x, [0.45] * 3, [0.22] * 3)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def imagenet_plan(per_process: float, scaling: float, cores: int = 64, images: int = IMAGENET_TRAIN) -> dict:
    """ImageNet-1k on a ``cores``-core node: ``per_process`` import images/s of one process, ``scaling``
    the measured 2-process efficiency (rate(2) / (2 rate(1))), assumed to hold to ``cores``."""
    rate = cores * per_process * min(scaling, 1.0)
    return {"cores": cores, "images": images, "images_per_s": rate, "minutes": images / rate / 60,
            "read_mb_per_s": rate * IMAGENET_MEAN_KB / 1e3}


def imagenet_like(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_imagenet_like import make_folder

    torch.set_num_threads(1)
    results: dict = {"load_average_at_start": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="capi-imagenet-like-") as tmp:
        folder = Path(args.folder or Path(tmp) / "folder")
        if not any(folder.glob("*/*.JPEG")):
            made = make_folder(folder, args.images, workers=os.cpu_count() or 1)
            print(f"generated {made['images']} JPEGs ({made['mean_kb']:.0f} KB each) in {made['seconds']:.0f} s")
        sizes = [p.stat().st_size for p in folder.glob("*/*.JPEG")]
        results["folder"] = {"images": len(sizes), "mean_kb": statistics.mean(sizes) / 1e3}
        results["import"] = [import_rate(folder, Path(tmp) / f"ds{p}", p) for p in (1, 2)]
        for r in results["import"]:
            print(f"import --max-short-side 256, {r['processes']} process(es): {r['images_per_s']:7.0f} img/s, "
                  f"{r['images_per_s_per_process']:5.0f} per process, {r['images_per_cpu_s']:5.0f} per CPU-second "
                  f"({r['images']} images, {r['seconds']:.1f} s, {r['stored_mb']:.0f} MB stored)")
        results["decode_224"] = [decode_rate(Path(tmp) / "ds2", p, batches=args.batches) for p in (1, 2)]
        for r in results["decode_224"]:
            print(f"decode + augment 256-px JPEG -> 224, {r['processes']} process(es): {r['images_per_s']:7.0f} "
                  f"img/s, {r['images_per_s_per_process']:5.0f} per process, {r['images_per_cpu_s']:5.0f} per "
                  f"CPU-second")
        results["import_originals"] = import_rate(folder, Path(tmp) / "originals", 2, max_short_side=None)
        results["decode_224_originals"] = decode_rate(Path(tmp) / "originals", 1, batches=args.batches)
        r = results["decode_224_originals"]
        print(f"decode + augment original ~500x375 JPEG -> 224, 1 process: {r['images_per_s']:7.0f} img/s, "
              f"{r['images_per_cpu_s']:5.0f} per CPU-second")
    results["normalise_224_per_s"] = normalise_rate()
    print(f"normalisation to float32 on this CPU (done on the training device): "
          f"{results['normalise_224_per_s']:.0f} img/s")
    one, two = results["import"]
    scaling = two["images_per_s"] / (2 * one["images_per_s"])
    results["import_scaling_2"] = scaling
    results["imagenet_plan"] = plan = imagenet_plan(one["images_per_s"], scaling)
    print(f"import scaling 1 -> 2 processes: {scaling:.0%} efficiency. ImageNet-1k ({plan['images']:,} images) on "
          f"{plan['cores']} cores: ~{plan['images_per_s']:,.0f} img/s, ~{plan['minutes']:.0f} min, if storage reads "
          f"~{plan['read_mb_per_s']:,.0f} MB/s")
    return results


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=30, help="batches per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--imagenet-like", action="store_true", help="the ImageNet-like case instead (see above)")
    parser.add_argument("--images", type=int, default=2000, help="--imagenet-like: images to generate")
    parser.add_argument("--folder", help="--imagenet-like: a folder generated before (kept)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.imagenet_like:
        if args.batches == parser.get_default("batches"):
            args.batches = 8  # of 128 images
        results = imagenet_like(args)
    else:
        torch.set_num_threads(1)  # in-process figures are per core; loader processes use one thread each anyway
        print(f"data throughput: {args.dataset}, batch {args.batch_size}, {args.img_size}x{args.img_size}, "
              f"{os.cpu_count()} CPUs, median of {args.runs} runs x {args.batches} batches")
        results = {}
        for workers, label in ((0, "in-process"), (1, "1 loader process"), (2, "2 loader processes")):
            cfg = DataConfig(dataset=args.dataset, loader_workers=workers)
            results[label], per_cpu_s = images_per_s(cfg, args.img_size, args.batch_size, args.batches, args.runs,
                                                     args.warmup)
            extra = f"  ({per_cpu_s:,.0f} per CPU-second)" if workers == 0 else ""
            print(f"  {label:<20} {results[label]:>9,.0f} images/s{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
