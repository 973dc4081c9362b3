"""The training loop's invariants (what is detached, what trains what), learning, checkpoints and resume."""

import json
import math

import pytest
import torch

from capi_core import checkpoint as ckpt
from capi_core.cadence import REPORTED_METRICS
from capi_core.config import build_config
from capi_core.train import JsonlMetrics, NonFiniteLossError, Trainer


def tiny_config(dataset, tmp_path, *overrides):
    return build_config("cpu-tiny", [f"data.dataset={dataset}", f"run.output_dir={tmp_path}",
                                     "data.loader_workers=0", *overrides])


def one_batch(trainer):
    from capi_core.data.reader import train_batches

    cfg = trainer.config
    images, _ = next(train_batches(cfg.data, cfg.model.img_size, cfg.optim.batch_size, seed=cfg.run.seed))
    return images


def masks(trainer, batch):
    from capi_core.masking import sample_masks

    cfg = trainer.config
    return sample_masks(cfg.masking.strategy, cfg.model.grid_size, cfg.masking.ratio,
                        cfg.masking.prediction_subsampling, batch, torch.Generator().manual_seed(0))


def test_each_loss_reaches_only_its_own_parameters(tiny_dataset, tmp_path):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path))
    images = one_batch(trainer)
    visible, predict = masks(trainer, images.shape[0])
    loss_s, loss_c, targets, logits_c = trainer.forward_losses(images, visible, predict)
    student = [p for p in trainer.student.parameters() if p.requires_grad]
    head = list(trainer.clustering_head.parameters())

    assert not targets.requires_grad and logits_c.requires_grad  # SK output is a constant
    assert all(g is None for g in torch.autograd.grad(loss_s, head, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(loss_c, student, retain_graph=True, allow_unused=True))
    assert all(g is not None for g in torch.autograd.grad(loss_c, head, retain_graph=True))
    got = torch.autograd.grad(loss_s, student, allow_unused=True)
    assert sum(g is not None for g in got) == len(student)  # the whole student learns from the CAPI loss
    assert all(not p.requires_grad for p in trainer.teacher.parameters())


def test_teacher_moves_only_by_ema(tiny_dataset, tmp_path):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path, "optim.warmup_fraction=0.0", "optim.ema_momentum=0.9"))
    images = one_batch(trainer)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    m = trainer.schedule(0)["momentum"]
    assert m == pytest.approx(0.9)
    trainer.train_step([images], 0)
    student = trainer.student.state_dict()
    for key, value in trainer.teacher.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, m * before[key] + (1 - m) * student[key])
    assert all(p.grad is None for p in trainer.teacher.parameters())


def test_the_target_entropy_is_computed_on_log_steps_only(tiny_dataset, tmp_path):
    """train_step leaves the entropy diagnostic out when asked (fit asks on every step that does not log)
    and trains the same either way; fit still logs it at every log step."""
    runs = {}
    for diagnostics in (True, False):
        trainer = Trainer(tiny_config(tiny_dataset, tmp_path / str(diagnostics)))
        out = trainer.train_step([one_batch(trainer)], 0, diagnostics=diagnostics)
        runs[diagnostics] = (out, torch.cat([p.flatten() for p in trainer.student.parameters()]))
    assert "target_entropy" in runs[True][0] and "target_entropy" not in runs[False][0]
    assert float(runs[True][0]["target_entropy"]) > 0
    torch.testing.assert_close(runs[True][0]["capi_loss"], runs[False][0]["capi_loss"], rtol=0, atol=0)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=0, atol=0)
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "fit", "optim.steps=7", "run.log_every=3"),
                      callbacks=[JsonlMetrics()])
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "train/target_entropy" in r]
    assert logged[:3] == [3, 6, 7] and all(r["train/target_entropy"] > 0 for r in rows if r["step"] in logged)


def test_momentum_starts_at_one_and_is_tied_to_lr_by_default(tiny_dataset, tmp_path):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path, "optim.ema_momentum=null", "optim.steps=100"))
    assert trainer.schedule(0)["momentum"] == 1.0  # the teacher is frozen at init for the first step
    for step in (5, 10, 50, 99):
        s = trainer.schedule(step)
        assert s["momentum"] == pytest.approx(1.0 - s["lr"])


