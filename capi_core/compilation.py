"""Whether a run compiles its step (``run.compile``), and what ``auto`` decides by.

``torch.compile`` of the step's forward (the trainer's ``forward_losses``: teacher, clustering head,
Sinkhorn-Knopp, student, both losses) fuses the elementwise work around the matmuls (norms, casts,
GELU, residual adds) and its backward, which on the CPU presets' small ViT is about half of a step.
Compiling costs time once per process, less when inductor's on-disk cache already holds the graphs:
``auto`` compiles a CPU run when its planned steps repay a cold compile (the figures below). On CUDA ``auto`` leaves it off: not measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Measured 2026-12-07 on a 2-core AMD EPYC VM (avx512_bf16, no AMX), bf16, the cpu-demo step at batch
# 64, eager and compiled timed alternately in one process: two threads 886 -> 1,055 img/s (11.6 ms
# saved a step) after a cold compile of 47 s; one thread 679 -> 798 img/s (14 ms) after 56 s. Both
# break even near 4,000 steps; a warm cache (the same shapes compiled before on this machine) costs
# 2-3 s. On a 2-core Intel Xeon VM without AMX (fp32, 2026-12-08), one thread: 614 -> 811 img/s (25 ms
# a step) after a cold compile of 50 s (22 s with inductor's kernels already built, 5 s with its graphs
# cached too): even there a cold compile breaks even only near 2,000 steps, and the quickstart's 2,300-step
# trials ran 12 min 7 s compiled against 12 min 22 s eager. AUTO_MIN_STEPS rounds the slower machine's
# cold figure up, so a run that compiles gains on either, even cold.
AUTO_MIN_STEPS = 5_000


@dataclass(frozen=True)
class CompileChoice:
    """Whether the step is compiled, and why (for the run's header)."""

    enabled: bool
    reason: str

    def describe(self) -> str:
        return f"{'on' if self.enabled else 'off'} ({self.reason})"


def choose_compile(setting: bool | str, device: torch.device, steps: int) -> CompileChoice:
    """``run.compile`` for a run of ``steps`` on ``device``: explicit true/false wins; ``auto`` compiles CPU
    runs of at least ``AUTO_MIN_STEPS`` steps."""
    if isinstance(setting, bool):
        return CompileChoice(setting, "set by run.compile")
    if device.type != "cpu":
        return CompileChoice(False, f"auto: not measured on {device.type}; set run.compile=true to try it")
    if steps < AUTO_MIN_STEPS:
        return CompileChoice(False, f"auto: {steps:,} steps would not repay the compile, which pays from "
                                    f"{AUTO_MIN_STEPS:,}")
    return CompileChoice(True, f"auto: {steps:,} steps repay the compile (from {AUTO_MIN_STEPS:,})")
