"""What running through Ray Train costs: a cpu-demo-sized run standalone vs through Ray, and 1 vs 2 workers.

Runs the same CAPI training (preset cpu-demo, fewer steps: --steps) four ways: standalone in this
process, then on a local Ray with 1 worker holding every CPU, and with 2 workers of one CPU each
(same global batch). For each it prints the wall time split at the first logged step: start-up
(model build, data, and for Ray the controller, worker group and process group) and the rest
(training, reports, final probe and checkpoint, teardown), plus steady-state images/s (the
trainer's own rate, averaged over the log intervals after the first). Ray's own start-up
(``ray.init``) is timed separately. No MLflow: this isolates Ray. Usage::

    python benchmarks/ray_overhead.py [--steps 60] [--log-every 5] [--dataset fashion-mnist]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from capi_core.config import build_config
from capi_core.data import resolve_dataset
from capi_core.train import JsonlMetrics, Trainer
from orchestrator.train import METRICS_FILE, ScalingOptions, run_distributed


def timed(run: Callable[[], object], metrics_file: Path) -> tuple[float, float]:
    """(wall seconds, seconds until ``metrics_file`` appeared, i.e. the first log step) of ``run()``."""
    first: list[float] = []
    done = threading.Event()
    start = time.perf_counter()

    def watch():
        while not done.is_set() and not metrics_file.exists():
            time.sleep(0.02)
        if metrics_file.exists():
            first.append(time.perf_counter() - start)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run()
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    return wall, first[0] if first else float("nan")


def steady_images_per_s(metrics_file: Path) -> float:
    """Mean of the trainer's images/s over the log intervals after the first (warm-up)."""
    rates = [json.loads(line)["train/images_per_s"] for line in metrics_file.read_text().splitlines()
             if "train/images_per_s" in line]
    rates = rates[1:] or rates
    return sum(rates) / len(rates)


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per run (cpu-demo has 2000)")
    parser.add_argument("--log-every", type=int, default=5, help="also where start-up ends: the first log step")
    args = parser.parse_args()

    import ray

    cpus = os.cpu_count() or 1
    out = Path(tempfile.mkdtemp(prefix="capi-ray-overhead-"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    def config(name: str):
        return build_config(args.preset, [f"data.dataset={args.dataset}", f"optim.steps={args.steps}",
                                          f"run.log_every={args.log_every}", f"run.output_dir={out}",
                                          f"run.name={name}"])

    load = os.getloadavg()[0]
    print(f"ray overhead: preset {args.preset}, {args.steps} steps (log every {args.log_every}), {args.dataset}, "
          f"{cpus} CPUs, load average {load:.1f}" + ("  (busy machine: figures are noisy)" if load > cpus / 2 else ""))
    results: dict[str, float] = {}

    resolve_dataset(args.dataset)  # a built-in is imported on first use: not part of any timing
    cfg = config("standalone")
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"threads": cpus})})
    wall, first = timed(lambda: Trainer(cfg, [JsonlMetrics()]).fit(), out / "standalone" / METRICS_FILE)
    rate = steady_images_per_s(out / "standalone" / METRICS_FILE)
    results.update(standalone_wall_s=wall, standalone_startup_s=first, standalone_images_per_s=rate)
    print(f"  {'standalone':<22} wall {wall:6.1f} s = start-up {first:5.1f} s + rest {wall - first:6.1f} s   "
          f"{rate:7.0f} images/s")

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    results["ray_init_s"] = time.perf_counter() - start
    print(f"  {'ray.init':<22} {results['ray_init_s']:6.1f} s")
    try:
        for workers in (1, 2):
            name = f"ray-{workers}w"
            scaling = ScalingOptions(workers=workers, cpus_per_worker=cpus // workers, max_failures=0)
            wall, first = timed(lambda: run_distributed(config(name), scaling, tracking=None),
                                out / name / METRICS_FILE)
            rate = steady_images_per_s(out / name / METRICS_FILE)
            results.update({f"{name}_wall_s": wall, f"{name}_startup_s": first, f"{name}_images_per_s": rate})
            print(f"  {f'Ray, {workers} worker(s) x {cpus // workers} CPU':<22} wall {wall:6.1f} s = start-up "
                  f"{first:5.1f} s + rest {wall - first:6.1f} s   {rate:7.0f} images/s")
    finally:
        ray.shutdown()

    base_rest = results["standalone_wall_s"] - results["standalone_startup_s"]
    ray_rest = results["ray-1w_wall_s"] - results["ray-1w_startup_s"]
    results["overhead_after_startup"] = ray_rest / base_rest - 1
    results["overhead_steady_state"] = results["standalone_images_per_s"] / results["ray-1w_images_per_s"] - 1
    print(f"  Ray (1 worker) vs standalone after start-up: {100 * results['overhead_after_startup']:+.1f} % wall, "
          f"{100 * results['overhead_steady_state']:+.1f} % per image in steady state (target < 10 %)")
    print(f"  2 workers vs 1: {results['ray-2w_images_per_s'] / results['ray-1w_images_per_s']:.2f}x images/s")
    return results


if __name__ == "__main__":
    main()
