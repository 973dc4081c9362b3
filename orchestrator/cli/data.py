"""``capi data``: import datasets into CAPI's Parquet format."""

from __future__ import annotations

import click


@click.group()
def data() -> None:
    """Import image datasets into Parquet shards (one row per encoded image)."""
