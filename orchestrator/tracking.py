"""MLflow tracking of CAPI runs: one MLflow run per training run, written by rank 0 only.

A training run and its MLflow run stay paired across restarts: the MLflow run id is kept in the
trainer's metadata, so every checkpoint carries it and a resumed run (after a worker failure, or the
same command run again) appends to the same MLflow run instead of opening a new one.

What is logged: the flattened config as params (values of secret-looking keys redacted), metrics in
``log_batch`` calls under the trainer's own ``train/``, ``probe/`` and ``diag/`` names, system facts
(devices, workers, library versions) as tags, and artifacts: the resolved ``config.yaml``,
``checkpoint.txt`` with the final checkpoint's location (also the ``capi.checkpoint`` tag) and any
evaluation pictures in the run directory.

A sweep is a parent run (role ``sweep``: the sweep file, search space and settings, at the end the
best trial and the trial counts) with one child run per trial, found again by its ``capi.trial_id``
tag; every ``capi.*`` tag is named here. Its experiment keeps a saved view of the runs table per sweep
(the metric, the probe's scores and the swept params as columns), which ``runs_page`` links to. Every
client comes from ``mlflow_client``.

The store is MLflow's own choice unless told otherwise: ``--tracking-uri``, then
``MLFLOW_TRACKING_URI``, then MLflow 3's default ``sqlite:///mlflow.db`` in the working directory.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlparse

import mlflow
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE,
                                      MLFLOW_USER)
from pydantic import BaseModel, ConfigDict, Field

from capi_core.checkpoint import STATE, list_checkpoints
from capi_core.config import TrainConfig, flatten
from capi_core.errors import CapiError
from capi_core.data import resolve_dataset
from capi_core.data.format import load_manifest
from capi_core.eval.diagnostics import diag_metrics
from capi_core.eval.online_probe import METRICS as PROBE_METRICS
from capi_core.train import Callback, Trainer
from orchestrator.sweep.console import describe_values
from orchestrator.sweep.spec import SweepSpec
from orchestrator.sweep.storage import YAML_FILE, SweepOutcome, SweepState
from orchestrator.uris import safe_uri  # noqa: F401 - re-exported: callers know it from here

log = logging.getLogger(__name__)
# MLflow prints "View run ... at: <tracking URI>" whenever a run ends, with any user:password in the
# URI, into every log that carries the process's stdout (Ray jobs, Train workers). Our CLI prints
# its own links, without credentials. Set here, so that every process that tracks gets it.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

RUN_ID_KEY = "mlflow_run_id"  # key in Trainer.metadata, hence in every checkpoint's state.json
URI_KEY = "mlflow_tracking_uri"  # beside it, without credentials: where `capi eval` logs its results
PARENT_TAG = "mlflow.parentRunId"
CHECKPOINT_TAG = "capi.checkpoint"
SWEEP_TAG = "capi.sweep"
ROLE_TAG = "capi.role"
TRIAL_TAG = "capi.trial_id"
SWEPT_TAG = "capi.swept_params"  # JSON list of the sweep's dimensions, on every child run
STOPPED_TAG = "capi.stopped_early"
EXPLOITS_TAG = "capi.pbt_exploits"
# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, "Detect issues"), where
# runs show only after switching to "Model training"; this value makes it open as a training experiment.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow 3.17's UI keeps a saved view of the runs table (columns, sort) in an experiment tag named by this
# prefix and the view's key, and opens the table in that view when the address carries ``viewStateShareKey``.
VIEW_TAG_PREFIX, VIEW_KEY_PARAM = "mlflow.sharedViewState.", "viewStateShareKey"
REDACTED = "***"
_SECRET = re.compile(r"token|password|secret", re.IGNORECASE)
# MLflow's per-call limits (mlflow.utils.validation): 100 params/tags and 1000 metrics per log_batch.
_MAX_PARAMS, _MAX_METRICS = 100, 1000
_MAX_PARAM_CHARS = 6000
_MAX_BUFFERED = 100_000  # metrics kept for retry while the server is unreachable; older ones are dropped
_PICTURES = ("*.png", "*.jpg", "*.svg", "pictures/**/*.png", "pictures/**/*.jpg", "pictures/**/*.svg")


class TrackingError(CapiError, RuntimeError):
    """The MLflow store cannot be reached or used; the message names the URI and the cause."""

    hint = "start the server, fix --tracking-uri / MLFLOW_TRACKING_URI, or train with --no-tracking"


class TrackingOptions(BaseModel):
    """Where and under what a training run is tracked."""

    model_config = ConfigDict(extra="forbid")

    uri: str | None = Field(None, description="MLflow tracking URI; None: MLFLOW_TRACKING_URI or MLflow's default")
    experiment: str = Field("capi", min_length=1, description="MLflow experiment, created when missing")
    parent_run_id: str | None = Field(None, description="nest the run under this run (sweeps)")
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags for the run")
    run_name: str | None = Field(None, description="the MLflow run's name; None: the config's run.name")


# ----------------------------------------------------------------------------------------- URIs
def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI to use, with local stores made absolute.

    ``uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default (``sqlite:///mlflow.db`` in the
    working directory). Absolute, because Ray workers run in their own working directories.
    """
    uri = uri or mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = unquote(uri[len("sqlite:///"):])
        return uri if path in ("", ":memory:") else "sqlite:///" + str(Path(path).expanduser().absolute())
    if parsed.scheme == "" or (parsed.scheme == "file" and not parsed.netloc):
        path = parsed.path if parsed.scheme == "file" else uri
        return Path(path).expanduser().absolute().as_uri()
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless the store at ``uri`` answers (HTTP) or can be written (local), quickly."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = safe_uri(uri).rstrip("/") + "/health"  # /health needs no credentials
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
                if response.status != 200:
                    raise TrackingError(f"MLflow server {safe_uri(uri)} answered /health with {response.status}")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"MLflow server {safe_uri(uri)} is not reachable ({reason}); start it, "
                                f"or pass another --tracking-uri") from None
    elif parsed.scheme in ("sqlite", "file"):
        if parsed.scheme == "file" and not MLFLOW_ALLOW_FILE_STORE.get():  # else MLflow raises deep inside
            raise TrackingError(f"MLflow store {uri}: this MLflow refuses file stores unless "
                                f"MLFLOW_ALLOW_FILE_STORE=true; use a sqlite:///PATH.db store or a server")
        path = Path(unquote(uri[len("sqlite:///"):])) if parsed.scheme == "sqlite" else Path(unquote(parsed.path))
        folder = path.parent if parsed.scheme == "sqlite" else path
        while not folder.exists():  # the store may create missing folders below an existing one
            folder = folder.parent
        if not folder.is_dir() or not _writable(folder):
            raise TrackingError(f"MLflow store {uri}: {folder} is not a writable directory")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def quiet_logs() -> None:
    """MLflow's INFO lines (creating a sqlite store's tables, ...) off a console that has its own."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------- params and tags
def redact(values: dict[str, Any]) -> dict[str, Any]:
    """Replace the values of keys that name a token, password or secret with ``***``."""
    return {k: (REDACTED if _SECRET.search(k) else v) for k, v in values.items()}


def config_params(config: TrainConfig) -> dict[str, str]:
    """The flattened config as MLflow params: ``{"optim.lr": "0.001", ...}``, secrets redacted."""
    params = {}
    for key, value in redact(flatten(config)).items():
        text = value if isinstance(value, str) else json.dumps(value)
        params[key] = text[:_MAX_PARAM_CHARS]
    return params


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "absent"


def system_tags(trainer: Trainer) -> dict[str, str]:
    """Devices, worker count and library versions of the process group running ``trainer``."""
    device = trainer.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {
        "sys.device": f"{device.type}: {name}",
        "sys.workers": str(trainer.world_size),
        "sys.host": platform.node(),
        "sys.threads_per_worker": str(torch.get_num_threads()),
        "capi.precision": trainer.precision.describe(),
        "capi.compile": trainer.compile.describe(),
        "sys.python": platform.python_version(),
        **{f"sys.{p}": _version(p) for p in ("torch", "timm", "ray", "mlflow")},
    }


# ------------------------------------------------------------------------------------------ runs
_ANSWERED: set[str] = set()  # servers that answered /health in this process


def mlflow_client(uri: str):
    """The ``MlflowClient`` of the store at ``uri``, its model registry included: the one place a
    client is made, so that every caller talks to the same store the same way.

    A server is asked for /health first (once per process, ``check_reachable``'s 5 s timeout): MLflow's
    own client retries an unreachable server 7 times with backoff over about two minutes before it
    says anything, and then without naming it."""
    if urlparse(uri).scheme in ("http", "https") and uri not in _ANSWERED:
        check_reachable(uri)
        _ANSWERED.add(uri)
    return MlflowClient(uri, registry_uri=uri)


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        except MlflowException:  # created meanwhile by a concurrent run (sweep trials)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or choose another --experiment")
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before capi tagged its experiments
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def _existing_run(client, run_id: str):
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == "active" else None


def open_run(uri: str, config: TrainConfig, options: TrackingOptions, run_id: str | None = None) -> str:
    """Reopen ``run_id`` (status back to RUNNING) if the store holds it, else create a run named
    ``config.run.name`` in ``options.experiment``, nested under ``options.parent_run_id``. Returns its id."""
    client = mlflow_client(uri)
    if run_id and _existing_run(client, run_id) is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {**source_tags(), **options.tags, "capi.run_name": config.run.name}
    if options.parent_run_id:
        tags[PARENT_TAG] = options.parent_run_id
    run = client.create_run(_experiment_id(client, options.experiment), run_name=options.run_name or config.run.name,
                            tags=redact(tags))
    return run.info.run_id


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags, which its UI shows as "Source", "Created by" and the commit: the
    command line, the user and the git commit of the code that runs (when it is a git checkout).

    Computed where a command runs; a sweep's trials get the driver's (``SweepState.source``), since
    in a Ray worker the command line is Ray's.
    """
    argv = [_program(sys.argv[0]), *map(_public_arg, sys.argv[1:])] if sys.argv and sys.argv[0] else ["python"]
    tags = {MLFLOW_SOURCE_NAME: " ".join(argv)[:500], MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_USER: _user()}
    commit = git_commit()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def _public_arg(arg: str) -> str:
    """A command-line word fit for a tag: a URI without its user:password, a secret-named
    ``key=value`` with its value redacted (the command line may carry ``--tracking-uri http://u:p@...``)."""
    if "://" in arg:
        return safe_uri(arg)
    key, eq, _ = arg.partition("=")
    return f"{key}={REDACTED}" if eq and _SECRET.search(key) else arg


def _program(argv0: str) -> str:
    """``capi`` for the console script, ``python -m pytest`` for a module run as a script."""
    path = Path(argv0)
    return f"python -m {path.parent.name}" if path.name == "__main__.py" else path.name


def runs_page(uri: str, server: str, experiment: str, sweep: str | None = None) -> str:
    """The address of an experiment's runs table in the MLflow UI at ``server``. MLflow 3.17's UI
    opens every experiment in its GenAI view whatever the experiment's kind tag says, unless the
    address asks for the training view (``workflowType=machine_learning``, which it then remembers).

    With ``sweep``, the table opens in that sweep's saved view (``save_sweep_view``: its metrics and
    swept params as columns, sorted by its metric), if the experiment holds it: the UI answers a key
    it cannot find with an error, and a sweep started before capi saved views has none."""
    exp = mlflow_client(uri).get_experiment_by_name(experiment)
    path = f"/#/experiments/{exp.experiment_id}/runs" if exp is not None else "/"
    query = {"workflowType": "machine_learning"}
    if sweep and exp is not None and VIEW_TAG_PREFIX + sweep_view_key(sweep) in exp.tags:
        query[VIEW_KEY_PARAM] = sweep_view_key(sweep)
    return f"{server.rstrip('/')}{path}?{urlencode(query)}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        return str(os.getuid())


def git_commit(where: Path = Path(__file__).parent) -> str | None:
    """The commit checked out where this code lives, or None outside a git checkout (an installed wheel)."""
    try:
        done = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def log_dataset(client, run_id: str, config: TrainConfig) -> None:
    """The run's training data as its MLflow input (the Datasets column and the run's Inputs):
    the dataset's name, a digest of its shards and its split sizes; once per run."""
    if client.get_run(run_id).inputs.dataset_inputs:
        return
    root = resolve_dataset(config.data.dataset, config.data.cache_dir)
    manifest = load_manifest(root)
    digest = hashlib.sha256("".join(sorted(s.sha256 for s in manifest.shards)).encode()).hexdigest()[:16]
    dataset = Dataset(name=manifest.name, digest=digest, source_type="local",
                      source=json.dumps({"uri": str(Path(root).absolute())}),
                      profile=json.dumps({"splits": manifest.splits, "classes": len(manifest.class_names),
                                          "channels": manifest.channels, "image_size": manifest.image_size}))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT,
                                                                              config.data.split)])])


