"""The ``capi`` command: data import, training, evaluation, sweeps and export.

Each sub-command lives in its own module and imports Ray, MLflow or torch only when it runs, so
``capi --help`` is instant and ``capi train`` works on a machine without Ray or MLflow.

Errors take one path, ``_ErrorsAsMessages``: the project's own errors (``capi_core.errors.CapiError``
and its subclasses: config, dataset, checkpoint, sweep, tracking, ...) print as one paragraph naming
the file, field or value and what to do, with their exit code (2 for a bad value, 1 otherwise);
anything else is a bug, printed as one line plus the file that holds its traceback (``--debug``
prints the traceback instead).
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import click

from capi_core.errors import CapiError
from orchestrator.cli import data, eval, export, sweep, train


class CapiCliError(click.ClickException):
    """A ``CapiError`` as click prints it: ``Error: message`` and the hint, with the error's exit code."""

    def __init__(self, err: CapiError):
        hint = getattr(err, "hint", "")
        super().__init__(f"{err}" + (f"\n  what to do: {hint}" if hint else ""))
        self.exit_code = getattr(err, "exit_code", 1)


def crash_report_dir() -> Path:
    """Where tracebacks of unexpected errors go: ``$CAPI_CACHE_DIR/errors`` (else ``~/.cache/capi/errors``),
    beside the data the project already caches, so a user can attach the file to a bug report."""
    # deferred: pyarrow (capi_core.data); only a crash needs it
    from capi_core.data import cache_root

    return cache_root() / "errors"


def write_crash_report(exc: BaseException, argv: list[str]) -> Path | None:
    """The traceback of ``exc`` in a new file under ``crash_report_dir()``; None if it cannot be written
    (then the message says so instead of raising a second error)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        directory = crash_report_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"capi-{stamp}-{os.getpid()}.txt"
        path.write_text("capi " + " ".join(argv) + "\n\n"
                        + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return path
    except Exception:  # noqa: BLE001 - the report is a courtesy; the error itself must still be printed
        return None


class _ErrorsAsMessages(click.Group):
    """The one place where ``capi`` turns exceptions into messages and exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click prints these itself
        except CapiError as err:
            if ctx.params.get("debug"):
                raise
            raise CapiCliError(err) from None
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None  # click prints "Aborted!" and exits 1
        except Exception as err:  # noqa: BLE001 - the last resort: a bug, reported as such
            if ctx.params.get("debug"):
                raise
            report = write_crash_report(err, sys.argv[1:])
            where = (f"the full traceback is in {report}" if report is not None
                     else "the traceback could not be written")
            message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise click.ClickException(
                f"unexpected {type(err).__name__}{': ' + message if message else ''}\n  {where}; rerun with "
                f"`capi --debug ...` to print it, and please report it") from None


@click.group(cls=_ErrorsAsMessages,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="capi-orchestrator")
@click.option("--debug", is_flag=True, envvar="CAPI_DEBUG",
              help="Print the full Python traceback of any error instead of a short message.")
def main(debug: bool) -> None:
    """Pretrain ViTs with CAPI, from a laptop CPU to a Ray cluster, tracked in MLflow.

    \b
    Typical flow:
      capi data import fashion-mnist        # or: idx IMAGES LABELS, imagefolder DIR
      capi train --preset cpu-demo          # one run, standalone or --workers N on Ray
      capi eval CHECKPOINT                  # probes, register diagnostics, pictures
      capi sweep run sweeps/quickstart.yaml # a Ray Tune sweep tracked in MLflow
      capi export --sweep NAME --out DIR    # timm-loadable weights + model card
    """


main.add_command(data.data)
main.add_command(train.train)
main.add_command(eval.eval_)
main.add_command(sweep.sweep)
main.add_command(export.export)
