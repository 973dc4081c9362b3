"""One CAPI training run as a Ray Train (V2) run: DDP workers, checkpoints in Ray storage, MLflow.

Every worker runs capi_core's unchanged Trainer. Ray sets up torch.distributed (gloo on CPU,
NCCL on GPU) before the worker function starts, so the Trainer sees an initialised process group:
DDP gradients, rank-disjoint data shards and the all-reduced Sinkhorn-Knopp follow from that.

Checkpoints: the Trainer writes them to a worker-local scratch directory; ``RayReport`` hands each
to ``ray.train.report``, which copies it to ``<storage>/<run.name>/checkpoints/step-N`` and deletes
the scratch copy; Ray keeps the newest ``run.keep_checkpoints``. With the default storage
(``run.output_dir``) the run directory is laid out as a standalone run's (checkpoints/, metrics.jsonl),
so ``capi eval`` and a standalone resume read it alike.

Resume: a worker failure restarts the worker group (``max_failures`` times) from the latest
reported checkpoint; the same command run again (same run.name and storage) resumes from it too.
The MLflow run id travels in every checkpoint, so all of this lands in one MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from ray.train import TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from capi_core.atomic import atomic_write_text
from capi_core.checkpoint import checkpoint_name, list_checkpoints
from capi_core.checkpoint_dirs import METRICS_FILE
from capi_core.config import TrainConfig, with_fields
from capi_core.data import resolve_dataset
from capi_core.errors import CapiError
from capi_core.eval.online_probe import PROBE_METRIC
from capi_core.train import Callback, JsonlMetrics, Trainer
from orchestrator.cluster import init_local_ray, join_cluster
from orchestrator.progress import LogLines, say
from orchestrator.ray_internals import SNAPSHOT, quiet_report_logs, report_poll_interval_s
from orchestrator.tracking import (MlflowTracking, TrackingError, TrackingOptions, best_effort, check_reachable,
                                   end_run, open_run, resolve_uri, run_id_in_checkpoints)

STARTUP_FILE = "startup.json"  # StartupRecord


class TrainingError(CapiError, RuntimeError):
    """A distributed run could not start or failed for good; the message says why."""


class ScalingOptions(BaseModel):
    """How one run spreads over a Ray cluster. Model and optimisation settings live in TrainConfig."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(2, ge=1, description="Ray Train workers, one DDP rank each")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker; also its torch threads")
    use_gpu: bool | None = Field(None, description="one GPU per worker; None: if run.device is cuda, or auto "
                                                   "and the cluster has a GPU per worker")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint")
    storage_path: str | None = Field(None, description="Ray Train storage: a local or shared path, or a "
                                                       "pyarrow URI (s3://...); None: run.output_dir")


