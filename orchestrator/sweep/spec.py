"""The sweep file: a YAML description of a CAPI hyperparameter sweep, checked before any Ray work.

A sweep names a base TrainConfig (a capi_core preset or config file plus overrides, resolved through
``capi_core.config``, the one source of defaults), a search space over dotted TrainConfig fields, a
search algorithm, an early-stopping scheduler, a budget and per-trial resources. ``load_sweep``
reports every problem at once as ``file:line: field: message``. Nothing here imports Ray, so
``capi sweep validate`` is instant and runs before a cluster exists.

Semantics the runner applies:

* ``budget.num_samples`` is the total number of trials.
* ``grid`` dimensions are enumerated in full (Ray's ``grid_search``); ``choice``, ``uniform``,
  ``loguniform`` and ``randint`` are sampled (``randint``'s upper bound is exclusive, as in Ray).
  Each grid point runs ``repeats() = num_samples / grid_size()`` times with fresh samples of the
  sampled dimensions, so num_samples must be a multiple of the grid size; ``repeats()`` is what Tune
  calls ``num_samples``.
* ``search.algorithm: grid`` takes grid dimensions only (num_samples then defaults to the grid size);
  ``optuna`` (TPE) takes none, because Optuna chooses every value itself.
* Scheduler times (``grace_period``, ``max_t``, ``perturbation_interval``) count probe evaluations:
  a trial reports ``search.metric`` every ``probe.every`` steps and at its last step
  (``reports_per_trial()``).
"""

from __future__ import annotations

import difflib
import itertools
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from capi_core import bounded_yaml
from capi_core.cadence import REPORTED_METRICS, checkpoints_per_run, probe_interval, probes_per_run
from capi_core.config import (PRESETS, ConfigError, TrainConfig, build_config, describe, dotted, error_message,
                               field_type, load_config, parse_overrides, with_fields)
from capi_core.errors import CapiError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# Bounds that keep a hostile or mistyped file from costing minutes before it is refused: each value of
# a grid or choice is checked by building a TrainConfig, and pairs of dimensions are checked together.
MAX_VALUES = 256  # values of one grid or choice dimension
MAX_TRIALS = 10_000  # trials of one sweep (grid points x repeats)
RANGE_SAMPLES = 64  # integers of a randint range checked one by one (all of them when the range is smaller)


