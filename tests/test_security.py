"""Security properties of what the tool runs, one test (or a few) per property.

* The local Ray that the CLI starts requires a token and binds its dashboard to loopback. What we
  ship for clusters (images, KubeRay, the cluster launcher, Slurm) is checked statically in
  tests/test_infra.py (``test_token_auth_and_loopback_dashboard`` and the per-file checkers); a
  real two-node cluster with token auth runs a sweep in tests/test_cluster.py.
* ``capi sweep submit`` refuses a real Ray cluster without authentication unless ``--insecure``.
* Passwords and tokens stay out of printed output, MLflow params, tags and artifacts, and run
  files (for a sweep's job log too: tests/test_cluster.py).
* Checkpoints are never unpickled: no unsafe deserialisation call in capi_core/ or orchestrator/
  (checked on the syntax tree), and a pickle disguised as model.safetensors is refused unrun.
* YAML is loaded safely: a python/object tag in a sweep or config file is an error, not a call.
"""

from __future__ import annotations

import ast
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from ray_nodes import RayNodes, jobs_api_status, node_env

from orchestrator.cli import main
from orchestrator.cluster import LOCAL_RAY_ENV

ROOT = Path(__file__).resolve().parents[1]
CAPI = Path(sys.executable).with_name("capi")
LINUX = pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads sockets and processes from /proc")


def tiny_sweep(directory: Path, dataset: Path, tracking_uri: str, name: str = "sec") -> Path:
    doc = {
        "name": name,
        "base": {"preset": "cpu-tiny", "overrides": {"data.dataset": str(dataset), "optim.steps": 4}},
        "search_space": {"loss.teacher_temp": {"grid": [0.02]}},
        "search": {"algorithm": "grid"},
        "storage": str(directory / "sweeps"),
        "mlflow": {"tracking_uri": tracking_uri},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ------------------------------------------------------------------------- the local Ray we start
@pytest.fixture(scope="module")
def cli_ray(tiny_dataset, tmp_path_factory):
    """(dashboard URL, HOME) of a local Ray started the way ``capi sweep run`` starts one."""
    import ray

    from orchestrator.sweep.spec import load_sweep
    from orchestrator.sweep.tune import init_ray

    root = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's unix sockets live below it
    spec = load_sweep(tiny_sweep(tmp_path_factory.mktemp("spec"), tiny_dataset, "sqlite:///unused.db"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root))
        mp.setenv("RAY_TMPDIR", str(root))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):  # Ray's defaults
            mp.delenv(key, raising=False)
        for key in LOCAL_RAY_ENV:  # set by init_ray: restored afterwards
            mp.delenv(key, raising=False)
        assert init_ray(spec, None), "a Ray was already running in this process"
        try:
            yield f"http://{ray._private.worker.global_worker.node.address_info['webui_url']}", root
        finally:
            ray.shutdown()
            shutil.rmtree(root, ignore_errors=True)


def test_local_ray_started_by_the_cli_requires_a_token(cli_ray):
    dashboard, home = cli_ray
    assert jobs_api_status(dashboard) == 401
    assert jobs_api_status(dashboard, (home / ".ray" / "auth_token").read_text().strip()) == 200


