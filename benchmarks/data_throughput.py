"""Decoded + augmented training images per second from a Parquet dataset (default: Fashion-MNIST).

Measures ``train_batches`` in-process (one torch thread: one core) and with 1 and 2 loader processes,
batch 256; prints the median of a few timed runs after warm-up. In-process it also prints images per
CPU-second of this process: the per-core rate, which a machine shared with other jobs does not hide.
Usage::

    python benchmarks/data_throughput.py [--dataset fashion-mnist] [--runs 3] [--batches 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from capi_core.config import DataConfig
from capi_core.data.reader import train_batches


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


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=30, help="batches per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

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
    return results


if __name__ == "__main__":
    main()
