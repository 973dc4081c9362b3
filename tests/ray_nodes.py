"""Real Ray nodes for tests: ``ray start --block`` processes under one temp dir, stopped by process id.

``ray stop`` kills every Ray process on the machine by name, other tests' and other users' too.
These helpers stop only what they started: the processes in the sessions of their own
``ray start`` commands, and any process whose command line names their temp dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.cluster import free_port

RAY = Path(sys.executable).with_name("ray")


def node_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for ``ray start``: a temp HOME, no usage stats, this venv first on PATH (a job's
    entrypoint runs with the head's PATH), and no Ray or MLflow setting inherited from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def jobs_api_status(dashboard: str, token: str | None = None) -> int:
    """HTTP status of the Jobs API's job list, with or without a bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{dashboard}/api/jobs/", headers=headers),
                                    timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@dataclass
class RayNodes:
    """A head and further nodes on this machine, each on its own ports, all under ``root``.

    ``root`` must be a short path: Ray's unix sockets live below it (at most ~107 characters).
    """

    root: Path
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    gcs_port: int = 0
    dashboard: str = ""

    def start_head(self, num_cpus: int) -> str:
        """Start the head with its dashboard on loopback; returns the dashboard's URL."""
        self.gcs_port, port = free_port(), free_port()
        self._start("head", ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(port), "--ray-client-server-port", str(free_port()),
                             "--num-cpus", str(num_cpus)])
        self.dashboard = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60  # the Jobs API comes up a little after `ray start` returns
        while jobs_api_status(self.dashboard) not in (200, 401):
            assert time.monotonic() < deadline, f"no Jobs API at {self.dashboard}"
            time.sleep(0.3)
        return self.dashboard

    def add_node(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        """Join a node to the head over loopback."""
        self._start(f"node{len(self.procs)}", [
            "--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(num_cpus),
            "--resources", json.dumps(resources or {}),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())])

    def _start(self, name: str, args: list[str], timeout: float = 120) -> None:
        """Run ``ray start --block`` with ``args``, in a temp dir of the node's own (as on separate
        machines: nodes sharing one unpack job packages into the same folders, over each other)."""
        # Every agent gets a port of its own: two raylets on one host would otherwise clash on the
        # fixed defaults (52365 for the dashboard agent, for one).
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port"]
        log = self.root / f"{name}.log"
        command = [str(RAY), "start", "--block", "--temp-dir", str(self.root / name), "--disable-usage-stats",
                   *args, *[x for p in ports for x in (p, str(free_port()))]]
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`ray start` ({name}) failed:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """Live processes in the sessions of our ``ray start`` commands or naming our temp dir."""
        sessions = {p.pid for p in self.procs}
        marker = str(self.root).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if stat[0] != "Z" and (int(stat[3]) in sessions or marker in cmdline):
                found.append(int(entry.name))
        return found

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM everything we started, SIGKILL what is left after ``grace`` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        for proc in self.procs:
            proc.wait(10)
        assert not self.pids(), f"Ray processes left running: {self.pids()}"