class SweepSpecError(CapiError, ValueError):
    """A sweep file cannot run; ``problems`` holds one ``file:line: field: message`` string per problem."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.problems = problems
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        super().__init__(f"invalid sweep file {path} ({count}):\n  " + "\n  ".join(problems))


class SweepSpecWarning(UserWarning):
    """A sweep file runs, but probably not as its author meant."""


@dataclass(frozen=True)
class Problem:
    """One finding about a sweep, at ``loc``: its path in the file, e.g. ``("scheduler", "max_t")``."""

    loc: tuple[str | int, ...]
    message: str
    warning: bool = False


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ------------------------------------------------------------------------------------------- schema


class Base(_Strict):
    """The TrainConfig every trial starts from: a preset or a config file, then overrides."""

    preset: str | None = Field(None, description="a capi_core preset, e.g. cpu-demo or vit-b")
    config: Path | None = Field(None, description="a YAML config file (it may name its own preset); "
                                                  "a relative path is relative to the sweep file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted field -> value, applied last")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return preset

    @field_validator("config")
    @classmethod
    def _relative_to_sweep_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        root = (info.context or {}).get("root")
        return root / path if path is not None and root is not None and not path.is_absolute() else path

    @field_validator("overrides", mode="before")
    @classmethod
    def _to_dotted(cls, overrides: Any) -> Any:
        # Accept what people already write for `capi train`: a nested mapping, dotted keys, or a list
        # of "section.field=value" strings; keep one form, dotted leaves, for the rest of the code.
        if isinstance(overrides, list):
            if not all(isinstance(item, str) for item in overrides):
                raise ValueError("a list of overrides must hold 'section.field=value' strings")
            try:
                overrides = parse_overrides(overrides)
            except ConfigError as err:
                raise ValueError(str(err)) from None
        if not isinstance(overrides, dict):
            return overrides  # pydantic reports the wrong type
        return dotted(overrides)

    @model_validator(mode="after")
    def _one_source(self) -> Base:
        if (self.preset is None) == (self.config is None):
            raise ValueError("give exactly one of preset and config")
        return self


class Distribution(_Strict):
    """One search dimension: exactly one of the keys below."""

    grid: list[Any] | None = Field(None, min_length=1, max_length=MAX_VALUES,
                                   description="every value, each in its own trials")
    choice: list[Any] | None = Field(None, min_length=1, max_length=MAX_VALUES,
                                     description="one value per trial, drawn by the searcher")
    uniform: tuple[float, float] | None = Field(None, description="[lo, hi]")
    loguniform: tuple[float, float] | None = Field(None, description="[lo, hi], uniform in log space, lo > 0")
    randint: tuple[int, int] | None = Field(None, description="[lo, hi): the upper bound is exclusive, as in Ray")

    @field_validator("grid", "choice")
    @classmethod
    def _distinct(cls, values: list[Any] | None) -> list[Any] | None:
        for i, value in enumerate(values or []):
            if value in values[:i]:
                raise ValueError(f"{value!r} is listed twice")
        return values

    @field_validator("uniform", "loguniform", "randint")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float] | None, info: ValidationInfo) -> tuple[float, float] | None:
        if bounds is not None:
            lo, hi = bounds
            if not lo < hi:
                raise ValueError(f"the lower bound {lo} must be below the upper bound {hi}")
            if info.field_name == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs a lower bound above 0, got {lo}")
        return bounds

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}" + (f"; got {', '.join(given)}"
                                                                               if given else ""))
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def args(self) -> list[Any]:
        """The values (grid, choice) or the bounds (uniform, loguniform, randint) as written."""
        return list(getattr(self, self.kind))

    def extremes(self) -> list[tuple[int, Any]]:
        """``(index in the file, value)`` for every value a trial can get (grid, choice) or, for a
        range, its two ends, the values most likely to break a constraint."""
        if self.kind in ("grid", "choice"):
            return list(enumerate(self.args))
        lo, hi = self.args
        return [(0, lo), (1, hi - 1 if self.kind == "randint" else hi)]

    def candidates(self) -> list[tuple[int, Any]]:
        """``extremes`` and, for ``randint``, the integers between them (evenly spaced ones when there are
        more than RANGE_SAMPLES): a constraint such as rope's registers % 4 == 0 breaks inside a range
        whose ends are both fine."""
        if self.kind != "randint":
            return self.extremes()
        lo, hi = self.args
        if hi - lo <= RANGE_SAMPLES:
            values = range(lo, hi)
        else:
            values = sorted({lo + (hi - 1 - lo) * i // (RANGE_SAMPLES - 1) for i in range(RANGE_SAMPLES)})
        return [(0 if v == lo else 1, v) for v in values]

    def __str__(self) -> str:
        return f"{self.kind} {self.args}"


class Search(_Strict):
    """How trial values are chosen and which metric ranks trials."""

    algorithm: Literal["grid", "random", "optuna"] = Field("random", description="optuna: TPE")
    metric: str = Field("probe/knn_top1", pattern=r"^(train|probe|diag)/[A-Za-z0-9_]+$")
    mode: Literal["max", "min"] = "max"
    seed: int = Field(0, description="seeds the searcher, so the sweep draws the same values again")


class NoScheduler(_Strict):
    """Every trial runs to its last step."""

    type: Literal["none"] = "none"


class ASHA(_Strict):
    """Asynchronous successive halving on search.metric: weak trials stop at rungs."""

    type: Literal["asha"]
    grace_period: int = Field(1, ge=1, description="probe evaluations before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="1/reduction_factor of the trials pass each rung")
    max_t: int | None = Field(None, ge=1, description="probe evaluations of a full trial; None: computed from "
                                                      "optim.steps and probe.every")


class PBT(_Strict):
    """Population based training: a lagging trial copies a leader's checkpoint and perturbs values."""

    type: Literal["pbt"]
    perturbation_interval: int = Field(ge=1, description="probe evaluations between exploit/explore steps")
    hyperparam_mutations: list[str] = Field(min_length=1, description="search_space fields PBT may change mid-run")


