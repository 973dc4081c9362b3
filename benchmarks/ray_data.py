"""Feeding Ray Train workers: capi_core's data layer against Ray Data over the same Parquet shards.

Both pipelines deliver one epoch of the train split, decoded and augmented by the same
``decode_augment``, to each of 2 Ray Train workers (rank-disjoint halves), timed from a cold start
(pipeline built inside the timing, shards read from disk) to the slower rank's last batch (worker start-up excluded); no training, so
the figure is what the input pipeline alone can sustain:

* **data layer**: each worker iterates ``train_batches(rank, world_size)`` (decoding in-process, as
  ``data.loader_workers=0``: on 2 cores, extra processes only contend). Exactly resumable by step.
* **Ray Data**: ``read_parquet`` of ``shard_paths`` with block order randomised, ``map_batches`` of
  ``decode_augment`` in Ray tasks (1,024 images each), split across the workers by Ray Train
  (``get_dataset_shard(...).iter_torch_batches`` with a local shuffle buffer).

Both share a 2-CPU budget: Train workers reserve 0.5 CPU each so that Ray Data's tasks (0.5 CPU
each) can be scheduled beside them. Prints images/s per variant (median of ``--runs``)::

    python benchmarks/ray_data.py            # ~4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from capi_core.config import DataConfig
from capi_core.data import resolve_dataset
from capi_core.data.format import load_manifest
from capi_core.data.reader import decode_augment, shard_paths, train_batches


def _augment_fn(dataset_dir: str, img_size: int, seed: int):
    manifest = load_manifest(dataset_dir)
    cfg = DataConfig()

    def augment(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # A Ray Data block does not know a row's number in the split; a hash of its id is a per-sample key.
        index = np.array([zlib.crc32(str(i).encode()) for i in batch["id"]], np.int64)
        x = decode_augment(list(batch["image"]), np.zeros_like(index), index, img_size=img_size,
                           channels=manifest.channels, mean=manifest.mean, std=manifest.std,
                           crop_scale=cfg.crop_scale, hflip=cfg.hflip, seed=seed)
        return {"image": x.numpy(), "label": batch["label"]}

    return augment


def _worker(loop: dict[str, Any]) -> None:
    import ray.train
    import torch

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    share = loop["images"] // world
    start, seen = time.perf_counter(), 0
    if loop["variant"] == "data layer":
        batches = train_batches(DataConfig(dataset=loop["dataset"], loader_workers=0), loop["img_size"],
                                loop["batch"], rank, world)
        while seen < share:
            x, _ = next(batches)
            seen += len(x)
    else:
        shard = ray.train.get_dataset_shard("train")
        for batch in shard.iter_torch_batches(batch_size=loop["batch"], local_shuffle_buffer_size=4 * loop["batch"]):
            seen += len(batch["image"])
    seconds = time.perf_counter() - start
    # Ray Train V2 keeps metrics only with checkpoints: each rank leaves its timing in a file instead.
    with open(os.path.join(loop["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"images": seen, "seconds": seconds}, f)


def run_variant(variant: str, dataset_dir: str, images: int, batch: int, img_size: int, out: str) -> float:
    """Images/s over both ranks for one cold epoch through ``variant``: images delivered over the slower
    rank's time from building its iterator to its last batch (worker start-up excluded)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    datasets = None
    if variant == "Ray Data":
        ds = ray.data.read_parquet([str(p) for p in shard_paths(dataset_dir, "train")], shuffle="files")
        # Tasks decode 1,024 images at a time (per-task overhead amortised); workers re-batch.
        datasets = {"train": ds.select_columns(["id", "image", "label"]).map_batches(
            _augment_fn(dataset_dir, img_size, 0), batch_size=1024, num_cpus=0.5)}
    trainer = TorchTrainer(
        _worker, train_loop_config={"variant": variant, "dataset": dataset_dir, "images": images, "batch": batch,
                                    "img_size": img_size, "out": out},
        datasets=datasets,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=f"ray-data-bench-{time.time_ns()}", storage_path=out))
    trainer.fit()
    ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    if len(ranks) != 2 or sum(r["images"] for r in ranks) < images - 2 * batch:
        raise RuntimeError(f"{variant}: the ranks did not read the epoch: {ranks}")
    return sum(r["images"] for r in ranks) / max(r["seconds"] for r in ranks)


def main() -> dict[str, float]:
    import ray

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch")
    ap.add_argument("--img-size", type=int, default=28)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    dataset_dir = str(resolve_dataset(args.dataset))
    manifest = load_manifest(dataset_dir)
    images = sum(s.rows for s in manifest.split_shards("train"))
    print(f"ray data: one epoch ({images:,} images) of {args.dataset} to 2 Ray Train workers, batch {args.batch} "
          f"per rank, {args.img_size} px, {os.cpu_count()} CPUs, median of {args.runs} cold runs", flush=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        # Alternate the variants so that a slow spell of a shared machine hits both.
        rates: dict[str, list[float]] = {"data layer": [], "Ray Data": []}
        for _ in range(args.runs):
            for variant in rates:
                with tempfile.TemporaryDirectory(prefix="capi-ray-data-") as out:
                    rates[variant].append(run_variant(variant, dataset_dir, images, args.batch, args.img_size, out))
                print(f"  {variant:<11} {rates[variant][-1]:>8,.0f} images/s ", flush=True)
        for variant, r in rates.items():
            results[variant] = statistics.median(r)
    finally:
        ray.shutdown()
    print(f"  median: data layer {results['data layer']:,.0f} images/s, Ray Data {results['Ray Data']:,.0f} "
          f"images/s: data layer {results['data layer'] / results['Ray Data']:.2f}x", flush=True)
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