def log_config(uri: str, run_id: str, config: TrainConfig) -> None:
    """Params for every config field not logged yet, plus ``config.yaml``.

    MLflow params are immutable: on a resume with a changed field (e.g. more ``optim.steps``) the
    new value goes to a ``resumed.<field>`` tag instead.
    """
    client = mlflow_client(uri)
    logged = client.get_run(run_id).data.params
    params = config_params(config)
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in logged and logged[k] != v]
    for i in range(0, len(new), _MAX_PARAMS):
        client.log_batch(run_id, params=new[i:i + _MAX_PARAMS])
    for i in range(0, len(changed), _MAX_PARAMS):
        client.log_batch(run_id, tags=changed[i:i + _MAX_PARAMS])
    client.log_dict(run_id, redact_nested(config.model_dump(mode="json")), "config.yaml")


def redact_nested(values: dict[str, Any]) -> dict[str, Any]:
    """``redact`` applied at every level of a nested dict."""
    return {k: (REDACTED if _SECRET.search(k) else redact_nested(v) if isinstance(v, dict) else v)
            for k, v in values.items()}


def end_run(uri: str, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    """Close a run as FINISHED, FAILED or KILLED; ``error`` is kept in the ``capi.error`` tag."""
    client = mlflow_client(uri)
    if error:
        client.set_tag(run_id, "capi.error", error[:5000])
    client.set_terminated(run_id, status)


def best_effort(call: Callable[[], Any], what: str = "MLflow") -> Any:
    """``call()``, or None after a warning on stderr: tracking trouble must not stop a run or a sweep."""
    try:
        return call()
    except Exception as err:  # noqa: BLE001 - any store or network failure
        print(f"warning: {what}: {err}", file=sys.stderr, flush=True)
        return None


def run_id_in_checkpoints(run_dir: Path) -> str | None:
    """The MLflow run id saved in the newest readable checkpoint under ``run_dir``, if any.

    Newest readable: a checkpoint being copied when a worker died may be incomplete.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            run_id = json.loads((path / STATE).read_text()).get("metadata", {}).get(RUN_ID_KEY)
        except (OSError, ValueError):
            continue
        if run_id:
            return run_id
    return None


# ----------------------------------------------------------------------------------------- sweeps
# A sweep is a parent run (role "sweep") with one child run per trial, found again by its trial id.


def open_sweep_run(spec: SweepSpec, uri: str, source_text: str | None) -> SweepState:
    """Create the sweep's parent run with the sweep file, search space, settings and base config."""
    client = mlflow_client(uri)
    experiment = spec.mlflow.experiment or spec.name
    source = source_tags()
    run = client.create_run(_experiment_id(client, experiment), run_name=spec.name,
                            tags={**source, SWEEP_TAG: spec.name, ROLE_TAG: "sweep"})
    run_id = run.info.run_id
    if source_text is not None:
        client.log_text(run_id, source_text, YAML_FILE)
    client.log_dict(run_id, {path: {dist.kind: dist.args} for path, dist in spec.search_space.items()},
                    "search_space.json")
    client.log_dict(run_id, {"algorithm": spec.search.algorithm, "metric": spec.search.metric,
                             "mode": spec.search.mode, "scheduler": spec.scheduler.model_dump(),
                             "budget": spec.budget.model_dump(), "resources": spec.resources.model_dump(),
                             "trials": spec.num_trials()}, "sweep_settings.json")
    client.log_dict(run_id, redact_nested(spec.base_config.model_dump(mode="json")), "base_config.yaml")
    client.log_batch(run_id, params=_params({"search.algorithm": spec.search.algorithm,
                                             "search.metric": spec.search.metric, "search.mode": spec.search.mode,
                                             "scheduler": spec.scheduler.type, "trials": spec.num_trials()}))
    # A view the store refuses (a tag holds 20,000 characters: a search space of hundreds of paths) costs
    # only the columns: the link then opens MLflow's default ones.
    best_effort(lambda: save_sweep_view(client, run.info.experiment_id, spec), "MLflow view of the runs table")
    return SweepState(name=spec.name, tracking_uri=uri, experiment=experiment, parent_run_id=run_id, source=source)


def sweep_view_key(name: str) -> str:
    """The key of a sweep's saved view of the runs table: one per sweep, so that sweeps sharing an
    experiment keep their own columns."""
    return f"capi-{name}"


def sweep_view(spec: SweepSpec) -> dict[str, Any]:
    """How a sweep's runs table is read: the sweep's metric and the probe's scores (trained, random
    init, gain), then the swept params, as columns in that order (the UI's default sorts each group
    by name) and wide enough for their names; the trials sorted by the metric, best first.

    Column keys are spelled as MLflow's UI spells them (``metrics.`probe/knn_gain```,
    ``params.`optim.ema_final```; trials log their config under the search space's dotted paths): the
    UI shows no column for a key spelled otherwise. They replace the UI's default columns (source,
    models, dataset), which are the same for every trial of a sweep."""
    metrics = dict.fromkeys([spec.search.metric, *PROBE_METRICS])  # the metric first, once
    names = [("metrics", m) for m in metrics] + [("params", p) for p in spec.search_space]
    columns = [f"{kind}.`{name}`" for kind, name in names]
    return {"orderByKey": columns[0], "orderByAsc": spec.search.mode == "min", "selectedColumns": columns,
            "columnOrder": columns,
            "columnWidths": {c: max(100, 8 * len(name) + 32) for c, (_, name) in zip(columns, names)}}


def save_sweep_view(client, experiment_id: str, spec: SweepSpec) -> None:
    """Save ``sweep_view`` as a named view of the experiment's runs table (the UI's "Views" menu), so that
    the address ``runs_page`` prints opens the trials with their scores shown instead of MLflow's
    default columns, where each metric had to be picked by hand.

    The tag holds what MLflow 3.17's own "Save view" writes: ``{name, createdAt, updatedAt, state}`` with
    ``state`` the view as JSON text (the UI reads it plain as well as deflated)."""
    now = int(time.time() * 1000)
    envelope = {"name": f"capi sweep {spec.name}", "createdAt": now, "updatedAt": now,
                "state": json.dumps(sweep_view(spec))}
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + sweep_view_key(spec.name), json.dumps(envelope))


