"""run.compile: explicit settings win, auto compiles long CPU runs, and a compiled step trains as eager does."""

import pytest
import torch

from capi_core.compilation import AUTO_MIN_STEPS, choose_compile
from capi_core.config import ConfigError, build_config
from capi_core.train import Trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # device names: no GPU needed for the rule


def test_explicit_settings_win_and_auto_follows_the_planned_steps():
    assert choose_compile(True, CPU, 10).enabled and not choose_compile(False, CPU, 10**6).enabled
    assert choose_compile(True, CUDA, 10).enabled
    assert not choose_compile("auto", CPU, AUTO_MIN_STEPS - 1).enabled
    assert choose_compile("auto", CPU, AUTO_MIN_STEPS).enabled
    assert not choose_compile("auto", CUDA, 10**6).enabled  # not measured there: the user decides
    assert "repay" in choose_compile("auto", CPU, AUTO_MIN_STEPS).describe()


def test_the_presets_choose_as_their_lengths_say():
    assert build_config("cpu-demo").run.compile == "auto"
    assert choose_compile("auto", CPU, build_config("cpu-demo").optim.steps).enabled
    assert not choose_compile("auto", CPU, build_config("cpu-tiny").optim.steps).enabled


def test_compile_takes_booleans_and_auto_only():
    assert build_config("cpu-tiny", ["run.compile=true"]).run.compile is True
    with pytest.raises(ConfigError, match=r"run.compile.*true or false \(or 'auto'\), got 1"):
        build_config("cpu-tiny", ["run.compile=1"])


def test_a_compiled_step_trains_the_tiny_preset_as_eager_does(tiny_dataset, tmp_path):
    """Inductor reorders and fuses float32 arithmetic (rounding ~1e-7 relative per op); over 20 steps of
    a 2-block model the CAPI loss (~ln 64 = 4.2 nats) may drift by a few thousandths, while a step that
    trains something else (a lost gradient, a stale teacher) moves it by tenths."""
    losses, trainers = {}, {}
    for compiled in (False, True):
        cfg = build_config("cpu-tiny", [f"data.dataset={tiny_dataset}", f"run.output_dir={tmp_path / str(compiled)}",
                                        f"run.compile={str(compiled).lower()}"])
        trainers[compiled] = Trainer(cfg)
        losses[compiled] = trainers[compiled].fit()
    assert trainers[True].compile.enabled and not trainers[False].compile.enabled
    for key in ("train/capi_loss", "train/clustering_loss"):
        assert losses[True][key] == pytest.approx(losses[False][key], abs=0.02)
    assert hasattr(trainers[True].forward_losses, "_torchdynamo_orig_callable")  # dynamo ran the forward
    teacher = {c: torch.cat([p.flatten() for p in t.teacher.parameters()]) for c, t in trainers.items()}
    torch.testing.assert_close(teacher[True], teacher[False], atol=1e-3, rtol=0)
