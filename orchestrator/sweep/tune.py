"""Running a sweep: one Ray Tune trial per CAPI run, each trial a Ray Train (V2) run, nested in MLflow.

The Tune + Train V2 pattern of Ray's docs (Train V2's ``TorchTrainer`` is not a Tune trainable, and
``Tuner(trainer)`` is deprecated since Train V2 became the default): every trial is a Tune *function*
that builds the trial's TrainConfig and ``fit()``s a ``TorchTrainer`` (``orchestrator.train.build_trainer``);
a ``TuneReportCallback`` inside Train forwards rank 0's probe reports to Tune, where the searcher and
scheduler see them. The trial function itself takes a token 0.01 CPU (it only waits); Train's workers
hold the trial's resources, so ``max_concurrent_trials`` defaults to the number of trials the cluster
holds.

Layout of ``<storage>/<name>/`` (the Tune experiment directory):

* Tune's own state (``experiment_state-*.json``, ``tuner.pkl``, a directory per trial with
  ``result.json``), which ``capi sweep resume`` restores;
* ``capi_sweep.json``: the MLflow store, experiment and parent run id, so a resume reuses them;
* ``sweep.json`` (the validated sweep, local paths made absolute) and ``sweep.yaml`` (as written);
* ``trials/<name>-<trial id>/``: each trial's Ray Train run (checkpoints, metrics.jsonl). The name is
  stable per trial, so a restarted trial resumes from its latest checkpoint instead of starting over;
  a trial that finished before an interruption reports its last checkpoint's metrics and trains no more.

MLflow: a parent run per sweep (sweep.yaml and the resolved search space as artifacts; at the end the
best trial's metric as ``best/<metric>`` and its ids as tags) and one child run per trial, tagged
``mlflow.parentRunId`` and ``capi.trial_id``, logged by rank 0 (``orchestrator.tracking``). A child
run is found again by its trial id, so retries and resumes append to it.

PBT needs Tune-level checkpoints, which Train-in-Tune does not produce (``TuneReportCallback``
forwards rank 0's metrics and a ``checkpoint_path``, but no Tune checkpoint). Under PBT the
trial function therefore reports to Tune itself: it runs the Train run in a thread, receives the
probe reports through its own queue and reports each with a small Tune checkpoint that points at
the Train checkpoint of that step. When PBT makes a trial exploit a donor, the trial starts a new
Train run (``<sweep>-<trial>-from-<donor>-<step>``) seeded with a copy of the donor's checkpoint,
logging on into the trial's child run (its ``capi.pbt_exploits`` tag lists the donors). Limits: every exploit restarts a Train
worker group (seconds on a CPU, more with GPUs), Train checkpoints are copied per exploit, and donor
checkpoints must outlive retention (the sweep file check demands ``run.keep_checkpoints`` large
enough, since Ray's PBT fails a trial whose donor checkpoint retention has already deleted).

Limits: storage must be a local or shared filesystem every node sees.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capi_core.atomic import atomic_directory, atomic_write_text
from capi_core.cadence import is_checkpoint_step, is_probe_step, probe_evals, probe_interval, probes_per_run
from capi_core.config import TrainConfig, with_fields
from orchestrator.sweep.spec import Distribution, SweepSpec

PROBE_EVALS = "probe_evals"  # Tune time attribute: probe evaluations so far (scheduler units)
STATE_FILE = "capi_sweep.json"
SPEC_FILE = "sweep.json"
YAML_FILE = "sweep.yaml"
TRIALS_DIR = "trials"
SWEEP_TAG = "capi.sweep"
ROLE_TAG = "capi.role"
TRIAL_TAG = "capi.trial_id"
SWEPT_TAG = "capi.swept_params"  # JSON list of the sweep's dimensions, on every child run
STOPPED_TAG = "capi.stopped_early"
EXPLOITS_TAG = "capi.pbt_exploits"
POINTER = "train_checkpoint.json"  # the whole content of a PBT Tune checkpoint
TRIAL_FN_CPU = 0.01  # what a trial function holds while its Train run works; it only waits
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")  # Tune statuses that `capi sweep resume` continues


class SweepError(RuntimeError):
    """A sweep cannot start, resume or finish; the message says why and what to do."""


@dataclass
class SweepState:
    """What a sweep keeps next to Tune's state so that a resume tracks into the same MLflow runs."""

    name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str

    def save(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / STATE_FILE, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: Path) -> SweepState:
        path = Path(directory) / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise SweepError(f"{directory} holds no sweep started by capi ({STATE_FILE} is missing)") from None
        except (OSError, ValueError, TypeError) as err:
            raise SweepError(f"{path} is unreadable: {err}") from None


