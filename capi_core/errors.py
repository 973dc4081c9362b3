"""The root of the project's own errors: a problem with the user's input or environment.

Every module raises its own subclass (``ConfigError``, ``DatasetError``, ``CheckpointError``, ...)
whose message names the file, field or value. The ``capi`` command catches this one base class, so
it prints each of them as a short paragraph without importing the heavy modules that define them;
anything else is a bug and keeps its traceback (written to a file, see ``orchestrator.cli``).
"""

from __future__ import annotations


class CapiError(Exception):
    """An error the user can act on. ``hint`` says what to do; ``exit_code`` is what ``capi`` exits
    with: 2 for a bad value given on the command line or in a file (click's usage-error code), 1 for
    a problem met while working (a corrupt file, an unreachable server)."""

    hint: str = ""
    exit_code: int = 1
