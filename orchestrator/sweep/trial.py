"""One trial of a sweep: a CAPI run inside a Ray Tune trial function, in that process or as a Ray Train run.

**In the trial's process** (``resources.launcher: auto`` with one worker, the default): the trial
function trains capi_core's Trainer itself and reports its probe results with ``tune.report``. Its
Tune actor holds the trial's CPUs (and GPU); actors are reused from one trial to the next, so a
trial's start-up is the Trainer's own (model, data, first step) instead of a Ray Train controller,
a worker group and a process group per trial: on 2 cores about a minute per trial measured before.
Checkpoints, metrics.jsonl and the MLflow child run are written as a standalone run writes them, in
the trial's run directory; a restart (Tune's ``failure.max_failures``, or ``capi sweep resume``)
resumes from the newest checkpoint there.

**As a Ray Train run** (several workers, or ``launcher: ray_train``): the Tune + Train V2 pattern of
Ray's docs (Train V2's ``TorchTrainer`` is not a Tune trainable, and ``Tuner(trainer)`` is deprecated
since Train V2 became the default): every trial is a Tune *function*
that builds the trial's TrainConfig and ``fit()``s a ``TorchTrainer`` (``orchestrator.train.build_trainer``);
a ``TuneReportCallback`` inside Train forwards rank 0's probe reports to Tune, where the searcher and
scheduler see them. The trial function itself takes a token 0.01 CPU (it only waits); Train's workers
hold the trial's resources. Each trial logs into its own MLflow child run, found again by its trial
id, so retries and resumes append to it.

PBT needs Tune-level checkpoints, which Train-in-Tune does not produce (``TuneReportCallback``
forwards rank 0's metrics and a ``checkpoint_path``, but no Tune checkpoint). Under PBT the
trial function therefore reports to Tune itself: it runs the Train run in a thread, receives the
probe reports through its own queue and reports each with a small Tune checkpoint that points at
the Train checkpoint of that step. When PBT makes a trial exploit a donor, the trial starts a new
Train run (``<sweep>-<trial>-from-<donor>-<step>``) seeded with a copy of the donor's checkpoint,
logging on into the trial's child run (its ``capi.pbt_exploits`` tag lists the donors). Limits: every
exploit restarts a Train worker group (seconds on a CPU, more with GPUs), Train checkpoints are copied
per exploit, and donor checkpoints must outlive retention (the sweep file check demands
``run.keep_checkpoints`` large enough, since Ray's PBT fails a trial whose donor checkpoint retention
has already deleted).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.train import TrainingFailedError
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.util.queue import Queue

from capi_core.atomic import atomic_directory
from capi_core.cadence import is_checkpoint_step, is_probe_step, probe_evals, probe_interval, probes_per_run
from capi_core.checkpoint import STATE
from capi_core.config import TrainConfig, with_fields
from capi_core.errors import CapiError
from capi_core.train import Callback, JsonlMetrics, Trainer
from orchestrator import tracking as track
from orchestrator.ray_internals import report_queue, set_report_queue
from orchestrator.sweep.spec import SweepSpec
from orchestrator.sweep.storage import PROBE_EVALS, SweepState, final_metrics, trial_run_name
from orchestrator.progress import LogLines
from orchestrator.train import (ScalingOptions, StartupRecord, build_trainer, describe_failure, error_summary,
                                has_state, placed_config, run_path)

POINTER = "train_checkpoint.json"  # the whole content of a PBT Tune checkpoint
TRIAL_FN_CPU = 0.01  # what a trial function holds while its Train run works; it only waits



class ProbeGate:
    """Which of a run's reports Tune sees: one per probe step that carries ``metric``, in step order,
    with the probe count (``PROBE_EVALS``) that schedulers count time in."""

    def __init__(self, metric: str, config: TrainConfig):
        self.metric, self.config = metric, config
        self._last_step = -1

    def item(self, step: int, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """The report for Tune at ``step``, or None if this one is not for Tune."""
        if self.metric not in metrics or step <= self._last_step or not is_probe_step(step, self.config):
            return None
        self._last_step = step
        return {"step": step, **metrics, PROBE_EVALS: probe_evals(step, probe_interval(self.config))}


class ProbeReport(TuneReportCallback):
    """Forwards rank 0's reports at probe steps to Tune, once per step, with the probe count.

    Tune compares trials on these (the scheduler's rungs are probe evaluations); Train's other
    reports (log steps) stay in MLflow. Only reports that carry ``metric`` are forwarded, as Tune
    requires the metric in every result. At a step that also writes a checkpoint, the report that
    carries it is the one forwarded, with its ``checkpoint_path``. ``sink``: a queue of the trial's
    own instead of Tune's (PBT, where the trial function reports with Tune checkpoints itself).
    """

    def __init__(self, metric: str, config: TrainConfig, sink=None):
        super().__init__()
        if sink is not None:
            set_report_queue(self, sink)
        self.config = config
        self.gate = ProbeGate(metric, config)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        report = metrics[0]
        step = int(report.get("step", -1))
        if checkpoint is None and is_checkpoint_step(step, self.config):
            return  # the same step's checkpoint report follows
        item = self.gate.item(step, report)
        if item is None:
            return
        if checkpoint is not None:
            item[CHECKPOINT_PATH_KEY] = checkpoint.path
        report_queue(self).put(item)


class InTrialReport(Callback):
    """The in-trial counterpart of ``ProbeReport``: reports the Trainer's probe results to Tune from
    the trial's own process, once per probe step, with the probe count. At a step that also writes a
    checkpoint the checkpoint's report is the one sent; under PBT it carries a Tune checkpoint that
    points at the Trainer's checkpoint (``report_with_pointer``).

    The last step is reported at the run's end, and this callback must come last: Tune may stop the
    trial at any report (ASHA at ``max_t``, a PBT pause), and ``tune.report`` then ends this thread,
    so everything else the run does at its end (MLflow's final metrics and status) comes first."""

    def __init__(self, metric: str, config: TrainConfig, trial_id: str, pbt: bool):
        self.config, self.trial_id, self.pbt = config, trial_id, pbt
        self.gate = ProbeGate(metric, config)
        self._checkpoint: Path | None = None

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if not is_checkpoint_step(step, self.config):  # else the same step's checkpoint report follows
            self._report(step, metrics, None)

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path | None, metrics: dict[str, float]) -> None:
        self._checkpoint = path
        if step < self.config.optim.steps:
            self._report(step, metrics, path)

    def on_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self._report(step, metrics, self._checkpoint)

    def _report(self, step: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        item = self.gate.item(step, metrics)
        if item is None:
            return
        if self.pbt and checkpoint is not None:
            report_with_pointer(item, self.trial_id, self.config.run.name, str(checkpoint))
        else:
            tune.report(item)


def report_with_pointer(item: dict[str, Any], trial_id: str, run_name: str, checkpoint: str) -> None:
    """``tune.report(item)`` with a Tune checkpoint that is only a pointer to the run's ``checkpoint``
    (PBT restores and exploits by it, ``pbt_lineage``); the weights are not copied."""
    with tempfile.TemporaryDirectory(prefix="capi-pointer-") as tmp:
        pointer = {"trial_id": trial_id, "run_name": run_name, "checkpoint": checkpoint}
        (Path(tmp) / POINTER).write_text(json.dumps(pointer))
        tune.report(item, checkpoint=tune.Checkpoint.from_directory(tmp))


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs besides its values; shipped once through ``tune.with_parameters``."""

    spec: SweepSpec  # portable: absolute paths
    state: SweepState


class TrialError(CapiError, RuntimeError):
    """A trial's training failed after its Train-level restarts; Tune may retry it."""


def scaling_options(spec: SweepSpec):
    res = spec.resources
    return ScalingOptions(workers=res.workers, cpus_per_worker=res.cpus_per_worker,
                          use_gpu=res.gpus_per_worker > 0, max_failures=spec.failure.max_failures)


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What one trial holds while it trains: its Train workers' resources, or its own in the trial's
    process. A GPU worker holds a whole GPU: that is what ``orchestrator.train.build_trainer`` asks
    Ray for, whatever fraction the sweep file names."""
    res = spec.resources
    need = {"CPU": res.workers * res.cpus_per_worker}
    if res.gpus_per_worker:
        need["GPU"] = res.workers * math.ceil(res.gpus_per_worker)
    return need


def trial_function_resources(spec: SweepSpec) -> dict[str, float]:
    """What the trial function's own actor asks Ray for: the whole trial when it trains in that
    process; else a token CPU, since it only waits on its Train run, whose workers hold the
    resources (Ray refuses an empty bundle)."""
    return trial_resources(spec) if spec.resources.in_trial() else {"CPU": TRIAL_FN_CPU}


def trial_config(spec: SweepSpec, params: dict[str, Any], trial_id: str) -> TrainConfig:
    """The trial's TrainConfig: the sweep's values, run named ``<sweep>-<trial id>`` (stable across restarts)."""
    config = spec.trial_config({path: params[path] for path in spec.search_space})
    return with_fields(config, {"run.name": trial_run_name(spec.name, trial_id)})


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trial: one CAPI run, in this process or as a Ray Train run, tracked in a child MLflow run."""
    entered = time.time()
    spec, state = setup.spec, setup.state
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(spec, params, trial_id)
    scaling = scaling_options(spec)
    pbt = spec.scheduler.type == "pbt"
    donor = None
    if pbt:  # PBT may hand this trial a checkpoint: its own (a restart) or a donor's (an exploit)
        config, donor = pbt_lineage(config, spec.name, trial_id, tune.get_checkpoint())
    path = Path(run_path(config, scaling))

    final = final_metrics(path, config) if donor is None else None
    if final is not None:  # trained before an interruption (or a PBT pause): report, do not train again
        run_id = track.child_run_id(state, trial_id)
        if run_id:  # the interruption may have come before rank 0 closed the run
            track.close_run(state.tracking_uri, run_id)
        tune.report({**final, PROBE_EVALS: probes_per_run(config)})
        return

    options = track.trial_options(state, spec, trial_id, {path: params[path] for path in spec.search_space})
    known = track.child_run_id(state, trial_id) or track.run_id_in_checkpoints(path)
    run_id = track.open_run(state.tracking_uri, config, options, known)
    if donor is not None:
        seed_from_donor(donor, path, run_id, state.tracking_uri)
        final = final_metrics(path, config)
        if final is not None:  # exploited at the donor's last step: nothing left to train
            tune.report({**final, PROBE_EVALS: probes_per_run(config)})
            track.end_run(state.tracking_uri, run_id, "FINISHED")
            return
    if spec.resources.in_trial():
        train_in_trial(config, scaling, state.tracking_uri, options, run_id, spec.search.metric, trial_id, pbt,
                       entered)
        return
    try:
        if pbt:
            fit_reporting_checkpoints(config, lambda callback: build_trainer(
                config, scaling, tracking_uri=state.tracking_uri, tracking=options, mlflow_run_id=run_id,
                callbacks=[callback]), spec.search.metric, trial_id)
        else:
            build_trainer(config, scaling, tracking_uri=state.tracking_uri, tracking=options, mlflow_run_id=run_id,
                          callbacks=[ProbeReport(spec.search.metric, config)]).fit()
    except TrainingFailedError as err:
        message = describe_failure(err)
        track.end_run(state.tracking_uri, run_id, "FAILED", message)
        raise TrialError(f"trial {trial_id} failed:\n{message}") from None
    track.end_run(state.tracking_uri, run_id, "FINISHED")


def train_in_trial(config: TrainConfig, scaling: ScalingOptions, uri: str, options: track.TrackingOptions,
                   run_id: str, metric: str, trial_id: str, pbt: bool, entered: float) -> None:
    """Train the trial's run in this process (its Tune actor), resuming from the run directory's
    newest checkpoint if it has one, and close its MLflow run. A failure closes the run FAILED and
    raises TrialError, which Tune retries (``failure.max_failures``) from the newest checkpoint.

    Tune stops a trial early (ASHA, the time budget) at its next report; the run is closed KILLED by
    the sweep's callback (``orchestrator.sweep.tune.SweepProgress``). ``entered``: when the trial
    function started (Unix seconds), for its ``startup.json``."""
    config = placed_config(config, scaling)
    run_dir = Path(run_path(config, scaling))
    startup = StartupRecord(run_dir, entered)
    callbacks = [LogLines(), JsonlMetrics(), startup, track.MlflowTracking(uri, options, run_id=run_id, config=config),
                 InTrialReport(metric, config, trial_id, pbt)]  # last: see its docstring
    try:
        trainer = Trainer(config, callbacks, resume=run_dir if has_state(run_dir) else None)
        startup.built()
        if trainer.step < config.optim.steps:
            trainer.fit()
    except Exception as err:  # noqa: BLE001 - any failure of the run is the trial's; Tune decides on a retry
        message = error_summary(err)
        track.end_run(uri, run_id, "FAILED", message)
        raise TrialError(f"trial {trial_id} failed:\n{message}") from None
    track.end_run(uri, run_id, "FINISHED")


def pbt_lineage(config: TrainConfig, sweep: str, trial_id: str, checkpoint) -> tuple[TrainConfig, dict | None]:
    """The Train run a PBT trial continues, and the donor checkpoint to seed it with (or None).

    ``checkpoint``: the trial's Tune checkpoint, a pointer to a Train checkpoint. Its own pointer
    continues the run it names; a donor's (an exploit) names a new run, seeded from the donor.
    """
    if checkpoint is None:
        return config, None
    with checkpoint.as_directory() as directory:
        pointer = json.loads((Path(directory) / POINTER).read_text())
    if pointer["trial_id"] == trial_id:
        name, donor = pointer["run_name"], None
    else:
        step = Path(pointer["checkpoint"]).name.removeprefix("step-").lstrip("0") or "0"
        name, donor = f"{trial_run_name(sweep, trial_id)}-from-{pointer['trial_id']}-{step}", pointer
    return with_fields(config, {"run.name": name}), donor


def seed_from_donor(donor: dict[str, Any], run_dir: Path, run_id: str, uri: str) -> None:
    """Copy the donor's Train checkpoint into the new run directory, as this trial's (its MLflow run
    id in the metadata), unless the run already started; record the exploit on the MLflow run."""
    if has_state(run_dir):
        return  # a restart of this exploit: Train resumes the run itself
    source = Path(donor["checkpoint"])
    with atomic_directory(run_dir / "checkpoints" / source.name) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        state = json.loads((tmp / STATE).read_text())
        state.setdefault("metadata", {})[track.RUN_ID_KEY] = run_id
        (tmp / STATE).write_text(json.dumps(state, indent=1))
    track.record_exploit(uri, run_id, f"{donor['trial_id']}@{source.name}")


def fit_reporting_checkpoints(config: TrainConfig, make_trainer: Callable, metric: str, trial_id: str) -> None:
    """Run the Train run in a thread and report its probe results to Tune from this (the trial's)
    thread, each with a Tune checkpoint that points at the Train checkpoint of that step."""
    sink = Queue(actor_options={"num_cpus": 0})
    trainer = make_trainer(ProbeReport(metric, config, sink=sink))
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # handed to the trial's thread
            failure.append(err)
        finally:
            sink.put(None)

    thread = threading.Thread(target=fit, name="capi-train", daemon=True)
    thread.start()
    while (item := sink.get()) is not None:
        path = item.pop(CHECKPOINT_PATH_KEY, None)
        if path is None:
            tune.report(item)
        else:
            report_with_pointer(item, trial_id, config.run.name, path)
    thread.join()
    if failure:
        raise failure[0]


def trainable(spec: SweepSpec, state: SweepState):
    setup = TrialSetup(spec=spec, state=state)
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_function_resources(spec))
