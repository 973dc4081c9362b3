"""``capi sweep``: hyperparameter sweeps with Ray Tune, tracked in MLflow."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.table import Table

from capi_core.config import flatten
from orchestrator.sweep.spec import SweepSpec, SweepSpecError, load_sweep


@click.group()
def sweep() -> None:
    """Validate, run, submit, resume and report sweeps."""


@sweep.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(file: Path) -> None:
    """Check a sweep FILE without starting Ray.

    Prints every problem as FILE:LINE: field: message and exits 1, or prints a summary of the
    trials, search space, scheduler and resources.
    """
    _print_summary(_load(file), file)


def _load(file: Path):
    """The validated sweep, or exit 1 after printing every problem (nothing else has started)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            spec = load_sweep(file)
        except SweepSpecError as err:
            for problem in err.problems:
                click.echo(problem, err=True)
            raise click.exceptions.Exit(1) from None
    for w in caught:
        click.secho(f"warning: {w.message}", fg="yellow", err=True)
    return spec


def _print_summary(spec, file: Path) -> None:
    # deferred: numpy and pyarrow
    from orchestrator.sweep.storage import noise_note
    from orchestrator.uris import safe_uri

    base = spec.base_config
    flat = flatten(base)
    grid, repeats = spec.grid_size(), spec.repeats()
    trials = f"{spec.num_trials()} trials" + (f" ({grid} grid points x {repeats})" if grid > 1 else "")
    source = f"preset {spec.base.preset}" if spec.base.preset else f"config {spec.base.config}"

    console = Console(highlight=False, soft_wrap=True)  # one line per fact, whatever the width
    console.print(f"[green]OK[/green] {file}: sweep '{spec.name}', {trials}, {spec.search.algorithm} search "
                  f"for the {spec.search.mode} of {spec.search.metric}")
    console.print(f"base: {source} + {len(spec.base.overrides)} overrides; {base.optim.steps} steps, "
                  f"batch {base.optim.batch_size}, probe every {base.probe.every or 'end only'}")
    table = Table("field", "distribution", "base value")
    for path, dist in spec.search_space.items():
        table.add_row(path, str(dist), repr(flat[path]))
    console.print(table)
    sched = spec.scheduler
    if sched.type == "asha":
        console.print(f"scheduler: ASHA, grace_period {sched.grace_period}, reduction_factor "
                      f"{sched.reduction_factor:g}, max_t {sched.max_t or spec.reports_per_trial()} (probe evaluations)")
    elif sched.type == "pbt":
        console.print(f"scheduler: PBT every {sched.perturbation_interval} probe evaluations, mutating "
                      f"{', '.join(sched.hyperparam_mutations)}")
    else:
        console.print("scheduler: none (every trial runs to the end)")
    res, budget = spec.resources, spec.budget
    console.print(f"resources per trial: {res.workers} worker(s) x {res.cpus_per_worker:g} CPU, "
                  f"{res.gpus_per_worker:g} GPU; at most {budget.max_concurrent_trials or 'as many as fit'} at once"
                  + (f"; time limit {budget.time_limit_s:g} s" if budget.time_limit_s else ""))
    console.print(spec.core_sharing(os.cpu_count() or 1))
    console.print(f"tracking: MLflow experiment '{spec.mlflow.experiment or spec.name}'"
                  + (f" at {safe_uri(spec.mlflow.tracking_uri)}" if spec.mlflow.tracking_uri else "")
                  + f"; trials under {spec.storage}; up to {spec.failure.max_failures} restart(s) per trial")
    noise = noise_note(spec)
    if noise:
        console.print(f"probe: {noise}")


_VERBOSE_HELP = ("also show Ray's, Tune's and MLflow's own output: worker logs, Tune's reporter, Ray's "
                 "warnings (off by default: the sweep prints its own progress)")
_STORAGE_HELP = "where sweeps live (a sweep file's storage); default: the sweep schema's default"
_ADDRESS_HELP = "join a running cluster: auto, or ray://HEAD:10001; default: start a local Ray"


def _storage(storage: Path | None) -> Path:
    return storage or SweepSpec.model_fields["storage"].default


@sweep.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--address", default=None, help=_ADDRESS_HELP)
@click.option("--export/--no-export", "do_export", default=True,
              help="export the best trial to <storage>/<name>/export and register it (alias champion)")
@click.option("--verbose", is_flag=True, help=_VERBOSE_HELP)
def run(file: Path, address: str | None, do_export: bool, verbose: bool) -> None:
    """Run the sweep in FILE with Ray Tune, tracked in MLflow.

    Validates FILE first (nothing starts on a bad file), starts a local Ray sized for the sweep
    unless --address names a cluster, prints a line per trial event, then a table of the trials,
    exports the best one and says how to open MLflow. An interrupted sweep continues with
    `capi sweep resume NAME`.
    """
    spec = _load(file)
    _announce(spec, address)  # before the imports below, which take seconds
    # deferred: Ray
    from orchestrator.sweep.tune import run_sweep

    outcome = run_sweep(spec, file, address, verbose, say=click.echo)
    _finish(outcome, do_export)


