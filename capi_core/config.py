"""Typed configuration for CAPI pretraining: the one place where defaults live.

Every other module (trainer, CLI, sweep loader) takes these models; none restates a default.
The bottom of the file is the one translation between a TrainConfig and dotted field paths
(``"optim.lr"``), which the CLI's overrides, the sweep file and MLflow params all speak:
``with_fields`` (dotted values -> a validated config), ``flatten`` (back), ``field_type`` (a
path's annotation) and ``error_lines`` / ``describe`` (pydantic's errors, located by path).
Names follow the CAPI paper (Darcet et al., "Cluster and Predict Latent Patches for Improved Masked Image
Modeling", TMLR 2025) and its reference code: ``student_temp``, ``teacher_temp``, ``num_clusters``,
``registers``. Presets at the bottom; paper-scale values are in ``vit-s/b/l``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from capi_core import bounded_yaml
from capi_core.errors import CapiError


class ConfigError(CapiError, ValueError):
    """A configuration value is invalid; the message names the field."""

    hint = "fix the field named above (`capi train --help` shows the override syntax)"
    exit_code = 2


def _refuse_coercion(annotation: Any, value: Any) -> Any:
    """``value`` unchanged, or ValueError where pydantic's lax mode would silently turn it into another
    kind: YAML reads ``yes``/``no``/``on`` as booleans, and lax mode then makes ``model.registers=yes`` 1
    and ``run.compile=1`` true. Numbers written as strings (``1e-3``, which YAML 1.1 reads as a string)
    stay accepted: they mean what they say."""
    if value is None:
        return value
    kinds = get_args(annotation) if get_origin(annotation) is not tuple else (annotation,)
    kinds = kinds or (annotation,)
    if bool in kinds:
        words = [w for kind in kinds if get_origin(kind) is Literal for w in get_args(kind)]  # e.g. "auto"
        if not isinstance(value, bool) and value not in words:
            also = f" (or {', '.join(map(repr, words))})" if words else ""
            raise ValueError(f"expected true or false{also}, got {value!r}")
    elif (int in kinds or float in kinds) and isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {value!r} (YAML reads yes, no, on and off as "
                         "booleans)")
    elif get_origin(annotation) is tuple and isinstance(value, (list, tuple)):
        for item_type, item in zip(get_args(annotation), value):
            _refuse_coercion(item_type, item)
    return value


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored default. allow_inf_nan=False:
    # no setting of CAPI means anything at infinity or NaN (an infinite mlp_ratio fails only deep inside
    # model construction, a NaN temperature only as NaN losses).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_silent_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_coercion(cls.model_fields[info.field_name].annotation, value)


class ModelConfig(_Strict):
    """Encoder (a timm ViT), predictor and heads."""

    img_size: int = Field(28, ge=8)
    in_chans: int = Field(1, ge=1, le=4)
    patch_size: int = Field(4, ge=1)
    embed_dim: int = Field(192, ge=8)
    depth: int = Field(6, ge=1)
    num_heads: int = Field(3, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    registers: int = Field(4, ge=0, le=16, description="register tokens (Darcet et al.)")
    pos_embed: Literal["learned", "rope"] = Field(
        "learned", description="learned absolute positions gathered at visible indices, or 2D RoPE"
    )
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="student only; teacher runs in eval mode")
    predictor_depth: int = Field(2, ge=1)
    predictor_dim: int | None = Field(None, ge=8, description="None: same as embed_dim")
    predictor_heads: int | None = Field(None, ge=1, description="None: same as num_heads")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        pdim = self.predictor_dim or self.embed_dim
        pheads = self.predictor_heads or self.num_heads
        if pdim % pheads:
            raise ValueError(f"predictor_dim {pdim} is not divisible by predictor_heads {pheads}")
        if self.pos_embed == "rope" and self.registers % 4:
            # CAPI's RoPE spreads the registers evenly over the 4 edges of the visible box (reference model.py).
            raise ValueError(f"pos_embed 'rope' needs registers to be a multiple of 4, got {self.registers}")
        return self


class MaskingConfig(_Strict):
    """Which patches the student sees and which it predicts (ablated in the CAPI paper, Tables 1b and 1e)."""

    strategy: Literal["random", "block", "inverse_block", "inverse_block_roll"] = "inverse_block_roll"
    ratio: float = Field(0.65, gt=0.0, lt=1.0, description="masked fraction at the start of training")
    ratio_end: float | None = Field(None, gt=0.0, lt=1.0, description="masked fraction at the end; None: constant")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="ramp from ratio to ratio_end")
    prediction_subsampling: float = Field(
        0.25, gt=0.0, le=1.0, description="fraction of masked patches predicted (paper 0.05; maintainer suggests 0.2)"
    )
    min_aspect: float = Field(0.5, gt=0.0)
    max_aspect: float = Field(2.0, gt=0.0)
    block_roll: bool = Field(
        True, description="``block``: cyclically shift the masked block, as the reference's BlockMasking does by default"
    )

    @model_validator(mode="after")
    def _check_schedule(self) -> MaskingConfig:
        if self.schedule != "constant" and self.ratio_end is None:
            raise ValueError(f"schedule '{self.schedule}' needs ratio_end")
        if self.min_aspect > self.max_aspect:
            raise ValueError("min_aspect is larger than max_aspect")
        return self


class ClusteringConfig(_Strict):
    """The teacher's online clustering head and its Sinkhorn-Knopp targets (CAPI paper, Tables 1c and 1i)."""

    num_clusters: int = Field(
        1024, ge=2, description="K prototypes; keep near the Sinkhorn batch: with K >> batch SK targets turn diffuse"
    )
    sinkhorn_iterations: int = Field(3, ge=1)
    positionwise: bool = Field(True, description="Sinkhorn per position across the batch (paper) or over all tokens")
    lr_ratio: float = Field(0.5, gt=0.0, description="clustering-head lr as a fraction of the main lr")
    weight_decay: float = Field(0.01, ge=0.0, description="torch's AdamW default, as in the reference")