def _params(values: dict[str, Any]) -> list:
    return [Param(k, str(v)) for k, v in values.items()]


def reopen_sweep_run(state: SweepState) -> None:
    """The parent run back to RUNNING, for a resumed sweep."""
    mlflow_client(state.tracking_uri).update_run(state.parent_run_id, status="RUNNING")


def trial_options(state: SweepState, spec: SweepSpec, trial_id: str,
                  values: dict[str, Any] | None = None) -> TrackingOptions:
    """Where a trial logs: a child of the sweep's parent run, tagged with the sweep, the trial id and
    the swept fields (so an export can name the trial's values)."""
    return TrackingOptions(uri=state.tracking_uri, experiment=state.experiment, parent_run_id=state.parent_run_id,
                           tags={**state.source, SWEEP_TAG: spec.name, TRIAL_TAG: trial_id,
                                 SWEPT_TAG: json.dumps(list(spec.search_space))},
                           run_name=trial_name(values) if values else None)


def trial_name(values: dict[str, Any]) -> str:
    """A trial's MLflow run name: its swept values (``registers=4 ema_final=0.994``), which the runs
    table shows where a trial id would tell nothing."""
    return describe_values(values)[:250]


def child_runs(uri: str, parent_run_id: str) -> list:
    """Every run nested under ``parent_run_id``, all pages."""
    client = mlflow_client(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs, token = [], None
    while True:
        page = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def child_run_id(state: SweepState, trial_id: str) -> str | None:
    """The MLflow child run of ``trial_id`` under the sweep's parent run, if one exists."""
    client = mlflow_client(state.tracking_uri)
    parent = client.get_run(state.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], max_results=2,
                              filter_string=f"tags.mlflow.parentRunId = '{state.parent_run_id}' "
                                            f"and tags.`{TRIAL_TAG}` = '{trial_id}'")
    return runs[0].info.run_id if runs else None


