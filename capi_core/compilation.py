"""Whether a run compiles its step (``run.compile``), and what ``auto`` decides by.

``torch.compile`` of the step's forward (the trainer's ``forward_losses``: teacher, clustering head,
Sinkhorn-Knopp, student, both losses) fuses the elementwise work around the matmuls (norms, casts,
GELU, residual adds) and its backward, which on the CPU presets' small ViT is about half of a step.
Compiling costs time once per process, less when inductor's on-disk cache already holds the graphs:
``auto`` compiles a CPU run when its planned steps repay a cold compile (the figures below, measured
with ``benchmarks/train_step.py --compile``). On CUDA ``auto`` leaves it off: not measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Measured on a 2-core AMD EPYC (avx512_bf16, no AMX), bf16, the cpu-demo step at batch 64: see
# benchmarks/README.md. The cold compile took COLD_COMPILE_S; the compiled step saved SAVED_PER_STEP
# of a step (one thread 679 -> 798 img/s, two threads see the README). Break-even: COLD_COMPILE_S /
# (saving per step) steps; AUTO_MIN_STEPS rounds it up for slower CPUs.
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
