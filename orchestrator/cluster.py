"""The Ray cluster a run or a sweep works on: a local one this process starts, or one it joins.

A local Ray gets its dashboard on loopback (its Jobs API runs any code) and ``LOCAL_RAY_ENV``'s
switches; a joined cluster gets this project's packages shipped as ``py_modules``, so that its
workers run the same ``capi_core`` and ``orchestrator`` as the driver, whatever they have installed.
Before joining, the address must answer within ``CONNECT_TIMEOUT_S`` (``check_address``), and a
cluster that cannot be joined is a ``ClusterError`` that names the address.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import ray

import capi_core
import orchestrator
from capi_core.errors import CapiError

# Switches for a local Ray, set in this process before it starts Ray so that Ray's processes inherit them.
LOCAL_RAY_ENV = {
    # A cluster-only Ray Train helper that polls for node drains; a local Ray is never drained. Each Ray
    # process wakes 100 times a second, about 1 % of a core on a small VM (benchmarks/ray_overhead.py).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # By default the raylet answers the first driver only once the workers it prestarts for it have
    # registered; one that misses the 60 s registration limit (a starved CPU: seen here, a 2-core VM
    # running another sweep) is given up on and ray.init never returns (Ray issue 40131). Without the
    # wait, workers start when a trial needs one, and a worker that cannot start is an error, not a hang.
    "RAY_prestart_worker_first_driver": "0",
}
API_SERVER_VARIABLE = "RAY_API_SERVER_ADDRESS"  # read by Ray's State and Jobs clients before they auto-detect
# How long a cluster's address may take to accept a TCP connection, and then to answer the start of an
# HTTP/2 connection (the Ray Client server and the GCS both speak gRPC): seconds for any live head node,
# even across regions, so a longer silence means a wrong, firewalled or wedged address.
CONNECT_TIMEOUT_S = 10.0
# A client's HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113, 3.4): a gRPC server answers
# with its own SETTINGS frame, a TLS server with an alert or by closing; a wedged one says nothing.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


class ClusterError(CapiError, RuntimeError):
    """The Ray cluster at an address cannot be joined (nothing listens, no answer in time, Ray refused);
    the message names the address."""

    hint = ("check --address (ray://HEAD:10001 for Ray Client, HEAD:6379 for the head's GCS, or auto for a "
            "cluster started on this machine) and that the cluster is up (`ray status` on the head)")


class LocalRayError(CapiError, RuntimeError):
    """A local Ray did not start. Seen on a 2-core VM at load ~8: Ray gives its raylet 30 s to register
    and then raises a bare ``Exception`` ("The current node timed out during startup"), which reached
    the user as an unexpected error although nothing in this project was wrong."""

    hint = ("a machine short of CPU or memory can miss Ray's start-up limit: check `uptime` and free memory, "
            "stop other heavy work and retry; a temporary directory Ray cannot write (RAY_TMPDIR, /tmp) fails "
            "the same way; or join a running cluster with --address")


class AddressError(CapiError, ValueError):
    """An address of the wrong kind (a dashboard's where a cluster's is needed, or the reverse): a bad
    value, exit code 2; the message says which kind the command takes."""

    exit_code = 2


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
    except Exception as err:  # noqa: BLE001 - Ray raises bare Exception for a start-up timeout
        raise LocalRayError(f"could not start a local Ray: {type(err).__name__}: {err}") from err
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
    shipping ``capi_core`` and ``orchestrator`` to its workers; ``options`` go to ``ray.init``.

    ``check_address`` first, because ``ray.init`` takes no time limit: against a loopback port where
    nothing listens, or one that never answers, Ray 2.60 gave up on ``ray://`` after 30 s with
    "ray client connection timeout" (no address named) and had not returned from a GCS address after
    5 minutes. Its own knobs (``RAY_CLIENT_*_CONNECTION_TIMEOUT_S``, ``RAY_NUM_REDIS_GET_RETRIES``)
    are environment variables read when Ray is imported, not per call. What the check cannot see is
    a server that answers the HTTP/2 handshake and then never answers Ray's first request (Ray
    pings a ``ray://`` server without a deadline).
    """
    check_address(address)
    modules = [os.path.dirname(capi_core.__file__), os.path.dirname(orchestrator.__file__)]
    try:
        ray.init(address=address, runtime_env={"py_modules": modules}, **options)
    except ConnectionError as err:  # Ray's "ray client connection timeout", "could not find any running Ray"
        raise ClusterError(f"could not join the Ray cluster at {address}: {err}") from None


def check_address(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ClusterError unless the Ray address ``address`` accepts a TCP connection and answers the
    start of an HTTP/2 connection, each within ``timeout`` seconds. ``auto`` (and no address) is Ray's
    own search of this machine, unless RAY_ADDRESS names the cluster, which is then checked."""
    if address in (None, "auto"):
        address = os.environ.get("RAY_ADDRESS") or None
    if address in (None, "auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise AddressError(f"{address} is a web address (a dashboard's, for `capi sweep submit`); joining a "
                           f"cluster takes ray://HEAD:10001 or the head's GCS address HEAD:6379")
    try:
        parts = urlsplit(address if "://" in address else "//" + address)
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None:
        return  # not HOST:PORT: Ray's own parsing names the problem
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise ClusterError(f"the Ray cluster at {address} did not accept a connection within {timeout:g} s "
                           f"(a wrong or firewalled address?)") from None
    except ConnectionRefusedError:
        raise ClusterError(f"nothing listens at {address} (connection refused): no Ray cluster there") from None
    except OSError as err:  # an unknown host, an unreachable network
        raise ClusterError(f"the Ray cluster at {address} is not reachable ({err.strerror or err})") from None
    with sock:
        try:
            sock.sendall(HTTP2_PREFACE)
            sock.recv(1)  # bytes or a closed connection: something answered
        except TimeoutError:
            raise ClusterError(f"the Ray cluster at {address} accepted a connection but did not answer within "
                               f"{timeout:g} s (not a Ray port, or a wedged head node?)") from None
        except OSError:
            pass  # reset: something answered, if not as Ray would; ray.init says what
