"""Submitting a sweep to a Ray cluster through the Ray Jobs API, with token authentication.

The job runs ``capi sweep run FILE`` on the head node with this project as its working directory
(virtual environments, run outputs, MLflow stores and git metadata left out). Anyone who can reach
an unauthenticated Jobs API can run code on the cluster (ShadowRay, CVE-2023-48022), so a cluster
that answers without a token is refused unless the caller says ``insecure``. The token comes from
``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, Ray's own order; it is
sent as a bearer header and never printed.

Every request to the dashboard has a time limit and an error that names the address: Ray's client
sends its requests without one, so a head that accepts the connection and never answers (an
overloaded or wedged dashboard, a firewall that drops packets) would hang ``capi sweep submit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import requests
from ray.job_submission import JobSubmissionClient

from capi_core.errors import CapiError
from orchestrator.cluster import AddressError

# Left out of the uploaded working directory: environments, outputs, stores, VCS metadata.
EXCLUDES = [".venv", "venv", "runs", "mlruns", "mlartifacts", "*.db", ".git", "__pycache__", "*.egg-info",
            ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Time limits of the requests to the dashboard, in seconds: connecting (a black-holed address fails
# here), then waiting for the answer. The first request, which asks whether the Jobs API wants a token,
# is quick for any dashboard, so a silent one is named after CHECK_TIMEOUT_S; the later ones get
# REQUEST_TIMEOUT_S, as the dashboard may legitimately take a while to take a job (it waits up to 10 s
# for its head agent, and stores an uploaded working directory first).
CHECK_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 60.0
# While --follow prints a job's logs, how long the log stream may stay silent before the job's status is
# asked (a bounded request): a job that prints nothing for a while is fine, a dashboard gone silent is not.
QUIET_CHECK_S = 30.0


class JobError(CapiError, RuntimeError):
    """The cluster cannot take the job (unreachable, unauthenticated, bad token); the message says why."""


class DashboardError(JobError):
    """The dashboard at an address does not answer, or not in time; the message names the address."""

    hint = ("check --address (the head's dashboard, http://HEAD:8265) and that the cluster is up (`ray status` on "
            "the head)")


class BoundedJobClient(JobSubmissionClient):
    """Ray's ``JobSubmissionClient`` with a time limit on every HTTP request it makes, the version checks
    of its constructor included. Its public methods take no timeout and call ``requests`` without one;
    all of them go through ``_do_request``, which passes extra keywords on to ``requests.request``
    (private: ``ray_internals.JOB_REQUEST``)."""

    def _do_request(self, method: str, endpoint: str, **kwargs):
        kwargs.setdefault("timeout", (CHECK_TIMEOUT_S, REQUEST_TIMEOUT_S))
        return super()._do_request(method, endpoint, **kwargs)


@contextlib.contextmanager
def answering(address: str, what: str, limit: float | None = None):
    """Turn a dashboard that does not connect within CHECK_TIMEOUT_S, does not answer ``what`` within
    ``limit`` seconds (default REQUEST_TIMEOUT_S), or refuses or drops the connection, into a
    DashboardError naming ``address``."""
    limit = REQUEST_TIMEOUT_S if limit is None else limit
    try:
        yield
    except requests.exceptions.ConnectTimeout:
        raise DashboardError(f"the Ray dashboard at {address} did not accept a connection within "
                             f"{CHECK_TIMEOUT_S:g} s ({what})") from None
    except requests.exceptions.Timeout:
        raise DashboardError(f"the Ray dashboard at {address} did not answer {what} within {limit:g} s") from None
    except (requests.exceptions.ConnectionError, ConnectionError) as err:
        raise DashboardError(f"the Ray dashboard at {address} is not reachable ({what}: {_reason(err)})") from None


def _reason(err: BaseException) -> str:
    """The operating system's word for a failed connection (``Connection refused``), found through the
    errors that requests and urllib3 wrap around it; else the error's first line."""
    seen, cause = set(), err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__ or getattr(cause, "reason", None)
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def auth_token() -> str | None:
    """The Ray auth token: ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``; None if there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError:
        return None
    return token or None


def _jobs_api_status(address: str, headers: dict[str, str]) -> int:
    """The HTTP status with which the dashboard at ``address`` answers a request to list its jobs."""
    with answering(address, "GET /api/jobs/", CHECK_TIMEOUT_S):
        return requests.get(address.rstrip("/") + "/api/jobs/", headers=headers, timeout=CHECK_TIMEOUT_S).status_code


def requires_token(address: str) -> bool:
    """Whether the Jobs API at ``address`` (``http://HEAD:8265``) refuses a request without a token."""
    if not address.startswith(("http://", "https://")):
        raise AddressError(f"--address must be the dashboard's http(s)://HOST:8265, got {address!r} (ray:// and "
                           f"GCS addresses are for `capi sweep run --address`)")
    status = _jobs_api_status(address, {})
    if status in (401, 403):
        return True
    if status == 200:
        return False
    raise JobError(f"Ray dashboard {address} answered /api/jobs/ with HTTP {status}; is it a Ray dashboard?")


def job_client(address: str, insecure: bool = False) -> BoundedJobClient:
    """A ``BoundedJobClient`` for ``address`` carrying the token; refuses an unauthenticated cluster
    unless ``insecure``."""
    if not requires_token(address):
        if not insecure:
            raise JobError(f"the Ray cluster at {address} accepts jobs without authentication: anyone who can reach "
                           f"it can run code there. Start it with token authentication (RAY_AUTH_MODE=token, see "
                           f"infra/) or, on an isolated network you trust, pass --insecure")
        headers = {}
    else:
        token = auth_token()
        if token is None:
            raise JobError(f"the Ray cluster at {address} requires a token: set RAY_AUTH_TOKEN or "
                           f"RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token (`ray get-auth-token` on the head "
                           f"prints it)")
        headers = {"Authorization": f"Bearer {token}"}
        if _jobs_api_status(address, headers) != 200:
            raise JobError(f"the Ray cluster at {address} rejected the token (from "
                           f"{'RAY_AUTH_TOKEN' if os.environ.get('RAY_AUTH_TOKEN') else 'the token file'})")
    with answering(address, "the version check"):
        return BoundedJobClient(address, headers=headers or None)


def entrypoint(sweep_file: Path, project_dir: Path) -> str:
    """``capi sweep run <file relative to the working directory>``; the file must be inside it."""
    try:
        relative = sweep_file.resolve().relative_to(project_dir.resolve())
    except ValueError:
        raise JobError(f"{sweep_file} is outside the project directory {project_dir} that is shipped as the "
                       f"job's working directory; move it inside or pass --project-dir") from None
    return f"capi sweep run {shlex.quote(relative.as_posix())}"


def portability_warnings(spec) -> list[str]:
    """What in a sweep file would not survive running as a job: the job's working directory is a
    copy that Ray deletes afterwards, so relative storage and a default local MLflow store vanish."""
    out = []
    if not Path(spec.storage).is_absolute():
        out.append(f"storage {spec.storage} is relative: on the cluster it lands in the job's temporary copy of "
                   f"the project; set storage to an absolute path on a filesystem the nodes share")
    if spec.mlflow.tracking_uri is None:
        out.append("mlflow.tracking_uri is not set: the job tracks into the cluster's MLFLOW_TRACKING_URI, or a "
                   "local store in its temporary working directory; set it to your MLflow server")
    elif "://" not in spec.mlflow.tracking_uri or spec.mlflow.tracking_uri.startswith(("sqlite:", "file:")):
        out.append(f"mlflow.tracking_uri {spec.mlflow.tracking_uri} is a local store: nodes other than the head "
                   f"cannot log to it; use an MLflow server")
    return out


def submit(client, sweep_name: str, sweep_file: Path, project_dir: Path) -> str:
    """Submit the sweep as a Ray job; returns the job's submission id."""
    submission_id = f"capi-sweep-{sweep_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with answering(client.get_address(), "the job submission"):
        return client.submit_job(entrypoint=entrypoint(sweep_file, project_dir), submission_id=submission_id,
                                 runtime_env={"working_dir": str(project_dir.resolve()), "excludes": EXCLUDES},
                                 metadata={"capi.sweep": sweep_name})


def follow(client, job_id: str, echo: Callable[[str], None]) -> str:
    """Print the job's logs as they come until it ends; returns its final status.

    The log stream (a websocket) has no time limit of its own, and a job may print nothing for
    minutes, so a stream silent for ``QUIET_CHECK_S`` is checked by asking the job's status, a
    bounded request: a dashboard that no longer answers ends the wait with a DashboardError, and a job that
    has ended while its stream stayed open ends it as well."""
    async def tail() -> None:
        lines = client.tail_job_logs(job_id).__aiter__()
        while True:
            chunk = asyncio.ensure_future(lines.__anext__())
            while not (await asyncio.wait({chunk}, timeout=QUIET_CHECK_S))[0]:
                if _status(client, job_id) in TERMINAL:
                    chunk.cancel()
                    return
            try:
                echo(chunk.result().rstrip("\n"))
            except StopAsyncIteration:
                return

    asyncio.run(tail())
    status = _status(client, job_id)
    while status not in TERMINAL:  # the log stream can close just before the status flips
        time.sleep(1)
        status = _status(client, job_id)
    return status


def _status(client, job_id: str) -> str:
    """The job's status, ``SUCCEEDED`` and so on (a bounded request)."""
    with answering(client.get_address(), f"the status of job {job_id}"):
        return str(client.get_job_status(job_id)).split(".")[-1]
