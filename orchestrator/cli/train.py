"""``capi train``: one CAPI pretraining run, standalone or as a Ray Train run."""

from __future__ import annotations

import click


@click.command()
def train() -> None:
    """Pretrain a ViT with CAPI."""
    raise click.ClickException("not implemented yet")