def close_run(uri: str, run_id: str, stopped_early: str | None = None) -> None:
    """Close a trial's MLflow run if it is still RUNNING: FINISHED, or, when ``stopped_early`` names
    why (the scheduler's rung, the time budget), KILLED with that reason in ``capi.stopped_early``.
    MLflow has no status for "stopped by the scheduler"; KILLED sets those runs apart in the runs
    table at a glance, and the tag says who stopped them."""
    client = mlflow_client(uri)
    if client.get_run(run_id).info.status == "RUNNING":
        if stopped_early:
            client.set_tag(run_id, STOPPED_TAG, stopped_early)
        client.set_terminated(run_id, "KILLED" if stopped_early else "FINISHED")


def record_exploit(uri: str, run_id: str, exploit: str) -> None:
    """Append ``exploit`` (``<donor trial>@<checkpoint>``) to the trial run's ``capi.pbt_exploits`` list."""
    client = mlflow_client(uri)
    exploits = json.loads(client.get_run(run_id).data.tags.get(EXPLOITS_TAG, "[]"))
    client.set_tag(run_id, EXPLOITS_TAG, json.dumps(exploits + [exploit]))


def checkpoint_run(checkpoint: Path) -> tuple[str | None, str | None, int]:
    """(MLflow run id, tracking URI, step) that a checkpoint's state.json names, as far as it names them."""
    try:
        state = json.loads((Path(checkpoint) / STATE).read_text())
    except (OSError, ValueError):
        return None, None, 0
    metadata = state.get("metadata", {})
    return metadata.get(RUN_ID_KEY), metadata.get(URI_KEY), int(state.get("step", 0))