def _announce(spec, address: str | None) -> None:
    """The sweep's first line, printed as soon as the file is valid: what is about to run, where."""
    at_once = spec.budget.max_concurrent_trials or "as many as fit"
    where = f"joining Ray at {address}" if address else "starting a local Ray"
    click.echo(f"sweep {spec.name}: {spec.num_trials()} trials ({spec.search.algorithm} search for the "
               f"{spec.search.mode} of {spec.search.metric}), {at_once} at a time; {where} ...")


@sweep.command()
@click.argument("name")
@click.option("--storage", type=click.Path(file_okay=False, path_type=Path), default=None, help=_STORAGE_HELP)
@click.option("--address", default=None, help=_ADDRESS_HELP)
@click.option("--export/--no-export", "do_export", default=True, help="export the best trial at the end")
@click.option("--verbose", is_flag=True, help=_VERBOSE_HELP)
def resume(name: str, storage: Path | None, address: str | None, do_export: bool, verbose: bool) -> None:
    """Continue the interrupted sweep NAME without re-running finished trials.

    Unfinished and errored trials go on from their latest checkpoints, into the same MLflow runs.
    Ray Tune restores its state by unpickling files in <storage>/NAME: only resume sweeps from
    storage you (this tool) wrote, never a directory someone else can write to.
    """
    click.echo(f"resuming sweep {name} ...")
    # deferred: Ray
    from orchestrator.sweep.tune import resume_sweep

    outcome = resume_sweep(_storage(storage), name, address, verbose)
    _finish(outcome, do_export)


@sweep.command()
@click.argument("name")
@click.option("--storage", type=click.Path(file_okay=False, path_type=Path), default=None, help=_STORAGE_HELP)
def status(name: str, storage: Path | None) -> None:
    """Show each trial of sweep NAME (status, values, best metric) from its storage; starts no Ray.

    Reads the sweep's files only (no Ray, MLflow or torch is imported), so it answers in about a second.
    """
    # deferred: numpy and pyarrow
    from orchestrator.sweep.storage import load_sweep_run, sweep_noise, trial_rows
    from orchestrator.uris import safe_uri

    spec, state, directory = load_sweep_run(_storage(storage), name)
    rows = trial_rows(directory, spec)
    noise = sweep_noise(spec)
    _print_trials(spec.search.metric, spec.search.mode, list(spec.search_space), rows,
                  None if noise is None else noise.sentence(), None if noise is None else noise.threshold)
    click.echo(f"{len(rows)} of {spec.num_trials()} trials started; MLflow parent run {state.parent_run_id} "
               f"at {safe_uri(state.tracking_uri)}")


@sweep.command()
@click.argument("name")
@click.option("--storage", type=click.Path(file_okay=False, path_type=Path), default=None, help=_STORAGE_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="report directory; default: <storage>/NAME/report")
@click.option("--images", type=click.IntRange(min=1), default=64, show_default=True,
              help="held-out images for the register diagnostics of each trial")
@click.option("--log/--no-log", default=True, help="log the report to the sweep's MLflow parent run")
def report(name: str, storage: Path | None, out: Path | None, images: int, log: bool) -> None:
    """Write an HTML report of sweep NAME: metric vs parameters, learning curves, registers vs
    high-norm tokens, a table of the trials; log it to the parent MLflow run."""
    # deferred: MLflow
    from orchestrator.report import build_report

    page = build_report(_storage(storage), name, out, images=images, log=log)
    click.echo(f"report: {page}")


