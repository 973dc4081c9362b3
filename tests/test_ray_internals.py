"""The private Ray names orchestrator/ray_internals.py relies on still exist in the installed Ray.

These fail loudly, by name, when Ray is upgraded: re-check each use in ray_internals.py against the
new release, then update its RAY_VERSION.
"""

from __future__ import annotations

import importlib
import inspect
import logging

import ray
from ray.job_submission import JobSubmissionClient
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator import ray_internals
from orchestrator.sweep import jobs


def test_ray_is_the_release_the_private_uses_were_checked_against():
    assert ray.__version__ == ray_internals.RAY_VERSION, (
        f"Ray {ray.__version__} is installed, but orchestrator/ray_internals.py was checked against "
        f"{ray_internals.RAY_VERSION}: re-check every private use there, then update RAY_VERSION")


def test_every_private_name_still_resolves():
    missing = [f"{module}.{name}" for module, names in ray_internals.PRIVATE_NAMES.items()
               for name in names if not hasattr(importlib.import_module(module), name)]
    assert not missing, f"gone from this Ray: {missing}"
    assert isinstance(importlib.import_module("ray.train.v2._internal.execution.context").logger, logging.Logger)
    assert ray_internals.SNAPSHOT == "checkpoint_manager_snapshot.json"  # the name existing run directories hold


def test_tune_report_callback_still_reports_through_the_queue_we_redirect():
    for method in (TuneReportCallback.__init__, TuneReportCallback.after_report):
        assert f"self.{ray_internals.REPORT_QUEUE}" in inspect.getsource(method), method.__qualname__


def test_redirected_reports_go_to_our_queue():
    callback = object.__new__(TuneReportCallback)  # its __init__ needs a Tune session
    sink = []
    ray_internals.set_report_queue(callback, type("Sink", (), {"put": lambda self, item: sink.append(item)})())
    ray_internals.report_queue(callback).put({"step": 1})
    assert sink == [{"step": 1}]
    assert ray_internals.report_poll_interval_s() > 0


def test_the_jobs_client_still_sends_every_request_through_the_method_we_bound():
    method = getattr(JobSubmissionClient, ray_internals.JOB_REQUEST)
    assert "**kwargs" in inspect.getsource(method) and "requests.request(" in inspect.getsource(method)
    assert ray_internals.JOB_REQUEST in vars(jobs.BoundedJobClient)  # the override is the pinned name
    # get_job_status asks get_job_info
    for public in (JobSubmissionClient.submit_job, JobSubmissionClient.get_job_info, JobSubmissionClient.stop_job):
        assert f"self.{ray_internals.JOB_REQUEST}(" in inspect.getsource(public), public.__qualname__