@dataclass
class TrialRow:
    """One trial as the sweep's table shows it."""

    trial_id: str
    status: str  # PENDING, RUNNING, TERMINATED, ERROR (Tune's), or "STOPPED" (by the scheduler)
    params: dict[str, Any]
    metric: float | None  # the best value of search.metric over the trial's reports
    last: float | None  # the last reported value
    probe_evals: int  # reports seen
    step: int | None  # training step of the last report
    error: str | None = None
    gain: float | None = None  # probe/knn_gain (points over random init) in the report with the best metric
    random_init: float | None = None  # probe/knn_random_init: the same network untrained, same probe set


@dataclass
class SweepOutcome:
    name: str
    path: Path
    state: SweepState
    metric: str
    mode: str
    trials: list[TrialRow] = field(default_factory=list)
    noise: str | None = None  # which probe set, and the difference below which scores are noise

    @property
    def best(self) -> TrialRow | None:
        return best_trial(self.trials, self.mode)

    @property
    def unfinished(self) -> list[TrialRow]:
        """Trials an interruption (Ctrl-C) or the time budget left pending, running or paused."""
        return [r for r in self.trials if r.status in UNFINISHED]


def best_trial(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.metric is not None and math.isfinite(r.metric)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.metric)


# ------------------------------------------------------------------------------------- pure parts
def sweep_dir(storage: str | Path, name: str) -> Path:
    return Path(storage).expanduser().resolve() / name


def portable(spec: SweepSpec, directory: Path) -> SweepSpec:
    """The spec with every local path absolute and trials writing under ``directory/trials``.

    Trials run in Ray workers with their own working directories; base overrides pin the dataset,
    cache and output paths the driver resolved.
    """
    from orchestrator.train import absolute_paths

    resolved = absolute_paths(spec.base_config).data
    data = spec.model_dump(mode="json")  # rebuilt rather than model_copy'd: base_config is cached
    if spec.base.config is not None:
        data["base"]["config"] = str(spec.base.config.resolve())
    overrides = data["base"]["overrides"]
    overrides.update({"data.dataset": resolved.dataset, "run.output_dir": str(directory / TRIALS_DIR)})
    if resolved.cache_dir is not None:
        overrides["data.cache_dir"] = str(resolved.cache_dir)
    data["storage"] = str(Path(directory).parent)
    return SweepSpec.model_validate(data)


def tune_domain(dist: Distribution):
    """The Ray Tune search domain of one sweep dimension."""
    from ray import tune

    lo_hi = dist.args
    return {"grid": lambda: tune.grid_search(lo_hi), "choice": lambda: tune.choice(lo_hi),
            "uniform": lambda: tune.uniform(*lo_hi), "loguniform": lambda: tune.loguniform(*lo_hi),
            "randint": lambda: tune.randint(*lo_hi)}[dist.kind]()


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """``{"loss.teacher_temp": tune.grid_search([...]), ...}``: Tune's config is the dotted trial values."""
    return {path: tune_domain(dist) for path, dist in spec.search_space.items()}