@sweep.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--address", required=True, help="the cluster's dashboard, http://HEAD:8265")
@click.option("--project-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="shipped as the job's working directory (without .venv, runs, mlruns, .git)")
@click.option("--follow", is_flag=True, help="print the job's logs until it ends")
@click.option("--insecure", is_flag=True, help="submit even to a cluster without token authentication")
def submit(file: Path, address: str, project_dir: Path, follow: bool, insecure: bool) -> None:
    """Submit the sweep in FILE to a Ray cluster as a job running `capi sweep run FILE`.

    The cluster must use token authentication (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token supply the token, which is never printed); one that accepts jobs without a
    token is refused unless --insecure.
    """
    # deferred: Ray
    from orchestrator.sweep import jobs

    spec = _load(file)
    for problem in jobs.portability_warnings(spec):
        click.secho(f"warning: {problem}", fg="yellow", err=True)
    client = jobs.job_client(address, insecure=insecure)
    job_id = jobs.submit(client, spec.name, file, project_dir)
    click.echo(f"submitted job {job_id} to {address}")
    if follow:
        final = jobs.follow(client, job_id, click.echo)
        click.echo(f"job {job_id}: {final}")
        if final != "SUCCEEDED":
            raise click.exceptions.Exit(1)
    else:
        click.echo(f"follow it with: ray job logs --address {address} --follow {job_id}")


TABLE_WIDTH = 80  # the final table where the output is no terminal (logs, CI): the width people read


def _print_trials(metric: str, mode: str, params: list[str], rows, noise: str | None = None,
                  threshold: float | None = None) -> None:
    """The trials as a table that fits 80 columns: each trial by its number in the sweep and its
    swept values under short names; stop reasons and errors below it, where they have the width; then
    which trials the best is told apart from, given the probe's noise ``threshold`` (k-NN points)."""
    # deferred: numpy and pyarrow
    from orchestrator.sweep.console import describe_values, short_names, show_value
    from orchestrator.sweep.storage import best_trial, told_apart

    best = best_trial(rows, mode)
    names = short_names(params)
    gain = metric != "probe/knn_gain"  # else the gain is the metric itself
    console = Console(highlight=False, width=None if sys.stdout.isatty() else TABLE_WIDTH)
    headers = ("trial", "status", *names.values(), f"best {metric.rsplit('/', 1)[-1]}", *(["gain"] if gain else []),
               "probes", "step")
    # Headers stay whole when they all fit (2 columns between cells); else every column folds to fit,
    # which loses no column.
    whole = sum(len(h) + 2 for h in headers) <= console.width
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for header in headers:
        table.add_column(header, overflow="fold", min_width=len(header) if whole else None)
    for r in rows:
        style = "bold green" if best is not None and r.trial_id == best.trial_id else None
        table.add_row(r.label + ("*" if style else ""), r.status, *[show_value(r.params.get(p, "")) for p in params],
                      _num(r.metric), *([_signed(r.gain)] if gain else []), str(r.probe_evals), str(r.step or ""),
                      style=style)
    console.print(table)
    for r in rows:
        if r.stop_reason:
            console.print(f"trial {r.label} stopped early: {r.stop_reason}")
        if r.error:
            console.print(f"trial {r.label} failed: {r.error}")
    if best is not None:
        gained = f" ({best.gain:+.1f} points over random init)" if best.gain is not None else ""
        console.print(f"best (*): trial {best.label} ({describe_values(best.params, names)}) with {metric} "
                      f"{best.metric:.4g}{gained}")
    console.print("gain: probe/knn_gain, the trial's k-NN minus the same network's at random init, same probe set")
    if noise:
        console.print(noise)
    split = told_apart(rows, mode, metric, threshold)
    if split is not None and (split[0] or split[1]):
        apart, within = (", ".join(r.label for r in part) for part in split)
        if not within:
            console.print(f"told apart: the best leads every other trial by more than {threshold:.1f} points")
        elif not apart:
            console.print(f"not told apart: every other trial is within {threshold:.1f} points of the best")
        else:
            console.print(f"told apart: the best leads trial(s) {apart} by more than {threshold:.1f} points; "
                          f"trial(s) {within} within the noise of it")


def _signed(value) -> str:
    return "" if value is None else f"{value:+.1f}"


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"


def _finish(outcome, do_export: bool) -> None:
    """Table, best trial, export of the best, and how to look at it all in MLflow."""
    # deferred: MLflow
    from orchestrator.export import ExportError, export_best, export_run
    from orchestrator.tracking import best_effort, child_run_id, runs_page, safe_uri

    spec_params = sorted({k for r in outcome.trials for k in r.params})
    _print_trials(outcome.metric, outcome.mode, spec_params, outcome.trials, outcome.noise,
                  outcome.noise_threshold)
    state, best, out = outcome.state, outcome.best, outcome.path / "export"
    if outcome.unfinished:
        click.secho(f"{len(outcome.unfinished)} trial(s) unfinished (interrupted or out of time): continue with "
                    f"`capi sweep resume {outcome.name}`", fg="yellow")
    if do_export and best is not None:
        try:
            try:  # the trial the table names as best ...
                run_id = child_run_id(state, best.trial_id)
                if run_id is None:
                    raise ExportError(f"trial {best.trial_id} has no MLflow run")
                done = export_run(state.tracking_uri, run_id, out, outcome.metric, outcome.mode)
            except ExportError as err:  # ... or, if it was stopped before a checkpoint, the best one with one
                click.echo(f"trial {best.trial_id} cannot be exported ({err}); exporting the best trial with a "
                           f"checkpoint")
                done = export_best(state.tracking_uri, state.parent_run_id, out, outcome.metric, outcome.mode)
            click.echo(f"exported run {done.run_id} to {done.out} (registered {done.model_name} v{done.version} "
                       f"@champion)")
        except ExportError as err:
            click.secho(f"not exported: {err}", fg="yellow", err=True)
    uri = safe_uri(state.tracking_uri)  # the state keeps any user:password; the log must not
    server = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = best_effort(lambda: runs_page(state.tracking_uri, server, state.experiment, state.name)) or server
    if server != uri:
        click.echo(f"MLflow: .venv/bin/mlflow ui --backend-store-uri {uri}   (or `mlflow ui ...` in the activated venv)")
    click.echo(f"MLflow: open {page}   (experiment {state.experiment}, parent run {state.parent_run_id})")