class LossConfig(_Strict):
    """The three temperatures of CAPI."""

    student_temp: float = Field(0.12, gt=0.0, le=10.0)
    teacher_temp: float = Field(0.06, gt=0.0, le=10.0, description="Sinkhorn-Knopp input temperature")
    clustering_temp: float = Field(0.12, gt=0.0, le=10.0, description="clustering head's own prediction temperature")


class OptimConfig(_Strict):
    """AdamW with CAPI's parameter groups and warmup + truncated cosine schedules (CAPI paper, Table 6)."""

    steps: int = Field(1000, ge=1, description="total optimiser steps")
    batch_size: int = Field(256, ge=2, description="global batch (split over workers)")
    grad_accumulation: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    min_lr: float = Field(0.0, ge=0.0)
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    truncate_cos: float = Field(0.8, gt=0.0, le=1.0, description="cosine runs to truncate_cos*pi")
    weight_decay: float = Field(0.1, ge=0.0)
    norm_wd_mult: float = Field(0.1, ge=0.0)
    patch_embed_lr_mult: float = Field(0.2, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    ema_momentum: float | None = Field(
        None, ge=0.0, lt=1.0, description="momentum at the end of warmup; None: tied to lr, m = 1 - lr (paper)"
    )
    ema_final: float = Field(
        1.0, gt=0.0, le=1.0, description="where the momentum's cosine ends when ema_momentum is set; 1.0: the "
        "teacher settles (paper); ema_momentum keeps it moving to the end, for short runs"
    )
    fused: bool = Field(True, description="fused AdamW where the device supports it")

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError("min_lr is larger than lr")
        return self

    @property
    def warmup_steps(self) -> int:
        return int(self.steps * self.warmup_fraction)


class DataConfig(_Strict):
    """Which Parquet dataset to read and how to augment it (one view, crop + flip: CAPI paper, Table 1d)."""

    dataset: str = Field("fashion-mnist", description="a built-in name or a directory of Parquet shards")
    cache_dir: Path | None = Field(None, description="where built-in datasets are imported; None: ~/.cache/capi")
    split: str = "train"
    crop_scale: tuple[float, float] = (0.6, 1.0)
    hflip: bool = True
    loader_workers: int = Field(1, ge=0, description="decode/augment processes per training process (none with "
                                                      "decode memory)")
    decode: Literal["auto", "cpu", "cuda", "memory"] = Field(
        "auto", description="where images are decoded: loader processes (cpu), the training GPU with nvJPEG (cuda), "
                            "or the whole split once into the training process's memory (memory: small datasets "
                            "of one image size); auto: memory for a split of at most 512 MiB decoded, else cuda when "
                            "training on CUDA from a JPEG dataset, else cpu"
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        return self


class ProbeConfig(_Strict):
    """The cheap online probe a sweep optimises: weighted k-NN on a small labelled subset."""

    every: int = Field(0, ge=0, description="steps between probes; 0: only at the end")
    train_images: int = Field(2000, ge=10)
    test_images: int = Field(1000, ge=10)
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0.0)
    diagnostic_images: int = Field(64, ge=0, description="probe queries on which the run's end measures its EMA "
                                                         "teacher's diag/ metrics (high-norm tokens, norm quantiles, "
                                                         "attention to registers); 0: none")
    picture_images: int = Field(8, ge=0, description="probe queries drawn at the run's end (PCA of the patch "
                                                     "features, attention, token norms) into <run>/pictures; 0: none")


class RunConfig(_Strict):
    """Where and how one training run executes."""

    name: str = Field("capi", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: Path = Path("runs")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA; on a CPU, whichever of bf16 and fp32 a short timing of the step's own shapes finds faster (capi_core.precision, cached per machine)"
    )
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the step's forward (teacher, heads, Sinkhorn-Knopp, student, losses); "
        "auto: on for CPU runs of at least capi_core.compile.AUTO_MIN_STEPS steps, where the faster step repays "
        "the compile time (measured), off otherwise and on CUDA (set it yourself there)")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    max_nonfinite: int = Field(3, ge=1, description="stop after this many consecutive non-finite losses")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's default")


