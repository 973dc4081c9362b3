"""Export of a run's EMA teacher to timm safetensors, a config and a model card, registered in MLflow.

No Ray: a standalone Trainer run tracked in a real ``mlflow server`` stands in for a sweep trial.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from capi_core import checkpoint as ckpt
from capi_core.config import build_config
from capi_core.data.format import load_manifest
from capi_core.train import Trainer
from orchestrator.cli import main
from orchestrator.export import ExportError, best_run, export_best, export_checkpoint, export_run
from orchestrator.tracking import CHECKPOINT_TAG, MlflowTracking, TrackingOptions, child_runs


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


@pytest.fixture(scope="module")
def trained(mlflow_server, tiny_dataset, tmp_path_factory):
    """(MLflow run id, final checkpoint) of a 5-step cpu-tiny run tracked in the server."""
    out = tmp_path_factory.mktemp("export-run")
    cfg = build_config("cpu-tiny", [f"data.dataset={tiny_dataset}", f"run.output_dir={out}", "data.loader_workers=0",
                                    "optim.steps=5", "run.name=exported"])
    trainer = Trainer(cfg, [MlflowTracking(mlflow_server, TrackingOptions(experiment="export"))])
    trainer.fit()
    return trainer.metadata["mlflow_run_id"], ckpt.list_checkpoints(out / "exported")[-1]


def load_timm(out: Path):
    """The card's recipe: timm's VisionTransformer from model_args, the weights loaded strictly, and
    not one warning on the way (timm's channel-adaptation notice included)."""
    cfg = json.loads((out / "config.json").read_text())
    with warnings.catch_warnings(), _no_log_warnings():
        warnings.simplefilter("error")
        model = VisionTransformer(**cfg["model_args"])
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        # timm's own loader, with the config's pretrained_cfg: no "source channels" adaptation notice.
        timm.create_model("vit_base_patch16_224", pretrained=True, **cfg["model_args"], pretrained_cfg_overlay=dict(
            file=str(out / "model.safetensors"), **cfg["pretrained_cfg"]))
    return model.eval(), cfg


class _no_log_warnings(logging.Handler):
    """Fails on any WARNING that timm logs while it is active."""

    def __enter__(self):
        logging.getLogger("timm").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("timm").removeHandler(self)

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            raise AssertionError(f"timm warned: {record.getMessage()}")


def test_export_loads_in_timm_with_the_checkpoint_features_and_is_registered(mlflow_server, trained, tiny_dataset,
                                                                            tmp_path):
    run_id, final = trained
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", "--run", run_id, "--metric", "probe/knn_top1", "--out", str(out),
                                       "--tracking-uri", mlflow_server], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}

    model, cfg = load_timm(out)
    saved = load_file(str(out / "model.safetensors"))
    assert set(model.state_dict()) == set(saved)  # no missing, no unexpected keys
    encoder, config = ckpt.load_encoder(final, "teacher")
    teacher = ckpt.split_prefix(ckpt.load_checkpoint(final)[0], "teacher.encoder.vit.")
    assert all(torch.equal(saved[k], teacher[k]) for k in saved)  # the EMA teacher, not the student
    x = torch.randn(3, config.model.in_chans, config.model.img_size, config.model.img_size)
    with torch.no_grad():
        # plain timm's SDPA against our explicit attention product (attention.py): fp32 summation order.
        torch.testing.assert_close(model.forward_features(x), encoder(x), rtol=1e-5, atol=1e-5)

    manifest = load_manifest(tiny_dataset)
    assert cfg["mean"] == manifest.mean and cfg["std"] == manifest.std
    assert cfg["input_size"] == [config.model.in_chans, config.model.img_size, config.model.img_size]
    assert cfg["source"]["run_id"] == run_id and cfg["source"]["step"] == 5
    card = (out / "README.md").read_text()
    knn = ckpt.load_checkpoint(final)[1]["metrics"]["probe/knn_top1"]
    assert f"| probe/knn_top1 | {knn:.4g} |" in card and run_id in card
    assert "VisionTransformer(**cfg[\"model_args\"])" in card and manifest.name in card
    # The name says what the network is; the training config holds nothing of this machine's run
    # directories (source.checkpoint alone says where the weights came from).
    m = config.model
    assert cfg["architecture"] == (f"capi_vit_w{m.embed_dim}_d{m.depth}_h{m.num_heads}_p{m.patch_size}"
                                   f"_reg{m.registers}_gap_{m.img_size}")
    assert str(final.parents[2]) not in json.dumps(cfg["training"])
    assert "run.output_dir" not in cfg["training"] and cfg["pretrained_cfg"]["input_size"][0] == m.in_chans

    # Logged to the run and registered from those artifacts, aliased champion.
    c = client(mlflow_server)
    assert {"export/model.safetensors", "export/config.json", "export/README.md"} <= {
        a.path for a in c.list_artifacts(run_id, "export")}
    version = c.get_model_version_by_alias("capi-exported", "champion")
    assert version.run_id == run_id
    fetched = Path(c.download_artifacts(run_id, "export", str(tmp_path / "fetched")))
    assert (fetched / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    # A second export replaces the first whole and makes the new version the champion.
    again = export_run(mlflow_server, run_id, out, "probe/knn_top1")
    assert again.version == str(int(version.version) + 1)
    assert c.get_model_version_by_alias("capi-exported", "champion").version == again.version
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


def test_the_best_child_with_a_checkpoint_is_picked_by_metric_and_mode(mlflow_server, trained, tmp_path):
    run_id, final = trained
    c = client(mlflow_server)
    experiment = c.create_experiment("export-sweep")
    parent = c.create_run(experiment, tags={"capi.sweep": "pick", "capi.role": "sweep"}).info.run_id

    def child(value, checkpoint):
        run = c.create_run(experiment, tags={"mlflow.parentRunId": parent,
                                             **({CHECKPOINT_TAG: str(checkpoint)} if checkpoint else {})})
        c.log_metric(run.info.run_id, "probe/knn_top1", value)
        return run.info.run_id

    high, low, unsaved = child(80.0, final), child(40.0, final), child(99.0, None)
    runs = child_runs(mlflow_server, parent)
    assert {r.info.run_id for r in runs} == {high, low, unsaved}
    assert best_run(runs, "probe/knn_top1", "max").info.run_id == high  # 99 has no checkpoint to export
    assert best_run(runs, "probe/knn_top1", "min").info.run_id == low
    with pytest.raises(ExportError, match="none of the 3 runs"):
        best_run(runs, "train/capi_loss")

    done = export_best(mlflow_server, parent, tmp_path / "best", "probe/knn_top1", "max", register=False)
    assert done.run_id == high and done.value == 80.0 and done.version is None
    # The CLI finds the sweep's parent run by name in MLflow when its storage is not here.
    result = CliRunner().invoke(main, ["export", "--sweep", "pick", "--mode", "min", "--out", str(tmp_path / "cli"),
                                       "--tracking-uri", mlflow_server, "--storage", str(tmp_path / "nowhere"),
                                       "--no-register"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["source"]["run_id"] == low


def test_bad_exports_name_the_problem_and_leave_nothing_behind(mlflow_server, trained, tmp_path):
    run_id, final = trained
    c = client(mlflow_server)
    bare = c.create_run(c.get_experiment_by_name("export").experiment_id).info.run_id
    with pytest.raises(ExportError, match=f"{bare} has no checkpoint"):
        export_run(mlflow_server, bare, tmp_path / "a")
    c.set_tag(bare, CHECKPOINT_TAG, str(tmp_path / "gone"))
    result = CliRunner().invoke(main, ["export", "--run", bare, "--out", str(tmp_path / "b"),
                                       "--tracking-uri", mlflow_server])
    assert result.exit_code != 0 and "does not exist" in result.output
    broken = tmp_path / "broken" / final.name
    shutil.copytree(final, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="model.safetensors"):
        export_checkpoint(broken, tmp_path / "c")
    assert not any((tmp_path / p).exists() for p in ("a", "b", "c"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.")]
    both = CliRunner().invoke(main, ["export", "--run", run_id, "--sweep", "x", "--out", str(tmp_path / "d")])
    assert both.exit_code != 0 and "exactly one of --sweep NAME and --run ID" in both.output


def test_a_rope_model_is_refused_and_loads_through_capi_core(tmp_path):
    """CAPI's RoPE ViT (the vit-* architecture) has no plain-timm equivalent: the export says how to load it."""
    cfg = build_config("cpu-tiny", [f"run.output_dir={tmp_path}", "model.pos_embed=rope", "run.name=rope"])
    trainer = Trainer(cfg)
    trainer._checkpoint({})
    with pytest.raises(ExportError, match=r"pos_embed=rope .*capi_core.checkpoint.load_encoder"):
        export_checkpoint(tmp_path / "rope", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    encoder, loaded = ckpt.load_encoder(tmp_path / "rope")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(x), trainer.teacher.encoder(x))
    assert loaded.model.pos_embed == "rope"
