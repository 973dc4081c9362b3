"""``capi sweep``: hyperparameter sweeps with Ray Tune, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import click


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
    import warnings

    from orchestrator.sweep.spec import SweepSpecError, load_sweep

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
    _print_summary(spec, file)


def _print_summary(spec, file: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from capi_core.config import flatten

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
    console.print(f"tracking: MLflow experiment '{spec.mlflow.experiment or spec.name}'"
                  + (f" at {spec.mlflow.tracking_uri}" if spec.mlflow.tracking_uri else "")
                  + f"; trials under {spec.storage}; up to {spec.failure.max_failures} restart(s) per trial")
