"""Which precision a run trains in: ``run.precision=auto`` decides by measuring, not by a CPU flag.

Whether bf16 autocast pays on a CPU depends on more than one flag: measured on a 2-core AMD EPYC with
AVX-512 and avx512_bf16 but no AMX, the cpu-demo step ran 230 img/s in bf16 against 152 in fp32,
while on an AVX-512 Xeon without avx512_bf16 a bf16 matmul ran at about half the fp32 rate. So
``auto`` times the step's own shapes (its linear layers and its attention, forward) in both
precisions for a fraction of a second, picks the faster, and caches the decision per machine (CPU
model, CPU flags, torch version, thread count) and shape under ``<cache>/precision/``: later runs,
sweep trials and Ray workers on the same machine read it instead of measuring again (a decision
measured on a busy machine is measured again once the machine is quiet, see ``trusted``). On CUDA,
``auto`` is bf16 without measuring (every GPU this project targets has bf16 tensor cores).
Explicit ``fp32`` / ``bf16`` are never overridden.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from capi_core.atomic import atomic_write
from capi_core.config import ModelConfig
from capi_core.data import cache_root
from capi_core.models.attention import scaled_dot_product_attention

PROBE_VERSION = 3  # bump when the probe or its record changes, so older decisions are measured again
# (2: the load; 3: attention as the models compute it on CPU, models/attention.py)
MAX_ROWS = 2048  # token rows in the timed matmuls: enough for the kernels to reach their steady rate
PROBE_FLOPS = 2 * 10**9  # linear-layer FLOPs per timed pass: ~10 ms at 0.2 TFLOP/s
REPEATS = 3  # timed repetitions per precision; the fastest counts (the least disturbed by other load)


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run trains in and why."""

    dtype: str  # "bf16" or "fp32"
    reason: str  # "explicit", "cuda" or "measured"
    fp32_gflops: float | None = None  # measured rates of the probe workload, when measured
    bf16_gflops: float | None = None
    cached: bool = False

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.dtype == "bf16" else None

    def describe(self) -> str:
        """``bf16 (auto: measured 412 GFLOP/s in bf16 against 190 in fp32, cached)`` for a run's header."""
        if self.reason == "explicit":
            return f"{self.dtype} (set by run.precision)"
        if self.reason == "cuda":
            return f"{self.dtype} (auto: CUDA)"
        cached = ", cached" if self.cached else ""
        return (f"{self.dtype} (auto: measured {self.bf16_gflops:.0f} GFLOP/s in bf16 against "
                f"{self.fp32_gflops:.0f} in fp32 on this CPU{cached})")


def flush_denormals(device: torch.device | str = "cpu") -> None:
    """Flush subnormal floats to zero, process-wide, when ``device`` is the CPU. Sinkhorn targets and
    softmax tails produce subnormals, and x86 handles each one in microcode: measured on the cpu-demo
    step, 24 -> 200 img/s in fp32. The probe's forward pass (bf16) showed no difference either way
    (2.92 against 2.99 s for 10,240 Fashion-MNIST images on one core, alternated; 2026-12-07), so an
    evaluation flushes for consistency with the trainer's probe, not for speed."""
    if torch.device(device).type == "cpu":
        torch.set_flush_denormal(True)


def machine_key(model: ModelConfig, threads: int) -> str:
    """What the measured rates depend on: the CPU, torch, the thread count and the step's shapes."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's lines suffice
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    cpu, flags = info.get("model name", platform.processor()), info.get("flags", "")
    what = {"version": PROBE_VERSION, "cpu": cpu, "flags": flags, "torch": torch.__version__, "threads": threads,
            "shape": [model.embed_dim, model.num_heads, model.mlp_ratio, model.num_patches + model.registers]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def probe_rates(model: ModelConfig, repeats: int = REPEATS) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of one transformer block's forward matmuls and attention at the model's width
    and sequence length, on the CPU: what autocast changes in a step."""
    d, heads, tokens = model.embed_dim, model.num_heads, model.num_patches + model.registers
    hidden = int(d * model.mlp_ratio)
    # About PROBE_FLOPS per pass whatever the width, so a ViT-L's probe costs what a tiny model's does.
    per_row = 2 * (4 * d * d + 2 * d * hidden)
    seqs = max(1, min(MAX_ROWS, PROBE_FLOPS // per_row) // tokens)
    rows = seqs * tokens
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(rows, d, generator=gen), torch.randn(rows, hidden, generator=gen)
    # qkv, attention output, MLP in and MLP out: a block's linear layers, each [rows, in] @ [in, out].
    pairs = [(x, torch.randn(d, 3 * d, generator=gen)), (x, torch.randn(d, d, generator=gen)),
             (x, torch.randn(d, hidden, generator=gen)), (h, torch.randn(hidden, d, generator=gen))]
    q = torch.randn(seqs, heads, tokens, d // heads, generator=gen)
    flops = sum(2 * a.shape[0] * w.shape[0] * w.shape[1] for a, w in pairs) + 4 * seqs * tokens * tokens * d

    def run(dtype: torch.dtype) -> float:
        cast = [(a.to(dtype), w.to(dtype)) for a, w in pairs]
        qs = q.to(dtype)
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms the kernels up
            start = time.perf_counter()
            for a, w in cast:
                a @ w
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                scaled_dot_product_attention(qs, qs, qs)  # as the step computes it, in each precision
            best = min(best, time.perf_counter() - start)
        return flops / best / 1e9

    with torch.no_grad():
        return run(torch.float32), run(torch.bfloat16)


def choose_precision(precision: str, device: torch.device, model: ModelConfig,
                     cache_dir: str | Path | None = None) -> PrecisionChoice:
    """The precision a run trains in: explicit wins; ``auto`` is bf16 on CUDA and on a CPU the faster of
    the two as measured (cached per machine and shape)."""
    if precision != "auto":
        return PrecisionChoice(precision, "explicit")
    if device.type == "cuda":
        return PrecisionChoice("bf16", "cuda")
    path = cache_root(cache_dir) / "precision" / f"{machine_key(model, torch.get_num_threads())}.json"
    load_now = load_average()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads(path.read_text())
        if trusted(record, load_now, os.cpu_count() or 1):
            return PrecisionChoice(record["dtype"], "measured", float(record["fp32_gflops"]),
                                   float(record["bf16_gflops"]), cached=True)
    fp32, bf16 = probe_rates(model)
    choice = PrecisionChoice("bf16" if bf16 > fp32 else "fp32", "measured", fp32, bf16)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in asdict(choice).items() if k not in ("cached", "reason")}
    record["load"] = load_now
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record)))
    return choice


def load_average() -> float:
    """The machine's 1-minute load average (0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def trusted(record: dict, load_now: float, cpus: int) -> bool:
    """Whether a cached decision stands. One measured while the machine was busy (a 1-minute load
    average above its core count) is provisional: it is measured again once the machine is quieter,
    because other processes skew the two rates unequally (seen here: 29 against 25 GFLOP/s at load 6,
    278 against 119 on the same machine when quiet). Records without a load predate this rule and stand."""
    load = float(record.get("load", 0.0))
    return load <= cpus or load_now >= cpus
