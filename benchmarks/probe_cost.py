"""What the trainer's online probe costs on this machine, and what its settings buy.

    .venv/bin/python benchmarks/probe_cost.py                    # one thread, as a quickstart trial probes
    .venv/bin/python benchmarks/probe_cost.py --threads 2 --rounds 10

The probe is a forward pass of fixed images through the EMA teacher's encoder and a weighted k-NN
(``capi_core.eval.online_probe``). On the cpu-demo encoder (bf16 where the machine's precision choice
says so) and the quickstart's probe set (Fashion-MNIST: 60,000 train images as the memory, the
10,000 test images as queries), this times, alternated in rounds in one process so that a change in
the machine's load hits every variant alike:

- the forward pass of ``--images`` probe images at several batch sizes, ``FEATURE_BATCH`` (what the
  probe uses) among them;
- the k-NN of the 10,000 queries against the 60,000 memories;
- the whole probe, both forward passes and the k-NN, with subnormal floats flushed (as the trainer
  and ``capi eval`` run) and without.

Medians print as a table with the machine: the figures behind the comments on ``FEATURE_BATCH`` and
``flush_denormals``. A random-init encoder costs what a trained one does. On a 2-core VM the same
variant drifts 10-15 % between rounds: compare medians of several rounds, never two single runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

from run_all import machine  # noqa: E402

from capi_core.atomic import atomic_write_text  # noqa: E402
from capi_core.config import build_config  # noqa: E402
from capi_core.data import resolve_dataset  # noqa: E402
from capi_core.eval.features import pooled_features  # noqa: E402
from capi_core.eval.knn import knn_predict  # noqa: E402
from capi_core.eval.online_probe import (FEATURE_BATCH, knn_predictions, online_probe_set,  # noqa: E402
                                         random_init_encoder)
from capi_core.precision import choose_precision  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    host = machine()  # before the work: its load average is the machine's, not this run's
    cfg = build_config(args.preset, ["probe.train_images=60000", "probe.test_images=10000"])
    cpu = torch.device("cpu")
    autocast = choose_precision(cfg.run.precision, cpu, cfg.model, cfg.data.cache_dir).autocast_dtype
    probe_set = online_probe_set(resolve_dataset(cfg.data.dataset, cfg.data.cache_dir), cfg.model.img_size,
                                 cfg.probe, cfg.data.cache_dir)
    encoder = random_init_encoder(cfg)
    images = probe_set.train_x[:args.images]
    batches = sorted({*args.batches, FEATURE_BATCH})

    def features(x, batch):
        return pooled_features(encoder, x, batch_size=batch, autocast_dtype=autocast)

    def whole_probe():  # what the trainer's probe runs, less reading the probe set and the baseline
        knn_predictions(encoder, probe_set, cfg.probe.k, cfg.probe.temperature, autocast)

    torch.set_flush_denormal(True)
    f_train, f_test = features(probe_set.train_x, FEATURE_BATCH), features(probe_set.test_x, FEATURE_BATCH)
    variants = {f"forward, {len(images):,} images, batch {b}": (True, lambda b=b: features(images, b))
                for b in batches}
    variants["k-NN, 10,000 queries x 60,000 memories"] = (True, lambda: knn_predict(
        f_train, probe_set.train_y, f_test, k=cfg.probe.k, temperature=cfg.probe.temperature))
    variants["whole probe, subnormals flushed"] = (True, whole_probe)
    variants["whole probe, subnormals kept"] = (False, whole_probe)
    times: dict[str, list[float]] = {name: [] for name in variants}
    features(images[:FEATURE_BATCH], FEATURE_BATCH)  # warm-up: first-call allocations and kernel choice
    for r in range(args.rounds):
        for name, (flush, fn) in variants.items():
            torch.set_flush_denormal(flush)
            times[name].append(timed(fn))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    torch.set_flush_denormal(True)
    return {"machine": host, "preset": args.preset, "threads": args.threads,
            "autocast": str(autocast), "probe_set": probe_set.description, "feature_batch": FEATURE_BATCH,
            "seconds": {name: {"median": statistics.median(t), "all": [round(x, 3) for x in t]}
                        for name, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a quickstart trial's)")
    parser.add_argument("--rounds", type=int, default=6, help="alternated rounds; medians are reported")
    parser.add_argument("--images", type=int, default=10_240, help="images for the batch-size comparison")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[64, 256, 1024],
                        help="batch sizes to compare, comma-separated (FEATURE_BATCH is always added)")
    parser.add_argument("--name", default="probe-cost", help="results file name")
    args = parser.parse_args()
    result = measure(args)
    m = result["machine"]
    print(f"{m['cpu']} ({m['flags']}), {m['cores']} cores, load {m['load_average_at_start']} at the start; "
          f"{args.threads} thread(s), {result['autocast']}; {result['probe_set']}")
    width = max(map(len, result["seconds"]))
    for name, t in result["seconds"].items():
        print(f"  {name:<{width}}  {t['median']:7.2f} s   ({' '.join(f'{x:.2f}' for x in t['all'])})")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    atomic_write_text(path, json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
