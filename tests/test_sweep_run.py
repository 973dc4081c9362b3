"""Sweeps on a real local Ray and a real MLflow server: Tune trials running Ray Train runs.

One ASHA sweep runs end to end through ``capi sweep run`` (nested MLflow runs, the parent's
summary, a trial stopped early with later trials still starting, export, status, report); another
sweep's driver is killed by pid after its first trial and ``capi sweep resume`` finishes it with
every trial trained exactly once; a PBT sweep makes one trial exploit another's checkpoint. Trials
are cpu-tiny runs of a few steps, one worker each.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.sweep import jobs
from orchestrator.sweep import tune as sweep_tune
from capi_core import checkpoint as ckpt
from capi_core.cadence import is_probe_step, probe_evals
from orchestrator.ray_internals import SNAPSHOT
from orchestrator.sweep.spec import load_sweep
from orchestrator.sweep.storage import NOTES_FILE, PROBE_EVALS, save_sweep_run, sweep_dir, trial_rows
from orchestrator.train import STARTUP_FILE
from orchestrator.sweep.trial import POINTER
from orchestrator.sweep.tune import fitting_trials, param_space, portable, scheduler
from orchestrator.tracking import EXPLOITS_TAG, RUN_ID_KEY, STOPPED_TAG, TRIAL_TAG, open_sweep_run


def sweep_file(tmp_path: Path, name: str, dataset: Path, uri: str, steps: int = 10, **sections) -> Path:
    """A cpu-tiny sweep file: ``steps`` steps, a probe every 5, one 1-CPU worker per trial."""
    doc = {
        "name": name,
        "base": {"preset": "cpu-tiny", "overrides": {
            "data.dataset": str(dataset), "data.loader_workers": 0, "optim.steps": steps, "probe.every": 5,
            "run.threads": 1}},
        "search_space": {"loss.teacher_temp": {"grid": [0.02, 0.5, 0.03]}},
        "search": {"algorithm": "grid"},
        "budget": {"max_concurrent_trials": 1},
        "storage": str(tmp_path / "sweeps"),
        "mlflow": {"tracking_uri": uri, "experiment": f"sweep-{name}"},
        # Retries absorb Train worker groups that miss the fixture's 30 s start timeout on a busy machine.
        "failure": {"max_failures": 3},
        **sections,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def mlflow_client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def runs_of(client, experiment: str) -> tuple:
    """(parent run, child runs by trial id) of a sweep's experiment."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("capi.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


# ----------------------------------------------------------------------------------- pure logic
def test_search_space_scheduler_units_and_concurrency(tiny_dataset, tmp_path):
    from orchestrator.sweep.spec import load_sweep

    spec = load_sweep(sweep_file(tmp_path, "units", tiny_dataset, "sqlite:///x.db", search={"algorithm": "random"},
                                 search_space={"loss.teacher_temp": {"loguniform": [0.01, 0.1]},
                                               "model.registers": {"grid": [0, 4]},
                                               "optim.lr": {"choice": [1e-3, 2e-3]}},
                                 budget={"num_samples": 4}, scheduler={"type": "asha", "grace_period": 1}))
    space = param_space(spec)
    assert space["model.registers"] == {"grid_search": [0, 4]}
    assert (space["loss.teacher_temp"].lower, space["loss.teacher_temp"].upper) == (0.01, 0.1)
    assert space["optim.lr"].categories == [1e-3, 2e-3]
    asha = scheduler(spec)
    assert (asha._time_attr, asha._max_t) == (PROBE_EVALS, 2)
    assert min(milestone for milestone, _ in asha._brackets[0]._rungs) == 1  # the grace period
    # Probe reports at steps 5 and 10 count as evaluations 1 and 2, as reports_per_trial says.
    assert [probe_evals(s, 5) for s in (5, 10)] == [1, 2] and spec.reports_per_trial() == 2
    assert [probe_evals(s, 4) for s in (4, 8, 10)] == [1, 2, 3]
    config = spec.base_config
    assert [s for s in range(1, 11) if is_probe_step(s, config)] == [5, 10]
    assert fitting_trials(spec, {"CPU": 3.5}) == 3 and fitting_trials(spec, {"CPU": 0.5}) == 1
    # Trials get absolute paths and write under the sweep directory.
    moved = portable(spec, tmp_path / "sweeps" / "units")
    trial = moved.trial_config({"loss.teacher_temp": 0.05, "model.registers": 0, "optim.lr": 1e-3})
    assert trial.run.output_dir == tmp_path / "sweeps" / "units" / "trials" and trial.model.registers == 0
    assert Path(trial.data.dataset).is_absolute()