def test_local_ray_workers_inherit_the_local_switches(cli_ray):
    """Ray's processes (Train's controller among them) see LOCAL_RAY_ENV, e.g. no preemption watcher."""
    import ray

    @ray.remote(num_cpus=0)
    def environment(keys):
        return {k: os.environ.get(k) for k in keys}

    assert LOCAL_RAY_ENV["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert ray.get(environment.remote(list(LOCAL_RAY_ENV))) == LOCAL_RAY_ENV
    # Train's placement-group cleaner finds the State API through this variable, not by auto-detecting a
    # local Ray (which fails when two run on the machine); the driver itself keeps no copy of it.
    dashboard, _ = cli_ray
    assert ray.get(environment.remote(["RAY_API_SERVER_ADDRESS"])) == {"RAY_API_SERVER_ADDRESS": dashboard}
    assert "RAY_API_SERVER_ADDRESS" not in os.environ


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@LINUX
def test_local_ray_dashboard_listens_on_loopback_only(cli_ray):
    dashboard, _ = cli_ray
    host, port = dashboard.removeprefix("http://").rsplit(":", 1)
    assert host == "127.0.0.1"
    bound = listening_addresses(int(port))
    assert bound and bound <= LOOPBACK_HEX, bound


def local_ray_inits(source: str) -> list[tuple[int, str | None]]:
    """(line, dashboard_host) of every ``ray.init(...)`` that starts a local Ray (no ``address=``)."""
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "ray.init":
            kwargs = {k.arg: k.value for k in node.keywords}
            if "address" not in kwargs:
                host = kwargs.get("dashboard_host")
                calls.append((node.lineno, host.value if isinstance(host, ast.Constant) else None))
    return calls


def test_every_local_ray_the_orchestrator_starts_binds_its_dashboard_to_loopback():
    """``capi train --workers`` starts its own Ray too; the fixture above runs only the sweep's."""
    calls = {f"{p.relative_to(ROOT)}:{line}": host for p in sorted((ROOT / "orchestrator").rglob("*.py"))
             for line, host in local_ray_inits(p.read_text())}
    assert calls, calls
    assert {k: v for k, v in calls.items() if v != "127.0.0.1"} == {}
    # The sweep and the trainer both start theirs through the one checked above.
    for module in ("train.py", "sweep/tune.py"):
        tree = ast.parse((ROOT / "orchestrator" / module).read_text())
        assert any(isinstance(n, ast.Call) and ast.unparse(n.func) == "init_local_ray" for n in ast.walk(tree)), module
    assert local_ray_inits("import ray\nray.init(num_cpus=2)\nray.init(address='auto')") == [(2, None)]


# ------------------------------------------------------------------ submitting to a cluster
@LINUX
def test_submit_refuses_a_cluster_without_token_auth_unless_insecure(tiny_dataset, tmp_path):
    from ray.job_submission import JobSubmissionClient

    root = Path(tempfile.mkdtemp(prefix="ri", dir="/tmp"))
    (root / "home").mkdir()
    nodes = RayNodes(root, node_env(root / "home", RAY_AUTH_MODE="disabled"))
    try:
        dashboard = nodes.start_head(num_cpus=1)
        assert jobs_api_status(dashboard) == 200  # anyone who reaches it can run code
        # An unreachable MLflow store: should the job start, it stops at once.
        file = tiny_sweep(tmp_path, tiny_dataset, "http://127.0.0.1:9")
        env = node_env(root / "home")  # no token anywhere

        def submit(*flags):
            return subprocess.run([str(CAPI), "sweep", "submit", str(file), "--address", dashboard,
                                   "--project-dir", str(tmp_path), *flags],
                                  env=env, capture_output=True, text=True, timeout=120)

        refused = submit()
        assert refused.returncode != 0
        assert "accepts jobs without authentication" in refused.stderr and "--insecure" in refused.stderr
        client = JobSubmissionClient(dashboard)
        assert client.list_jobs() == []

        accepted = submit("--insecure")
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert "submitted job capi-sweep-sec-" in accepted.stdout
        (job,) = client.list_jobs()
        assert job.entrypoint == f"capi sweep run {file.name}"
    finally:
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------- secrets
def test_passwords_and_tokens_stay_out_of_output_mlflow_and_run_files(mlflow_server, tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    url_password, env_password, token = (secrets.token_hex(12) for _ in range(3))
    uri = mlflow_server.replace("http://", f"http://capi:{url_password}@", 1)
    env = node_env(tmp_path, MLFLOW_TRACKING_USERNAME="capi", MLFLOW_TRACKING_PASSWORD=env_password,
                   RAY_AUTH_TOKEN=token)
    result = subprocess.run(
        [str(CAPI), "train", "--preset", "cpu-tiny", "--tracking-uri", uri, "--experiment", "secrets",
         f"data.dataset={tiny_dataset}", "data.loader_workers=0", "optim.steps=4", "run.threads=1",
         f"run.output_dir={tmp_path / 'runs'}", "run.name=leak"],
        env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert run.data.params and run.data.metrics
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in [*artifacts.rglob("*"), *(tmp_path / "runs").rglob("*")] if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "model.safetensors" for p in files)
    for secret in (url_password, env_password, token):
        assert secret not in result.stdout + result.stderr
        assert secret not in repr(run.data.params) + repr(run.data.tags)
        assert [p for p in files if secret.encode() in p.read_bytes()] == []


def test_secret_named_tags_are_redacted(mlflow_server):
    from mlflow.tracking import MlflowClient

    from capi_core.config import build_config
    from orchestrator.tracking import REDACTED, TrackingOptions, open_run

    token = secrets.token_hex(12)
    options = TrackingOptions(experiment="secret-tags", tags={"deploy_token": token, "db_password": token,
                                                              "team": "vision"})
    run = MlflowClient(mlflow_server).get_run(open_run(mlflow_server, build_config("cpu-tiny"), options))
    assert run.data.tags["deploy_token"] == run.data.tags["db_password"] == REDACTED
    assert run.data.tags["team"] == "vision"


# ---------------------------------------------------------------------- deserialisation
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                      "jsonpickle"}
UNPICKLING_CALLS = {"load", "loads", "Unpickler", "open", "decode"}
UNSAFE_YAML = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
UNSAFE_YAML_LOADERS = {f"yaml.{n}" for n in ("Loader", "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader",
                                             "CFullLoader")}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}


