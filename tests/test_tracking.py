"""MLflow tracking against a real ``mlflow server``: params, batched metrics, tags, artifacts, resume."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from capi_core import checkpoint as ckpt
from capi_core.config import build_config
from conftest import free_port
from orchestrator.cli import main
from orchestrator.cli.sweep import _finish
from orchestrator.sweep.spec import SweepSpec
from orchestrator.sweep.storage import SweepOutcome
from orchestrator.tracking import (
    REDACTED,
    RUN_ID_KEY,
    VIEW_TAG_PREFIX,
    TrackingError,
    check_reachable,
    config_params,
    open_sweep_run,
    redact,
    redact_nested,
    resolve_uri,
)


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def history_steps(c, run_id, key):
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def artifact_text(c, run_id, name, tmp_path):
    return Path(c.download_artifacts(run_id, name, str(tmp_path))).read_text()


# ----------------------------------------------------------------------------------- pure logic
def test_local_stores_resolve_to_absolute_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_uri(f"sqlite:///{tmp_path}/x.db") == f"sqlite:///{tmp_path}/x.db"
    assert resolve_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert resolve_uri("http://host:5000") == "http://host:5000"
    assert resolve_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"  # MLflow 3's own default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert resolve_uri(None) == "http://elsewhere:5000"


def test_secret_values_are_redacted():
    assert redact({"a.api_token": "t0k", "db.Password": "pw", "s.client_secret": "s", "optim.lr": 1e-3}) == {
        "a.api_token": REDACTED, "db.Password": REDACTED, "s.client_secret": REDACTED, "optim.lr": 1e-3}
    assert redact_nested({"auth": {"token": "t0k", "user": "me"}}) == {"auth": {"token": REDACTED, "user": "me"}}
    params = config_params(build_config("cpu-tiny"))
    assert params["optim.lr"] == "0.001" and params["model.registers"] == "4"
    assert params["optim.betas"] == "[0.9, 0.95]"


def test_unreachable_server_is_reported_before_training(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"{dead} is not reachable"):
        check_reachable(dead, timeout=2)
    assert time.monotonic() - start < 10
    result = CliRunner().invoke(main, ["train", "--preset", "cpu-tiny", f"run.output_dir={tmp_path}",
                                       "--tracking-uri", dead])
    assert result.exit_code != 0 and "is not reachable" in result.output
    assert not (tmp_path / "capi").exists()  # nothing started


def test_a_file_store_mlflow_refuses_is_reported_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = (tmp_path / "mlruns").as_uri()
    result = CliRunner().invoke(main, ["train", "--preset", "cpu-tiny", f"run.output_dir={tmp_path}",
                                       "--tracking-uri", store])
    assert result.exit_code != 0 and "MLFLOW_ALLOW_FILE_STORE=true" in result.output, result.output
    assert not (tmp_path / "capi").exists()  # nothing started
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_reachable(store)  # allowed again: MLflow's own switch


# ------------------------------------------------------------------------------ a real server
def test_standalone_run_is_tracked_and_resumed_into_the_same_run(mlflow_server, tiny_dataset, tmp_path):
    c = client(mlflow_server)
    parent = c.create_run(c.create_experiment("sweep-parent")).info.run_id
    args = ["train", "--preset", "cpu-tiny", f"data.dataset={tiny_dataset}", f"run.output_dir={tmp_path}",
            "data.loader_workers=0", "run.checkpoint_every=5", "--tracking-uri", mlflow_server,
            "--experiment", "standalone"]
    first = CliRunner().invoke(main, [*args, "optim.steps=10"], catch_exceptions=False)
    assert first.exit_code == 0, first.output

    exp = c.get_experiment_by_name("standalone")
    (run,) = c.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "capi"
    assert run.data.params["optim.steps"] == "10" and run.data.params["model.embed_dim"] == "32"
    assert run.data.params["data.dataset"] == str(tiny_dataset)
    assert history_steps(c, run_id, "train/capi_loss") == [5, 10]
    assert history_steps(c, run_id, "probe/knn_top1") == [10]
    assert {"train/clustering_loss", "train/lr", "train/target_entropy", "train/images_per_s"} <= set(run.data.metrics)
    assert run.data.tags["sys.workers"] == "1" and run.data.tags["sys.torch"].startswith("2.")
    assert run.data.tags["sys.device"].startswith("cpu")
    final = ckpt.list_checkpoints(tmp_path / "capi")[-1]
    assert run.data.tags["capi.checkpoint"] == str(final)
    artifacts = {a.path for a in c.list_artifacts(run_id)}
    assert {"config.yaml", "checkpoint.txt"} <= artifacts
    assert artifact_text(c, run_id, "checkpoint.txt", tmp_path).strip() == str(final)
    assert "optim:" in artifact_text(c, run_id, "config.yaml", tmp_path)
    state = json.loads((final / ckpt.STATE).read_text())
    assert state["metadata"][RUN_ID_KEY] == run_id  # the checkpoint carries the run id

    # The same command with more steps resumes from the checkpoint into the same MLflow run.
    second = CliRunner().invoke(main, [*args, "optim.steps=15"], catch_exceptions=False)
    assert second.exit_code == 0, second.output
    (run,) = c.search_runs([exp.experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert history_steps(c, run_id, "train/capi_loss") == [5, 10, 15]
    assert run.data.params["optim.steps"] == "10"  # params are immutable in MLflow ...
    assert run.data.tags["resumed.optim.steps"] == "15"  # ... so the change is a tag
    assert run.data.tags["capi.resumed_at_step"] == "10"

    # A parent run id nests the run (sweeps).
    from orchestrator.tracking import MlflowTracking, TrackingOptions
    from capi_core.train import Trainer

    cfg = build_config("cpu-tiny", [f"data.dataset={tiny_dataset}", f"run.output_dir={tmp_path / 'child'}",
                                    "data.loader_workers=0", "optim.steps=5"])
    options = TrackingOptions(experiment="standalone", parent_run_id=parent, tags={"sweep.token": "t0k"})
    trainer = Trainer(cfg, [MlflowTracking(mlflow_server, options)])
    trainer.fit()
    child = c.get_run(trainer.metadata[RUN_ID_KEY])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags["sweep.token"] == REDACTED


def test_a_sweep_link_opens_the_runs_table_with_its_scores_and_swept_params(mlflow_server, tmp_path, capsys):
    # The saved view MLflow 3.17's UI reads (bundle: experiment tag mlflow.sharedViewState.<key>, an envelope
    # {name, createdAt, state: JSON text}, opened by ?viewStateShareKey=<key>), so that the printed address
    # shows the trials' scores without picking columns by hand.
    spec = SweepSpec.model_validate({
        "name": "view", "base": {"preset": "cpu-tiny"}, "search": {"algorithm": "grid", "metric": "probe/knn_top1"},
        "search_space": {"optim.ema_final": {"grid": [0.994, 1.0]}, "model.registers": {"grid": [0, 4]}},
        "mlflow": {"tracking_uri": mlflow_server, "experiment": "sweep-view"}})
    state = open_sweep_run(spec, mlflow_server, None)
    experiment = client(mlflow_server).get_experiment_by_name("sweep-view")
    envelope = json.loads(experiment.tags[f"{VIEW_TAG_PREFIX}capi-view"])
    assert envelope["name"] == "capi sweep view" and isinstance(envelope["createdAt"], int)
    view = json.loads(envelope["state"])
    columns = ["metrics.`probe/knn_top1`", "metrics.`probe/knn_random_init`", "metrics.`probe/knn_gain`",
               "params.`optim.ema_final`", "params.`model.registers`"]
    assert view["selectedColumns"] == view["columnOrder"] == columns and set(view["columnWidths"]) == set(columns)
    assert view["orderByKey"] == "metrics.`probe/knn_top1`" and view["orderByAsc"] is False  # mode max: best first
    # The trials log their config as params under the search space's paths: the columns name real params.
    assert {"optim.ema_final", "model.registers"} <= set(config_params(spec.base_config))

    _finish(SweepOutcome(name="view", path=tmp_path, state=state, metric="probe/knn_top1", mode="max"), False)
    link = re.search(r"MLflow: open (\S+)", capsys.readouterr().out).group(1)
    assert link.endswith(f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
                         "&viewStateShareKey=capi-view")