class WorkerTracking(BaseModel):
    """Where rank 0 logs: the MLflow store, the run's settings and the run the driver opened, if any."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(description="resolved tracking URI")
    options: TrackingOptions
    run_id: str | None = Field(None, description="None: rank 0 opens the run (or finds it in its checkpoint)")


class WorkerLoop(BaseModel):
    """What crosses into every Ray Train worker, as ``train_loop_config``.

    It travels as JSON (``model_dump(mode="json")``) and is validated again in the worker
    (``train_loop``), so both sides of the boundary agree on its fields and types.
    """

    model_config = ConfigDict(extra="forbid")

    config: TrainConfig = Field(description="the run's config, local paths absolute")
    run_path: str = Field(description="where Ray keeps the run: <storage>/<run.name>, a path or a URI")
    local_run_dir: bool = Field(description="run_path is a local directory: metrics.jsonl is written there")
    fallback_resume: str | None = Field(None, description="a standalone run's directory to resume from when "
                                                          "Ray holds no checkpoint of the run")
    tracking: WorkerTracking | None = Field(None, description="None: no MLflow")


@dataclass
class TrainResult:
    path: str  # the Ray run directory: <storage>/<run.name>
    checkpoint: str | None  # the final checkpoint
    metrics: dict[str, Any]  # rank 0's metrics reported with the final checkpoint
    mlflow_run_id: str | None


# --------------------------------------------------------------------------------- worker side
class RayReport(Callback):
    """Reports metrics at log steps and every checkpoint to Ray Train.

    Every rank calls ``ray.train.report`` (it is a barrier); rank 0 passes the checkpoint, which Ray
    copies to ``checkpoints/step-N`` in its storage and then deletes from the worker's scratch.

    Ray's controller takes one report per poll (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), and a
    report made before the previous one was taken blocks training until the next poll. So
    metrics-only reports are spaced at least one poll interval apart, timed by rank 0 and broadcast
    so that every rank agrees; probe results are always reported (sweep schedulers act on them).
    Each report carries ``step``: schedulers should count steps, not reports.
    """

    def __init__(self):
        self.min_interval_s = report_poll_interval_s()
        self._last = -math.inf

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if PROBE_METRIC in metrics or self._due(trainer):
            ray.train.report({"step": step, **metrics})
            self._last = time.monotonic()

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path | None, metrics: dict[str, float]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(path) if path is not None else None
        ray.train.report({"step": step, **metrics}, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoints/{checkpoint_name(step)}",
                         delete_local_checkpoint_after_upload=True)
        self._last = time.monotonic()

    def _due(self, trainer: Trainer) -> bool:
        due = torch.tensor([time.monotonic() - self._last >= self.min_interval_s], dtype=torch.uint8,
                           device=trainer.device)
        if trainer.distributed:
            dist.broadcast(due, src=0)
        return bool(due.item())


class StartupRecord(Callback):
    """Writes ``<run dir>/startup.json`` on rank 0 at the run's first log step: when the process
    that trains entered its training function, built the Trainer, opened the data and logged
    (Unix seconds), so that a sweep's start-up can be split into its parts afterwards
    (``benchmarks/ray_overhead.py``), and which process trained (host and pid). Only a run's first
    start is recorded; a resume keeps it."""

    def __init__(self, run_dir: Path, entered: float):
        self.path = Path(run_dir) / STARTUP_FILE
        self.times = {"entered": entered, "pid": os.getpid(), "host": socket.gethostname()}
        self._written = self.path.exists()  # a resumed run keeps its first start's record

    def built(self) -> None:
        self.times["built"] = time.time()

    def on_start(self, trainer: Trainer) -> None:
        self.times.update(data_open=time.time(), start_step=trainer.step)

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if not trainer.is_main or self._written:
            return
        self._written = True
        self.times.update(first_log=time.time(), first_log_step=step)
        best_effort(lambda: atomic_write_text(self.path, json.dumps(self.times)), f"could not write {self.path}")


# Where workers keep their Trainer's output until Ray Train persists it: one directory per worker
# process, named "<pid>-<run name>-<random>", under a root per user (another user's workers may share /tmp).
SCRATCH_ROOT = Path(tempfile.gettempdir()) / f"capi-scratch-{os.getuid()}"


def scratch_dir(run_name: str) -> Path:
    """A new scratch directory for this worker process, after removing those of worker processes that
    are gone. A worker killed by a signal (a trial its scheduler stopped, a restart after a failure)
    cannot run its own cleanup, and its directory may hold a local checkpoint: hundreds of MB for the
    paper's models, on every stopped trial of a long sweep."""
    SCRATCH_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in SCRATCH_ROOT.iterdir():
        pid = old.name.partition("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{run_name}-", dir=SCRATCH_ROOT))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def train_loop(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs: one rank of the CAPI Trainer.

    ``loop_config``: a ``WorkerLoop`` as JSON (the config, the run directory, a standalone run to
    fall back to, the MLflow settings).
    """
    entered = time.time()
    quiet_report_logs()  # the console keeps rank 0's progress lines
    loop = WorkerLoop.model_validate(loop_config)
    config = loop.config
    ctx = ray.train.get_context()
    if config.run.device == "cuda":
        torch.cuda.set_device(get_device())  # so the Trainer's "cuda" is this worker's GPU
    # A built-in dataset is imported on first use: once per node, before the other ranks read it.
    if ctx.get_local_rank() == 0:
        resolve_dataset(config.data.dataset, config.data.cache_dir)
    dist.barrier()

    scratch = scratch_dir(config.run.name)
    try:
        worker_config = with_fields(config, {"run.output_dir": scratch})
        run_path = loop.run_path
        startup = StartupRecord(Path(run_path), entered)
        callbacks: list[Callback] = [RayReport(), LogLines()]
        if loop.local_run_dir:
            callbacks += [JsonlMetrics(Path(run_path) / METRICS_FILE), startup]
        if loop.tracking is not None:
            t = loop.tracking
            callbacks.append(MlflowTracking(t.uri, t.options, run_id=t.run_id, config=config,
                                            checkpoint_uri=lambda p: f"{run_path}/checkpoints/{Path(p).name}"))
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as resume:
                trainer = Trainer(worker_config, callbacks, resume=resume)
        else:
            trainer = Trainer(worker_config, callbacks, resume=loop.fallback_resume)
        startup.built()
        if trainer.step >= config.optim.steps:
            if trainer.is_main:
                say(f"run {config.run.name} is already complete (step {trainer.step})")
            return
        trainer.fit()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------------- driver side
def absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with local paths made absolute: Ray workers run in their own working directories."""
    data = config.data
    updates: dict[str, Any] = {"run.output_dir": config.run.output_dir.expanduser().resolve()}
    if Path(data.dataset).expanduser().exists():
        updates["data.dataset"] = str(Path(data.dataset).expanduser().resolve())
    if data.cache_dir is not None:
        updates["data.cache_dir"] = data.cache_dir.expanduser().resolve()
    return with_fields(config, updates)


def has_state(run_dir: Path) -> bool:
    """Whether a run directory holds a run to continue: Ray Train's record of its checkpoints, or a
    checkpoint of a standalone run."""
    return (run_dir / SNAPSHOT).exists() or bool(list_checkpoints(run_dir))


def run_path(config: TrainConfig, scaling: ScalingOptions) -> str:
    """Where Ray Train keeps this run: ``<storage>/<run.name>``."""
    storage = scaling.storage_path or str(config.run.output_dir.expanduser().resolve())
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return f"{storage.rstrip('/')}/{config.run.name}"


def placed_config(config: TrainConfig, scaling: ScalingOptions) -> TrainConfig:
    """The config as one worker of ``scaling`` runs it: on a GPU if it holds one, with as many torch
    threads as it holds CPUs unless ``run.threads`` names them."""
    use_gpu = scaling.use_gpu if scaling.use_gpu is not None else config.run.device == "cuda"
    return with_fields(config, {"run.device": "cuda" if use_gpu else "cpu",
                                "run.threads": config.run.threads or max(1, int(scaling.cpus_per_worker))})


def build_trainer(config: TrainConfig, scaling: ScalingOptions, *, tracking_uri: str | None = None,
                  tracking: TrackingOptions | None = None, mlflow_run_id: str | None = None,
                  callbacks: list | None = None):
    """A Ray Train V2 ``TorchTrainer`` for one CAPI run (not started).

    ``config`` should hold absolute paths (``absolute_paths``). ``tracking_uri`` (resolved) turns on
    MLflow logging from rank 0 into ``mlflow_run_id`` (opened beforehand) or a new run.
    ``callbacks``: Ray Train ``UserCallback``s, e.g. Tune's ``TuneReportCallback`` in a sweep.
    """
    config = placed_config(config, scaling)
    use_gpu = config.run.device == "cuda"
    path = run_path(config, scaling)
    local = "://" not in path
    # A run directory with checkpoints but no Ray record of them was started standalone: resume from it.
    fallback = path if local and has_state(Path(path)) and not Path(path, SNAPSHOT).exists() else None
    loop = WorkerLoop(config=config, run_path=path, local_run_dir=local, fallback_resume=fallback,
                      tracking=None if tracking_uri is None else WorkerTracking(
                          uri=tracking_uri, options=tracking or TrackingOptions(), run_id=mlflow_run_id))
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=path.rsplit("/", 1)[0],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
            # Finite limits everywhere: a run that cannot get its workers fails instead of waiting.
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures, controller_failure_limit=1),
            callbacks=callbacks,
        ),
    )