class TrainConfig(_Strict):
    """Everything one CAPI pretraining run needs."""

    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    clustering: ClusteringConfig = ClusteringConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    probe: ProbeConfig = ProbeConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _check_masking_fits(self) -> TrainConfig:
        n = self.model.num_patches
        for r in {self.masking.ratio, self.masking.ratio_end or self.masking.ratio}:
            n_masked = int(n * r)
            if n_masked < 1 or n - n_masked < 1:
                raise ValueError(f"masking ratio {r} leaves no masked or no visible patch on a {n}-patch grid")
            if int(n_masked * self.masking.prediction_subsampling) < 1:
                raise ValueError(
                    f"masking.prediction_subsampling {self.masking.prediction_subsampling} predicts no patch "
                    f"of the {n_masked} masked ones"
                )
        return self


# --------------------------------------------------------------------------------------------------
# Presets. cpu-* presets deviate from the paper in size, K, EMA momentum and prediction subsampling
# because a 28x28 Fashion-MNIST run on 2 CPU cores is not a ViT-L on LVD-142M.

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on CPU: tests and smoke runs on tiny generated data.
    "cpu-tiny": {
        "model": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                  "registers": 4, "predictor_depth": 1},
        "clustering": {"num_clusters": 64},
        "optim": {"steps": 20, "batch_size": 32, "lr": 1e-3, "ema_momentum": 0.99},
        # End-of-run diagnostics on few images and two pictures: seconds matter in tests.
        "probe": {"train_images": 100, "test_images": 50, "k": 5, "diagnostic_images": 16, "picture_images": 2},
        "run": {"log_every": 5, "precision": "fp32"},
    },
    # The CPU recipe, chosen by the study in sweeps/study/cpu_recipe.yaml (docs/cpu_recipe.md): on 2 cores
    # a small ViT on 16 tokens learns most per minute. At 1,000 steps, against the previous demo's shape
    # (width 192, depth 6, patch 4), width 128 / depth 4 / patch 7 gained +9.0 k-NN points over random
    # init where width 192 / depth 6 gained +2.3 in twice the time, and patch 4 +4.5 at 600 steps in
    # more time than patch 7's 1,000. Each of these departs from the paper for the run's length:
    # - the momentum stays at its base to the end (ema_final) instead of rising to 1: in a short run
    #   the rise froze the teacher, the probed network, for its last third (+1.5 points);
    # - 30 % warmup instead of 10 % (+2.7 points with the flat momentum): the teacher stays near its
    #   init longer, so the first targets are stable;
    # - K = 256 clusters instead of 16,384 (the paper's K equals its global batch; ours is 64). Over
    #   three seeds at 2,000 steps, scored with the whole train split as memory, 256 and 1,024 led 16
    #   and 64 by 0.8-1.3 points and tied with each other; 1,024 costs ~15 % more per step than 256 on
    #   one core. The whole cpu-demo (then 12,000 steps) read 84.58 % k-NN with 256 against 84.27 % with 64,
    #   within the noise of two independent runs (docs/cpu_recipe.md);
    # - every masked patch is predicted (the paper predicts 5 %, its maintainers suggest 20 %): on 16
    #   tokens the predictor is cheap, and the recipe gained +9.3 with it against +8.0 without;
    # - batch 64: on 2 cores it trains as many images/s as 256, so a budget buys 4x the steps.
    "cpu-demo": {
        "model": {"img_size": 28, "in_chans": 1, "patch_size": 7, "embed_dim": 128, "depth": 4, "num_heads": 4,
                  "registers": 4, "predictor_depth": 2},
        "masking": {"prediction_subsampling": 1.0},
        "clustering": {"num_clusters": 256},
        # 15,000 steps: what 15 minutes buy on the slowest 2-core machine measured (an AMD EPYC VM that
        # trained ~1,000 img/s compiled with SDPA attention, ~1,210 with the explicit product of
        # models/attention.py, 2026-12-07), compile and probes included. At 12,000 steps seed 0 read
        # 84.58 % k-NN; at 15,000, 85.43 % (14.0 min wall).
        "optim": {"steps": 15_000, "batch_size": 64, "lr": 1.5e-3, "warmup_fraction": 0.3, "ema_momentum": 0.994,
                  "ema_final": 0.994},
        # The whole train split as the k-NN memory: over 4 training seeds the score spreads 0.44 points
        # with it, against 0.86 with 5,000 images (benchmarks/learning.py noise, 1,200 steps); 3 probes
        # of ~20 s on 2 cores are under 10 % of the run.
        "probe": {"every": 5000, "train_images": 60_000, "test_images": 10_000},
        "run": {"log_every": 20},
    },
    # The paper's GPU configurations (CAPI paper, Table 8; architecture and recipe of the reference code):
    # 224 px, patch 14, 16 registers, CAPI's RoPE (the official model has no absolute positions), inverse
    # block masking with roll at 65 %, 5 % of the masked patches predicted (the reference default; its
    # maintainer suggests 0.2: masking.prediction_subsampling=0.2), drop path 0.2, EMA momentum 1 - lr,
    # K = 16384, global batch 16384 for 500k steps. The GPU decodes the JPEGs (data.decode auto).
    "vit-s": {
        "model": {"img_size": 224, "in_chans": 3, "patch_size": 14, "embed_dim": 384, "depth": 12, "num_heads": 6,
                  "registers": 16, "pos_embed": "rope", "drop_path": 0.2, "predictor_depth": 6},
        "masking": {"strategy": "inverse_block_roll", "ratio": 0.65, "prediction_subsampling": 0.05},
        "clustering": {"num_clusters": 16384},
        "optim": {"steps": 500_000, "batch_size": 16384, "lr": 2e-3, "ema_momentum": None},
        "data": {"loader_workers": 4},
    },
    "vit-b": {
        "model": {"img_size": 224, "in_chans": 3, "patch_size": 14, "embed_dim": 768, "depth": 12, "num_heads": 12,
                  "registers": 16, "pos_embed": "rope", "drop_path": 0.2, "predictor_depth": 6},
        "masking": {"strategy": "inverse_block_roll", "ratio": 0.65, "prediction_subsampling": 0.05},
        "clustering": {"num_clusters": 16384},
        "optim": {"steps": 500_000, "batch_size": 16384, "lr": 1e-3, "ema_momentum": None},
        "data": {"loader_workers": 4},
    },
    "vit-l": {
        "model": {"img_size": 224, "in_chans": 3, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16,
                  "registers": 16, "pos_embed": "rope", "drop_path": 0.2, "predictor_depth": 12},
        "masking": {"strategy": "inverse_block_roll", "ratio": 0.65, "prediction_subsampling": 0.05},
        "clustering": {"num_clusters": 16384},
        "optim": {"steps": 500_000, "batch_size": 16384, "lr": 1e-3, "ema_momentum": None},
        "data": {"loader_workers": 4},
    },
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# The cpu-demo recipe for about an hour on 2 cores: 4x its steps, probed 8 times. Measured on a 2-core
# AMD EPYC VM (bf16, compiled): 54.8 min wall (52.3 training), 86.87 % k-NN and 89.60 % attentive on
# the full test set; the README has the curve.
PRESETS["cpu-long"] = _merge(PRESETS["cpu-demo"], {"optim": {"steps": 60_000}, "probe": {"every": 7_500}})


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "model.registers=8"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} names no field")
        try:
            value = bounded_yaml.safe_load(raw) if raw.strip() else ""
        except bounded_yaml.YamlLimitError as err:
            raise ConfigError(f"override {path.strip()}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r} has a value that is not plain YAML: {err}") from None
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {key}")
        node[keys[-1]] = value
    return out


