"""``capi export``: the best run's encoder as timm-loadable safetensors with a model card."""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.sweep.spec import Search, SweepSpec


@click.command()
@click.option("--sweep", "sweep_name", metavar="NAME", help="export the best trial of this sweep")
@click.option("--run", "run_id", metavar="ID", help="export this MLflow run")
@click.option("--metric", default=None, help="rank runs by this metric; default: the sweep's search.metric")
@click.option("--mode", type=click.Choice(["max", "min"]), default=None, help="default: the sweep's search.mode")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="export directory")
@click.option("--tracking-uri", default=None, help="MLflow store; default: the sweep's, else MLFLOW_TRACKING_URI")
@click.option("--storage", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where sweeps live (a sweep file's storage); default: the sweep schema's default")
@click.option("--model-name", default=None, help="registered model name; default: capi-<sweep or run name>")
@click.option("--register/--no-register", default=True, help="log the export to the run and register it "
                                                              "(alias champion)")
def export(sweep_name, run_id, metric, mode, out, tracking_uri, storage, model_name, register) -> None:
    """Export the EMA teacher of the best run of a sweep (--sweep) or of one run (--run).

    Writes OUT/model.safetensors (timm key layout), OUT/config.json and OUT/README.md (model card),
    then logs OUT to the run's MLflow artifacts and registers it as a new model version with the
    alias 'champion'. Load it with
    timm.create_model(cfg['architecture'], pretrained=True,
    pretrained_cfg_overlay=dict(file='model.safetensors'), **cfg['model_args']).
    """
    if (sweep_name is None) == (run_id is None):
        raise click.UsageError("give exactly one of --sweep NAME and --run ID")
    # deferred: MLflow
    from orchestrator.export import export_best, export_run, sweep_parent
    from orchestrator.tracking import resolve_uri

    default_metric, default_mode = Search.model_fields["metric"].default, Search.model_fields["mode"].default
    if sweep_name is not None:
        uri, parent, metric_, mode_ = _sweep_location(sweep_name, storage, tracking_uri)
        metric, mode = metric or metric_ or default_metric, mode or mode_ or default_mode
        parent = parent or sweep_parent(uri, sweep_name)
        done = export_best(uri, parent, out, metric, mode, model_name, register)
    else:
        uri = resolve_uri(tracking_uri)
        done = export_run(uri, run_id, out, metric, mode or default_mode, model_name, register)
    click.echo(f"exported run {done.run_id}" + (f" ({done.metric} {done.value:.4g})" if done.value is not None else "")
               + f" to {done.out}")
    if done.version:
        click.echo(f"registered {done.model_name} version {done.version} as @champion: "
                   f"models:/{done.model_name}@champion")


def _sweep_location(name: str, storage: Path | None, tracking_uri: str | None):
    """(tracking uri, parent run id, metric, mode) from the sweep's storage if it is here, else from MLflow."""
    # deferred: torch and MLflow
    from orchestrator.sweep.storage import SweepError, load_sweep_run
    from orchestrator.tracking import resolve_uri

    try:
        spec, state, _ = load_sweep_run(storage or SweepSpec.model_fields["storage"].default, name)
    except SweepError:
        return resolve_uri(tracking_uri), None, None, None
    uri = resolve_uri(tracking_uri) if tracking_uri else state.tracking_uri
    return uri, state.parent_run_id if uri == state.tracking_uri else None, spec.search.metric, spec.search.mode