def describe_failure(err: BaseException) -> str:
    """One line per failed rank (or the controller's error), without Ray's wrapping tracebacks."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        return "\n".join(f"rank {rank}: {error_summary(e)}" for rank, e in sorted(failures.items()))
    cause = getattr(err, "controller_failure", None)
    return error_summary(cause if cause is not None else err)


def error_summary(err: BaseException) -> str:
    """``Type: first line of the message``: one line for a console, a trial's error, an MLflow run."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def run_distributed(config: TrainConfig, scaling: ScalingOptions | None = None, address: str | None = None,
                    tracking: TrackingOptions | None = None, resume: bool = True) -> TrainResult:
    """Run one CAPI training as a Ray Train run and wait for it.

    ``address``: None starts (or reuses) a local Ray; ``auto`` or ``ray://HOST:PORT`` joins a
    cluster, shipping ``capi_core`` and ``orchestrator`` to it. ``tracking``: MLflow settings, or
    None for no MLflow. ``resume=False`` refuses to reuse a run directory that already has state.
    Raises TrainingError (bad setup, or failed after ``max_failures`` restarts) before or after
    training; the MLflow run is then marked FAILED.
    """
    scaling = scaling or ScalingOptions()
    config = absolute_paths(config)
    path = run_path(config, scaling)
    local = "://" not in path
    if local and not resume and has_state(Path(path)):
        raise TrainingError(f"{path} already holds a run; choose another run.name, remove it, or resume")

    if address is None:
        check_dataset(config)  # the same machine: fail here, not in every worker restart
    uri = run_id = None
    if tracking is not None:
        uri = resolve_uri(tracking.uri)
        try:
            check_reachable(uri)
        except TrackingError as err:
            raise TrainingError(str(err)) from None

    started = False
    if not ray.is_initialized():
        if address is None:
            init_local_ray()
        else:
            join_cluster(address)
        started = True
    try:
        if scaling.use_gpu is None:
            gpus = ray.cluster_resources().get("GPU", 0)
            use_gpu = config.run.device == "cuda" or (config.run.device == "auto" and gpus >= scaling.workers)
            scaling = scaling.model_copy(update={"use_gpu": use_gpu})
        _check_resources(scaling, strict=address is None)
        # Opened here, so that a worker restart before the first checkpoint keeps the same run; on a
        # resume the latest checkpoint names the run to continue. Remote storage is not read here:
        # then rank 0 finds the run id in the checkpoint it resumes from, or opens the run itself.
        if tracking is not None and (local or not resume):
            saved = run_id_in_checkpoints(Path(path)) if resume else None
            run_id = open_run(uri, config, tracking, saved)
        trainer = build_trainer(config, scaling, tracking_uri=uri, tracking=tracking, mlflow_run_id=run_id)
        try:
            result = trainer.fit()
        except TrainingFailedError as err:
            message = describe_failure(err)
            _end_run(uri, run_id, "FAILED", message)
            raise TrainingError(f"training failed after {scaling.max_failures} restart(s):\n{message}") from None
        except BaseException as err:  # interrupted, or Ray itself failed
            _end_run(uri, run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", repr(err))
            raise
        _end_run(uri, run_id, "FINISHED")  # rank 0 did, unless the run was already complete
    finally:
        if started:
            ray.shutdown()
    return TrainResult(path=path, checkpoint=result.checkpoint.path if result.checkpoint else None,
                       metrics=dict(result.metrics or {}), mlflow_run_id=run_id)


def _end_run(uri: str | None, run_id: str | None, status: str, error: str | None = None) -> None:
    """Close the MLflow run; a tracking failure is reported, not raised over the training's outcome."""
    if run_id is not None:
        best_effort(lambda: end_run(uri, run_id, status, error), f"could not mark MLflow run {run_id} {status}")


def check_dataset(config: TrainConfig) -> None:
    """TrainingError naming ``data.dataset`` when the run's dataset is missing or unreadable here."""
    try:
        resolve_dataset(config.data.dataset, config.data.cache_dir)
    except (ValueError, OSError) as err:
        raise TrainingError(f"data.dataset: {err}") from None


def _check_resources(scaling: ScalingOptions, strict: bool) -> None:
    """Refuse a run the (local) cluster can never place, instead of letting Ray wait for it."""
    have = ray.cluster_resources()
    need = {"CPU": scaling.workers * scaling.cpus_per_worker, **({"GPU": scaling.workers} if scaling.use_gpu else {})}
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if short:
        text = ", ".join(f"{need:g} {k} (cluster has {got:g})" for k, (need, got) in short.items())
        if strict:
            raise TrainingError(f"{scaling.workers} workers need {text}; lower --workers or cpus per worker")
        print(f"warning: {scaling.workers} workers need {text}; waiting for the cluster to scale up",
              file=sys.stderr)
