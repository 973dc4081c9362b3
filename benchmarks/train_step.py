"""Training-step throughput and model FLOP utilisation (MFU) of the CAPI step.

    .venv/bin/python benchmarks/train_step.py                    # cpu-demo and vit-s on this machine
    .venv/bin/python benchmarks/train_step.py --preset vit-b --batch 64 --device cuda
    .venv/bin/python benchmarks/train_step.py --preset cpu-demo --batch 64 --compare-compile

FLOPs are counted from the model by torch's FlopCounterMode over one whole step (teacher forward,
clustering head, student forward + backward); the peak is a large matmul measured in the same run
in bf16 and in fp32, so MFU is relative to this machine, not a datasheet. Images are synthetic: the
data loader has its own benchmark (data_throughput.py). Figures are medians after warm-up steps.

Two columns say what bounds the MFU of a small model:
- ``mm ceiling``: every matrix product of one step (recorded with their shapes and dtypes), each timed
  alone at its own shape; their FLOPs over that time, as a share of the large-matmul peak. A step
  cannot beat it even if everything that is not a matmul were free: on cpu-demo (16 tokens, width
  128) the products are [B*20, 128] x [128, 128]-sized, far from the 2048-cube the peak is.
- ``mm share``: the time those products take alone, as a share of the measured step.

``--compare-compile`` builds the step twice, eager and ``torch.compile``d (``run.compile``), and
times them alternately in rounds in one process, so that a change in the machine's load hits both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
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


PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
_MATMULS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.addmm.default: (1, 2),
            torch.ops.aten.bmm.default: (0, 1), torch.ops.aten.baddbmm.default: (1, 2)}


class MatmulShapes(TorchDispatchMode):
    """Records the operands' shapes and dtype of every matrix product run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[tuple[tuple[int, ...], tuple[int, ...], torch.dtype], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            i, j = _MATMULS[func]
            key = (tuple(args[i].shape), tuple(args[j].shape), args[i].dtype)
            self.seen[key] = self.seen.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def matmul_alone(shapes: dict, device: torch.device, repeats: int = 20) -> tuple[float, float]:
    """(FLOPs, seconds) of one step's matrix products, each shape timed alone on contiguous operands
    (median of ``repeats``): what the products would cost with nothing else in the step."""
    flops = seconds = 0.0
    for (sa, sb, dtype), count in shapes.items():
        a, b = torch.randn(sa, device=device, dtype=dtype), torch.randn(sb, device=device, dtype=dtype)
        mm = torch.bmm if a.dim() == 3 else torch.mm
        mm(a, b)
        times = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            mm(a, b)
            _sync(device)
            times.append(time.perf_counter() - t)
        flops += count * 2 * a.numel() * sb[-1]
        seconds += count * statistics.median(times)
    return flops, seconds


def _build(preset: str, batch: int, tmp: str, overrides: list[str]) -> tuple[Trainer, list[torch.Tensor]]:
    cfg = build_config(preset, [f"optim.batch_size={batch}", f"run.output_dir={tmp}", *overrides])
    trainer = Trainer(cfg)
    m = cfg.model
    images = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=trainer.device)
    return trainer, list(images.split(trainer.micro_batch))


def _time_steps(trainer: Trainer, micro: list[torch.Tensor], first: int, steps: int) -> list[float]:
    times = []
    for i in range(steps):
        _sync(trainer.device)
        t = time.perf_counter()
        trainer.train_step(micro, first + i)
        _sync(trainer.device)
        times.append(time.perf_counter() - t)
    return times


@contextlib.contextmanager
def _eager(trainer: Trainer):
    """The trainer's step uncompiled for a while: ``run.compile`` binds a compiled ``forward_losses``
    on the instance, over the class's own method."""
    compiled = trainer.__dict__.pop("forward_losses", None)
    try:
        yield
    finally:
        if compiled is not None:
            trainer.forward_losses = compiled


def bench_step(preset: str, batch: int, steps: int, warmup: int, overrides: list[str], rounds: int = 3) -> dict:
    """Throughput and MFU of one preset's step, timed in ``rounds`` rounds of ``steps`` steps.

    Each round measures the large-matmul peak of both precisions again just before its steps, and its MFU
    is its own rate over its own peak; the row reports the median over rounds and their range. Measured
    once at the start instead, the peak and the step were half a minute apart, and on a 2-core VM whose
    speed drifts 10-15 % the same step read 44.8 % and 58.8 % of peak in two runs (2026-12-08).
    """
    with tempfile.TemporaryDirectory() as tmp:
        trainer, micro = _build(preset, batch, tmp, overrides)
        for i in range(warmup):
            trainer.train_step(micro, i)
        # FlopCounterMode sees no FLOPs in the fused CPU attention kernels: count on the math path
        # (eager, so that the products recorded are the model's own, not a compiled graph's).
        with _eager(trainer), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, \
                MatmulShapes() as shapes:
            trainer.train_step(micro, warmup)
        flops = counter.get_total_flops()
        precision = "bf16" if trainer.autocast_dtype is not None else "fp32"
        times: list[float] = []
        mfu: dict[str, list[float]] = {"bf16": [], "own": []}
        for r in range(rounds):
            peaks = {name: matmul_peak(dt, trainer.device) for name, dt in PRECISIONS.items()}
            round_s = statistics.median(_time_steps(trainer, micro, warmup + 1 + r * steps, steps))
            mfu["bf16"].append(flops / round_s / peaks["bf16"])
            mfu["own"].append(flops / round_s / peaks[precision])
            times.append(round_s)
        step_s = statistics.median(times)
        # The products alone against a peak measured beside them, for the same reason.
        own_peak = matmul_peak(PRECISIONS[precision], trainer.device)
        mm_flops, mm_s = matmul_alone(shapes.seen, trainer.device)
        return {"preset": preset, "batch": batch, "tokens_per_image": trainer.config.model.num_patches,
                "precision": precision, "compiled": trainer.compile.enabled, "device": str(trainer.device),
                "images_per_s": batch / step_s, "step_s": step_s, "model_gflop_per_step": flops / 1e9,
                "achieved_tflops": flops / step_s / 1e12, "matmul_gflop_per_step": mm_flops / 1e9,
                "matmul_alone_s": mm_s, "matmul_alone_tflops": mm_flops / mm_s / 1e12, "rounds": rounds,
                "mfu_vs_bf16_peak": statistics.median(mfu["bf16"]),
                "mfu_vs_own_precision_peak": statistics.median(mfu["own"]),
                "mfu_own_range": [min(mfu["own"]), max(mfu["own"])],
                "matmul_ceiling_vs_own_peak": mm_flops / mm_s / own_peak,
                "matmul_share_of_step": mm_s / step_s}


