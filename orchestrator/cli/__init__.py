"""The ``capi`` command: data import, training, evaluation, sweeps and export.

Each sub-command lives in its own module and imports Ray, MLflow or torch only when it runs, so
``capi --help`` is instant and ``capi train`` works on a machine without Ray or MLflow.
"""

from __future__ import annotations

import click

from orchestrator.cli import data, eval, export, sweep, train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="capi-orchestrator")
def main() -> None:
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
