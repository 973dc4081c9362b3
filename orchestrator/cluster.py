"""The Ray cluster a run or a sweep works on: a local one this process starts, or one it joins.

A local Ray gets its dashboard on loopback (its Jobs API runs any code) and ``LOCAL_RAY_ENV``'s
switches; a joined cluster gets this project's packages shipped as ``py_modules``, so that its
workers run the same ``capi_core`` and ``orchestrator`` as the driver, whatever they have installed.
"""

from __future__ import annotations

import os
import socket

import ray

import capi_core
import orchestrator

# Cluster-only Ray Train helpers that a local Ray (one machine, never drained) does not need. Each Ray
# process wakes 100 times a second, about 1 % of a core on a small VM (benchmarks/ray_overhead.py).
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # it polls for node drains
API_SERVER_VARIABLE = "RAY_API_SERVER_ADDRESS"  # read by Ray's State and Jobs clients before they auto-detect


def init_local_ray(**options) -> None:
    """Start a local Ray: its dashboard on loopback (its Jobs API runs any code) and, unless the user
    set them, ``LOCAL_RAY_ENV``'s switches, which Ray's processes inherit from this one.

    The dashboard stays on, although it costs ~2 % of a core: it serves the State API that Train's
    placement-group cleaner asks about the controller (without it that actor warns every few seconds).
    That cleaner finds the State API by auto-detecting "the" local Ray, which fails when a second Ray
    runs on the machine (another sweep, a test, a user's `ray start`): seen here, every cleaner died
    with "Found multiple active Ray instances", finished trials kept their CPUs, and the next trials
    timed out waiting for a worker. So the dashboard gets a port chosen here, and Ray's processes are
    told it (``API_SERVER_VARIABLE``).
    """
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    port = options.pop("dashboard_port", None) or free_port()
    # Only while Ray starts: its processes inherit it from this one then, but in this process the
    # variable would override every address given explicitly afterwards (Ray's clients prefer it).
    previous = os.environ.get(API_SERVER_VARIABLE)
    os.environ[API_SERVER_VARIABLE] = f"http://127.0.0.1:{port}"
    try:
        ray.init(dashboard_host="127.0.0.1", dashboard_port=port, **options)
    finally:
        if previous is None:
            del os.environ[API_SERVER_VARIABLE]
        else:
            os.environ[API_SERVER_VARIABLE] = previous


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_cluster(address: str, **options) -> None:
    """Connect to the Ray cluster at ``address`` (``auto``, ``ray://HOST:PORT`` or a GCS address),
    shipping ``capi_core`` and ``orchestrator`` to its workers; ``options`` go to ``ray.init``."""
    modules = [os.path.dirname(capi_core.__file__), os.path.dirname(orchestrator.__file__)]
    ray.init(address=address, runtime_env={"py_modules": modules}, **options)
