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

import math
import os
import sys
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from orchestrator import tracking as track
from orchestrator.cluster import init_local_ray, join_cluster
from orchestrator.sweep.spec import Distribution, SweepSpec
from orchestrator.sweep.storage import (PROBE_EVALS, STATE_FILE, TRIALS_DIR, SweepError, SweepOutcome, SweepState,
                                        load_sweep_run, noise_note, save_sweep_run, sweep_dir, trial_dirname,
                                        trial_rows)
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


class SweepProgress(tune.Callback):
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
        run_id = track.best_effort(lambda: track.child_run_id(self.state, trial.trial_id))
        if early and run_id:
            track.best_effort(lambda: track.close_run(self.state.tracking_uri, run_id, stopped_early=True))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(trial, f"failed; see {trial.path}/error.txt")


def init_ray(spec: SweepSpec, address: str | None) -> bool:
    """Join ``address`` (shipping our packages) or start a local Ray sized for the sweep; True if started."""
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
        join_cluster(address)
    return True


def _reachable(uri: str) -> str:
    """``uri`` if its MLflow store answers, else SweepError before any Ray work."""
    try:
        track.check_reachable(uri)
    except track.TrackingError as err:
        raise SweepError(str(err)) from None
    return uri


def run_sweep(spec: SweepSpec, source: Path | None = None, address: str | None = None) -> SweepOutcome:
    """Run a validated sweep to the end and return its trials.

    Creates ``<storage>/<name>`` (refusing one that exists: resume it instead), the MLflow parent
    run, and a Tuner; starts a local Ray unless one runs or ``address`` names a cluster.
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
    started = init_ray(spec, address)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        run_spec = portable(spec, directory)
        state = track.open_sweep_run(spec, uri, source.read_text() if source else None)
        save_sweep_run(directory, run_spec, state, source)
        max_concurrent = spec.budget.max_concurrent_trials or fitting_trials(spec, ray.cluster_resources())
        tuner = tune.Tuner(
            trainable(run_spec, state),
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.search.metric, mode=spec.search.mode, num_samples=spec.repeats(),
                search_alg=searcher(spec, max_concurrent), scheduler=scheduler(spec),
                time_budget_s=spec.budget.time_limit_s,
                trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(directory.parent), verbose=0,
                failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
                callbacks=[SweepProgress(state, spec.search.metric, spec.reports_per_trial())]),
        )
        return _fit(tuner, run_spec, state, directory)
    finally:
        if started:
            ray.shutdown()


def resume_sweep(storage: str | Path, name: str, address: str | None = None) -> SweepOutcome:
    """Continue an interrupted sweep: unfinished and errored trials run on from their checkpoints,
    finished ones are kept. Tune's restore unpickles its state: only our own storage is read."""
    spec, state, directory = load_sweep_run(storage, name)
    if not tune.Tuner.can_restore(str(directory)):
        raise SweepError(f"{directory} holds no Tune state to resume (the sweep stopped before its first "
                         f"trial); remove it and run the sweep again")
    _reachable(state.tracking_uri)
    started = init_ray(spec, address)
    try:
        track.reopen_sweep_run(state)
        tuner = tune.Tuner.restore(str(directory), trainable(spec, state),
                                   resume_unfinished=True, resume_errored=True)
        return _fit(tuner, spec, state, directory)
    finally:
        if started:
            ray.shutdown()


def _fit(tuner, spec: SweepSpec, state: SweepState, directory: Path) -> SweepOutcome:
    try:
        tuner.fit()
    except BaseException as err:
        track.best_effort(lambda: track.end_run(state.tracking_uri, state.parent_run_id,
                                                "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
                                                repr(err)))
        raise
    outcome = SweepOutcome(name=spec.name, path=directory, state=state, metric=spec.search.metric,
                           mode=spec.search.mode, trials=trial_rows(directory, spec), noise=noise_note(spec))
    track.best_effort(lambda: track.log_sweep_summary(outcome))
    return outcome


