"""Shared fixtures: a tiny generated dataset, a real MLflow server on loopback, a local Ray instance.

Everything a fixture starts it also stops, by process id; nothing touches the real home directory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.cluster import free_port

# The trainer caches random-init probe baselines under the CAPI cache; the suite keeps its own, so it
# neither reads a developer's entries nor leaves files in the real home directory, and removes it at
# exit (it holds an imported dataset and probe sets: ~36 MB a session).
if "CAPI_CACHE_DIR" not in os.environ:
    os.environ["CAPI_CACHE_DIR"] = tempfile.mkdtemp(prefix="capi-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CAPI_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _forget_ray_auth_token():
    """Each test module starts its Ray under its own temporary HOME, but Ray caches the auth token
    process-wide: without a reset, a later module's ``ray.init`` finds the earlier token cached,
    writes none under the new HOME, and its GCS aborts for want of one."""
    yield
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 16x16 grey two-split dataset (512 train, 128 test) imported through the real IDX importer."""
    from synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data"))


def _stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process started with its own session, and the children it spawned, by its pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    else:  # the server process ended; its workers may not have
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI of a real ``mlflow server`` on 127.0.0.1 (sqlite in tmp, proxied artifacts, no job runner)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    with open(root / "server.log", "wb") as out:
        proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield uri
    finally:
        _stop_group(proc)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module, with HOME (so the auth token Ray writes) in a temp dir.

    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2`` makes worker-group failures show up fast; Train
    workers start within 30 s or the run fails instead of waiting.
    """
    import ray

    # A short path: Ray's unix sockets live under the temp dir and must stay under ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {
        "HOME": str(root / "home"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "90",
    }
    (root / "home").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):  # a token from elsewhere
            mp.delenv(key, raising=False)
        # Logical CPUs: 2 Train workers plus a Tune trial driver fit on a 2-core machine.
        ray.init(num_cpus=4, _temp_dir=str(root / "t"), include_dashboard=True, log_to_driver=True,
                 configure_logging=False)
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(root, ignore_errors=True)