def test_tune_noise_switches_hold_only_while_the_tuner_runs(monkeypatch):
    from orchestrator.sweep.tune import QUIET_TUNE_ENV, quiet_tune

    for key in QUIET_TUNE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")  # the user's own choice wins
    with quiet_tune(verbose=False):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1" and os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ and os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    with quiet_tune(verbose=True):  # --verbose: Tune as it comes
        assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ


def test_a_bad_file_stops_at_validation(tiny_dataset, tmp_path, mlflow_server):
    bad = sweep_file(tmp_path, "bad", tiny_dataset, mlflow_server, budget={"num_samples": 2})
    result = CliRunner().invoke(main, ["sweep", "run", str(bad)])
    assert result.exit_code == 1 and "budget.num_samples" in result.output
    assert not (tmp_path / "sweeps").exists()  # nothing started, nothing written


def test_a_local_ray_that_cannot_start_is_a_clear_error(tiny_dataset, tmp_path):
    # A real failure of Ray's own start-up (its temporary directory under a file): under heavy load
    # the raylet's 30 s registration limit fails the same call with a bare Exception.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    file = sweep_file(tmp_path, "noray", tiny_dataset, f"sqlite:///{tmp_path / 'mlflow.db'}")
    env = {**os.environ, "RAY_TMPDIR": str(blocker / "ray"), "RAY_ADDRESS": "", "CAPI_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([str(Path(sys.executable).with_name("capi")), "sweep", "run", str(file)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Error: could not start a local Ray: NotADirectoryError" in result.stderr
    assert "what to do:" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert "unexpected" not in result.stderr


def test_optuna_searcher_samples_the_sweep_space_under_its_names(ray_local, tiny_dataset, tmp_path):
    from ray import tune

    from orchestrator.sweep.spec import load_sweep
    from orchestrator.sweep.tune import searcher

    spec = load_sweep(sweep_file(tmp_path, "opt", tiny_dataset, "sqlite:///x.db", search={"algorithm": "optuna"},
                                 search_space={"loss.teacher_temp": {"loguniform": [0.01, 0.1]},
                                               "model.registers": {"choice": [0, 4]}},
                                 budget={"num_samples": 3, "max_concurrent_trials": 2}))

    def trial(config):  # stands in for run_trial: the metric is a known function of the values
        tune.report({spec.search.metric: config["loss.teacher_temp"] * 100 + config["model.registers"]})

    grid = tune.Tuner(trial, param_space=param_space(spec), tune_config=tune.TuneConfig(
        metric=spec.search.metric, mode="max", num_samples=spec.repeats(), search_alg=searcher(spec, 2)),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "optuna"), verbose=0)).fit()
    configs = [r.config for r in grid]
    assert len(configs) == 3 and all(set(c) == {"loss.teacher_temp", "model.registers"} for c in configs)
    assert all(0.01 <= c["loss.teacher_temp"] <= 0.1 and c["model.registers"] in (0, 4) for c in configs)
    spec.trial_config(configs[0])  # the values are valid TrainConfig fields


# ------------------------------------------------------------------------------- Ray Jobs auth
class _Dashboard(http.server.BaseHTTPRequestHandler):
    """Answers /api/jobs/ like a Ray dashboard with (401 without a bearer token) or without auth."""

    token: str | None = None

    def do_GET(self):  # noqa: N802 - http.server's name
        auth = self.headers.get("Authorization")
        ok = self.token is None or auth == f"Bearer {self.token}"
        self.send_response(200 if ok else (403 if auth else 401))
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args):
        pass