def log_eval(uri: str, run_id: str, report: dict[str, Any], step: int, pictures: list[str] = ()) -> None:
    """A ``capi eval`` report into the checkpoint's run: each probe's test top-1 as ``eval/<probe>_top1``,
    the gain over random init and the diagnostics' scalars as metrics at the checkpoint's step; the
    probes as a table (``eval/probes.json``, MLflow's table artifact, viewable and comparable across
    runs in the UI); eval.json and the pictures as artifacts under ``eval/``."""
    client = mlflow_client(uri)
    now = int(time.time() * 1000)
    values = {f"eval/{r['probe']}_top1": r["top1"] for r in report["probes"] if r.get("top1") is not None}
    for key in ("knn_random_init", "knn_gain"):
        if report.get(key) is not None:
            values[f"eval/{key}"] = report[key]
    if report.get("diagnostics"):
        values.update({f"eval/{k}": v for k, v in diag_metrics(report["diagnostics"]).items()})
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
    rows = report["probes"]
    client.log_table(run_id, {"probe": [r["probe"] for r in rows], "test_top1": [r.get("top1") for r in rows],
                              "selected": [json.dumps(r.get("selected", {})) for r in rows],
                              "params": [r.get("params") for r in rows], "note": [r.get("note", "") for r in rows],
                              "dataset": [report["dataset"]] * len(rows), "step": [step] * len(rows)},
                     "eval/probes.json")
    client.log_dict(run_id, report, "eval/eval.json")
    for picture in pictures:
        client.log_artifact(run_id, picture, "eval/pictures")


