"""``capi eval run`` / ``capi eval knn`` end to end on a tiny checkpoint and the tiny generated dataset."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from capi_core.checkpoint import save_checkpoint, with_prefix
from capi_core.config import build_config
from capi_core.models.student import Student
from orchestrator.cli import main


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory):
    config = build_config("cpu-tiny", {"data": {"dataset": str(tiny_dataset)}})
    torch.manual_seed(0)
    teacher = Student(config)  # a trainer checkpoint holds the whole EMA teacher: encoder, predictor, head
    path = tmp_path_factory.mktemp("run") / "step-0000020"
    return save_checkpoint(path, with_prefix(teacher.state_dict(), "teacher."),
                           {"step": 20, "config": config.model_dump(mode="json")})


def invoke(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)], catch_exceptions=False)


def test_run_writes_json_pictures_and_a_table(checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = invoke("run", checkpoint, "--probes", "knn,linear,abmilp", "--diagnostics", "--pictures",
                    "--epochs", "2", "--diagnostic-images", "64", "--picture-images", "4", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    probes = {p["probe"]: p for p in report["probes"]}
    assert set(probes) == {"knn", "knn_predictor", "linear_cls", "linear_mean", "abmilp"}
    assert probes["linear_cls"]["top1"] is None  # our encoder has no [cls] token
    for name in ("knn", "knn_predictor", "linear_mean", "abmilp"):
        assert 0.0 <= probes[name]["top1"] <= 100.0
    assert report["train_images"] == 512 and report["test_images"] == 128
    assert report["diagnostics"]["tokens"] == {"has_cls": False, "registers": 4, "patches": 16}
    assert len(report["diagnostics"]["attention_flow"]["patch_to_registers"]) == 2  # one value per block
    assert len(report["pictures"]) == 3
    for path in report["pictures"]:
        Image.open(path).verify()
    assert "abmilp" in result.output and "linear_mean" in result.output


def test_random_init_baseline_goes_to_its_own_directory(checkpoint):
    # `capi eval CHECKPOINT` is the short form of `capi eval run CHECKPOINT`
    result = invoke(checkpoint, "--probes", "knn", "--random-init", "--limit-train", "200")
    assert result.exit_code == 0, result.output
    report = json.loads((checkpoint / "eval-random-init" / "eval.json").read_text())
    assert report["random_init"] is True and report["train_images"] == 200


def test_knn_command_prints_top1(checkpoint):
    result = invoke("knn", checkpoint, "--k", "5")
    assert result.exit_code == 0, result.output
    assert "knn_top1" in result.output and "k=5" in result.output and "mean pooling" in result.output
    result = invoke("knn", checkpoint, "--k", "5", "--pool", "predictor")
    assert result.exit_code == 0, result.output
    assert "predictor pooling" in result.output


def test_bad_inputs_give_clear_errors(checkpoint, tmp_path):
    from capi_core.data.importers import import_idx
    from synthetic import bars, write_idx

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "state.json").write_text((checkpoint / "state.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    result = invoke("knn", corrupt)
    assert result.exit_code != 0 and "model.safetensors" in result.output

    images, labels = bars(32, 16, seed=0)
    only_train = tmp_path / "only-train"
    import_idx(write_idx(tmp_path / "i.idx", images), write_idx(tmp_path / "l.idx", labels), only_train, split="train")
    result = invoke("knn", checkpoint, "--dataset", only_train)
    assert result.exit_code != 0 and "no test split" in result.output

    unlabelled = tmp_path / "unlabelled"
    for split in ("train", "test"):
        import_idx(write_idx(tmp_path / f"{split}-i.idx", images), write_idx(tmp_path / f"{split}-l.idx", 0 * labels),
                   unlabelled, split=split, class_names=["unlabelled"])
    result = invoke("run", checkpoint, "--dataset", unlabelled, "--probes", "knn")
    assert result.exit_code != 0 and "class label" in result.output

    result = invoke("run", checkpoint, "--probes", "knn,mlp")
    assert result.exit_code != 0 and "mlp" in result.output
