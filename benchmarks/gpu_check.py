"""One acceptance command for a GPU machine: versions, the measured bf16 peak, the vit-b step, the data feed.

    python benchmarks/gpu_check.py                      # one table on stdout, the same as JSON
    python benchmarks/gpu_check.py --json gpu_check.json --batch 256 --skip-ray

In about 5 minutes on one GPU (well under 10), it prints and writes:

- CUDA, cuDNN, NCCL, torch and torchvision versions, the GPU and its memory;
- the measured bf16 matmul peak (8192^3, median of 10), against which MFU is taken;
- the ``vit-b`` training step (CAPI's architecture and recipe, bf16 autocast, synthetic images):
  images/s, model FLOPs per step (torch's FlopCounterMode), MFU (target >= 45 %), peak memory, and
  which scaled-dot-product-attention kernel runs for the encoder's and the predictor's shapes;
- the data feed: a generated ImageNet-like folder (``make_imagenet_like.py``) imported at
  ``--max-short-side 256``, then ``train_batches`` at 224 px decoding on the CPU in loader processes
  and on the GPU (nvJPEG), images/s of each against the step's;
- a 1-GPU Ray Train run against the same run standalone (steady images/s), if Ray is installed.

Each part is a function that also runs on a CPU (``--device cpu``), which the test suite does at a
small size (one vit-b step at batch 2, the RoPE path, the 224-px JPEG pipeline), so that a GPU run
only adds the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

from train_step import bench_step, matmul_peak  # noqa: E402

MFU_TARGET = 0.45


def versions(device: torch.device) -> dict:
    """Software versions and the device."""
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "device": str(device),
           "cpus": os.cpu_count()}
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):
        out["nccl"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    return out


def attention_kernels(device: torch.device, batch: int, heads: int = 12, head_dim: int = 64,
                      tokens: int = 16 + 256, visible: int = 16 + 90, predicted: int = 8) -> dict[str, list[str]]:
    """The SDPA kernels that run, forward and backward in bf16 as on a GPU, for vit-b's self-attention
    (teacher and student shapes) and its predictor's cross-attention; names from the profiler. (On a CPU
    the trainer runs attention in fp32 instead: ``capi_core.models.attention``.)"""
    from torch.profiler import ProfilerActivity, profile

    shapes = {"teacher": (tokens, tokens), "student": (visible, visible), "predictor": (predicted, visible)}
    out = {}
    for name, (nq, nk) in shapes.items():
        q = torch.randn(batch, heads, nq, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(batch, heads, nk, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
        out[name] = sorted({e.key for e in prof.key_averages()
                            if "attention" in e.key and e.key.startswith("aten::_") and "backward" not in e.key})
    return out


def step_check(device: torch.device, batch: int, steps: int, warmup: int, peak_flops: float,
               preset: str = "vit-b", compile: bool = False, threads: int | None = None) -> dict:
    """The training step of ``preset`` in bf16 on ``device``: images/s, FLOPs, MFU, peak memory.

    ``threads`` sets torch's CPU threads for the run (it stays set afterwards).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    overrides = [f"run.device={device.type}", "run.precision=bf16", f"run.compile={str(compile).lower()}"]
    # One round: the MFU here is over ``peak_flops``, a peak measured at a size that fills the GPU.
    row = bench_step(preset, batch, steps, warmup, overrides + ([f"run.threads={threads}"] if threads else []),
                     rounds=1)
    row["mfu"] = row["achieved_tflops"] * 1e12 / peak_flops
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    row["attention_kernels"] = attention_kernels(device, batch)
    return row


def imagenet_like(folder: Path, out: Path, images: int) -> dict:
    """Generate an ImageNet-like folder (unless ``folder`` has one) and import it at ``--max-short-side 256``."""
    from make_imagenet_like import make_folder

    from capi_core.data.imagefolder import import_imagefolder

    result = {}
    if not any(folder.glob("*/*.JPEG")):
        result["generate_s"] = make_folder(folder, images, workers=os.cpu_count() or 1)["seconds"]
    start = time.perf_counter()
    manifest = import_imagefolder(folder, out, max_short_side=256)
    result["import_images_per_s"] = sum(manifest.splits.values()) / (time.perf_counter() - start)
    return result