def _imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it refers to: ``import numpy as np`` gives np -> numpy, ``from torch import
    load`` gives load -> torch.load."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(node: ast.AST, names: dict[str, str]) -> str | None:
    """``np.load`` -> ``numpy.load`` through the imports; None for anything but a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([names.get(node.id, node.id), *reversed(parts)])


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_deserialisation(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: call`` for every call that can run code hidden in data: unpickling (pickle and
    kin, torch.load without weights_only=True, numpy.load with allow_pickle, pandas.read_pickle) and
    YAML loading that constructs Python objects."""
    tree = ast.parse(source, filename)
    names = _imported_names(tree)
    problems = []
    for node in ast.walk(tree):
        name = _qualified(node, names) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if name in UNSAFE_YAML_LOADERS:
            problems.append(f"{filename}:{node.lineno}: {name} constructs arbitrary Python objects")
        if not isinstance(node, ast.Call):
            continue
        name = _qualified(node.func, names)
        if name is None:
            continue
        kwargs = {k.arg: k.value for k in node.keywords}
        module, _, function = name.rpartition(".")
        where = f"{filename}:{node.lineno}: {name}"
        if module.rpartition(".")[2] in UNPICKLING_MODULES and function in UNPICKLING_CALLS:
            problems.append(f"{where} unpickles")
        elif name == "pandas.read_pickle":
            problems.append(f"{where} unpickles")
        elif name in ("torch.load", "torch.serialization.load") and not _is_true(kwargs.get("weights_only")):
            problems.append(f"{where} without weights_only=True unpickles")
        elif name == "numpy.load" and "allow_pickle" in kwargs and not (
                isinstance(kwargs["allow_pickle"], ast.Constant) and kwargs["allow_pickle"].value is False):
            problems.append(f"{where} with allow_pickle unpickles")
        elif name in UNSAFE_YAML:
            problems.append(f"{where} constructs arbitrary Python objects")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = kwargs.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or _qualified(loader, names) not in SAFE_YAML_LOADERS:
                problems.append(f"{where} without a safe Loader")
    return problems


def test_no_unsafe_deserialisation_in_the_code():
    files = sorted([*(ROOT / "capi_core").rglob("*.py"), *(ROOT / "orchestrator").rglob("*.py")])
    assert len(files) > 20  # the tree was found
    problems = [p for f in files for p in unsafe_deserialisation(f.read_text(), str(f.relative_to(ROOT)))]
    assert problems == []


