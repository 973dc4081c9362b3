"""Training-step throughput and model FLOP utilisation (MFU) of the CAPI step.

    .venv/bin/python benchmarks/train_step.py                    # cpu-demo and vit-s on this machine
    .venv/bin/python benchmarks/train_step.py --preset vit-b --batch 64 --device cuda

FLOPs are counted from the model by torch's FlopCounterMode over one whole step (teacher forward,
clustering head, student forward + backward); the peak is a large matmul measured in the same run
in bf16 and in fp32, so MFU is relative to this machine, not a datasheet. Images are synthetic: the
data loader has its own benchmark (data_throughput.py). Figures are medians after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from capi_core.config import build_config
from capi_core.train import Trainer


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matmul in ``dtype`` (median of ``repeats``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_step(preset: str, batch: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(preset, [f"optim.batch_size={batch}", f"run.output_dir={tmp}", *overrides])
        trainer = Trainer(cfg)
        m = cfg.model
        images = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=trainer.device)
        micro = list(images.split(trainer.micro_batch))
        for i in range(warmup):
            trainer.train_step(micro, i)
        # FlopCounterMode sees no FLOPs in the fused CPU attention kernels: count on the math path.
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            trainer.train_step(micro, warmup)
        flops = counter.get_total_flops()
        times = []
        for i in range(steps):
            _sync(trainer.device)
            t = time.perf_counter()
            trainer.train_step(micro, warmup + 1 + i)
            _sync(trainer.device)
            times.append(time.perf_counter() - t)
        step_s = statistics.median(times)
        precision = "bf16" if trainer.autocast_dtype is not None else "fp32"
        return {"preset": preset, "batch": batch, "tokens_per_image": m.num_patches, "precision": precision,
                "device": str(trainer.device), "images_per_s": batch / step_s, "step_s": step_s,
                "model_gflop_per_step": flops / 1e9, "achieved_tflops": flops / step_s / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="preset(s) to time (default: cpu-demo and vit-s)")
    ap.add_argument("--batch", type=int, action="append", help="batch per preset (default 256 / 16 on CPU)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. run.precision=bf16")
    args = ap.parse_args()
    presets = args.preset or ["cpu-demo", "vit-s"]
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    default_batch = {"cpu-demo": 256, "vit-s": 16 if device.type == "cpu" else 256}
    batches = args.batch or [default_batch.get(p, 64) for p in presets]

    peaks = {name: matmul_peak(dt, device) for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    print(f"device {device}, {torch.get_num_threads()} threads; measured matmul peak: "
          f"bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s, fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s")
    rows = []
    for preset, batch in zip(presets, batches):
        row = bench_step(preset, batch, args.steps, args.warmup, [f"run.device={device.type}", *args.overrides])
        row["mfu_vs_bf16_peak"] = row["achieved_tflops"] * 1e12 / peaks["bf16"]
        row["mfu_vs_own_precision_peak"] = row["achieved_tflops"] * 1e12 / peaks[row["precision"]]
        rows.append(row)
    print(f"{'preset':10} {'batch':>5} {'tok':>4} {'prec':>5} {'img/s':>9} {'GFLOP/step':>11} {'TFLOP/s':>8} "
          f"{'MFU(bf16)':>9} {'MFU(own)':>9}")
    for r in rows:
        print(f"{r['preset']:10} {r['batch']:>5} {r['tokens_per_image']:>4} {r['precision']:>5} "
              f"{r['images_per_s']:>9.1f} {r['model_gflop_per_step']:>11.1f} {r['achieved_tflops']:>8.3f} "
              f"{r['mfu_vs_bf16_peak']:>9.1%} {r['mfu_vs_own_precision_peak']:>9.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peaks_flops": peaks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