def feed_rate(dataset: Path, device: torch.device, decode: str, batch: int, batches: int, workers: int) -> float:
    """Images/s of ``train_batches`` at 224 px onto ``device`` (normalised there), after the first batch."""
    from capi_core.config import DataConfig
    from capi_core.data.reader import train_batches

    it = train_batches(DataConfig(dataset=str(dataset), loader_workers=workers, decode=decode), 224, batch,
                       device=device)
    x, _ = next(it)  # start-up: loader processes, first shards
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
    _sync(device)
    assert x.shape == (batch, 3, 224, 224) and x.device.type == device.type and x.dtype == torch.float32
    return batches * batch / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data_check(dataset: Path, device: torch.device, batch: int, batches: int, workers: int) -> dict:
    """The feed with CPU decoding in ``workers`` loader processes and, on CUDA, with GPU decoding."""
    out = {"loader_workers": workers, "batch": batch}
    for decode in ["cpu"] + (["cuda"] if device.type == "cuda" else []):
        out[f"feed_{decode}_images_per_s"] = feed_rate(dataset, device, decode, batch, batches, workers)
    return out


def ray_check(device: torch.device, batch: int, steps: int, dataset: str, preset: str = "vit-b",
              extra: tuple[str, ...] = ()) -> dict:
    """A 1-worker Ray Train run (1 GPU) against the same run standalone: steady images/s of each."""
    try:
        import ray  # noqa: F401

        from orchestrator.cluster import init_local_ray
        from orchestrator.train import ScalingOptions, run_distributed
        from ray_overhead import steady_images_per_s
    except ImportError as err:
        return {"skipped": f"Ray is not installed here ({err.name})"}
    from capi_core.config import build_config
    from capi_core.train import JsonlMetrics, Trainer

    out = {}
    with tempfile.TemporaryDirectory(prefix="capi-gpu-ray-") as tmp:
        overrides = [f"data.dataset={dataset}", f"optim.batch_size={batch}", f"optim.steps={steps}",
                     "run.log_every=10", f"run.output_dir={tmp}", "probe.train_images=100", "probe.test_images=50",
                     f"run.device={device.type}", *extra]
        start = time.perf_counter()
        Trainer(build_config(preset, [*overrides, "run.name=standalone"]), [JsonlMetrics()]).fit()
        out["standalone_s"] = time.perf_counter() - start
        out["standalone_images_per_s"] = steady_images_per_s(Path(tmp) / "standalone" / "metrics.jsonl")
        init_local_ray(num_cpus=os.cpu_count() or 1, log_to_driver=False)
        try:
            start = time.perf_counter()
            run_distributed(build_config(preset, [*overrides, "run.name=ray"]),
                            ScalingOptions(workers=1, cpus_per_worker=max(1, (os.cpu_count() or 2) - 1),
                                           use_gpu=device.type == "cuda", max_failures=0), tracking=None)
            out["ray_s"] = time.perf_counter() - start
        finally:
            import ray

            ray.shutdown()
        out["ray_images_per_s"] = steady_images_per_s(Path(tmp) / "ray" / "metrics.jsonl")
        out["ray_overhead"] = out["standalone_images_per_s"] / out["ray_images_per_s"] - 1
    return out


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2g}"