def compare_compile(preset: str, batch: int, rounds: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    """Eager against compiled, built side by side and timed alternately: ``rounds`` x ``steps`` each."""
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        built = {"eager": _build(preset, batch, a, [*overrides, "run.compile=false"]),
                 "compiled": _build(preset, batch, b, [*overrides, "run.compile=true"])}
        compile_s = {}
        for name, (trainer, micro) in built.items():
            t = time.perf_counter()
            for i in range(warmup):
                trainer.train_step(micro, i)
            compile_s[name] = time.perf_counter() - t
        times: dict[str, list[float]] = {name: [] for name in built}
        for r in range(rounds):
            for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
                trainer, micro = built[name]
                times[name] += _time_steps(trainer, micro, warmup + r * steps, steps)
        rate = {name: batch / statistics.median(t) for name, t in times.items()}
        return {"preset": preset, "batch": batch, "eager_images_per_s": rate["eager"],
                "compiled_images_per_s": rate["compiled"], "speedup": rate["compiled"] / rate["eager"],
                "warmup_s": compile_s, "rounds": rounds, "steps_per_round": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="preset(s) to time (default: cpu-demo and vit-s)")
    ap.add_argument("--batch", type=int, action="append", help="batch per preset (default 256 / 16 on CPU)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--compare-compile", action="store_true",
                    help="time each preset eager and compiled, alternately in one process")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of --steps each: MFU per round over that round's "
                    "peak; with --compare-compile, eager and compiled alternate")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. run.precision=bf16")
    args = ap.parse_args()
    presets = args.preset or ["cpu-demo", "vit-s"]
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    default_batch = {"cpu-demo": 256, "vit-s": 16 if device.type == "cpu" else 256}
    batches = args.batch or [default_batch.get(p, 64) for p in presets]

    peaks = {name: matmul_peak(dt, device) for name, dt in PRECISIONS.items()}
    print(f"device {device}, {torch.get_num_threads()} threads; matmul peak at the start: "
          f"bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s, fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s (measured again "
          f"before every round: MFU is each round's rate over its own peak)")
    overrides = [f"run.device={device.type}", *args.overrides]
    if args.compare_compile:
        rows = [compare_compile(p, b, args.rounds, args.steps, args.warmup, overrides) for p, b in zip(presets, batches)]
        print(f"{'preset':10} {'batch':>5} {'eager img/s':>12} {'compiled img/s':>15} {'speedup':>8} "
              f"{'first steps, eager / compiled':>30}")
        for r in rows:
            w = r["warmup_s"]
            print(f"{r['preset']:10} {r['batch']:>5} {r['eager_images_per_s']:>12.1f} "
                  f"{r['compiled_images_per_s']:>15.1f} {r['speedup']:>7.2f}x "
                  f"{w['eager']:>15.1f} s / {w['compiled']:.1f} s")
        print(f"medians of {args.rounds} alternating rounds of {args.steps} steps each; the compiled first steps "
              f"include the compile (less when inductor's cache already holds these graphs)")
    else:
        rows = [bench_step(p, b, args.steps, args.warmup, overrides, args.rounds) for p, b in zip(presets, batches)]
        print(f"{'preset':10} {'batch':>5} {'tok':>4} {'prec':>5} {'comp':>5} {'img/s':>9} {'GFLOP/step':>11} "
              f"{'TFLOP/s':>8} {'MFU(bf16)':>9} {'MFU(own)':>9} {'own, range':>12} {'mm ceiling':>10} {'mm share':>9}")
        for r in rows:
            print(f"{r['preset']:10} {r['batch']:>5} {r['tokens_per_image']:>4} {r['precision']:>5} "
                  f"{'yes' if r['compiled'] else 'no':>5} {r['images_per_s']:>9.1f} {r['model_gflop_per_step']:>11.1f} "
                  f"{r['achieved_tflops']:>8.3f} {r['mfu_vs_bf16_peak']:>9.1%} {r['mfu_vs_own_precision_peak']:>9.1%} "
                  f"{r['mfu_own_range'][0]:>5.0%}-{r['mfu_own_range'][1]:<5.0%} "
                  f"{r['matmul_ceiling_vs_own_peak']:>10.1%} {r['matmul_share_of_step']:>9.1%}")
        print(f"MFU: medians over {args.rounds} rounds of {args.steps} steps, each over the peak measured just before it; "
              "range: the rounds' lowest and highest MFU(own)")
        print("mm ceiling: the step's own matrix products, each timed alone, against the large-matmul peak of the "
              "precision in use; mm share: their time alone over the step's")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peaks_flops": peaks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