def searcher(spec: SweepSpec, max_concurrent: int):
    """grid and random: Tune's variant generator (seeded); optuna: TPE behind a concurrency limit.

    The searcher enforces ``max_concurrent`` itself: Tune ignores TuneConfig's max_concurrent_trials
    next to a variant generator.
    """
    if spec.search.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=spec.search.seed), max_concurrent=max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=max_concurrent)


def scheduler(spec: SweepSpec):
    """None (FIFO), ASHA or PBT on search.metric, their times counted in probe evaluations."""
    sched = spec.scheduler
    if sched.type == "none":
        return None
    if sched.type == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        # A mutation resamples from the dimension's distribution, or steps to a neighbouring value of a list.
        mutations = {path: spec.search_space[path].args if spec.search_space[path].kind in ("grid", "choice")
                     else tune_domain(spec.search_space[path]) for path in sched.hyperparam_mutations}
        return PopulationBasedTraining(time_attr=PROBE_EVALS, perturbation_interval=sched.perturbation_interval,
                                       hyperparam_mutations=mutations)
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=PROBE_EVALS, max_t=sched.max_t or spec.reports_per_trial(),
                         grace_period=sched.grace_period, reduction_factor=sched.reduction_factor)


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What one trial's Train workers hold. A GPU worker holds a whole GPU: that is what
    ``orchestrator.train.build_trainer`` asks Ray for, whatever fraction the sweep file names."""
    res = spec.resources
    need = {"CPU": res.workers * res.cpus_per_worker}
    if res.gpus_per_worker:
        need["GPU"] = res.workers * math.ceil(res.gpus_per_worker)
    return need


def fitting_trials(spec: SweepSpec, cluster: dict[str, float]) -> int:
    """How many trials the cluster's resources hold at once (at least 1)."""
    return max(1, min(int(cluster.get(k, 0) // v) for k, v in trial_resources(spec).items()))


# -------------------------------------------------------------------------------- inside a trial
try:  # a Train callback class must exist at import time; Ray is an orchestrator dependency
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
except ImportError:  # pragma: no cover - only without ray[tune]
    TuneReportCallback, CHECKPOINT_PATH_KEY = object, "checkpoint_path"


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
            self._training_actor_item_queue = sink
        self.metric = metric
        self.config = config
        self._last_step = -1

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        report = metrics[0]
        step = int(report.get("step", -1))
        if self.metric not in report or step <= self._last_step or not is_probe_step(step, self.config):
            return
        if checkpoint is None and is_checkpoint_step(step, self.config):
            return  # the same step's checkpoint report follows
        self._last_step = step
        item = {**report, PROBE_EVALS: probe_evals(step, probe_interval(self.config))}
        if checkpoint is not None:
            item[CHECKPOINT_PATH_KEY] = checkpoint.path
        self._training_actor_item_queue.put(item)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs besides its values; shipped once through ``tune.with_parameters``."""

    spec: SweepSpec  # portable: absolute paths
    state: SweepState


class TrialError(RuntimeError):
    """A trial's training failed after its Train-level restarts; Tune may retry it."""


def scaling_options(spec: SweepSpec):
    from orchestrator.train import ScalingOptions

    res = spec.resources
    return ScalingOptions(workers=res.workers, cpus_per_worker=res.cpus_per_worker,
                          use_gpu=res.gpus_per_worker > 0, max_failures=spec.failure.max_failures)


def trial_config(spec: SweepSpec, params: dict[str, Any], trial_id: str) -> TrainConfig:
    """The trial's TrainConfig: the sweep's values, run named ``<sweep>-<trial id>`` (stable across restarts)."""
    config = spec.trial_config({path: params[path] for path in spec.search_space})
    return with_fields(config, {"run.name": f"{spec.name}-{trial_id}"})


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trial: one CAPI run as a Ray Train run, tracked in a child MLflow run."""
    import ray.tune
    from ray.train import TrainingFailedError

    from orchestrator import tracking as track
    from orchestrator.train import build_trainer, describe_failure, run_path

    spec, state = setup.spec, setup.state
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(spec, params, trial_id)
    scaling = scaling_options(spec)
    pbt = spec.scheduler.type == "pbt"
    donor = None
    if pbt:  # PBT may hand this trial a checkpoint: its own (a restart) or a donor's (an exploit)
        config, donor = pbt_lineage(config, spec.name, trial_id, ray.tune.get_checkpoint())
    path = Path(run_path(config, scaling))

    final = final_metrics(path, config) if donor is None else None
    if final is not None:  # trained before an interruption (or a PBT pause): report, do not train again
        run_id = child_run_id(state, trial_id)
        if run_id:  # the interruption may have come before rank 0 closed the run
            close_run(state.tracking_uri, run_id)
        ray.tune.report({**final, PROBE_EVALS: probes_per_run(config)})
        return

    options = track.TrackingOptions(uri=state.tracking_uri, experiment=state.experiment,
                                    parent_run_id=state.parent_run_id,
                                    tags={SWEEP_TAG: spec.name, TRIAL_TAG: trial_id,
                                          SWEPT_TAG: json.dumps(list(spec.search_space))})
    known = child_run_id(state, trial_id) or track.run_id_in_checkpoints(path)
    run_id = track.open_run(state.tracking_uri, config, options, known)
    if donor is not None:
        seed_from_donor(donor, path, run_id, state.tracking_uri)
        final = final_metrics(path, config)
        if final is not None:  # exploited at the donor's last step: nothing left to train
            ray.tune.report({**final, PROBE_EVALS: probes_per_run(config)})
            track.end_run(state.tracking_uri, run_id, "FINISHED")
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


# ------------------------------------------------------------------------------------------ PBT
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
        name, donor = f"{sweep}-{trial_id}-from-{pointer['trial_id']}-{step}", pointer
    return with_fields(config, {"run.name": name}), donor


def seed_from_donor(donor: dict[str, Any], run_dir: Path, run_id: str, uri: str) -> None:
    """Copy the donor's Train checkpoint into the new run directory, as this trial's (its MLflow run
    id in the metadata), unless the run already started; record the exploit on the MLflow run."""
    from capi_core.checkpoint import STATE, list_checkpoints
    from orchestrator.tracking import RUN_ID_KEY
    from orchestrator.train import SNAPSHOT

    if (run_dir / SNAPSHOT).exists() or list_checkpoints(run_dir):
        return  # a restart of this exploit: Train resumes the run itself
    source = Path(donor["checkpoint"])
    with atomic_directory(run_dir / "checkpoints" / source.name) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        state = json.loads((tmp / STATE).read_text())
        state.setdefault("metadata", {})[RUN_ID_KEY] = run_id
        (tmp / STATE).write_text(json.dumps(state, indent=1))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exploits = json.loads(client.get_run(run_id).data.tags.get(EXPLOITS_TAG, "[]"))
    client.set_tag(run_id, EXPLOITS_TAG, json.dumps(exploits + [f"{donor['trial_id']}@{source.name}"]))


def fit_reporting_checkpoints(config: TrainConfig, make_trainer: Callable, metric: str, trial_id: str) -> None:
    """Run the Train run in a thread and report its probe results to Tune from this (the trial's)
    thread, each with a Tune checkpoint that points at the Train checkpoint of that step."""
    import ray.tune
    from ray.util.queue import Queue

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
            ray.tune.report(item)
            continue
        with tempfile.TemporaryDirectory(prefix="capi-pointer-") as tmp:
            pointer = {"trial_id": trial_id, "run_name": config.run.name, "checkpoint": path}
            (Path(tmp) / POINTER).write_text(json.dumps(pointer))
            ray.tune.report(item, checkpoint=ray.tune.Checkpoint.from_directory(tmp))
    thread.join()
    if failure:
        raise failure[0]


def final_metrics(run_dir: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The metrics saved in a finished run's last checkpoint (with its step), or None if unfinished."""
    from capi_core.checkpoint import STATE, latest_checkpoint

    found = latest_checkpoint(run_dir)
    if found is None:
        return None
    try:
        state = json.loads((found / STATE).read_text())
    except (OSError, ValueError):
        return None
    if int(state.get("step", 0)) < config.optim.steps:
        return None
    return {"step": int(state["step"]), **state.get("metrics", {})}


def child_run_id(state: SweepState, trial_id: str) -> str | None:
    """The MLflow child run of ``trial_id`` under the sweep's parent run, if one exists."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(state.tracking_uri)
    parent = client.get_run(state.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], max_results=2,
                              filter_string=f"tags.mlflow.parentRunId = '{state.parent_run_id}' "
                                            f"and tags.`{TRIAL_TAG}` = '{trial_id}'")
    return runs[0].info.run_id if runs else None


# ------------------------------------------------------------------------------------ the driver
try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover
    _TuneCallback = object


class SweepProgress(_TuneCallback):
    """Prints one line per trial event and closes the MLflow runs of trials the scheduler stopped.

    A trial that finishes its training closes its own run; one stopped early (ASHA, time budget) is
    killed mid-training, so its run is closed here as FINISHED with ``capi.stopped_early``.
    """

    def __init__(self, state: SweepState, metric: str, reports: int):
        self.state, self.metric, self.reports = state, metric, reports

    def _say(self, trial, text: str) -> None:
        print(f"[trial {trial.trial_id}] {text}", file=sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        values = ", ".join(f"{k}={v}" for k, v in trial.config.items())
        self._say(trial, f"started: {values}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        shown = f"{value:.4g}" if isinstance(value, (int, float)) else value
        self._say(trial, f"probe {result.get(PROBE_EVALS, '?')}/{self.reports} at step {result.get('step', '?')}: "
                         f"{self.metric} {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        early = last.get(PROBE_EVALS, 0) < self.reports
        self._say(trial, "stopped early (scheduler or time budget)" if early else "finished")
        run_id = _quiet(lambda: child_run_id(self.state, trial.trial_id))
        if early and run_id:
            _quiet(lambda: close_run(self.state.tracking_uri, run_id, stopped_early=True))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(trial, f"failed; see {trial.path}/error.txt")


def close_run(uri: str, run_id: str, stopped_early: bool = False) -> None:
    """Mark a trial's MLflow run FINISHED if it is still RUNNING (tagged when stopped early)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if client.get_run(run_id).info.status == "RUNNING":
        if stopped_early:
            client.set_tag(run_id, STOPPED_TAG, "true")
        client.set_terminated(run_id, "FINISHED")


def _quiet(call: Callable[[], Any]) -> Any:
    """Tracking trouble must not stop the sweep: warn and go on."""
    try:
        return call()
    except Exception as err:  # noqa: BLE001 - any store or network failure
        print(f"warning: MLflow: {err}", file=sys.stderr, flush=True)
        return None


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trainable(spec: SweepSpec, state: SweepState):
    from ray import tune

    setup = TrialSetup(spec=spec, state=state)
    # The trial function only waits on its Train run, whose workers hold the resources; Ray refuses
    # an empty bundle, so it asks for a token hundredth of a CPU.
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_FN_CPU})


def _init_ray(spec: SweepSpec, address: str | None) -> bool:
    """Join ``address`` (shipping our packages) or start a local Ray sized for the sweep; True if started."""
    import ray

    from orchestrator.train import init_local_ray

    if ray.is_initialized():
        return False
    # A Ray job (`capi sweep submit`) runs this with RAY_ADDRESS set: join that cluster, since Ray
    # refuses num_cpus when it connects to one.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        per_trial = trial_resources(spec)["CPU"]
        # The trial functions' token CPUs must fit beside their workers: on 2 cores, two 1-CPU trials
        # need 2.02 logical CPUs, and with only 2 the second trial's workers never start.
        concurrent = spec.budget.max_concurrent_trials or 1
        cpus = max(os.cpu_count() or 1, math.ceil((per_trial + TRIAL_FN_CPU) * concurrent))
        # Keep the dashboard: a trial that Tune stops takes its Train controller with it, and Ray frees that
        # controller's placement group only after the dashboard's State API reports it dead. Without it,
        # the leaked groups hold their CPUs and later trials wait forever.
        init_local_ray(num_cpus=cpus, include_dashboard=True)
    else:
        import capi_core
        import orchestrator

        modules = [os.path.dirname(capi_core.__file__), os.path.dirname(orchestrator.__file__)]
        ray.init(address=address, runtime_env={"py_modules": modules})
    return True


def _reachable(uri: str) -> str:
    """``uri`` if its MLflow store answers, else SweepError before any Ray work."""
    from orchestrator.tracking import TrackingError, check_reachable

    try:
        check_reachable(uri)
    except TrackingError as err:
        raise SweepError(str(err)) from None
    return uri


def _open_parent(spec: SweepSpec, uri: str, source_text: str | None) -> SweepState:
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking as track

    experiment = spec.mlflow.experiment or spec.name
    client = MlflowClient(uri)
    run = client.create_run(track._experiment_id(client, experiment), run_name=spec.name,
                            tags={SWEEP_TAG: spec.name, ROLE_TAG: "sweep"})
    run_id = run.info.run_id
    if source_text is not None:
        client.log_text(run_id, source_text, YAML_FILE)
    client.log_dict(run_id, {path: {dist.kind: dist.args} for path, dist in spec.search_space.items()},
                    "search_space.json")
    client.log_dict(run_id, {"algorithm": spec.search.algorithm, "metric": spec.search.metric,
                             "mode": spec.search.mode, "scheduler": spec.scheduler.model_dump(),
                             "budget": spec.budget.model_dump(), "resources": spec.resources.model_dump(),
                             "trials": spec.num_trials()}, "sweep_settings.json")
    client.log_dict(run_id, track.redact_nested(spec.base_config.model_dump(mode="json")), "base_config.yaml")
    client.log_batch(run_id, params=_params({"search.algorithm": spec.search.algorithm,
                                             "search.metric": spec.search.metric, "search.mode": spec.search.mode,
                                             "scheduler": spec.scheduler.type, "trials": spec.num_trials()}))
    return SweepState(name=spec.name, tracking_uri=uri, experiment=experiment, parent_run_id=run_id)


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in values.items()]


def run_sweep(spec: SweepSpec, source: Path | None = None, address: str | None = None) -> SweepOutcome:
    """Run a validated sweep to the end and return its trials.

    Creates ``<storage>/<name>`` (refusing one that exists: resume it instead), the MLflow parent
    run, and a Tuner; starts a local Ray unless one runs or ``address`` names a cluster.
    """
    import ray
    from ray import tune

    from orchestrator.tracking import resolve_uri

    directory = sweep_dir(spec.storage, spec.name)
    if (directory / STATE_FILE).exists() or tune.Tuner.can_restore(str(directory)):
        raise SweepError(f"sweep {spec.name!r} already exists in {directory}; continue it with "
                         f"`capi sweep resume {spec.name}`, or remove that directory to start over")
    uri = _reachable(resolve_uri(spec.mlflow.tracking_uri))
    if address is None:  # a local cluster reads the dataset from this machine: fail here, before Ray
        from orchestrator.train import TrainingError, check_dataset

        try:
            check_dataset(spec.base_config)
        except TrainingError as err:
            raise SweepError(f"base {err}") from None
    started = _init_ray(spec, address)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        run_spec = portable(spec, directory)
        state = _open_parent(spec, uri, source.read_text() if source else None)
        state.save(directory)
        atomic_write_text(directory / SPEC_FILE, run_spec.model_dump_json(indent=1))
        if source is not None:
            shutil.copyfile(source, directory / YAML_FILE)
        max_concurrent = spec.budget.max_concurrent_trials or fitting_trials(spec, ray.cluster_resources())
        tuner = tune.Tuner(
            _trainable(run_spec, state),
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.search.metric, mode=spec.search.mode, num_samples=spec.repeats(),
                search_alg=searcher(spec, max_concurrent), scheduler=scheduler(spec),
                time_budget_s=spec.budget.time_limit_s,
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(directory.parent), verbose=0,
                failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
                callbacks=[SweepProgress(state, spec.search.metric, spec.reports_per_trial())]),
        )
        return _fit(tuner, run_spec, state, directory)
    finally:
        if started:
            ray.shutdown()


