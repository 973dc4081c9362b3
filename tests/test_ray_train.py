"""Distributed training: 2 ranks equal 1 process, and the Ray Train path end to end.

The equivalence test runs the Trainer in 2 gloo processes against 1 process on the same global
batch. The Ray tests share one local Ray (conftest) and a real MLflow server, and kill a Ray Train
worker by pid to check that the run resumes from its checkpoint into the same MLflow run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from pydantic import ValidationError

from capi_core import checkpoint as ckpt
from capi_core.config import build_config
from conftest import free_port
from orchestrator.cli import main
from orchestrator.ray_internals import SNAPSHOT
from orchestrator.tracking import RUN_ID_KEY, TrackingOptions
from orchestrator import train as ray_train_module
from orchestrator.train import (ScalingOptions, TrainingError, WorkerLoop, WorkerTracking, run_distributed, run_path,
                                scratch_dir)

GLOBAL_BATCH = 32


def tiny_config(dataset, out, *overrides):
    return build_config("cpu-tiny", [f"data.dataset={dataset}", f"run.output_dir={out}", "data.loader_workers=0",
                                     f"optim.batch_size={GLOBAL_BATCH}", "run.threads=1", *overrides])


# ---- 2 gloo ranks == 1 process on the same global batch ------------------------------------------

def _global_masks(cfg):
    from capi_core.masking import sample_masks

    return sample_masks(cfg.masking.strategy, cfg.model.grid_size, cfg.masking.ratio,
                        cfg.masking.prediction_subsampling, GLOBAL_BATCH, torch.Generator().manual_seed(7))


def _one_step(cfg, rank: int, world: int) -> dict:
    """Targets, losses and DDP-averaged gradients of one micro-batch on ``rank`` of ``world``."""
    from capi_core.data.reader import train_batches
    from capi_core.train import Trainer

    trainer = Trainer(cfg)
    images, _ = next(train_batches(cfg.data, cfg.model.img_size, GLOBAL_BATCH // world, rank=rank,
                                   world_size=world, seed=cfg.run.seed))
    visible, predict = (m[rank::world] for m in _global_masks(cfg))  # rank r holds global rows r, r+world, ...
    loss_s, loss_c, targets, assignments = trainer.forward_losses(images, visible, predict)
    (loss_s + loss_c).backward()
    return {"images": images, "targets": targets, "assignments": assignments,
            "capi_loss": loss_s.detach(), "clustering_loss": loss_c.detach(),
            "student_grads": [p.grad.clone() for p in trainer.student.parameters() if p.grad is not None],
            "head_grads": [p.grad.clone() for p in trainer.clustering_head.parameters()]}


def _rank_main(rank: int, world: int, port: int, cfg_json: str, out: str) -> None:
    from capi_core.config import TrainConfig

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(_one_step(TrainConfig.model_validate_json(cfg_json), rank, world), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def reordering_atol(reference: torch.Tensor, terms: int) -> float:
    """The most that summing ``terms`` fp32 values in another order can move an entry of ``reference``:
    2 * gamma_n * sum|t_i|, gamma_n = n u / (1 - n u), u = 2^-24 (Higham, Accuracy and Stability of
    Numerical Algorithms, 2nd ed., section 4.2, eq. 4.4: each order is within gamma_{n-1} sum|t_i| of
    the exact sum). The entries compared are means over the batch, so sum|t_i| is the mean magnitude
    of the per-image (per-token) contributions; the tensor's largest entry stands in for it."""
    u = 2.0**-24
    gamma = terms * u / (1 - terms * u)
    return 2 * gamma * float(reference.abs().max())