def build_config(preset: str | None = None, overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a preset name plus nested or ``a.b=c`` overrides; errors name the field."""
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[preset]
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    try:
        return TrainConfig.model_validate(_merge(base, overrides or {}))
    except ValidationError as err:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(error_lines(err))) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML (or JSON) file, which may name a ``preset`` to start from,
    plus ``a.b=c`` overrides on top."""
    path = Path(path)
    try:
        data = bounded_yaml.safe_load(bounded_yaml.read_limited(path)) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, bounded_yaml.YamlLimitError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping")
    preset = data.pop("preset", None)
    return build_config(preset, _merge(data, parse_overrides(list(overrides))))


def flatten(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted ``{"optim.lr": 0.001, ...}`` view of a config, for tracking and reports."""
    out: dict[str, Any] = {}
    for key, value in config.model_dump(mode="json").items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value


# --------------------------------------------------------------------------------------------------
# Dotted field paths: the one translation between a TrainConfig and ``{"optim.lr": 1e-3, ...}``.


def dotted(mapping: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}, "model.registers": 4}`` -> ``{"optim.lr": 1e-3, "model.registers": 4}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def field_type(path: str) -> Any:
    """The annotation of a dotted TrainConfig field (``"model.registers"`` -> int); ConfigError, with
    the closest name, if ``path`` names no field."""
    model: type[BaseModel] = TrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "TrainConfig"
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f"did you mean {'.'.join(parts[:i] + close)!r}? " if close else ""
            raise ConfigError(f"unknown field {path!r}: {hint}{where} has {', '.join(fields)}")
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i == len(parts) - 1:
            if is_section:
                raise ConfigError(f"{path!r} is a section; name one of its fields: "
                                  f"{', '.join(annotation.model_fields)}")
            return annotation
        if not is_section:
            raise ConfigError(f"unknown field {path!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        model = annotation
    raise ConfigError("empty field path")


def with_fields(config: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """``config`` with dotted fields replaced (``{"run.name": "t1", "optim.lr": 2e-3}``), validated as a
    whole so that cross-field checks run. Paths must name fields (``field_type``); raises pydantic's
    ValidationError, whose locs are the dotted paths (``error_lines`` words them)."""
    data = config.model_dump()
    for path, value in values.items():
        *sections, name = path.split(".")
        node = data
        for key in sections:
            node = node[key]
        node[name] = value
    return TrainConfig.model_validate(data)


def error_message(error: dict[str, Any]) -> str:
    """One pydantic error's message without pydantic's ``Value error, `` prefix."""
    return error["msg"].removeprefix("Value error, ")


def error_lines(err: ValidationError, inputs: bool = True) -> list[str]:
    """``["optim.lr: Input should be less than or equal to 1 (got 2.0)", ...]``, one per error;
    ``inputs``: name the rejected value where it is a plain one (not for a validator's own message)."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        shown = inputs and e["type"] != "value_error" and "input" in e and not isinstance(e["input"], dict)
        lines.append(f"{field}: {error_message(e)}" + (f" (got {e['input']!r})" if shown else ""))
    return lines


def describe(err: ValidationError) -> str:
    """``error_lines`` on one line, without the rejected values: ``field: message; field: message``."""
    return "; ".join(error_lines(err, inputs=False))
