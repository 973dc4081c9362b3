"""``capi eval``: frozen-feature evaluation of a checkpoint."""

from __future__ import annotations

import click


@click.group(name="eval")
def eval_() -> None:
    """Evaluate a checkpoint's frozen features."""
