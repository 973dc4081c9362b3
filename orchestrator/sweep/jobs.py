"""Submitting a sweep to a Ray cluster through the Ray Jobs API, with token authentication.

The job runs ``capi sweep run FILE`` on the head node with this project as its working directory
(virtual environments, run outputs, MLflow stores and git metadata left out). Anyone who can reach
an unauthenticated Jobs API can run code on the cluster (ShadowRay, CVE-2023-48022), so a cluster
that answers without a token is refused unless the caller says ``insecure``. The token comes from
``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, Ray's own order; it is
sent as a bearer header and never printed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ray.job_submission import JobSubmissionClient

from capi_core.errors import CapiError

# Left out of the uploaded working directory: environments, outputs, stores, VCS metadata.
EXCLUDES = [".venv", "venv", "runs", "mlruns", "mlartifacts", "*.db", ".git", "__pycache__", "*.egg-info",
            ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(CapiError, RuntimeError):
    """The cluster cannot take the job (unreachable, unauthenticated, bad token); the message says why."""


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


def _get(url: str, headers: dict[str, str], timeout: float) -> int:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def requires_token(address: str, timeout: float = 10.0) -> bool:
    """Whether the Jobs API at ``address`` (``http://HEAD:8265``) refuses a request without a token."""
    if not address.startswith(("http://", "https://")):
        raise JobError(f"--address must be the dashboard's http(s)://HOST:8265, got {address!r}")
    try:
        status = _get(address.rstrip("/") + "/api/jobs/", {}, timeout)
    except (urllib.error.URLError, OSError) as err:
        raise JobError(f"Ray dashboard {address} is not reachable ({getattr(err, 'reason', err)})") from None
    if status in (401, 403):
        return True
    if status == 200:
        return False
    raise JobError(f"Ray dashboard {address} answered /api/jobs/ with HTTP {status}; is it a Ray dashboard?")


def job_client(address: str, insecure: bool = False, timeout: float = 10.0):
    """A ``JobSubmissionClient`` for ``address`` carrying the token; refuses an unauthenticated cluster
    unless ``insecure``."""
    if not requires_token(address, timeout):
        if not insecure:
            raise JobError(f"the Ray cluster at {address} accepts jobs without authentication: anyone who can reach "
                           f"it can run code there. Start it with token authentication (RAY_AUTH_MODE=token, see "
                           f"infra/) or, on an isolated network you trust, pass --insecure")
        return JobSubmissionClient(address)
    token = auth_token()
    if token is None:
        raise JobError(f"the Ray cluster at {address} requires a token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, "
                       f"or put it in ~/.ray/auth_token (`ray get-auth-token` on the head prints it)")
    headers = {"Authorization": f"Bearer {token}"}
    if _get(address.rstrip("/") + "/api/jobs/", headers, timeout) != 200:
        raise JobError(f"the Ray cluster at {address} rejected the token (from "
                       f"{'RAY_AUTH_TOKEN' if os.environ.get('RAY_AUTH_TOKEN') else 'the token file'})")
    return JobSubmissionClient(address, headers=headers)


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
    return client.submit_job(entrypoint=entrypoint(sweep_file, project_dir), submission_id=submission_id,
                             runtime_env={"working_dir": str(project_dir.resolve()), "excludes": EXCLUDES},
                             metadata={"capi.sweep": sweep_name})


def follow(client, job_id: str, echo: Callable[[str], None]) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            echo(chunk.rstrip("\n"))

    asyncio.run(tail())
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL:  # the log stream can close just before the status flips
        time.sleep(1)
        status = str(client.get_job_status(job_id))
    return status.split(".")[-1]