def test_two_ranks_give_the_targets_losses_and_gradients_of_one_process(tiny_dataset, tmp_path):
    """Two ranks and one process compute the same sums in another order (two partial sums all-reduced
    instead of one running sum), so they agree to fp32 reordering error, not bit for bit. The absolute
    tolerance of each tensor is ``reordering_atol`` for the number of terms summed into its entries:
    the global batch for Sinkhorn-Knopp's per-position batch sums (assignments, targets), the batch
    times the tokens per image for the gradients and losses (DDP averages the ranks' gradients).
    A fixed 1e-7 held on Intel CPUs and failed on AMD EPYC (2.5e-7), whose vectorised reductions
    group the terms differently; the bound holds for any grouping. Relative tolerances stay as they
    were (1e-5 on targets and losses, 1e-4 on gradients)."""
    cfg = tiny_config(tiny_dataset, tmp_path)
    single = _one_step(cfg, 0, 1)
    out = str(tmp_path / "rank")
    mp.spawn(_rank_main, args=(2, free_port(), cfg.model_dump_json(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]

    n_pred = single["targets"].shape[0] // GLOBAL_BATCH
    tokens = GLOBAL_BATCH * (cfg.model.num_patches + cfg.model.registers)
    for r, got in enumerate(ranks):  # rank r holds global images r, r+2, ...: rank-disjoint shards
        torch.testing.assert_close(got["images"], single["images"][r::2])
        assignments = single["assignments"][:, r::2]
        torch.testing.assert_close(got["assignments"], assignments, rtol=1e-5,
                                   atol=reordering_atol(single["assignments"], GLOBAL_BATCH))
        per_image = single["targets"].view(GLOBAL_BATCH, n_pred, -1)[r::2].flatten(0, 1)
        torch.testing.assert_close(got["targets"], per_image, rtol=1e-5,
                                   atol=reordering_atol(single["targets"], GLOBAL_BATCH))
        for a, b in zip(got["student_grads"] + got["head_grads"], single["student_grads"] + single["head_grads"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=reordering_atol(b, tokens))
    for key in ("capi_loss", "clustering_loss"):
        mean = (ranks[0][key] + ranks[1][key]) / 2  # equal shards: the mean of rank means is the global mean
        torch.testing.assert_close(mean, single[key], rtol=1e-5, atol=reordering_atol(single[key], tokens))
    assert len(single["student_grads"]) == len(ranks[0]["student_grads"]) > 0


# ---- Ray Train end to end ---------------------------------------------------------------------------

def _mlflow(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_one_worker(ray) -> int:
    from ray.util.state import list_actors

    # This instance's address: other Ray instances may run on the same host.
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    pid = max(a.pid for a in actors)  # any rank will do
    os.kill(pid, signal.SIGKILL)
    return pid


def _steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(run_dir)]


def _registered_step(run_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train has registered (0: none), from its run snapshot."""
    try:
        snapshot = json.loads((run_dir / SNAPSHOT).read_text())
        return int(snapshot["latest_checkpoint_result"]["checkpoint_dir_name"].rsplit("-", 1)[1])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def test_the_worker_loop_crosses_as_json_and_is_validated_again(tiny_dataset, tmp_path):
    """What build_trainer hands every Ray Train worker survives JSON unchanged, and a worker refuses
    a loop whose fields it does not know."""
    loop = WorkerLoop(config=tiny_config(tiny_dataset, tmp_path), run_path=str(tmp_path / "capi"), local_run_dir=True,
                      tracking=WorkerTracking(uri="sqlite:///m.db", options=TrackingOptions(experiment="e")))
    wire = json.loads(json.dumps(loop.model_dump(mode="json")))
    assert WorkerLoop.model_validate(wire) == loop
    with pytest.raises(ValidationError, match="extra"):
        WorkerLoop.model_validate({**wire, "resume": True})


def test_a_worker_removes_the_scratch_directories_of_workers_that_are_gone(tmp_path, monkeypatch):
    """A worker killed by a signal leaves its scratch directory (and the checkpoint in it); the next
    worker on the node removes it, and leaves those of live processes alone."""
    monkeypatch.setattr(ray_train_module, "SCRATCH_ROOT", tmp_path / "scratch")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (tmp_path / "scratch" / f"{gone}-capi-abc" / "checkpoints").mkdir(parents=True)
    (tmp_path / "scratch" / f"{gone}-capi-abc" / "checkpoints" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "scratch" / f"{os.getppid()}-other-def").mkdir()  # a live process: the test runner's parent
    (tmp_path / "scratch" / "not-a-worker").mkdir()  # not named by a pid: not ours to judge
    new = scratch_dir("capi")
    assert new.parent == tmp_path / "scratch" and new.name.startswith(f"{os.getpid()}-capi-")
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir() if p != new) == [f"{os.getppid()}-other-def",
                                                                                    "not-a-worker"]


def test_bad_setups_fail_before_training(ray_local, tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path)
    dead = TrackingOptions(uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrainingError, match="is not reachable"):
        run_distributed(cfg, ScalingOptions(workers=2), tracking=dead)
    with pytest.raises(TrainingError, match="need 64 CPU"):
        run_distributed(cfg, ScalingOptions(workers=64), tracking=None)
    with pytest.raises(TrainingError, match="data.dataset"):
        run_distributed(tiny_config(tmp_path / "missing", tmp_path), ScalingOptions(workers=2), tracking=None)
    (tmp_path / "capi").mkdir()
    (tmp_path / "capi" / SNAPSHOT).write_text("{}")
    with pytest.raises(TrainingError, match="already holds a run"):
        run_distributed(cfg, ScalingOptions(workers=2), tracking=None, resume=False)
    assert not list((tmp_path / "capi").glob("checkpoints"))


def test_worker_kills_resume_from_checkpoints_into_one_mlflow_run(ray_local, mlflow_server, tiny_dataset, tmp_path):
    steps, every = 400, 20
    overrides = [f"optim.steps={steps}", f"run.checkpoint_every={every}", f"run.log_every={every}",
                 "run.keep_checkpoints=2"]
    cfg = tiny_config(tiny_dataset, tmp_path, *overrides)
    tracking = TrackingOptions(uri=mlflow_server, experiment="ray-e2e")
    run_dir = Path(run_path(cfg, ScalingOptions()))
    mlflow = _mlflow(mlflow_server)

    box: dict = {}

    def first_attempt():
        try:
            run_distributed(cfg, ScalingOptions(workers=2, max_failures=1), tracking=tracking)
        except TrainingError as err:
            box["error"] = err

    thread = threading.Thread(target=first_attempt, daemon=True)
    thread.start()
    # Kill 1: once Ray has registered a checkpoint, and longer than the health-check interval later.
    first = _wait(lambda: _registered_step(run_dir), 120, "a first registered checkpoint")
    time.sleep(0.5)
    killed = [_kill_one_worker(ray_local)]
    run_id = mlflow.search_runs([mlflow.get_experiment_by_name("ray-e2e").experiment_id])[0].info.run_id
    resumed_at = int(_wait(lambda: mlflow.get_run(run_id).data.tags.get("capi.resumed_at_step"), 120,
                           "the restarted worker group to resume"))
    assert resumed_at >= first and resumed_at % every == 0
    # Kill 2: the restart limit (1) is spent, so the run fails and says why.
    _wait(lambda: _registered_step(run_dir) > resumed_at, 120, "a checkpoint after the resume")
    time.sleep(0.5)
    killed.append(_kill_one_worker(ray_local))
    thread.join(120)
    assert not thread.is_alive()
    message = str(box["error"])
    assert "training failed after 1 restart" in message and "rank " in message
    failed = mlflow.get_run(run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["capi.error"]

    # The same command again resumes from the latest registered checkpoint, into the same MLflow run.
    latest = _registered_step(run_dir)
    assert latest > resumed_at
    cli = CliRunner().invoke(main, ["train", "--preset", "cpu-tiny", *_cli_overrides(cfg, overrides),
                                    "--workers", "2", "--tracking-uri", mlflow_server, "--experiment", "ray-e2e"],
                             catch_exceptions=False)
    assert cli.exit_code == 0, cli.output
    assert f"MLflow run {run_id}" in cli.output

    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("ray-e2e").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["capi.resumed_at_step"] == str(latest)  # the step counter continued
    # The killed workers could not clean up after themselves; the workers that came after them did.
    assert not [p for pid in killed for p in ray_train_module.SCRATCH_ROOT.glob(f"{pid}-*")]
    logged = sorted({m.step for m in mlflow.get_metric_history(run_id, "train/capi_loss")})
    assert logged == list(range(every, steps + 1, every))  # every log step, once or more, none missing
    assert run.data.params["optim.steps"] == str(steps) and run.data.params["model.embed_dim"] == "32"
    assert run.data.tags["sys.workers"] == "2" and run.data.tags["sys.threads_per_worker"] == "1"
    assert "probe/knn_top1" in run.data.metrics
    final = run_dir / "checkpoints" / ckpt.checkpoint_name(steps)
    assert run.data.tags["capi.checkpoint"] == str(final)
    assert {"config.yaml", "checkpoint.txt"} <= {a.path for a in mlflow.list_artifacts(run_id)}

    # The run directory is laid out like a standalone run's, with Ray's retention.
    assert _steps(run_dir) == [steps - every, steps]  # keep_checkpoints=2
    tensors, state = ckpt.load_checkpoint(final)
    assert state["step"] == steps and state["metadata"][RUN_ID_KEY] == run_id
    assert (run_dir / "metrics.jsonl").is_file()
    encoder, _ = ckpt.load_encoder(run_dir)
    assert encoder.num_registers == cfg.model.registers


def _cli_overrides(cfg, overrides):
    return [f"data.dataset={cfg.data.dataset}", f"run.output_dir={cfg.run.output_dir}", "data.loader_workers=0",
            f"optim.batch_size={GLOBAL_BATCH}", "run.threads=1", *overrides]
