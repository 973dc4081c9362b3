"""A sweep submitted to a real two-node Ray cluster with token authentication, through the Jobs API.

The cluster is two raylets on this machine, started by ``ray start`` with ports of their own: a
head (dashboard on loopback) and a second node joined over loopback, both with
``RAY_AUTH_MODE=token`` and a token file. ``capi sweep submit --follow`` sends a cpu-tiny sweep of
two one-worker trials; the job runs ``capi sweep run`` on the head and the trials log into a real
MLflow server, whose address (with a password in it) the cluster has in its environment, the way
docs/cluster.md sets MLflow up. Everything started here is stopped by process id.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from ray_nodes import RayNodes, jobs_api_status, node_env

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the processes to stop in /proc")

CAPI = Path(sys.executable).with_name("capi")
SECOND = "second_node"  # custom resource that tells the joined node apart


@pytest.fixture(scope="module")
def cluster(mlflow_server):
    """(nodes, token, MLflow password): a head and a second node of one CPU each, token auth on."""
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's unix sockets live below it
    (root / "home").mkdir()
    token, password = secrets.token_hex(32), secrets.token_hex(16)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    uri = mlflow_server.replace("http://", f"http://capi-sweeps:{password}@", 1)
    env = node_env(root / "home", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
                   MLFLOW_TRACKING_URI=uri, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
                   RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="90")
    nodes = RayNodes(root, env)
    try:
        nodes.start_head(num_cpus=1)
        nodes.add_node(num_cpus=1, resources={SECOND: 1})
        yield nodes, token, password
    finally:
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)


def sweep_file(project: Path, dataset: Path, storage: Path) -> Path:
    """Two cpu-tiny trials of one worker each, both at once; MLflow from the cluster's environment.

    0.9 CPU per worker: a node holds one worker next to the trials' Tune drivers (0.01 CPU each,
    wherever Ray puts them) but never two, so two trials that run at once use both nodes.
    """
    doc = {
        "name": "two-nodes",
        "base": {"preset": "cpu-tiny", "overrides": {
            "data.dataset": str(dataset), "data.loader_workers": 0, "optim.steps": 10, "probe.every": 5,
            "run.threads": 1}},
        "search_space": {"loss.teacher_temp": {"grid": [0.02, 0.05]}},
        "search": {"algorithm": "grid"},
        "budget": {"max_concurrent_trials": 2},
        "resources": {"workers": 1, "cpus_per_worker": 0.9},
        "storage": str(storage),
        "mlflow": {"experiment": "two-nodes"},
    }
    path = project / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_sweep_submitted_with_a_token_runs_a_trial_on_each_node_and_tracks_to_mlflow(
        cluster, mlflow_server, tiny_dataset, tmp_path):
    nodes, token, password = cluster
    assert jobs_api_status(nodes.dashboard) == 401  # token auth is on: no token, no Jobs API
    assert jobs_api_status(nodes.dashboard, token) == 200

    project = tmp_path / "project"  # shipped as the job's working directory
    project.mkdir()
    file = sweep_file(project, tiny_dataset, tmp_path / "sweeps")
    env = node_env(Path(nodes.env["HOME"]), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=nodes.env["RAY_AUTH_TOKEN_PATH"])
    result = subprocess.run([str(CAPI), "sweep", "submit", str(file), "--address", nodes.dashboard,
                             "--project-dir", str(project), "--follow"],
                            env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "submitted job capi-sweep-two-nodes-" in output and ": SUCCEEDED" in output
    # The job's whole log came back through --follow; neither secret is in it.
    assert token not in output
    assert password not in output

    # Results: one finished child run per trial, nested under the sweep's parent, in our server.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("capi.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(float(r.data.params["loss.teacher_temp"]) for r in children) == [0.02, 0.05]
    assert all(r.info.status == "FINISHED" and "probe/knn_top1" in r.data.metrics for r in children)
    assert parent.info.status == "FINISHED"
    for run in [parent, *children]:
        assert password not in repr(run.data.params) + repr(run.data.tags)

    # Placement, from the cluster's State API: one trial process per trial (one-worker trials train in
    # their Tune trial's own process, an actor of Tune's ImplicitFunc class), one on each node.
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    state = StateApiClient(nodes.dashboard, headers={"Authorization": f"Bearer {token}"})
    node_ids = {n.node_id: SECOND in n.resources_total
                for n in state.list(StateResource.NODES, ListApiOptions(detail=True), raise_on_missing_output=True)}
    workers = state.list(StateResource.ACTORS, ListApiOptions(filters=[("class_name", "=", "ImplicitFunc")]),
                         raise_on_missing_output=True)
    assert len(node_ids) == 2 and sorted(node_ids.values()) == [False, True]
    assert len(workers) == 2, [(w.actor_id, w.state, w.node_id) for w in workers]
    assert {w.node_id for w in workers} == set(node_ids)


def test_image_folder_import_runs_as_ray_tasks_on_the_cluster(cluster, tmp_path):
    """``capi data import imagefolder --address``: the shards are Ray tasks on the cluster's nodes (here
    both see one file system), the driver writes the manifest. (Which nodes run them is Ray's choice:
    at 2 images a task the first warm worker often finishes them all before the other node's starts.)"""
    import numpy as np
    from PIL import Image

    from capi_core.data import verify_dataset

    nodes, token, _ = cluster
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(16):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(root / f"c{i % 2}" / f"{i}.jpg")
    env = node_env(Path(nodes.env["HOME"]), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=nodes.env["RAY_AUTH_TOKEN_PATH"])
    result = subprocess.run([str(CAPI), "data", "import", "imagefolder", str(root), "--out", str(tmp_path / "ds"),
                             "--shard-rows", "2", "--address", f"127.0.0.1:{nodes.gcs_port}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    manifest = verify_dataset(tmp_path / "ds")
    assert manifest.splits == {"train": 16} and manifest.encodings == {"jpeg-source": 16}

    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    state = StateApiClient(nodes.dashboard, headers={"Authorization": f"Bearer {token}"})
    tasks = state.list(StateResource.TASKS, ListApiOptions(filters=[("func_or_class_name", "=", "import_shard")],
                                                           detail=True), raise_on_missing_output=True)
    assert len(tasks) == 8 and {t.state for t in tasks} == {"FINISHED"}
    cluster_nodes = {n.node_id for n in state.list(StateResource.NODES, ListApiOptions(), raise_on_missing_output=True)}
    assert {t.node_id for t in tasks} <= cluster_nodes
