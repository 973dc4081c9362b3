"""The sweep driver: a Ray Tune ``Tuner`` over the sweep's search space, one trial per CAPI run
(``orchestrator.sweep.trial``), its state in the sweep's storage (``orchestrator.sweep.storage``).

``run_sweep`` starts a sweep, ``resume_sweep`` continues an interrupted one from Tune's state. The
driver starts a local Ray sized for the sweep unless it joins a cluster; since Train's workers hold
each trial's resources, ``max_concurrent_trials`` defaults to the number of trials the cluster holds.

MLflow: a parent run per sweep (sweep.yaml and the resolved search space as artifacts; at the end the
best trial's metric as ``best/<metric>`` and its ids as tags) and one child run per trial, tagged
``mlflow.parentRunId`` and ``capi.trial_id``, logged by rank 0 (``orchestrator.tracking``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from orchestrator import tracking as track
from orchestrator.cluster import init_local_ray, join_cluster
from orchestrator.sweep.baselines import warm_baselines
from orchestrator.sweep.console import SweepConsole, stop_reason
from orchestrator.sweep.spec import Distribution, SweepSpec
from orchestrator.sweep.storage import (PROBE_EVALS, STATE_FILE, TRIALS_DIR, SweepError, SweepOutcome, SweepState,
                                        load_sweep_run, load_trial_notes, logged_step, number_trials, save_sweep_run,
                                        save_trial_notes, sweep_dir, sweep_noise, trial_dirname, trial_rows)
from orchestrator.sweep.trial import TRIAL_FN_CPU, trainable, trial_resources
from orchestrator.train import TrainingError, absolute_paths, check_dataset


def tune_domain(dist: Distribution):
    """The Ray Tune search domain of one sweep dimension."""
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
        return ConcurrencyLimiter(OptunaSearch(seed=spec.search.seed), max_concurrent=max_concurrent)
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=max_concurrent)


def scheduler(spec: SweepSpec):
    """None (FIFO), ASHA or PBT on search.metric, their times counted in probe evaluations."""
    sched = spec.scheduler
    if sched.type == "none":
        return None
    if sched.type == "pbt":
        # A mutation resamples from the dimension's distribution, or steps to a neighbouring value of a list.
        mutations = {path: spec.search_space[path].args if spec.search_space[path].kind in ("grid", "choice")
                     else tune_domain(spec.search_space[path]) for path in sched.hyperparam_mutations}
        return PopulationBasedTraining(time_attr=PROBE_EVALS, perturbation_interval=sched.perturbation_interval,
                                       hyperparam_mutations=mutations)
    return ASHAScheduler(time_attr=PROBE_EVALS, max_t=sched.max_t or spec.reports_per_trial(),
                         grace_period=sched.grace_period, reduction_factor=sched.reduction_factor)


def reuse_actors(spec: SweepSpec) -> bool:
    """Whether a trial's process trains the next trial too: yes when trials train in their own process.

    A new trial then skips starting a process and importing torch, timm and our packages (several
    seconds a trial on 2 cores). It is safe because Tune's function trials report synchronously: a
    trial that Tune stops (ASHA, PBT) is waiting in ``tune.report``, and leaves at once, before the
    process takes the next trial; the Trainer seeds, sizes its threads and builds its model anew for
    each run. A Ray Train trial's process only waits, so there is nothing to save there.
    """
    return spec.resources.in_trial()


def fitting_trials(spec: SweepSpec, cluster: dict[str, float]) -> int:
    """How many trials the cluster's resources hold at once (at least 1)."""
    return max(1, min(int(cluster.get(k, 0) // v) for k, v in trial_resources(spec).items()))


def portable(spec: SweepSpec, directory: Path) -> SweepSpec:
    """The spec with every local path absolute and trials writing under ``directory/trials``.

    Trials run in Ray workers with their own working directories; base overrides pin the dataset,
    cache and output paths the driver resolved.
    """
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


# How often the console names each running trial's step when nothing else was said: often enough that a
# trial probed only at its end shows it is alive, rarely enough that a 10-minute sweep prints ~10 lines.
HEARTBEAT_S = 60.0


class SweepProgress(tune.Callback):
    """The sweep's console (``orchestrator.sweep.console.SweepConsole``) fed from Tune's trial events; it
    also numbers the trials, records why a trial stopped early, and closes that trial's MLflow run.

    A trial that finishes its training closes its own run; one stopped early (ASHA, time budget) is
    killed mid-training, so its run is closed here as KILLED with ``capi.stopped_early`` naming the
    reason: the runs table then tells it from the finished ones by its status.
    """

    def __init__(self, spec: SweepSpec, state: SweepState, directory: Path):
        self.state, self.directory = state, directory
        self.scheduler, self.time_limit_s = spec.scheduler, spec.budget.time_limit_s
        self.metric, self.mode, self.reports = spec.search.metric, spec.search.mode, spec.reports_per_trial()
        self.total = spec.num_trials()
        self.name, self.steps = spec.name, spec.base_config.optim.steps
        self.setup()

    def setup(self, **info) -> None:
        """At the experiment's start, also when ``capi sweep resume`` restores this callback from
        Tune's pickled state: the clock starts now, and the notes are read back from storage."""
        self.notes = load_trial_notes(self.directory)
        self.console = SweepConsole(total=self.total, reports=self.reports, metric=self.metric, mode=self.mode,
                                    steps=self.steps, heartbeat_s=HEARTBEAT_S)

    def _number(self, trials) -> None:
        if number_trials(self.notes, [t.trial_id for t in trials]):
            save_trial_notes(self.directory, self.notes)

    def _logged_steps(self) -> dict[str, int | None]:
        return {i: logged_step(self.directory, self.name, i) for i in self.console.running()}

    def on_step_end(self, iteration, trials, **info) -> None:
        self._number(trials)  # in Tune's creation order, before a trial's first event
        if self.console.heartbeat_due():
            self.console.heartbeat(self._logged_steps())

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._number(trials)
        # When Tune started the trial (its first start; a restart keeps it): where its start-up begins
        # (benchmarks/ray_overhead.py splits it with the trial's startup.json).
        if "started_at" not in self.notes.setdefault(trial.trial_id, {}):
            self.notes[trial.trial_id]["started_at"] = round(time.time(), 3)
            save_trial_notes(self.directory, self.notes)
        steps = trial.config.get("optim.steps")
        self.console.started(trial.trial_id, self.notes[trial.trial_id]["number"], trial.config,
                             steps=int(steps) if isinstance(steps, (int, float)) else None)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        self.console.result(trial.trial_id, int(result.get(PROBE_EVALS, 0)), result.get("step"),
                            value if isinstance(value, (int, float)) else None)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        probes = int((trial.last_result or {}).get(PROBE_EVALS, 0))
        reason = None
        if probes < self.reports:
            reason = stop_reason(probes, self.reports, self.console.now() - self.console.start, self.time_limit_s,
                                 self.scheduler.type, getattr(self.scheduler, "reduction_factor", 2.0))
            self.notes.setdefault(trial.trial_id, {})["stopped"] = reason
            save_trial_notes(self.directory, self.notes)
        self.console.steps_reached(self._logged_steps())  # the ETA below counts the others' steps
        self.console.ended(trial.trial_id, reason)
        run_id = track.best_effort(lambda: track.child_run_id(self.state, trial.trial_id))
        if reason and run_id:
            track.best_effort(lambda: track.close_run(self.state.tracking_uri, run_id, stopped_early=reason))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error_file = Path(trial.path) / "error.txt"
        try:
            cause = error_file.read_text().strip().splitlines()[-1]
        except (OSError, IndexError):
            cause = "see Tune's log"
        self.console.failed(trial.trial_id, f"{cause[:200]} (full error: {error_file})")


# Tune's own console output, off unless --verbose: at verbose=0 its default output engine still prints
# a configuration box and a TensorBoard hint, its legacy one prints nothing; and without automatic
# loggers it adds no TensorBoard logger (the hint, and files no command reads). Both are Tune's
# documented environment variables, read when the Tuner runs (set only for that while: the process may
# run other Tuners, tests do); a value the user set wins.
QUIET_TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


def result_loggers() -> list:
    """Tune's per-trial result files: result.json (``trial_rows`` reads it) and progress.csv."""
    return [JsonLoggerCallback(), CSVLoggerCallback()]


def quiet_console(verbose: bool) -> dict:
    """Keep Ray's, Tune's and MLflow's own lines off the sweep's console unless ``verbose``, and
    return the ``ray.init`` options that do the same for Ray: no worker output forwarded to the
    driver (Train's controller and worker logs, its dead-controller clean-up notices, Ray's
    de-duplication notices), and only errors from Ray's own loggers (its warning that token
    authentication is on, which it is by our choice, came on every start)."""
    if verbose:
        return {"log_to_driver": True, "logging_level": logging.INFO}
    track.quiet_logs()
    return {"log_to_driver": False, "logging_level": logging.ERROR}


@contextmanager
def quiet_tune(verbose: bool):
    """``QUIET_TUNE_ENV`` while the Tuner runs, unless ``verbose``; the environment as it was afterwards."""
    added = {} if verbose else {k: v for k, v in QUIET_TUNE_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def init_ray(spec: SweepSpec, address: str | None, verbose: bool = False) -> bool:
    """Join ``address`` (shipping our packages) or start a local Ray sized for the sweep; True if started."""
    options = quiet_console(verbose)
    if ray.is_initialized():
        return False
    # A Ray job (`capi sweep submit`) runs this with RAY_ADDRESS set: join that cluster, since Ray
    # refuses num_cpus when it connects to one.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # A Ray Train trial's function holds a token CPU beside its workers: on 2 cores, two 1-CPU
        # trials need 2.02 logical CPUs, and with only 2 the second trial's workers would never start.
        per_trial = trial_resources(spec)["CPU"] + (0 if spec.resources.in_trial() else TRIAL_FN_CPU)
        concurrent = spec.budget.max_concurrent_trials or 1
        cpus = max(os.cpu_count() or 1, math.ceil(per_trial * concurrent))
        # Keep the dashboard: a trial that Tune stops takes its Train controller with it, and Ray frees that
        # controller's placement group only after the dashboard's State API reports it dead. Without it,
        # the leaked groups hold their CPUs and later trials wait forever.
        init_local_ray(num_cpus=cpus, include_dashboard=True, **options)
    else:
        join_cluster(address, **options)
    return True


def _reachable(uri: str) -> str:
    """``uri`` if its MLflow store answers, else SweepError before any Ray work."""
    try:
        track.check_reachable(uri)
    except track.TrackingError as err:
        raise SweepError(str(err)) from None
    return uri


def run_sweep(spec: SweepSpec, source: Path | None = None, address: str | None = None,
              verbose: bool = False, say: Callable[[str], None] | None = None) -> SweepOutcome:
    """Run a validated sweep to the end and return its trials.

    Creates ``<storage>/<name>`` (refusing one that exists: resume it instead), the MLflow parent
    run, and a Tuner; starts a local Ray unless one runs or ``address`` names a cluster. A local sweep
    of CPU trials first scores its probe baselines once (``orchestrator.sweep.baselines``), saying so
    through ``say``.
    """
    directory = sweep_dir(spec.storage, spec.name)
    if (directory / STATE_FILE).exists() or tune.Tuner.can_restore(str(directory)):
        raise SweepError(f"sweep {spec.name!r} already exists in {directory}; continue it with "
                         f"`capi sweep resume {spec.name}`, or remove that directory to start over")
    uri = _reachable(track.resolve_uri(spec.mlflow.tracking_uri))
    if address is None:  # a local cluster reads the dataset from this machine: fail here, before Ray
        try:
            check_dataset(spec.base_config)
        except TrainingError as err:
            raise SweepError(f"base {err}") from None
        # Only where the trials share this machine's cache: not from a Ray job (RAY_ADDRESS), whose
        # trials may run on other nodes, nor for GPU trials, which score their baselines on their GPU.
        if not spec.resources.gpus_per_worker and not os.environ.get("RAY_ADDRESS"):
            warm_baselines(spec, say or (lambda text: None))
    started = init_ray(spec, address, verbose)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        run_spec = portable(spec, directory)
        state = track.open_sweep_run(spec, uri, source.read_text() if source else None)
        save_sweep_run(directory, run_spec, state, source)
        return _fit(new_tuner(run_spec, state, directory), run_spec, state, directory, verbose)
    finally:
        if started:
            ray.shutdown()


def new_tuner(spec: SweepSpec, state: SweepState, directory: Path) -> tune.Tuner:
    """A Tuner for the saved sweep ``spec`` (local paths absolute) in ``directory``, tracked under ``state``."""
    max_concurrent = spec.budget.max_concurrent_trials or fitting_trials(spec, ray.cluster_resources())
    return tune.Tuner(
        trainable(spec, state),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.search.metric, mode=spec.search.mode, num_samples=spec.repeats(),
            search_alg=searcher(spec, max_concurrent), scheduler=scheduler(spec),
            time_budget_s=spec.budget.time_limit_s,
            trial_dirname_creator=trial_dirname, reuse_actors=reuse_actors(spec)),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=str(directory.parent), verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
            callbacks=[SweepProgress(spec, state, directory), *result_loggers()]),
    )


def resume_sweep(storage: str | Path, name: str, address: str | None = None,
                 verbose: bool = False) -> SweepOutcome:
    """Continue an interrupted sweep: unfinished and errored trials run on from their checkpoints,
    finished ones are kept. Tune's restore unpickles its state: only our own storage is read."""
    spec, state, directory = load_sweep_run(storage, name)
    _reachable(state.tracking_uri)
    started = init_ray(spec, address, verbose)
    try:
        track.reopen_sweep_run(state)
        if tune.Tuner.can_restore(str(directory)):
            tuner = tune.Tuner.restore(str(directory), trainable(spec, state),
                                       resume_unfinished=True, resume_errored=True)
        else:  # stopped after saving the sweep, before Tune saved anything: no trial ran, so start them now
            tuner = new_tuner(spec, state, directory)
        return _fit(tuner, spec, state, directory, verbose)
    finally:
        if started:
            ray.shutdown()


def _fit(tuner, spec: SweepSpec, state: SweepState, directory: Path, verbose: bool = False) -> SweepOutcome:
    try:
        with quiet_tune(verbose):
            tuner.fit()
    except BaseException as err:
        track.best_effort(lambda: track.end_run(state.tracking_uri, state.parent_run_id,
                                                "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
                                                repr(err)))
        raise
    noise = sweep_noise(spec)
    outcome = SweepOutcome(name=spec.name, path=directory, state=state, metric=spec.search.metric,
                           mode=spec.search.mode, trials=trial_rows(directory, spec),
                           noise=None if noise is None else noise.sentence(),
                           noise_threshold=None if noise is None else noise.threshold)
    track.best_effort(lambda: track.log_sweep_summary(outcome))
    return outcome