def log_sweep_summary(outcome: SweepOutcome) -> None:
    """The parent run's summary: best metric, best trial and run ids, trial counts; then FINISHED,
    KILLED if trials are left to resume, or FAILED if every trial failed."""
    state = outcome.state
    client = mlflow_client(state.tracking_uri)
    counts: dict[str, int] = {}
    for row in outcome.trials:
        counts[row.status] = counts.get(row.status, 0) + 1
    now = int(time.time() * 1000)
    metrics = [Metric(f"sweep/trials_{k.lower()}", float(v), now, 0) for k, v in counts.items()]
    tags = [RunTag("capi.trials", json.dumps(counts))]
    if outcome.noise:
        tags.append(RunTag("capi.probe_noise", outcome.noise))
    best = outcome.best
    if best is not None:
        metrics.append(Metric(f"best/{outcome.metric}", float(best.metric), now, 0))
        tags.append(RunTag("capi.best_trial", best.trial_id))
        run_id = child_run_id(state, best.trial_id)
        if run_id:
            tags.append(RunTag("capi.best_run_id", run_id))
    client.log_batch(state.parent_run_id, metrics=metrics, tags=tags)
    client.log_dict(state.parent_run_id, [asdict(r) for r in outcome.trials], "trials.json")
    failed = bool(outcome.trials) and all(r.status == "ERROR" for r in outcome.trials)
    client.set_terminated(state.parent_run_id, "FAILED" if failed else "KILLED" if outcome.unfinished else "FINISHED")