def load_sweep_run(storage: str | Path, name: str) -> tuple[SweepSpec, SweepState, Path]:
    """The spec and MLflow state a sweep directory holds (written by ``run_sweep``)."""
    directory = sweep_dir(storage, name)
    if not directory.is_dir():
        raise SweepError(f"no sweep {name!r} in {directory.parent}")
    state = SweepState.load(directory)
    try:
        spec = SweepSpec.model_validate_json((directory / SPEC_FILE).read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"{directory / SPEC_FILE} is unreadable: {err}") from None
    return spec, state, directory


def resume_sweep(storage: str | Path, name: str, address: str | None = None) -> SweepOutcome:
    """Continue an interrupted sweep: unfinished and errored trials run on from their checkpoints,
    finished ones are kept. Tune's restore unpickles its state: only our own storage is read."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    spec, state, directory = load_sweep_run(storage, name)
    if not tune.Tuner.can_restore(str(directory)):
        raise SweepError(f"{directory} holds no Tune state to resume (the sweep stopped before its first "
                         f"trial); remove it and run the sweep again")
    _reachable(state.tracking_uri)
    started = _init_ray(spec, address)
    try:
        MlflowClient(state.tracking_uri).update_run(state.parent_run_id, status="RUNNING")
        tuner = tune.Tuner.restore(str(directory), _trainable(spec, state),
                                   resume_unfinished=True, resume_errored=True)
        return _fit(tuner, spec, state, directory)
    finally:
        if started:
            ray.shutdown()


def _fit(tuner, spec: SweepSpec, state: SweepState, directory: Path) -> SweepOutcome:
    from orchestrator import tracking as track

    try:
        tuner.fit()
    except BaseException as err:
        _quiet(lambda: track.end_run(state.tracking_uri, state.parent_run_id,
                                     "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", repr(err)))
        raise
    outcome = SweepOutcome(name=spec.name, path=directory, state=state, metric=spec.search.metric,
                           mode=spec.search.mode, trials=trial_rows(directory, spec), noise=noise_note(spec))
    _quiet(lambda: log_summary(outcome))
    return outcome


def log_summary(outcome: SweepOutcome) -> None:
    """The parent run's summary: best metric, best trial and run ids, trial counts; then FINISHED,
    KILLED if trials are left to resume, or FAILED if every trial failed."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    state = outcome.state
    client = MlflowClient(state.tracking_uri)
    counts: dict[str, int] = {}
    for row in outcome.trials:
        counts[row.status] = counts.get(row.status, 0) + 1
    now = int(time.time() * 1000)
    metrics = [Metric(f"sweep/trials_{k.lower()}", float(v), now, 0) for k, v in counts.items()]
    tags = [RunTag("capi.trials", json.dumps(counts))]
    if outcome.noise:
        tags.append(RunTag("capi.probe_noise", outcome.noise))
    best = outcome.best
    if best is not None:
        metrics.append(Metric(f"best/{outcome.metric}", float(best.metric), now, 0))
        tags.append(RunTag("capi.best_trial", best.trial_id))
        run_id = child_run_id(state, best.trial_id)
        if run_id:
            tags.append(RunTag("capi.best_run_id", run_id))
    client.log_batch(state.parent_run_id, metrics=metrics, tags=tags)
    client.log_dict(state.parent_run_id, [asdict(r) for r in outcome.trials], "trials.json")
    failed = bool(outcome.trials) and all(r.status == "ERROR" for r in outcome.trials)
    client.set_terminated(state.parent_run_id, "FAILED" if failed else "KILLED" if outcome.unfinished else "FINISHED")


