"""``capi sweep``: hyperparameter sweeps with Ray Tune, tracked in MLflow."""

from __future__ import annotations

import click


@click.group()
def sweep() -> None:
    """Validate, run, submit, resume and report sweeps."""