def table(results: dict) -> list[tuple[str, str]]:
    """(what, figure) rows of the summary table."""
    v, rows = results["versions"], []
    rows.append(("device", f"{v.get('gpu', v['device'])}" + (f", {v['gpu_memory_gb']:.0f} GiB" if "gpu_memory_gb" in v
                                                           else "") + f", {v['cpus']} CPUs"))
    rows.append(("versions", f"torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, NCCL {v['nccl']}, "
                             f"torchvision {v['torchvision']}"))
    rows.append(("bf16 matmul peak", f"{results['peak_bf16_tflops']:.1f} TFLOP/s (measured)"))
    s = results.get("step")
    if s:
        ok = "OK" if s["mfu"] >= MFU_TARGET else f"below the {MFU_TARGET:.0%} target"
        rows.append((f"vit-b step, batch {s['batch']}", f"{_rate(s['images_per_s'])} img/s, {s['model_gflop_per_step']:,.0f} "
                                                        f"GFLOP/step, MFU {s['mfu']:.1%} ({ok})"))
        if "peak_memory_gb" in s:
            rows.append(("peak memory", f"{s['peak_memory_gb']:.1f} GiB"))
        rows.append(("attention kernels", "; ".join(f"{shape}: {', '.join(ops) or 'none'}"
                                                    for shape, ops in s["attention_kernels"].items())))
    d = results.get("data")
    if d:
        step_rate = s["images_per_s"] if s else None
        for decode in ("cpu", "cuda"):
            rate = d.get(f"feed_{decode}_images_per_s")
            if rate is not None:
                vs = f", {rate / step_rate:.2f}x the step" if step_rate else ""
                where = f"{d['loader_workers']} loader processes" if decode == "cpu" else "nvJPEG"
                rows.append((f"data feed, decode {decode}", f"{_rate(rate)} img/s ({where}){vs}"))
    if results.get("import"):
        rows.append(("import", f"{_rate(results['import']['import_images_per_s'])} img/s on {v['cpus']} CPUs "
                               "(--max-short-side 256)"))
    r = results.get("ray")
    if r:
        rows.append(("Ray Train, 1 GPU", r["skipped"] if "skipped" in r else
                     f"{_rate(r['ray_images_per_s'])} img/s vs {_rate(r['standalone_images_per_s'])} standalone: "
                     f"{r['ray_overhead']:+.1%}"))
    return rows


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=256, help="vit-b batch of the step and of the data feed")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="time the step with run.compile=true")
    ap.add_argument("--images", type=int, default=2048, help="images of the generated folder")
    ap.add_argument("--folder", type=Path, help="an ImageNet-like folder generated before")
    ap.add_argument("--loader-workers", type=int, default=None, help="default: min(8, CPUs - 1)")
    ap.add_argument("--feed-batches", type=int, default=6)
    ap.add_argument("--ray-steps", type=int, default=60)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--json", default="gpu_check.json")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    start = time.perf_counter()
    results: dict = {"versions": versions(device)}
    n = 8192 if device.type == "cuda" else 1024
    results["peak_bf16_tflops"] = statistics.median(matmul_peak(torch.bfloat16, device, n=n) for _ in range(2)) / 1e12
    print(f"peak: {results['peak_bf16_tflops']:.1f} TFLOP/s bf16", flush=True)
    results["step"] = step_check(device, args.batch, args.steps, args.warmup, results["peak_bf16_tflops"] * 1e12,
                                 compile=args.compile)
    print(f"step: {results['step']['images_per_s']:.0f} img/s, MFU {results['step']['mfu']:.1%}", flush=True)
    workers = args.loader_workers if args.loader_workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    with tempfile.TemporaryDirectory(prefix="capi-gpu-check-") as tmp:
        dataset = Path(tmp) / "ds"
        if not (args.skip_data and args.skip_ray):
            results["import"] = imagenet_like(args.folder or Path(tmp) / "folder", dataset, args.images)
        if not args.skip_data:
            results["data"] = data_check(dataset, device, args.batch, args.feed_batches, workers)
            print(f"data: {results['data']}", flush=True)
        if not args.skip_ray:
            results["ray"] = ray_check(device, args.batch, args.ray_steps, str(dataset))
            print(f"ray: {results['ray']}", flush=True)
    results["seconds"] = time.perf_counter() - start
    rows = table(results)
    width = max(len(k) for k, _ in rows)
    print(f"\nGPU check ({results['seconds'] / 60:.1f} min)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwritten to {args.json}")
    return results


if __name__ == "__main__":
    main()
