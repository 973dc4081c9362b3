"""``capi export``: the best run's encoder as timm-loadable safetensors with a model card."""

from __future__ import annotations

import click


@click.command()
def export() -> None:
    """Export the best checkpoint of a sweep or run."""
    raise click.ClickException("not implemented yet")