# ------------------------------------------------------------------------------------- callback
class MlflowTracking(Callback):
    """Trainer callback: logs one MLflow run from rank 0 (the other ranks do nothing).

    ``run_id``: a run opened beforehand (by the Ray driver, so that a worker restart before the
    first checkpoint does not open a second run); a run id saved in the resumed checkpoint wins.
    ``config``: what to log as params (default: the trainer's). ``checkpoint_uri`` maps a checkpoint
    written by the trainer to where it finally lives (Ray storage); default: its own path.
    """

    def __init__(self, uri: str, options: TrackingOptions | None = None, run_id: str | None = None,
                 config: TrainConfig | None = None, checkpoint_uri: Callable[[Path], str] | None = None):
        self.uri = uri
        self.options = options or TrackingOptions()
        self.run_id = run_id
        self.config = config
        self.checkpoint_uri = checkpoint_uri or (lambda path: str(Path(path).absolute()))
        self.checkpoint: str | None = None  # where the latest checkpoint lives
        self._buffer: list = []
        self._warned = False
        self._mlflow = None

    @property
    def client(self):
        if self._mlflow is None:
            self._mlflow = mlflow_client(self.uri)
        return self._mlflow

    def on_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        saved = trainer.metadata.get(RUN_ID_KEY)
        if saved and self.run_id and saved != self.run_id:
            self._discard_if_empty(self.run_id)
        config = self.config or trainer.config
        self.run_id = open_run(self.uri, config, self.options, saved or self.run_id)
        trainer.metadata[RUN_ID_KEY] = self.run_id
        trainer.metadata[URI_KEY] = safe_uri(self.uri)
        log_config(self.uri, self.run_id, config)
        tags = system_tags(trainer)
        if trainer.step:
            tags["capi.resumed_at_step"] = str(trainer.step)
        self.client.log_batch(self.run_id, tags=_tags(tags))
        self._try(lambda: log_dataset(self.client, self.run_id, config))

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if trainer.is_main:
            self._add(step, metrics)
            self._flush()

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path | None, metrics: dict[str, float]) -> None:
        if trainer.is_main and path is not None:
            self.checkpoint = self.checkpoint_uri(path)
            self._flush()
            self._try(lambda: self.client.set_tag(self.run_id, CHECKPOINT_TAG, self.checkpoint))

    def on_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        # train/* of the last step went out in on_log; the end adds the final probe and diagnostics.
        self._add(step, {k: v for k, v in metrics.items() if not k.startswith("train/")})
        self._flush()
        if self.checkpoint:
            self.client.log_text(self.run_id, self.checkpoint + "\n", "checkpoint.txt")
        for picture in _pictures(trainer.run_dir):
            self.client.log_artifact(self.run_id, str(picture), "pictures")
        self.client.set_terminated(self.run_id, "FINISHED")

    # -------------------------------------------------------------------------------- internals
    def _add(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v))
        del self._buffer[:-_MAX_BUFFERED]

    def _flush(self) -> None:
        while self._buffer:
            chunk = self._buffer[:_MAX_METRICS]
            if not self._try(lambda: self.client.log_batch(self.run_id, metrics=chunk)):
                return  # kept for the next flush
            del self._buffer[:len(chunk)]

    def _try(self, call: Callable[[], Any]) -> bool:
        """Tracking must not stop training: a failed call is warned about (once) and retried later."""
        try:
            call()
            return True
        except Exception as err:  # noqa: BLE001 - any store or network failure
            if not self._warned:
                log.warning("MLflow logging to %s failed (%s); training goes on, will retry", safe_uri(self.uri), err)
                self._warned = True
            return False

    def _discard_if_empty(self, run_id: str) -> None:
        """Delete a run opened for this training that the resumed checkpoint's run supersedes."""
        run = _existing_run(self.client, run_id)
        if run is not None and not run.data.metrics:
            self.client.delete_run(run_id)


def _tags(tags: dict[str, str]) -> list:
    return [RunTag(k, v) for k, v in redact(tags).items()]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pictures(run_dir: Path) -> Iterable[Path]:
    seen: set[Path] = set()
    for pattern in _PICTURES:
        for path in sorted(Path(run_dir).glob(pattern)):
            if path.is_file() and path not in seen:
                seen.add(path)
                yield path
