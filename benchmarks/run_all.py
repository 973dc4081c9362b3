"""Every benchmark in one command: one table on stdout, the same figures as JSON.

    make bench                                   # = .venv/bin/python benchmarks/run_all.py (~20 min, 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick            # smaller sizes, a few minutes
    .venv/bin/python benchmarks/run_all.py --skip ray,peer    # leave parts out

Parts (each also runs alone, see its file):
  step      training step images/s and model FLOP utilisation for cpu-demo and vit-s
            (FLOPs counted from the model, peak = a bf16 and an fp32 matmul measured before each round)
  sinkhorn  position-wise Sinkhorn-Knopp, 3 iterations, 4,096 rows, K = 1,024 to 16,384
  data      data loader images/s (in-process, and 2 loader processes)
  ray       a sweep's wall time against its trials run standalone; 1 against 2 Train workers
  peer      the same step built from the `lightly` package's CAPI modules (pip install -e '.[bench]')

Every timing is a median of several runs after warm-up, except the sweep (one ~5-minute sweep;
repeat it with --repeats). Figures are for this machine: the JSON records its CPU, core count,
torch version and load average, and a busy machine is flagged.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

PARTS = ("step", "sinkhorn", "data", "ray", "peer")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from capi_core.train import cpu_has_amx

    flags = []
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
        flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "flags": " ".join(flags), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "amx": cpu_has_amx(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": round(os.getloadavg()[0], 2),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def bench_steps(quick: bool) -> list[dict]:
    from train_step import bench_step, compare_compile

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for preset, batch in (("cpu-demo", 256), ("vit-s", 16 if device.type == "cpu" else 256)):
        # MFU per round over the peak measured just before it (train_step.bench_step).
        r = bench_step(preset, batch, steps=3 if quick else 5, warmup=2, overrides=[f"run.device={device.type}"],
                       rounds=2 if quick else 4)
        rows.append({"kind": "step", **r})
        print(f"  step {preset} batch {batch}: {r['images_per_s']:.1f} img/s, {r['precision']}, "
              f"MFU {r['mfu_vs_bf16_peak']:.1%} of bf16 peak / {r['mfu_vs_own_precision_peak']:.1%} of "
              f"{r['precision']} peak (its matmuls alone: {r['matmul_ceiling_vs_own_peak']:.1%})", flush=True)
    # torch.compile on the small preset at the batch it trains at: eager and compiled built side by side
    # and timed alternately, so that a change in load hits both.
    c = compare_compile("cpu-demo", 64, rounds=2 if quick else 6, steps=3 if quick else 5, warmup=3,
                        overrides=[f"run.device={device.type}"])
    rows.append({"kind": "compile", **c})
    print(f"  step cpu-demo batch 64: eager {c['eager_images_per_s']:.1f} img/s, compiled "
          f"{c['compiled_images_per_s']:.1f} ({c['speedup']:.2f}x)", flush=True)
    return rows


def bench_sinkhorn(quick: bool, rows: int = 4096, positions: int = 16, repeats: int = 5) -> list[dict]:
    from capi_core.sinkhorn import sinkhorn_knopp

    out = []
    for k in (1024, 4096, 16384):
        logits = torch.randn(positions, rows // positions, k)
        sinkhorn_knopp(logits, 0.06)  # warm-up
        times = []
        for _ in range(3 if quick else repeats):
            start = time.perf_counter()
            sinkhorn_knopp(logits, 0.06)
            times.append(time.perf_counter() - start)
        out.append({"rows": rows, "num_clusters": k, "ms": 1000 * statistics.median(times)})
        print(f"  sinkhorn {rows} rows, K={k}: {out[-1]['ms']:.1f} ms", flush=True)
    return out


def bench_data(quick: bool) -> dict:
    from data_throughput import images_per_s

    from capi_core.config import DataConfig

    batches = 10 if quick else 30
    out = {}
    for workers in (0, 2):
        wall, per_cpu = images_per_s(DataConfig(loader_workers=workers), 28, 256, batches, runs=3, warmup=5)
        out[f"loader_{workers}_images_per_s"] = wall
        if workers == 0:
            out["in_process_images_per_cpu_s"] = per_cpu
        print(f"  data, {workers} loader processes: {wall:,.0f} images/s", flush=True)
    return out


def bench_ray(quick: bool, repeats: int) -> dict:
    import ray_overhead

    # One standalone / Ray pair per measure(): the repeats alternate whole measurements instead.
    args = ray_overhead.parser().parse_args(["--trial-steps", "40" if quick else "400", "--repeats", "1"])
    runs = [ray_overhead.measure(args) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"repeats": repeats}


def bench_peer(quick: bool) -> dict | None:
    if importlib.util.find_spec("lightly") is None:
        print("  peer: skipped (lightly is not installed: pip install -e '.[bench]')", flush=True)
        return None
    from peer_lightly import compare

    return compare("cpu-demo", 64 if quick else 256, steps=3 if quick else 5, warmup=2)


def table(results: dict) -> list[tuple[str, str, str, str]]:
    """(benchmark, setting, figure, target) rows for the printed table."""
    rows = []
    steps = results.get("step", [])
    for r in (r for r in steps if r.get("kind") == "step"):
        target = "" if r["preset"] != "vit-s" else ">= 25 % MFU of bf16 peak"
        rows.append(("train step", f"{r['preset']}, batch {r['batch']}, {r['tokens_per_image']} tokens, "
                     f"{r['precision']}{', compiled' if r['compiled'] else ''}",
                     f"{r['images_per_s']:.1f} img/s, MFU {r['mfu_vs_bf16_peak']:.1%} of bf16 peak, "
                     f"{r['mfu_vs_own_precision_peak']:.1%} of {r['precision']} peak (its matmuls alone "
                     f"{r['matmul_ceiling_vs_own_peak']:.1%})", target))
    for r in (r for r in steps if r.get("kind") == "compile"):
        rows.append(("torch.compile", "cpu-demo, batch 64, alternating with eager",
                     f"{r['eager_images_per_s']:.1f} -> {r['compiled_images_per_s']:.1f} img/s "
                     f"({r['speedup'] - 1:+.1%})", ""))
    for r in results.get("sinkhorn", []):
        rows.append(("sinkhorn-knopp", f"{r['rows']} rows, K={r['num_clusters']}, 3 iterations", f"{r['ms']:.1f} ms", ""))
    if "data" in results:
        d = results["data"]
        rows.append(("data loader", "in process", f"{d['loader_0_images_per_s']:,.0f} img/s "
                     f"({d['in_process_images_per_cpu_s']:,.0f} per CPU-s)", ">= 5,000 per core"))
        rows.append(("data loader", "2 loader processes", f"{d['loader_2_images_per_s']:,.0f} img/s", ""))
    if results.get("ray"):
        r = results["ray"]
        if "sweep_overhead" in r:
            rows.append(("ray sweep overhead", f"{r['sweep_trials']:.0f} trials, {r['sweep_wall_s']:.0f} s sweep vs "
                         f"{r['standalone_sum_s']:.0f} s standalone", f"{r['sweep_overhead']:+.1%} whole, "
                         f"{r['sweep_overhead_beyond_startup']:+.1%} beyond start-up"
                         + (f"; Ray's processes {r['sweep_cpu_others']:.0%} of the CPU while trials trained"
                            if "sweep_cpu_others" in r else ""), "< 10 % beyond start-up"))
        if "train_overhead_beyond_startup" in r:
            rows.append(("ray train overhead", f"1 worker vs standalone, {r['standalone_wall_s']:.0f} s run",
                         f"{r['train_overhead_beyond_startup']:+.1%} beyond start-up (training alone "
                         f"{r['train_overhead_training_only']:+.1%}; ray.init {r['ray_init_s']:.1f} s)",
                         "< 10 %"))
        if "two_vs_one_worker" in r:
            rows.append(("ray train workers", "2 x 1 CPU vs 1 x 2 CPUs", f"{r['two_vs_one_worker']:.2f}x img/s "
                         f"({r['ray-1w_images_per_s']:.0f} -> {r['ray-2w_images_per_s']:.0f})", ""))
    if results.get("peer"):
        p = results["peer"]
        rows.append(("peer: lightly 1.6 CAPI",
                     f"{p['preset']}, batch {p['batch']}, ours {p['precision']}, lightly {p['lightly_precision']}",
                     f"ours {p['ours']['images_per_s']:.1f} vs lightly {p['lightly']['images_per_s']:.1f} img/s: "
                     f"lightly takes {p['ratio']:.2f}x as long", "ours faster"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a few minutes)")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    ap.add_argument("--repeats", type=int, default=1, help="sweeps for the Ray overhead figure (median)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/run_all.json"))
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        ap.error(f"unknown part(s) in --skip: {', '.join(sorted(skip - set(PARTS)))}; choose from {', '.join(PARTS)}")

    results: dict = {"machine": machine()}
    m = results["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, AMX {m['amx']}, torch {m['torch']}, load average "
          f"{m['load_average_at_start']}" + ("  (busy machine: figures are noisy)"
                                              if m["load_average_at_start"] > (m["cores"] or 1) / 2 else ""),
          flush=True)
    runners = {"step": lambda: bench_steps(args.quick), "sinkhorn": lambda: bench_sinkhorn(args.quick),
               "data": lambda: bench_data(args.quick), "ray": lambda: bench_ray(args.quick, args.repeats),
               "peer": lambda: bench_peer(args.quick)}
    for part in PARTS:
        if part not in skip:
            start = time.perf_counter()
            results[part] = runners[part]()
            results.setdefault("seconds", {})[part] = round(time.perf_counter() - start, 1)

    rows = table(results)
    widths = [max(len(r[i]) for r in rows + [("benchmark", "setting", "figure", "target")]) for i in range(4)]
    print()
    for r in [("benchmark", "setting", "figure", "target"), tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