@pytest.mark.parametrize("source", [
    "import pickle\npickle.load(f)",
    "import pickle as p\np.loads(b)",
    "from pickle import loads\nloads(b)",
    "from ray import cloudpickle\ncloudpickle.loads(b)",
    "import torch\ntorch.load(path)",
    "import torch\ntorch.load(path, weights_only=False)",
    "from torch import load\nload(path, map_location='cpu')",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "import pandas as pd\npd.read_pickle(path)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.load(text, yaml.FullLoader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml\nyaml.full_load_all(text)",
    "import yaml\nloader = yaml.UnsafeLoader(text)",
    "from yaml import load\nload(text)",
])
def test_the_deserialisation_check_catches(source):
    assert unsafe_deserialisation(source) != []


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(path, weights_only=True)",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import yaml\nloader = yaml.SafeLoader(text)",
    "import numpy as np\nnp.load(path)",
    "from safetensors.torch import load_file\nload_file(path)",
    "import json\njson.loads(text)",
])
def test_the_deserialisation_check_accepts(source):
    assert unsafe_deserialisation(source) == []


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_a_pickle_posing_as_model_safetensors_is_refused_and_never_runs(tiny_dataset, tmp_path):
    import pickle

    from capi_core.checkpoint import (WEIGHTS, CheckpointError, load_checkpoint, load_encoder, save_checkpoint,
                                      with_prefix)
    from capi_core.config import build_config
    from capi_core.models.encoder import Encoder

    config = build_config("cpu-tiny", {"data": {"dataset": str(tiny_dataset)}})
    good = save_checkpoint(tmp_path / "good" / "step-0000001",
                           with_prefix(Encoder(config.model).state_dict(), "teacher.encoder."),
                           {"step": 1, "config": config.model_dump(mode="json")})
    load_encoder(good)  # the same checkpoint with its real weights loads

    marker = tmp_path / "payload-ran"
    payloads = {"pickle": pickle.dumps(Payload(marker))}
    torch.save(Payload(marker), tmp_path / "torch.pt")  # torch's own format: a zip around a pickle
    payloads["torch.save"] = (tmp_path / "torch.pt").read_bytes()
    for kind, payload in payloads.items():
        bad = shutil.copytree(good, tmp_path / kind / good.name)
        (bad / WEIGHTS).write_bytes(payload)
        with pytest.raises(CheckpointError, match=str(bad / WEIGHTS)):
            load_checkpoint(bad)
        with pytest.raises(CheckpointError, match=WEIGHTS):
            load_encoder(bad)
        assert not marker.exists(), kind

    torch.load(tmp_path / "torch.pt", weights_only=False)
    assert marker.exists()  # the payload is live: unpickled, it runs


# ---------------------------------------------------------------------------------- YAML
def test_yaml_with_a_python_tag_is_an_error_and_never_runs(tiny_dataset, tmp_path):
    from capi_core.config import ConfigError, load_config
    from orchestrator.sweep.spec import SweepSpecError, load_sweep

    marker = tmp_path / "tag-ran"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    sweep = tmp_path / "evil-sweep.yaml"
    sweep.write_text(f"name: evil\nbase:\n  preset: cpu-tiny\n  overrides:\n    optim.steps: {tag}\n"
                     f"search_space:\n  loss.teacher_temp: {{grid: [0.02, 0.05]}}\n")
    config = tmp_path / "evil-config.yaml"
    config.write_text(f"preset: cpu-tiny\noptim:\n  steps: {tag}\n")

    with pytest.raises(SweepSpecError) as err:
        load_sweep(sweep)
    assert any(p.startswith(f"{sweep}:5:") and "python/object/apply:os.system" in p for p in err.value.problems)
    result = CliRunner().invoke(main, ["sweep", "validate", str(sweep)])
    assert result.exit_code == 1 and f"{sweep}:5:" in result.output
    with pytest.raises(ConfigError, match=str(config)):
        load_config(config)
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--no-tracking"])
    assert result.exit_code != 0 and str(config) in result.output
    assert not marker.exists()

    yaml.unsafe_load(config.read_text())
    assert marker.exists()  # the tag is live: an unsafe loader runs it