Scheduler = Annotated[NoScheduler | ASHA | PBT, Field(discriminator="type")]


class Budget(_Strict):
    num_samples: int | None = Field(None, ge=1, le=MAX_TRIALS,
                                    description="total trials; None: one per grid point (algorithm grid)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the cluster can hold")
    time_limit_s: float | None = Field(None, gt=0, description="wall-clock limit of the whole sweep; None: none")


def _count(n: float, noun: str) -> str:
    return f"{n:g} {noun}" + ("" if n == 1 else "s")


# Ray's own processes (GCS, raylet, dashboard and its agents, the Tune driver) while in-trial trials
# train, in cores: measured over the quickstart on a 2-core VM with benchmarks/ray_overhead.py
# --efficiency quickstart (README, Performance).
RAY_RESIDENT_CORES = 0.1


class Resources(_Strict):
    """What one trial asks Ray for: ``workers`` DDP ranks, each with these CPUs and GPUs."""

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    launcher: Literal["auto", "in_trial", "ray_train"] = Field(
        "auto", description="auto: a one-worker trial trains inside its Tune trial's own process (no Ray Train "
                            "controller and worker group to start: seconds instead of about a minute on 2 cores), "
                            "a trial of several workers as a Ray Train run; ray_train: always a Ray Train run")

    @field_validator("launcher")
    @classmethod
    def _one_process(cls, launcher: str, info: ValidationInfo) -> str:
        if launcher == "in_trial" and info.data.get("workers", 1) > 1:
            raise ValueError("in_trial trains in one process: it needs workers: 1 (ray_train or auto for more)")
        return launcher

    def in_trial(self) -> bool:
        """Whether a trial trains inside its Tune trial's process rather than as a Ray Train run."""
        return self.launcher == "in_trial" or (self.launcher == "auto" and self.workers == 1)

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_or_fraction(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):  # Ray shares a GPU between workers but cannot split several
            raise ValueError(f"more than one GPU per worker must be a whole number, got {gpus}")
        return gpus


class MLflow(_Strict):
    experiment: str | None = Field(None, min_length=1, description="None: the sweep's name")
    tracking_uri: str | None = Field(None, description="None: the runner's local store")


class Failure(_Strict):
    # Finite on purpose: Ray's -1 ("retry forever") turns a broken trial into an endless loop.
    max_failures: int = Field(1, ge=0, description="restarts of a failed trial from its last checkpoint")


