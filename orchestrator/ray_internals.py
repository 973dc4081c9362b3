"""Every use of Ray's private API, in one place, with the Ray release it was checked against.

Five things this project needs have no public Ray API: how often Train's controller takes a report
(``RayReport`` paces its reports by it), the logger under which Train logs every report (too chatty
for the console), the file in which Train records a run's checkpoints (it tells a Ray run from a
standalone one), the queue through which Tune's ``TuneReportCallback`` hands reports to Tune
(PBT trials redirect it to a queue of their own) and the one method through which the Jobs client
sends its HTTP requests (``orchestrator.sweep.jobs`` gives them a time limit there). Ray may change
any of them in any release, so ``tests/test_ray_internals.py`` checks ``RAY_VERSION`` and every name
used here: when it fails, re-check each use below against the new Ray, then update both.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.train.v2._internal import constants as train_constants
from ray.train.v2._internal.execution import context as train_context
from ray.tune.integration.ray_train import TuneReportCallback

RAY_VERSION = "2.60.0"  # the release every use below was checked against
# module -> the private names of it used here (the test resolves each one)
PRIVATE_NAMES = {
    "ray.train.v2._internal.constants": ("HEALTH_CHECK_INTERVAL_S_ENV_VAR", "DEFAULT_HEALTH_CHECK_INTERVAL_S",
                                         "CHECKPOINT_MANAGER_SNAPSHOT_FILENAME"),
    "ray.train.v2._internal.execution.context": ("logger",),
}
REPORT_QUEUE = "_training_actor_item_queue"  # TuneReportCallback's queue to Tune, set in its __init__
# JobSubmissionClient's one HTTP call, whose extra keywords go to requests.request: jobs.BoundedJobClient
# overrides it to add a timeout. Named here, not imported: ray.job_submission takes seconds to import.
JOB_REQUEST = "_do_request"

# Ray Train's record of a run's reported checkpoints, in the run's storage directory.
SNAPSHOT = train_constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def report_poll_interval_s() -> float:
    """Seconds between the polls in which Train's controller takes one report from the workers
    (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2): a report made sooner blocks until the next."""
    return float(os.environ.get(train_constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR,
                                train_constants.DEFAULT_HEALTH_CHECK_INTERVAL_S))


def quiet_report_logs() -> None:
    """Keep Train's per-report INFO lines (metrics included) off the console: Ray Train 2.60 logs them
    under a logger named after its file, which its LoggingConfig level misses."""
    reporter = getattr(train_context, "logger", None)
    if isinstance(reporter, logging.Logger):
        reporter.setLevel(logging.WARNING)


def set_report_queue(callback: TuneReportCallback, queue: Any) -> None:
    """Send ``callback``'s reports to ``queue`` (anything with ``put``) instead of to Tune."""
    setattr(callback, REPORT_QUEUE, queue)


def report_queue(callback: TuneReportCallback) -> Any:
    """Where ``callback`` sends its reports: Tune's queue, unless ``set_report_queue`` replaced it."""
    return getattr(callback, REPORT_QUEUE)
