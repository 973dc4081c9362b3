"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a directory ``step-0001234/`` holding ``model.safetensors`` (student, EMA teacher,
clustering head, optimiser moments, RNG state) and ``state.json`` (config, step, optimiser
hyperparameters, caller metadata such as the MLflow run id). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from capi_core.atomic import atomic_directory
# The directory layout lives in checkpoint_dirs (no torch there, so that reading a sweep's state stays fast).
from capi_core.checkpoint_dirs import (STATE, WEIGHTS, checkpoint_name, find_checkpoint,  # noqa: F401 - re-exported
                                       latest_checkpoint, list_checkpoints)
from capi_core.config import TrainConfig
from capi_core.models.encoder import Encoder
from capi_core.models.student import Student

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the model; the message names the file."""


def save_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write ``directory`` atomically: build it under a temporary name, then rename it into place."""
    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        with open(tmp / STATE, "w") as f:
            json.dump({"format_version": FORMAT_VERSION, **state}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    return Path(directory)


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint directory; raise CheckpointError naming the file that is missing or corrupt."""
    directory = Path(directory)
    weights, state_file = directory / WEIGHTS, directory / STATE
    for f in (weights, state_file):
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {state_file} is not valid JSON: {err}") from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {weights} is corrupt: {err}") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_file} has format version {state.get('format_version')}, expected {FORMAT_VERSION}")
    return tensors, state


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{"teacher.encoder.x": t}`` with prefix ``"teacher."`` -> ``{"encoder.x": t}``."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state_dict.items()}


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors (safetensors) and plain JSON (hyperparameters)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            tensors[f"{prefix}{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                        prefix: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in split_prefix(tensors, prefix).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def load_encoder(path: Path, which: str = "teacher"):
    """The (EMA teacher by default) encoder of a checkpoint, ready for evaluation, and its config.

    Returns ``(Encoder, TrainConfig)``. A file from another architecture or a corrupt file raises
    CheckpointError naming the file and the mismatch.
    """
    return _load_part(path, which, "encoder", Encoder)


def load_student(path: Path, which: str = "teacher"):
    """The whole (EMA teacher by default) model: encoder, predictor and head, for predictor pooling.

    Returns ``(Student, TrainConfig)``; errors as ``load_encoder``.
    """
    return _load_part(path, which, "", Student)


def _load_part(path: Path, which: str, part: str, build):
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    path = Path(path)
    if path.is_dir():  # a checkpoint, or a run directory: then its latest checkpoint
        found = find_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint found in {path}")
        path = found
    tensors, state = load_checkpoint(path)
    try:
        config = TrainConfig.model_validate(state["config"])
    except Exception as err:  # noqa: BLE001 - any schema problem is a bad checkpoint
        raise CheckpointError(f"{path / STATE} holds no valid training config: {err}") from None
    module = build(config.model) if part else build(config)
    weights = split_prefix(tensors, f"{which}.{part + '.' if part else ''}")
    expected = module.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape)
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"{path / WEIGHTS} does not match the architecture in its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, different shapes {reshaped[:3]}"
        )
    module.load_state_dict(weights)
    return module.eval(), config
