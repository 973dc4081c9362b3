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
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from capi_core.atomic import atomic_directory
# The directory layout lives in checkpoint_dirs (no torch there, so that reading a sweep's state stays fast).
from capi_core.checkpoint_dirs import (STATE, WEIGHTS, checkpoint_name, find_checkpoint,  # noqa: F401 - re-exported
                                       latest_checkpoint, list_checkpoints)
from capi_core.config import TrainConfig, describe
from capi_core.errors import CapiError
from capi_core.models.encoder import Encoder
from capi_core.models.student import Student

FORMAT_VERSION = 1


class CheckpointError(CapiError, RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the model; the message names the file."""

    hint = ("check the path, or point at another checkpoint; a damaged step-* directory of a run can be "
            "removed to fall back to the one before it")


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
    """Read a checkpoint directory; raise CheckpointError naming the file that is missing or corrupt,
    the field of ``state.json`` that is wrong, or the tensor that holds NaN or infinity."""
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
    check_state(state, state_file)
    check_finite(tensors, weights)
    return tensors, state


def check_state(state: Any, state_file: Path, resume: bool = False) -> TrainConfig:
    """The training config of a parsed ``state.json``, after checking the fields a reader uses (with
    ``resume``, also the optimiser state a resume loads; an evaluation checkpoint may lack it): each
    missing or malformed one is named, instead of surfacing later as a KeyError."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file} holds a JSON {type(state).__name__}, not an object")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_file} has format version {state.get('format_version')!r}, "
                              f"expected {FORMAT_VERSION}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{state_file}: step must be a non-negative integer, got {step!r}")
    optim = state.get("optim")
    for part in ("main", "clustering") if resume else ():
        groups = optim.get(part, {}).get("param_groups") if isinstance(optim, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise CheckpointError(f"{state_file}: optim.{part}.param_groups is missing or not a list of objects")
    if not isinstance(state.get("metadata", {}), dict):
        raise CheckpointError(f"{state_file}: metadata must be an object")
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{state_file} holds no training config (field config)")
    try:
        return TrainConfig.model_validate(state["config"])
    except ValidationError as err:
        raise CheckpointError(f"{state_file} holds no valid training config: {describe(err)}") from None


def check_finite(tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """Refuse weights holding NaN or infinity: they evaluate to chance without a word, and a resumed
    run would only fail steps later at its first non-finite loss."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{weights}: tensor {key} holds {bad} non-finite value(s) of {value.numel()}; "
                                  "the run diverged before this checkpoint")


def check_matches(module: torch.nn.Module, weights: dict[str, torch.Tensor], file: Path) -> None:
    """Raise CheckpointError unless ``weights`` has exactly ``module``'s keys and shapes."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape)
    if missing or unexpected or reshaped:
        shapes = [f"{k} {tuple(weights[k].shape)} instead of {tuple(expected[k].shape)}" for k in reshaped[:3]]
        raise CheckpointError(
            f"{file} does not match the architecture in its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, different shapes {shapes}"
        )


def resume_checkpoint(path: Path) -> Path | None:
    """What a resume continues from: ``path`` if it is a checkpoint directory (complete or not, so a
    damaged one is reported, not skipped), else the newest ``step-*`` of the run directory ``path``;
    None when there is none, and the run starts fresh.

    Checkpoints appear whole by rename (``atomic_directory``) and are deleted by rename first
    (``prune_checkpoints``), so a newest ``step-*`` missing a file was damaged after it was written.
    Skipping it would silently restart the run from an older step or from scratch; it is an error."""
    path = Path(path)
    if (path / STATE).exists() or (path / WEIGHTS).exists():
        return path
    root = path / "checkpoints"
    found = sorted(root.glob("step-*")) if root.is_dir() else []
    if not found:
        return None
    newest = found[-1]
    for f in (newest / WEIGHTS, newest / STATE):
        if not f.is_file():
            older = [p for p in list_checkpoints(path) if p != newest]
            fallback = f"remove {newest} to resume from {older[-1].name}" if older else f"remove {newest}"
            raise CheckpointError(f"the newest checkpoint {newest} has no {f.name}, so the run cannot resume from "
                                  f"it; {fallback}, or start over with --no-resume")
    return newest


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for path in list_checkpoints(run_dir)[:-keep]:
        # Renamed out of the step-* namespace first: a process killed mid-delete leaves a hidden
        # directory, never a step-* checkpoint with some of its files gone.
        doomed = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


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
        found = resume_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint found in {path}")
        path = found
    tensors, state = load_checkpoint(path)
    config = check_state(state, path / STATE)
    module = build(config.model) if part else build(config)
    weights = split_prefix(tensors, f"{which}.{part + '.' if part else ''}")
    check_matches(module, weights, path / WEIGHTS)
    module.load_state_dict(weights)
    return module.eval(), config