class SweepSpec(_Strict):
    """A whole sweep file. Build it with ``load_sweep``, which also runs ``check()``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64, description="a slug: the sweep's id")
    base: Base
    search_space: dict[str, Distribution] = Field(min_length=1, description="dotted TrainConfig field -> "
                                                                             "distribution")
    search: Search = Field(default_factory=Search)
    scheduler: Scheduler = Field(default_factory=NoScheduler)
    budget: Budget = Field(default_factory=Budget)
    resources: Resources = Field(default_factory=Resources)
    mlflow: MLflow = Field(default_factory=MLflow)
    storage: Path = Field(Path("runs/sweeps"), description="where Ray Tune keeps trials and checkpoints")
    failure: Failure = Field(default_factory=Failure)

    @field_validator("storage")
    @classmethod
    def _a_directory(cls, storage: Path) -> Path:
        # Checked here, not when Tune first writes to it minutes later: a storage path that is (or lies
        # under) an existing file cannot hold the sweep's directory.
        for part in (storage, *storage.parents):
            if part.exists():
                if not part.is_dir():
                    raise ValueError(f"{part} is a file, not a directory; choose a directory for the sweep's trials")
                break
        return storage

    @field_validator("scheduler", mode="before")
    @classmethod
    def _type_shorthand(cls, scheduler: Any) -> Any:
        return {"type": scheduler} if isinstance(scheduler, str) else scheduler  # `scheduler: asha`

    @cached_property
    def base_config(self) -> TrainConfig:
        """The resolved base TrainConfig; ConfigError names the field."""
        try:
            return self._build_base()
        except ValidationError as err:
            raise ConfigError(f"invalid base configuration: {describe(err)}") from None

    def _build_base(self) -> TrainConfig:
        start = build_config(self.base.preset) if self.base.config is None else load_config(self.base.config)
        return with_fields(start, self.base.overrides)

    def trial_config(self, params: Mapping[str, Any]) -> TrainConfig:
        """The base config with a trial's dotted values set, e.g. ``{"loss.teacher_temp": 0.05}``."""
        for path in params:
            field_type(path)  # ConfigError naming an unknown field
        try:
            return with_fields(self.base_config, params)
        except ValidationError as err:
            raise ConfigError(f"invalid trial values {dict(params)}: {describe(err)}") from None

    def grid_size(self) -> int:
        """Number of points of the full grid: the product of the grid dimensions' lengths (1 if none)."""
        size = 1
        for dist in self.search_space.values():
            if dist.kind == "grid":
                size *= len(dist.args)
        return size

    def num_trials(self) -> int:
        return self.budget.num_samples or self.grid_size()

    def repeats(self) -> int:
        """Trials per grid point: what Tune calls ``num_samples``."""
        return self.num_trials() // self.grid_size()

    def reports_per_trial(self) -> int:
        """Probe evaluations (scheduler reports) of a full trial, as the trainer makes them."""
        return probes_per_run(self.base_config)

    def core_sharing(self, cpus: int) -> str:
        """How the trials share a machine of ``cpus`` cores, for ``capi sweep validate``'s summary."""
        res = self.resources
        threads = self.base_config.run.threads or max(1, int(res.cpus_per_worker))
        at_once = self.budget.max_concurrent_trials or max(1, int(cpus // (res.workers * res.cpus_per_worker)))
        used = at_once * res.workers * threads
        where = ("trains in its Tune trial's process" if res.in_trial()
                 else f"is a Ray Train run of {_count(res.workers, 'worker')}")
        per = f"{_count(threads, 'torch thread')}" + (" per worker" if res.workers > 1 else "")
        text = (f"cores: {_count(at_once, 'trial')} at a time, each {where} with {per}: "
                f"{_count(used, 'thread')} on this machine's {_count(cpus, 'core')}")
        if used > cpus:
            return text + "; oversubscribed: lower max_concurrent_trials or run.threads, or the trials slow each other"
        # Ray's own processes (GCS, raylet, dashboard, the Tune driver) take a share beside the trainers.
        # It is left to them by sharing, not by a thread fewer: on 2 cores that share is a tenth of a
        # core or so (README, Performance), while a thread fewer would take half of a 2-thread trainer.
        return text + f"; Ray's own processes share them (about {RAY_RESIDENT_CORES:g} core while trials train, " \
                      "measured on 2 cores)"

    def check(self) -> list[Problem]:
        """Combinations that pass the schema but cannot work (or probably are mistakes)."""
        problems = list(_check_base(self))
        if any(not p.warning for p in problems):
            return problems  # the remaining checks build on the base config
        for check in (_check_search_space, _check_algorithm, _check_metric, _check_budget, _check_scheduler,
                      _check_resources):
            problems += check(self)
        return problems

    def why_not(self, values: Mapping[str, Any]) -> str | None:
        """Why a trial with these dotted values (valid field paths) cannot run; None if it can."""
        try:
            config = with_fields(self.base_config, values)
        except ValidationError as err:
            return describe(err)
        # The trainer splits the global batch over ranks and accumulation steps (capi_core.train).
        split = self.resources.workers * config.optim.grad_accumulation
        if config.optim.batch_size % split:
            return (f"optim.batch_size {config.optim.batch_size} is not divisible by resources.workers x "
                    f"optim.grad_accumulation ({self.resources.workers} x {config.optim.grad_accumulation})")
        return None


# ------------------------------------------------------------------------------- TrainConfig paths


def _is_integer(annotation: Any) -> bool:
    types = get_args(annotation) or (annotation,)
    return int in types and float not in types


# ------------------------------------------------------------------------------------------ checks


def _check_base(spec: SweepSpec) -> Iterator[Problem]:
    overrides = ("base", "overrides")
    bad_path = False
    for path in spec.base.overrides:
        try:
            field_type(path)
        except ConfigError as err:
            bad_path = True
            yield Problem(overrides + tuple(path.split(".")), str(err))
    if bad_path:
        return
    try:
        spec._build_base()
    except ConfigError as err:  # the preset or the config file itself
        yield Problem(("base", "config" if spec.base.config else "preset"), str(err))
        return
    except ValidationError as err:
        for e in err.errors():
            yield Problem(overrides + tuple(e["loc"]), error_message(e))
        return
    why = spec.why_not({})
    if why:
        yield Problem(("resources", "workers"), why)


def _check_search_space(spec: SweepSpec) -> Iterator[Problem]:
    usable: dict[str, Distribution] = {}
    for path, dist in spec.search_space.items():
        loc = ("search_space", path)
        try:
            annotation = field_type(path)
        except ConfigError as err:
            yield Problem(loc, str(err))
            continue
        if dist.kind in ("uniform", "loguniform") and _is_integer(annotation):
            yield Problem(loc + (dist.kind,), f"{path} is an integer; use randint, choice or grid")
            continue
        ok = True
        for i, value in dist.candidates():
            why = spec.why_not({path: value})
            if why:
                ok = False
                yield Problem(loc + (dist.kind, i), f"{value!r} is invalid for {path}: {why}")
                if dist.kind == "randint":
                    break  # one offending integer of a range says it all
        if ok:
            usable[path] = dist
    # Values fine alone can clash with another dimension's (rope with 6 registers, a ratio and a
    # ratio_end that leave no visible patch). Pairs catch these at a cost of sum(|a| x |b|) builds;
    # a clash among three searched fields would surface only when its trial starts.
    for (path_a, a), (path_b, b) in itertools.combinations(usable.items(), 2):
        for (_, va), (_, vb) in itertools.product(a.extremes(), b.extremes()):
            why = spec.why_not({path_a: va, path_b: vb})
            if why:
                yield Problem(("search_space", path_b), f"{path_a}={va!r} with {path_b}={vb!r} cannot run: {why}")
                break


def _check_algorithm(spec: SweepSpec) -> Iterator[Problem]:
    algorithm = spec.search.algorithm
    for path, dist in spec.search_space.items():
        if algorithm == "grid" and dist.kind != "grid":
            yield Problem(("search_space", path, dist.kind), f"search.algorithm grid enumerates grid dimensions only; "
                                                             f"make {path} a grid or use algorithm random or optuna")
        if algorithm == "optuna" and dist.kind == "grid":
            yield Problem(("search_space", path, "grid"), f"search.algorithm optuna chooses every value itself; "
                                                          f"use choice instead of grid for {path}")
    if spec.search.mode == "max" and spec.search.metric.endswith("loss"):
        yield Problem(("search", "mode"), f"search.mode max on {spec.search.metric}: the sweep would favour the "
                                          f"highest loss", warning=True)


def _check_metric(spec: SweepSpec) -> Iterator[Problem]:
    # Tune ranks trials, and ASHA and PBT compare them, on this metric in each probe report; a metric
    # no report carries validates as a pattern but leaves every trial unscored.
    metric = spec.search.metric
    if metric not in REPORTED_METRICS:
        close = difflib.get_close_matches(metric, REPORTED_METRICS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        yield Problem(("search", "metric"), f"trials never report {metric!r}; {hint}they report "
                                            f"{', '.join(REPORTED_METRICS)}")


def _check_budget(spec: SweepSpec) -> Iterator[Problem]:
    loc, n, size = ("budget", "num_samples"), spec.budget.num_samples, spec.grid_size()
    if size > MAX_TRIALS:
        yield Problem(("search_space",), f"the grid has {size:,} points, above the limit of {MAX_TRIALS:,} trials "
                                         f"of one sweep; shrink the grid or sample (choice, uniform, randint)")
        return
    if n is None and spec.search.algorithm != "grid":
        yield Problem(("search", "algorithm"), f"search.algorithm {spec.search.algorithm} needs budget.num_samples, "
                                               f"the number of trials")
        return
    if n is not None and n < size:
        yield Problem(loc, f"the search_space grid has {size} points but budget.num_samples is {n}; "
                           f"raise budget.num_samples to {size} or shrink the grid")
        return
    if n is not None and n % size:
        yield Problem(loc, f"budget.num_samples {n} is not a multiple of the search_space grid's {size} points "
                           f"(each point runs num_samples / {size} times)")
        return
    if spec.search.algorithm == "grid" and spec.repeats() > 1:
        yield Problem(loc, f"each grid point runs {spec.repeats()} times with the same values; put run.seed "
                           f"in the grid to vary seeds", warning=True)
    concurrent = spec.budget.max_concurrent_trials
    if concurrent is not None and concurrent > spec.num_trials():
        yield Problem(("budget", "max_concurrent_trials"), f"{concurrent} exceeds the sweep's {spec.num_trials()} "
                                                           f"trials; at most {spec.num_trials()} run at once",
                      warning=True)


def _check_scheduler(spec: SweepSpec) -> Iterator[Problem]:
    sched = spec.scheduler
    if isinstance(sched, NoScheduler):
        return
    if isinstance(sched, PBT):
        yield from _check_mutations(spec, sched)
    config = spec.base_config
    steps, every, log_every = config.optim.steps, config.probe.every, config.run.log_every
    if not 0 < every < steps:
        yield Problem(("scheduler", "type"), f"scheduler {sched.type} compares trials at periodic probe reports, "
                                             f"but base probe.every is {every} with optim.steps {steps}; set "
                                             f"base.overrides probe.every between 1 and {steps - 1}")
        return
    if every % log_every:  # the trainer probes only at log steps
        yield Problem(("base", "overrides", "probe", "every"), f"probe.every {every} is not a multiple of "
                                                                f"run.log_every {log_every}; the trainer probes only "
                                                                f"at log steps")
        return
    for path in ("optim.steps", "probe.every", "run.log_every"):
        if path in spec.search_space:
            yield Problem(("search_space", path), f"{path} cannot be searched with scheduler {sched.type}: trials "
                                                  f"must report at the same steps to be compared")
    reports = spec.reports_per_trial()
    if isinstance(sched, ASHA):
        yield from _check_asha(sched, reports, f"optim.steps {steps} / probe.every {every}")
    else:
        yield from _check_pbt(spec, sched, reports)


def _check_asha(sched: ASHA, reports: int, how: str) -> Iterator[Problem]:
    if sched.max_t is not None and sched.max_t > reports:
        yield Problem(("scheduler", "max_t"), f"max_t {sched.max_t} exceeds the {reports} probe evaluations a "
                                              f"trial makes ({how})")
    max_t = sched.max_t or reports
    if sched.grace_period >= max_t:
        yield Problem(("scheduler", "grace_period"), f"grace_period {sched.grace_period} must be below max_t {max_t} "
                                                     f"(probe evaluations), or ASHA never stops a trial")


def _check_pbt(spec: SweepSpec, sched: PBT, reports: int) -> Iterator[Problem]:
    if sched.perturbation_interval >= reports:
        yield Problem(("scheduler", "perturbation_interval"), f"a trial makes only {reports} probe evaluations, so "
                                                              f"PBT would never perturb with interval "
                                                              f"{sched.perturbation_interval}")
    run = spec.base_config.run
    interval = sched.perturbation_interval * probe_interval(spec.base_config)
    if not run.checkpoint_every or interval % run.checkpoint_every:
        yield Problem(("base", "overrides", "run", "checkpoint_every"),
                      f"PBT copies a donor's checkpoint at every perturbation ({interval} steps); set "
                      f"run.checkpoint_every to a divisor of {interval}, got {run.checkpoint_every}")
        return
    # A donor keeps training while PBT exploits it; if retention prunes the checkpoint PBT picked,
    # the copying trial fails (Ray 2.60: "Could not recover from checkpoint as it does not exist on storage
    # anymore").
    written = checkpoints_per_run(spec.base_config)
    if run.keep_checkpoints < written:
        yield Problem(("base", "overrides", "run", "keep_checkpoints"),
                      f"PBT with run.keep_checkpoints {run.keep_checkpoints} can delete a donor's checkpoint "
                      f"before it is copied; keep all {written} a trial writes")


def _check_mutations(spec: SweepSpec, sched: PBT) -> Iterator[Problem]:
    for i, path in enumerate(sched.hyperparam_mutations):
        loc = ("scheduler", "hyperparam_mutations", i)
        if path not in spec.search_space:
            yield Problem(loc, f"{path!r} is not in search_space, which gives PBT the values to mutate to")
        elif path.startswith("model.") or path == "clustering.num_clusters":
            yield Problem(loc, f"{path} changes parameter shapes, so a trial cannot load its donor's checkpoint")


def _check_resources(spec: SweepSpec) -> Iterator[Problem]:
    res, run = spec.resources, spec.base_config.run
    if res.gpus_per_worker > 0 and run.device == "cpu":
        yield Problem(("resources", "gpus_per_worker"), "trials ask for GPUs but base run.device is cpu")
    if res.gpus_per_worker == 0 and run.device == "cuda":
        yield Problem(("resources", "gpus_per_worker"), "base run.device is cuda but trials ask for no GPU")
    if run.threads and run.threads > res.cpus_per_worker:
        yield Problem(("resources", "cpus_per_worker"), f"run.threads {run.threads} exceeds the "
                                                        f"{res.cpus_per_worker:g} CPUs a worker gets", warning=True)


# ------------------------------------------------------------------------------- file and lines


def load_sweep(path: str | Path) -> SweepSpec:
    """Read, validate and check a sweep file. Raises SweepSpecError listing every problem with its
    line; emits a SweepSpecWarning for each probable mistake that does not stop the sweep."""
    path = Path(path)
    try:
        text = bounded_yaml.read_limited(path)
    except (OSError, UnicodeDecodeError, bounded_yaml.YamlLimitError) as err:
        raise SweepSpecError(path, [f"{path}: cannot read: {err}"]) from None
    data, lines, problems = _parse_yaml(text, path)
    if data is None:
        raise SweepSpecError(path, [f"{path}:1: the file is empty; a sweep needs name, base and search_space"])
    if not isinstance(data, dict):
        raise SweepSpecError(path, [f"{path}:{lines[()]}: a sweep file must be a mapping (name, base, "
                                    f"search_space, ...), not a {type(data).__name__}"])
    spec = None
    try:
        spec = SweepSpec.model_validate(data, context={"root": path.parent})
    except ValidationError as err:
        problems += [_from_pydantic(e) for e in err.errors()]
    if spec is not None:
        problems += spec.check()
    located = sorted(((_locate(p, data, lines), p) for p in problems), key=lambda item: item[0])
    errors = [f"{path}:{line}: {field}: {p.message}" for (line, field), p in located if not p.warning]
    if errors:
        raise SweepSpecError(path, errors)
    for (line, field), p in located:
        warnings.warn(SweepSpecWarning(f"{path}:{line}: {field}: {p.message}"), stacklevel=2)
    return spec


def _parse_yaml(text: str, path: Path) -> tuple[Any, dict[tuple, int], list[Problem]]:
    """Safe-load YAML and record the 1-based line of every key and list item, by its path in the
    document; duplicate keys (which YAML resolves silently to the last) come back as problems."""
    loader = yaml.SafeLoader(text)
    try:
        node = bounded_yaml.compose(loader)
        data = loader.construct_document(node) if node is not None else None
    except bounded_yaml.YamlLimitError as err:
        raise SweepSpecError(path, [f"{path}:1: {err}"]) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        context = f" ({err.context} on line {err.context_mark.line + 1})" if err.context and err.context_mark else ""
        raise SweepSpecError(path, [f"{path}{line}: YAML syntax error: {err.problem}{context}"]) from None
    except yaml.YAMLError as err:
        raise SweepSpecError(path, [f"{path}: YAML error: {err}"]) from None
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}
    problems: list[Problem] = []
    if node is not None:
        lines[()] = node.start_mark.line + 1
        _record_lines(node, (), lines, problems, set())
    return data, lines, problems


def _record_lines(node: yaml.Node, loc: tuple, lines: dict[tuple, int], problems: list[Problem],
                  seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already walked (also stops recursive anchors)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a complex key; the schema rejects it at the parent's line
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in keys:
                problems.append(Problem(loc + (key,), "duplicate key; YAML would silently keep only the last"))
            keys.add(key)
            lines[loc + (key,)] = line
            if "." in key:  # a dotted key such as `optim.lr:` also locates errors about optim.lr
                lines.setdefault(loc + tuple(key.split(".")), line)
            _record_lines(value_node, loc + (key,), lines, problems, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            line = item.start_mark.line + 1
            lines[loc + (i,)] = line
            if isinstance(item, yaml.ScalarNode) and "=" in item.value:  # an override item `- optim.lr=1e-3`
                lines.setdefault(loc + tuple(item.value.split("=", 1)[0].strip().split(".")), line)
            _record_lines(item, loc + (i,), lines, problems, seen)


def _from_pydantic(error: dict[str, Any]) -> Problem:
    loc = tuple(p for p in error["loc"] if p != "[key]")  # pydantic's marker for an invalid dict key
    msg = error_message(error)
    if error["type"] == "union_tag_invalid":
        loc += ("type",)  # point at the `type:` line rather than the section
        msg = f"unknown {loc[-2]} type {error['ctx']['tag']!r}; choose one of {error['ctx']['expected_tags']}"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _SPEC_KEYS, n=1, cutoff=0.75)
        msg = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
    elif error["type"] not in ("value_error", "missing") and isinstance(error.get("input"), (str, int, float)):
        msg += f" (got {error['input']!r})"
    return Problem(loc, msg)


def _locate(problem: Problem, data: Any, lines: dict[tuple, int]) -> tuple[int, str]:
    """``(line, printable field)`` for a problem: the line of the deepest part of its loc present in
    the file, so a missing or unknown field points at its section."""
    kept: list[str | int] = []
    node = data
    for part in problem.loc:
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue  # the tag pydantic adds to locs inside a discriminated union (scheduler)
        kept.append(part)
        node = node.get(part) if isinstance(node, dict) else None
    line = next((lines[tuple(kept[:i])] for i in range(len(kept), -1, -1) if tuple(kept[:i]) in lines), 1)
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in kept).lstrip(".")
    return line, field or "sweep"


def _all_keys(model: type[BaseModel]) -> set[str]:
    keys = set(model.model_fields)
    for field in model.model_fields.values():
        for candidate in get_args(field.annotation) + (field.annotation,):
            for arg in get_args(candidate) + (candidate,):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    keys |= _all_keys(arg)
    return keys


# Every key a sweep file may use, for "did you mean" on unknown keys.
_SPEC_KEYS = sorted(_all_keys(SweepSpec) | set(DISTRIBUTIONS))