@pytest.fixture
def dashboard():
    servers = []

    def start(token):
        handler = type("Handler", (_Dashboard,), {"token": token})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


def test_submit_refuses_clusters_without_token_auth_and_never_prints_the_token(dashboard, tmp_path, monkeypatch,
                                                                               tiny_dataset):
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    assert jobs.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.auth_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret-token")
    assert jobs.auth_token() == "s3cret-token"  # Ray's order: env, path, home file

    open_cluster, locked = dashboard(None), dashboard("s3cret-token")
    assert not jobs.requires_token(open_cluster) and jobs.requires_token(locked)
    file = sweep_file(tmp_path, "sub", tiny_dataset, "sqlite:///x.db")
    result = CliRunner().invoke(main, ["sweep", "submit", str(file), "--address", open_cluster,
                                       "--project-dir", str(tmp_path)])
    assert result.exit_code != 0 and "without authentication" in result.output and "--insecure" in result.output
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-token")
    result = CliRunner().invoke(main, ["sweep", "submit", str(file), "--address", locked,
                                       "--project-dir", str(tmp_path)])
    assert result.exit_code != 0 and "rejected the token" in result.output
    assert "wrong-token" not in result.output
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    (tmp_path / ".ray" / "auth_token").unlink()
    with pytest.raises(jobs.JobError, match="requires a token"):
        jobs.job_client(locked)
    with pytest.raises(jobs.JobError, match="outside the project directory"):
        jobs.entrypoint(file, tmp_path / "elsewhere")
    assert jobs.entrypoint(file, tmp_path) == "capi sweep run sub.yaml"
    from orchestrator.sweep.spec import load_sweep

    assert "a local store" in jobs.portability_warnings(load_sweep(file))[0]  # sqlite: head-only


def test_a_local_ray_dashboard_requires_a_token(ray_local):
    url = ray_local._private.worker.global_worker.node.address_info["webui_url"]
    assert jobs.requires_token(f"http://{url}")


