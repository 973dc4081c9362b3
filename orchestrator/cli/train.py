"""``capi train``: one CAPI pretraining run, standalone or as a Ray Train run, tracked in MLflow."""

from __future__ import annotations

import click

from capi_core.config import PRESETS, build_config, load_config


def _tracking_options(tracking: bool, tracking_uri: str | None, experiment: str | None):
    """MLflow settings, or None when tracking is off (or MLflow is absent and none was asked for)."""
    if not tracking:
        return None
    try:
        import mlflow  # noqa: F401 - deferred: asks whether MLflow is installed; capi train runs without it
    except ImportError:
        if tracking_uri or experiment:
            raise click.UsageError("--tracking-uri/--experiment need MLflow, which is not installed") from None
        click.echo("MLflow is not installed: training without tracking", err=True)
        return None
    # deferred: MLflow
    from orchestrator.tracking import TrackingOptions

    return TrackingOptions(uri=tracking_uri, **({"experiment": experiment} if experiment else {}))


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--preset", default="cpu-demo", show_default=True,
              help=f"Starting configuration: {', '.join(PRESETS)} (capi_core/config.py).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="A YAML file of overrides (it may name its own `preset`).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Ray Train workers (DDP ranks). 0 runs standalone in this process, without Ray.")
@click.option("--address", default=None,
              help="Ray cluster for --workers: 'auto' or ray://HOST:PORT. Default: a local Ray started on demand.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs reserved per Ray worker, also its torch threads.")
@click.option("--max-failures", type=click.IntRange(min=0), default=None,
              help="Worker-group restarts from the latest checkpoint before the run fails.")
@click.option("--storage", default=None,
              help="Ray Train storage (shared path or s3://...) for --workers. Default: run.output_dir.")
@click.option("--tracking/--no-tracking", default=True, show_default=True,
              help="Log the run to MLflow (params, metrics, artifacts).")
@click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI", show_envvar=True,
              help="MLflow tracking URI. Default: MLflow's own, sqlite:///mlflow.db in the working directory.")
@click.option("--experiment", default=None, help="MLflow experiment (created when missing).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the latest checkpoint of the same run name and output dir (or storage).")
@click.argument("overrides", nargs=-1)
def train(preset, config_file, workers, address, cpus_per_worker, max_failures, storage, tracking, tracking_uri,
          experiment, resume, overrides) -> None:
    """Pretrain a ViT with CAPI.

    OVERRIDES are dotted `section.field=value` pairs applied on top of the preset, e.g.

    \b
      capi train --preset cpu-demo optim.steps=500 model.registers=8 loss.teacher_temp=0.05
      capi train --preset cpu-demo --workers 2              # DDP over 2 Ray workers
      capi train --workers 8 --address auto --tracking-uri http://mlflow:5000

    Writes checkpoints (safetensors + JSON) and metrics.jsonl under run.output_dir/run.name. Every
    run is tracked in MLflow unless --no-tracking: by default in MLflow's local store
    (sqlite:///mlflow.db here; see it with `mlflow ui`). An MLflow run resumed from a checkpoint
    continues the same MLflow run. With --workers, a failed worker restarts the group from the
    latest checkpoint up to --max-failures times; running the same command again resumes.
    """
    if config_file:
        config = load_config(config_file, list(overrides))
    else:
        config = build_config(preset, list(overrides))
    track = _tracking_options(tracking, tracking_uri, experiment)
    if workers:
        _train_distributed(config, workers, address, cpus_per_worker, max_failures, storage, track, resume)
        return
    if address or cpus_per_worker or max_failures is not None or storage:
        raise click.UsageError("--address, --cpus-per-worker, --max-failures and --storage need --workers N")
    _train_standalone(config, track, resume)


def _train_distributed(config, workers, address, cpus_per_worker, max_failures, storage, track, resume) -> None:
    # deferred: Ray
    from orchestrator.train import ScalingOptions, run_distributed

    given = {"cpus_per_worker": cpus_per_worker, "max_failures": max_failures, "storage_path": storage}
    scaling = ScalingOptions(workers=workers, **{k: v for k, v in given.items() if v is not None})
    result = run_distributed(config, scaling, address=address, tracking=track, resume=resume)
    _echo_done(result.metrics.get("step"), result.metrics)
    click.echo(f"final checkpoint: {result.checkpoint}")
    if result.mlflow_run_id:
        click.echo(f"MLflow run {result.mlflow_run_id}")


def _train_standalone(config, track, resume) -> None:
    # deferred: torch
    from capi_core.train import JsonlMetrics, Trainer
    from orchestrator.progress import ProgressBar

    callbacks = [JsonlMetrics(), ProgressBar(config.optim.steps)]
    if track is not None:
        # deferred: MLflow
        from orchestrator.tracking import MlflowTracking, check_reachable, resolve_uri

        uri = resolve_uri(track.uri)
        check_reachable(uri)
        callbacks.append(MlflowTracking(uri, track))
    run_dir = config.run.output_dir / config.run.name
    trainer = Trainer(config, callbacks, resume=run_dir if resume else None)
    if getattr(trainer, "resumed_from", None):
        click.echo(f"resuming from {trainer.resumed_from} (step {trainer.step})", err=True)
    metrics = trainer.fit()
    _echo_done(trainer.step, metrics)
    click.echo(f"checkpoints and metrics.jsonl in {run_dir}")
    if track is not None:
        click.echo(f"MLflow run {trainer.metadata.get('mlflow_run_id')}")


def _echo_done(step, metrics: dict) -> None:
    nan = float("nan")
    click.echo(f"done: step {step}, capi_loss {metrics.get('train/capi_loss', nan):.4f}, "
               f"k-NN top-1 {metrics.get('probe/knn_top1', nan):.2f}% on the probe set, "
               f"{metrics.get('probe/knn_gain', nan):+.2f} points over the same network at random init "
               f"({metrics.get('probe/knn_random_init', nan):.2f}%)")
