"""What a training run shows on the console while it trains: one line of its latest metrics, as a
rich progress bar (``capi train`` standalone) or as printed lines from Ray Train's rank 0.

Both are trainer callbacks that act on rank 0 only; neither imports Ray, so a standalone run
needs none. A sweep's console is ``orchestrator.sweep.console``.
"""

from __future__ import annotations

import sys

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from capi_core.eval.online_probe import PROBE_METRIC
from capi_core.train import Callback, Trainer


def metrics_summary(metrics: dict[str, float]) -> str:
    """``capi 6.012  clust 6.101  H(T) 5.93  812 img/s  knn 61.2% (+4.1 over random init)``."""
    line = (f"capi {metrics['train/capi_loss']:.3f}  clust {metrics['train/clustering_loss']:.3f}"
            f"  H(T) {metrics['train/target_entropy']:.2f}  {metrics['train/images_per_s']:.0f} img/s")
    if PROBE_METRIC in metrics:
        line += f"  knn {metrics[PROBE_METRIC]:.1f}%"
    if "probe/knn_gain" in metrics:
        line += f" ({metrics['probe/knn_gain']:+.1f} over random init)"
    return line


class ProgressBar(Callback):
    """A rich progress bar with the latest losses on stderr; a line per log step where stderr is no
    terminal (CI, logs)."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps

    def on_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 transient=False, disable=not sys.stderr.isatty())
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.total_steps, completed=trainer.step, info="")
        click.echo(f"precision: {trainer.precision.describe()}; compile: {trainer.compile.describe()}", err=True)

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        summary = metrics_summary(metrics)
        self.progress.update(self.task, completed=step, info=summary)
        if not sys.stderr.isatty():  # no live bar (CI, logs): print a line per log step instead
            click.echo(f"step {step}/{self.total_steps}  {summary}", err=True)

    def on_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if trainer.is_main:
            self.progress.stop()


class LogLines(Callback):
    """Prints one progress line per log step on rank 0 (Ray forwards it to the driver's console)."""

    def on_start(self, trainer: Trainer) -> None:
        if trainer.is_main:
            say(f"precision: {trainer.precision.describe()}; compile: {trainer.compile.describe()}")
        if trainer.is_main and trainer.step:
            say(f"resumed at step {trainer.step}/{trainer.config.optim.steps}")

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if trainer.is_main:
            say(f"step {step}/{trainer.config.optim.steps}  {metrics_summary(metrics)}")


def say(line: str) -> None:
    """Print ``line`` to the real stdout: in a Ray worker, Ray Train's patched print would also log
    it, and it would show twice."""
    print(line, file=sys.__stdout__, flush=True)

