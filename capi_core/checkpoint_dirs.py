"""Where checkpoints live, without reading them: ``<run>/checkpoints/step-0001234/`` holding
``model.safetensors`` and ``state.json`` (``capi_core.checkpoint`` writes and reads them), beside the
run's ``metrics.jsonl`` (``capi_core.train.JsonlMetrics`` appends to it).

Separate from ``capi_core.checkpoint`` because it needs no torch: ``capi sweep status`` finds a
sweep's checkpoints and their JSON from the files alone, in well under the seconds torch takes to import.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = "model.safetensors"
STATE = "state.json"
METRICS_FILE = "metrics.jsonl"  # in the run directory: one JSON object per logged step


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints under ``run_dir/checkpoints``, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE).is_file() and (p / WEIGHTS).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir/checkpoints``; None if it has none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def find_checkpoint(path: Path) -> Path | None:
    """``path`` itself if it is a checkpoint directory, else the latest checkpoint of the run directory
    ``path``; None if it is neither."""
    path = Path(path)
    return path if (path / STATE).exists() else latest_checkpoint(path)