# ------------------------------------------------------------------------------- end to end
def test_asha_sweep_end_to_end_with_nested_runs_export_status_and_report(ray_local, mlflow_server, tiny_dataset,
                                                                         tmp_path, monkeypatch):
    # train/target_entropy grows with the teacher temperature, so the ranking is known: 0.5 is the
    # worst at the first rung (step 5) and ASHA stops it; the 0.03 trial must still start after that
    # stop. 30 steps leave the stop time to land before the stopped trial would have finished anyway.
    file = sweep_file(tmp_path, "e2e", tiny_dataset, mlflow_server, steps=30,
                      search={"algorithm": "grid", "metric": "train/target_entropy", "mode": "min"},
                      scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    monkeypatch.setattr(sweep_tune, "HEARTBEAT_S", 0.2)  # a line a minute in use; these trials last seconds
    result = CliRunner().invoke(main, ["sweep", "run", str(file)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "stopped early (ASHA rung at probe " in result.output
    assert re.search(r"^probe baseline: [\d.]+ % k-NN at random init on ", result.output, re.M)  # the driver's, once
    # The heartbeat reads each running trial's step from the metrics.jsonl its Train run writes.
    assert re.search(r"\] running: trial \d/3 at step \d+/30", result.output), result.output
    assert "mlflow" in result.output.lower() and "parent run" in result.output
    assert re.search(r"\[\d+:\d\d\] trial 3/3 started: teacher_temp=0.03", result.output)
    # (Escape codes and Ray's lines are checked on a real driver's console in the resume test: here the
    # fixture's Ray forwards its workers' output into the same captured stream.)
    assert "best so far: trial" in result.output

    client = mlflow_client(mlflow_server)
    parent, children = runs_of(client, "sweep-e2e")
    by_temp = {float(r.data.params["loss.teacher_temp"]): r for r in children}
    assert sorted(by_temp) == [0.02, 0.03, 0.5]  # one child run per trial, nested under the parent
    assert len({r.data.tags[TRIAL_TAG] for r in children}) == 3
    stopped = by_temp[0.5]
    # Stopped early: KILLED in the runs table, the tag naming the scheduler's rung; the others FINISHED.
    assert stopped.info.status == "KILLED" and stopped.data.tags[STOPPED_TAG].startswith("ASHA rung at probe ")
    assert all(r.info.status == ("KILLED" if STOPPED_TAG in r.data.tags else "FINISHED") for r in children)
    assert by_temp[0.02].info.status == "FINISHED"  # the best trial ran to its end
    # As ML researchers expect MLflow: a training experiment, source tags, runs named by their values,
    # the dataset as the runs' input.
    experiment = client.get_experiment_by_name("sweep-e2e")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for run in (parent, *children):
        tags = run.data.tags
        assert tags["mlflow.source.name"].startswith(("capi", "pytest", "python")) and tags["mlflow.user"]
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert {r.info.run_name for r in children} == {"teacher_temp=0.02", "teacher_temp=0.5", "teacher_temp=0.03"}
    inputs = client.get_run(by_temp[0.02].info.run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == [json.loads((tiny_dataset / "manifest.json").read_text())["name"]]
    assert max(m.step for m in client.get_metric_history(stopped.info.run_id, "train/target_entropy")) < 30
    assert by_temp[0.02].data.metrics["train/target_entropy"] < stopped.data.metrics["train/target_entropy"]
    full = [r for r in children if STOPPED_TAG not in r.data.tags]
    assert all(r.data.metrics["train/target_entropy"] >= 0 and "probe/knn_top1" in r.data.metrics for r in full)
    for run in full:  # at its end, each trial measured its final teacher and drew it
        assert 0 <= run.data.metrics["diag/high_norm_fraction"] <= 1 and "diag/norm_q99" in run.data.metrics
        assert "pictures/pca.png" in {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}

    # The parent's summary names the best finished trial and its value.
    directory = sweep_dir(tmp_path / "sweeps", "e2e")
    # One-worker trials trained inside their Tune trials: no Ray Train record in their run directories,
    # and each recorded its start-up from the driver's start time on.
    notes = json.loads((directory / NOTES_FILE).read_text())
    pids = set()
    for run in children:
        run_dir = directory / "trials" / run.data.tags["capi.run_name"]
        startup = json.loads((run_dir / STARTUP_FILE).read_text())
        pids.add(startup["pid"])
        assert not (run_dir / SNAPSHOT).exists()
        assert (run_dir / "checkpoints").is_dir() or STOPPED_TAG in run.data.tags  # stopped before its first
        assert notes[run.data.tags[TRIAL_TAG]]["started_at"] <= startup["entered"] <= startup["built"] <= \
            startup["data_open"] <= startup["first_log"]
    assert len(pids) == 1  # one at a time: the first trial's process trained the other two (reuse_actors)
    rows = {r["trial_id"]: r for r in json.loads(
        Path(client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))).read_text())}
    best_id = min((t for t in rows.values() if t["metric"] is not None), key=lambda t: t["metric"])["trial_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["capi.best_trial"] == best_id
    best_run = client.get_run(parent.data.tags["capi.best_run_id"])
    assert best_run.data.tags[TRIAL_TAG] == best_id
    assert parent.data.metrics["best/train/target_entropy"] == pytest.approx(rows[best_id]["metric"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.yaml", "search_space.json",
                                                                          "trials.json", "base_config.yaml"}
    assert sorted(t["status"] for t in rows.values()).count("STOPPED") >= 1

    # The best trial is exported and registered as champion.
    export = directory / "export"
    assert {p.name for p in export.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    champion = client.get_model_version_by_alias("capi-e2e", "champion")
    exported = json.loads((export / "config.json").read_text())
    assert champion.run_id == exported["source"]["run_id"]
    assert champion.run_id == best_run.info.run_id
    assert isinstance(exported["source"]["trial_params"]["loss.teacher_temp"], float)  # typed, not "0.02"

    # capi eval logs its table, metrics and pictures into the checkpoint's run.
    checkpoint = best_run.data.tags["capi.checkpoint"]
    evaluated = CliRunner().invoke(main, ["eval", "run", checkpoint, "--probes", "knn", "--limit-train", "200",
                                          "--diagnostics", "--diagnostic-images", "16", "--pictures",
                                          "--picture-images", "2", "--tracking-uri", mlflow_server],
                                   catch_exceptions=False)
    assert evaluated.exit_code == 0, evaluated.output
    logged_eval = client.get_run(best_run.info.run_id)
    assert "eval/knn_top1" in logged_eval.data.metrics and "eval/diag/high_norm_fraction" in logged_eval.data.metrics
    eval_artifacts = {a.path for a in client.list_artifacts(best_run.info.run_id, "eval")}
    assert {"eval/probes.json", "eval/eval.json"} <= eval_artifacts
    table = json.loads(Path(client.download_artifacts(best_run.info.run_id, "eval/probes.json",
                                                      str(tmp_path))).read_text())
    assert "knn" in json.dumps(table) and "test_top1" in json.dumps(table)
    assert {a.path for a in client.list_artifacts(best_run.info.run_id, "eval/pictures")} >= {
        "eval/pictures/pca.png"}

    # status reads the same from storage, without Ray work.
    status = CliRunner().invoke(main, ["sweep", "status", "e2e", "--storage", str(tmp_path / "sweeps")])
    assert status.exit_code == 0, status.output
    for number in (1, 2, 3):  # trials by their number in the sweep, as the console named them
        assert re.search(rf"^\s*{number}\*?\s+(TERMINATED|STOPPED)\b", status.output, re.M), status.output
    assert "STOPPED" in status.output and "TERMINATED" in status.output

    # The report shows every trial, in the page and the plots, and lands in the parent run.
    report = CliRunner().invoke(main, ["sweep", "report", "e2e", "--storage", str(tmp_path / "sweeps"),
                                       "--images", "16"], catch_exceptions=False)
    assert report.exit_code == 0, report.output
    page = (directory / "report" / "index.html").read_text()
    assert all(trial_id in page for trial_id in rows)
    for png in ("learning_curves.png", "metric_vs_loss_teacher_temp.png", "registers_vs_high_norm.png",
                "parallel_coordinates.png"):
        assert (directory / "report" / png).stat().st_size > 1000 and png in page
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) >= 4 and all(src.startswith("data:image/png;base64,") for src in sources)  # self-contained
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/index.html" in logged and "report/learning_curves.png" in logged

    # Running the same sweep again is refused: it exists, and resume is the way on.
    again = CliRunner().invoke(main, ["sweep", "run", str(file)])
    assert again.exit_code != 0 and "capi sweep resume e2e" in again.output


def test_killed_driver_resumes_and_every_trial_trains_once(ray_local, mlflow_server, tiny_dataset, tmp_path):
    file = sweep_file(tmp_path, "resume", tiny_dataset, mlflow_server)
    address = ray_local.get_runtime_context().gcs_address
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen([str(Path(sys.executable).with_name("capi")), "sweep", "run", str(file),
                                   "--address", address, "--no-export"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 240
        while " done, best " not in log.read_text():
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # anything the driver left in its session
        except ProcessLookupError:
            pass
    client = mlflow_client(mlflow_server)
    _, before = runs_of(client, "sweep-resume")
    finished = [r for r in before if r.info.status == "FINISHED"]
    assert len(finished) == 1  # the kill came after the first trial, before the others finished
    # The driver's console, no terminal: plain lines, none of Ray's, Tune's or MLflow's own.
    console = log.read_text()
    assert "\x1b[" not in console and "trial 1/3 started" in console, console
    noise = ("WARNING", "(TrainController", "(RayTrainWorker", "(PlacementGroupCleaner", "TensorBoard",
             "Configuration for experiment", "[repeated", "INFO ")
    assert not [line for line in console.splitlines() if any(n in line for n in noise)], console

    result = CliRunner().invoke(main, ["sweep", "resume", "resume", "--storage", str(tmp_path / "sweeps"),
                                       "--no-export"], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    parent, children = runs_of(client, "sweep-resume")
    assert sorted(float(r.data.params["loss.teacher_temp"]) for r in children) == [0.02, 0.03, 0.5]
    assert all(r.info.status == "FINISHED" for r in children)
    for run in children:  # each trial reached its last step exactly once
        final = [m for m in client.get_metric_history(run.info.run_id, "probe/knn_top1") if m.step == 10]
        assert len(final) == 1, run.data.tags[TRIAL_TAG]
    for run in finished:  # trained before the kill: not trained again
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/capi_loss")]
        assert sorted(steps) == sorted(set(steps))
    assert parent.info.status == "FINISHED" and "best/probe/knn_top1" in parent.data.metrics
    status = CliRunner().invoke(main, ["sweep", "status", "resume", "--storage", str(tmp_path / "sweeps")])
    assert status.output.count("TERMINATED") == 3, status.output


def test_a_sweep_killed_before_tune_saved_its_state_resumes_from_its_first_trial(ray_local, tiny_dataset, tmp_path):
    # A driver killed after it saved the sweep (spec, MLflow parent run) but before Tune wrote anything
    # (benchmarks/kill_faults.py --only sweep): `capi sweep run` refuses the existing sweep, so `capi
    # sweep resume` must start the trials, under the same parent run.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    file = sweep_file(tmp_path, "early", tiny_dataset, uri, search_space={"loss.teacher_temp": {"grid": [0.05]}})
    spec = load_sweep(file)
    directory = sweep_dir(spec.storage, spec.name)
    directory.mkdir(parents=True)
    run_spec = portable(spec, directory)
    save_sweep_run(directory, run_spec, open_sweep_run(spec, uri, file.read_text()), file)  # as run_sweep does
    again = CliRunner().invoke(main, ["sweep", "run", str(file)])
    assert again.exit_code != 0 and "capi sweep resume early" in again.output

    result = CliRunner().invoke(main, ["sweep", "resume", "early", "--storage", str(tmp_path / "sweeps"),
                                       "--no-export"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [r.status for r in trial_rows(directory, run_spec)] == ["TERMINATED"]
    parent, children = runs_of(mlflow_client(uri), "sweep-early")  # one parent run: the saved one
    assert parent.info.status == "FINISHED" and [r.info.status for r in children] == ["FINISHED"]


def test_a_killed_in_trial_process_resumes_from_its_checkpoint_into_the_same_mlflow_run(
        ray_local, mlflow_server, tiny_dataset, tmp_path):
    # The trial trains in its Tune actor's process: SIGKILL it after its first checkpoint, and Tune's
    # retry (failure.max_failures) must resume from that checkpoint, logging on into the same child run.
    steps, every = 400, 20
    file = sweep_file(tmp_path, "killed", tiny_dataset, mlflow_server,
                      base={"preset": "cpu-tiny", "overrides": {
                          "data.dataset": str(tiny_dataset), "data.loader_workers": 0, "optim.steps": steps,
                          "probe.every": 200, "run.checkpoint_every": every, "run.log_every": every,
                          "run.keep_checkpoints": 2, "run.threads": 1}},
                      search_space={"loss.teacher_temp": {"grid": [0.05]}})
    box: dict = {}
    sweep = threading.Thread(target=lambda: box.update(result=CliRunner().invoke(
        main, ["sweep", "run", str(file), "--no-export"], catch_exceptions=False)), daemon=True)
    sweep.start()
    trials = sweep_dir(tmp_path / "sweeps", "killed") / "trials"
    deadline = time.monotonic() + 180
    while not list(trials.glob(f"*/checkpoints/{ckpt.checkpoint_name(every)}")):
        assert time.monotonic() < deadline and sweep.is_alive(), "no first checkpoint in time"
        time.sleep(0.1)
    (run_dir,) = [d for d in trials.iterdir() if (d / STARTUP_FILE).exists()]
    pid = json.loads((run_dir / STARTUP_FILE).read_text())["pid"]
    assert pid != os.getpid()  # a Ray worker process, not the driver
    os.kill(pid, signal.SIGKILL)
    sweep.join(240)
    assert not sweep.is_alive() and box["result"].exit_code == 0, box.get("result") and box["result"].output

    client = mlflow_client(mlflow_server)
    _, (run,) = runs_of(client, "sweep-killed")
    assert run.info.status == "FINISHED"
    resumed_at = int(run.data.tags["capi.resumed_at_step"])
    assert every <= resumed_at < steps and resumed_at % every == 0
    logged = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/capi_loss")})
    assert logged == list(range(every, steps + 1, every))  # every log step, none missing
    final = [m for m in client.get_metric_history(run.info.run_id, "probe/knn_top1") if m.step == steps]
    assert len(final) == 1  # the end was reached once
    assert [p.name for p in ckpt.list_checkpoints(run_dir)][-1] == ckpt.checkpoint_name(steps)


def test_pbt_exploit_seeds_a_new_train_run_from_the_donor_into_the_trial_mlflow_run(mlflow_server, tiny_dataset,
                                                                                   tmp_path):
    # The exploit step by itself (no Tune): PBT hands the trial a donor's pointer checkpoint.
    from ray.tune import Checkpoint

    from capi_core.config import build_config
    from capi_core.train import Trainer
    from orchestrator.tracking import MlflowTracking, TrackingOptions, open_run
    from orchestrator.sweep.trial import pbt_lineage, seed_from_donor

    trials = tmp_path / "trials"
    config = build_config("cpu-tiny", [f"data.dataset={tiny_dataset}", f"run.output_dir={trials}",
                                       "data.loader_workers=0", "optim.steps=10", "run.checkpoint_every=5",
                                       "run.keep_checkpoints=2"])
    client = mlflow_client(mlflow_server)
    options = TrackingOptions(uri=mlflow_server, experiment="pbt-seed")
    donor_config = config.model_copy(update={"run": config.run.model_copy(update={"name": "sw-t1"})})
    Trainer(donor_config, [MlflowTracking(mlflow_server, options)]).fit()
    donor_step5 = trials / "sw-t1" / "checkpoints" / "step-0000005"

    def pointer(trial_id, run_name, checkpoint):
        directory = tmp_path / f"ptr-{trial_id}-{run_name}"
        directory.mkdir()
        (directory / POINTER).write_text(json.dumps({"trial_id": trial_id, "run_name": run_name,
                                                      "checkpoint": str(checkpoint)}))
        return Checkpoint.from_directory(directory)

    base = config.model_copy(update={"run": config.run.model_copy(update={"name": "sw-t2"})})
    assert pbt_lineage(base, "sw", "t2", None) == (base, None)  # no checkpoint: the trial's own run
    own, none = pbt_lineage(base, "sw", "t2", pointer("t2", "sw-t2-from-t1-5", donor_step5))
    assert own.run.name == "sw-t2-from-t1-5" and none is None  # a restart continues its lineage
    seeded, donor = pbt_lineage(base, "sw", "t2", pointer("t1", "sw-t1", donor_step5))
    assert seeded.run.name == "sw-t2-from-t1-5" and donor["trial_id"] == "t1"

    run_id = open_run(mlflow_server, seeded, options)
    run_dir = trials / seeded.run.name
    seed_from_donor(donor, run_dir, run_id, mlflow_server)
    seed_from_donor(donor, run_dir, run_id, mlflow_server)  # a restart of the exploit: no second copy
    copied = json.loads((run_dir / "checkpoints" / "step-0000005" / "state.json").read_text())
    assert copied["step"] == 5 and copied["metadata"][RUN_ID_KEY] == run_id
    assert json.loads(client.get_run(run_id).data.tags[EXPLOITS_TAG]) == ["t1@step-0000005"]

    trainer = Trainer(seeded, [MlflowTracking(mlflow_server, options, run_id=run_id)], resume=run_dir)
    assert trainer.step == 5
    trainer.fit()
    assert trainer.metadata[RUN_ID_KEY] == run_id  # logged into the trial's run, not the donor's
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/capi_loss")) == [10]
    donor_run = json.loads((donor_step5 / "state.json").read_text())["metadata"][RUN_ID_KEY]
    assert donor_run != run_id and EXPLOITS_TAG not in client.get_run(donor_run).data.tags


@pytest.mark.parametrize("launcher", ["auto", "ray_train"])
def test_pbt_sweep_reports_pointer_checkpoints_and_finishes(ray_local, mlflow_server, tiny_dataset, tmp_path,
                                                            launcher):
    # 0.5 gives the higher target entropy, so its trial is in the lower quantile and may copy the 0.02
    # trial's checkpoint; whether it does depends on how the two trials overlap in time (PBT skips a
    # leader that has no saved checkpoint yet), so the exploit itself is checked in the test above.
    # What must hold here: every probe reached Tune with a pointer checkpoint PBT could copy.
    file = sweep_file(tmp_path, "pbt", tiny_dataset, mlflow_server,
                      base={"preset": "cpu-tiny", "overrides": {
                          "data.dataset": str(tiny_dataset), "data.loader_workers": 0, "optim.steps": 15,
                          "probe.every": 5, "run.checkpoint_every": 5, "run.keep_checkpoints": 3,
                          "run.threads": 1}},
                      search_space={"loss.teacher_temp": {"grid": [0.02, 0.5]}},
                      search={"algorithm": "grid", "metric": "train/target_entropy", "mode": "min"},
                      scheduler={"type": "pbt", "perturbation_interval": 1,
                                 "hyperparam_mutations": ["loss.teacher_temp"]},
                      budget={"max_concurrent_trials": 2},
                      resources={"workers": 1, "cpus_per_worker": 1, "launcher": launcher},
                      mlflow={"tracking_uri": mlflow_server, "experiment": f"sweep-pbt-{launcher}"})
    result = CliRunner().invoke(main, ["sweep", "run", str(file), "--no-export"], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    client = mlflow_client(mlflow_server)
    _, children = runs_of(client, f"sweep-pbt-{launcher}")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children), [
        (r.data.tags[TRIAL_TAG], r.info.status, r.data.tags.get("capi.error")) for r in children]
    directory = sweep_dir(tmp_path / "sweeps", "pbt")
    for run in children:
        trial_id = run.data.tags[TRIAL_TAG]
        (trial_dir,) = directory.glob(f"trial_*{trial_id}*")
        files = sorted(trial_dir.glob(f"checkpoint_*/{POINTER}"))
        pointers = [json.loads(p.read_text()) for p in files]
        assert pointers  # a probe step is also a checkpoint step, so probes came with pointers
        assert all(Path(p["checkpoint"]).parent.name == "checkpoints" for p in pointers)
        assert Path(pointers[-1]["checkpoint"]).is_dir() and pointers[-1]["trial_id"] == trial_id
        # The last step came with a pointer, unless the trial's last exploit handed it a donor's final
        # checkpoint: then it reports the donor's metrics and trains no more (seen once on 2 cores).
        exploits = json.loads(run.data.tags.get(EXPLOITS_TAG, "[]"))
        if not (exploits and exploits[-1].endswith("@step-0000015")):
            assert Path(pointers[-1]["checkpoint"]).name == "step-0000015", (exploits, [
                (f.parent.name, p["run_name"], Path(p["checkpoint"]).name) for f, p in zip(files, pointers)])
    for run in children:
        for exploit in json.loads(run.data.tags.get(EXPLOITS_TAG, "[]")):  # an exploit, if one happened
            donor, step = exploit.split("@")
            seeded = directory / "trials" / f"pbt-{run.data.tags[TRIAL_TAG]}-from-{donor}-{int(step[5:])}"
            assert json.loads((seeded / "checkpoints" / step / "state.json").read_text())["metadata"][
                RUN_ID_KEY] == run.info.run_id
    # Which path trained: Ray Train keeps its record of a run's checkpoints in the run directory. (A run
    # seeded with a donor's final checkpoint trains nothing: it has no metrics.jsonl.)
    run_dirs = [d for d in (directory / "trials").iterdir() if (d / "metrics.jsonl").is_file()]
    assert run_dirs and all((d / SNAPSHOT).exists() == (launcher == "ray_train") for d in run_dirs)
    status = CliRunner().invoke(main, ["sweep", "status", "pbt", "--storage", str(tmp_path / "sweeps")])
    assert status.output.count("TERMINATED") == 2, status.output