def noise_note(spec: SweepSpec) -> str | None:
    """Which probe set the trials were scored on and the difference below which their scores are
    noise, for the table's footer and the parent run; None if the dataset cannot be read here."""
    from capi_core.data import DatasetError, resolve_dataset
    from capi_core.eval.online_probe import probe_noise

    cfg = spec.base_config
    try:
        return probe_noise(resolve_dataset(cfg.data.dataset, cfg.data.cache_dir), cfg.model.img_size,
                           cfg.probe).sentence()
    except (DatasetError, OSError):
        return None


# ------------------------------------------------------------------------------ reading storage
def trial_rows(directory: Path, spec: SweepSpec) -> list[TrialRow]:
    """Every trial of a sweep directory, read from Tune's JSON files (nothing is unpickled)."""
    directory = Path(directory)
    states = _trial_states(directory)
    trial_dirs = {trial_id: directory / logdir for trial_id, (_, logdir) in states.items()}
    claimed = set(trial_dirs.values())
    # Trials Tune has not yet written to its state file (a sweep just starting): found by directory name.
    for trial_dir in sorted(p for p in directory.glob("trial_*") if p.is_dir()):
        trial_id = trial_dir.name.removeprefix("trial_")
        if trial_id not in trial_dirs and trial_dir not in claimed:
            trial_dirs[trial_id] = trial_dir
    rows = []
    for trial_id, trial_dir in sorted(trial_dirs.items()):
        params = _read_json(trial_dir / "params.json") or {}
        results = _read_results(trial_dir / "result.json")
        scored = [r for r in results if isinstance(r.get(spec.search.metric), (int, float))]
        values = [r[spec.search.metric] for r in scored]
        pick = max if spec.search.mode == "max" else min
        best_result = pick(scored, key=lambda r: r[spec.search.metric]) if scored else {}
        status = states[trial_id][0] if trial_id in states else "PENDING" if not results else "TERMINATED"
        evals = int(results[-1].get(PROBE_EVALS, 0)) if results else 0
        if status == "TERMINATED" and evals < spec.reports_per_trial():
            status = "STOPPED"
        error = (trial_dir / "error.txt").read_text().strip().splitlines()[-1:] if (trial_dir / "error.txt").exists() \
            else None
        rows.append(TrialRow(trial_id=trial_id, status=status,
                             params={k: params[k] for k in spec.search_space if k in params},
                             metric=pick(values) if values else None, last=values[-1] if values else None,
                             probe_evals=evals, step=results[-1].get("step") if results else None,
                             error=error[0] if error else None, gain=best_result.get("probe/knn_gain"),
                             random_init=best_result.get("probe/knn_random_init")))
    return rows


def _trial_states(directory: Path) -> dict[str, tuple[str, str]]:
    """trial id -> (Tune status, trial directory relative to the sweep) from the newest experiment state.

    Newest by the session timestamp in the file name, not by mtime: Tune's final sync rewrites every
    session's file, so an older session's stale file can be the last one touched. The directory comes
    from the state because a restored trial may log into a new one (``trial_<id>_<suffix>``).
    """
    states = sorted(directory.glob("experiment_state-*.json"), key=lambda p: p.name)
    if not states:
        return {}
    data = _read_json(states[-1]) or {}
    out = {}
    for item in data.get("trial_data", []):
        trial = item[0] if isinstance(item, list) else item
        if isinstance(trial, str):
            trial = json.loads(trial)
        if isinstance(trial, dict) and "trial_id" in trial:
            logdir = trial.get("relative_logdir") or f"trial_{trial['trial_id']}"
            out[trial["trial_id"]] = (trial.get("status", "UNKNOWN"), logdir)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_results(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return out