def test_loss_falls_and_metrics_are_logged(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path, "optim.steps=60", "run.log_every=5")
    metrics = Trainer(cfg, [JsonlMetrics()]).fit()
    lines = [json.loads(x) for x in (tmp_path / cfg.run.name / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/capi_loss"] for x in lines if "train/capi_loss" in x]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    # The final report is a probe step's (the metrics a sweep may rank trials on) plus the end-of-run
    # register diagnostics, which only the last report carries.
    assert set(REPORTED_METRICS) <= set(metrics)
    assert {k for k in metrics if k not in REPORTED_METRICS} and all(
        k.startswith("diag/") for k in metrics if k not in REPORTED_METRICS)
    for key in ("train/clustering_loss", "train/lr", "train/momentum", "train/target_entropy",
                "train/clusters_used", "train/cluster_perplexity", "train/images_per_s"):
        assert key in lines[0] and math.isfinite(lines[0][key])
    assert 0 <= metrics["probe/knn_top1"] <= 100
    assert 1 <= lines[-1]["train/clusters_used"] <= cfg.clustering.num_clusters


def test_checkpoint_round_trip(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path, "optim.steps=4")
    trainer = Trainer(cfg)
    trainer.fit()
    (path,) = ckpt.list_checkpoints(tmp_path / cfg.run.name)
    tensors, state = ckpt.load_checkpoint(path)
    assert state["step"] == 4
    restored = Trainer(cfg, resume=path)
    for a, b in zip(trainer.student.state_dict().values(), restored.student.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(trainer.clustering_head.parameters(), restored.clustering_head.parameters()):
        assert torch.equal(a, b)
    encoder, loaded_cfg = ckpt.load_encoder(path)
    assert loaded_cfg == cfg
    for a, b in zip(trainer.teacher.encoder.state_dict().values(), encoder.state_dict().values()):
        assert torch.equal(a, b)
    student, _ = ckpt.load_student(tmp_path / cfg.run.name, "student")  # a run directory: its latest checkpoint
    for a, b in zip(trainer.student.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)
    teacher, _ = ckpt.load_student(path)
    assert not teacher.training
    for a, b in zip(trainer.teacher.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_gives_the_same_losses(tiny_dataset, tmp_path):
    common = ["optim.steps=10", "run.log_every=1", "run.checkpoint_every=5", "run.keep_checkpoints=5"]
    full_cfg = tiny_config(tiny_dataset, tmp_path / "a", *common)
    Trainer(full_cfg, [JsonlMetrics()]).fit()
    full = [json.loads(x) for x in (tmp_path / "a" / "capi" / "metrics.jsonl").read_text().splitlines()]

    half = ckpt.list_checkpoints(tmp_path / "a" / "capi")[0]
    assert half.name == ckpt.checkpoint_name(5)
    resumed_cfg = tiny_config(tiny_dataset, tmp_path / "b", *common)
    trainer = Trainer(resumed_cfg, [JsonlMetrics()], resume=half)
    assert trainer.step == 5
    trainer.fit()
    resumed = [json.loads(x) for x in (tmp_path / "b" / "capi" / "metrics.jsonl").read_text().splitlines()]
    by_step = {x["step"]: x for x in full}
    for row in resumed:
        if row["step"] <= 10 and "train/capi_loss" in row:
            assert row["train/capi_loss"] == pytest.approx(by_step[row["step"]]["train/capi_loss"], rel=1e-6)
            assert row["train/clustering_loss"] == pytest.approx(by_step[row["step"]]["train/clustering_loss"],
                                                                 rel=1e-6)


def test_non_finite_losses_stop_with_a_clear_error(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path, "optim.steps=10", "run.max_nonfinite=2")
    trainer = Trainer(cfg)
    with torch.no_grad():
        for p in trainer.student.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        trainer.fit()


def test_corrupt_checkpoint_names_the_file(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path, "optim.steps=2")
    Trainer(cfg).fit()
    (path,) = ckpt.list_checkpoints(tmp_path / cfg.run.name)
    weights = path / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_encoder(path)


def test_checkpoint_from_another_architecture_is_refused(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path, "optim.steps=2")
    Trainer(cfg).fit()
    (path,) = ckpt.list_checkpoints(tmp_path / cfg.run.name)
    state = json.loads((path / ckpt.STATE).read_text())
    state["config"]["model"]["embed_dim"] = 64
    (path / ckpt.STATE).write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        ckpt.load_encoder(path)

