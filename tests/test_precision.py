"""run.precision=auto decides by measuring, caches the decision, and never overrides an explicit choice."""

import json

import pytest
import torch

from capi_core import precision
from capi_core.config import build_config
from capi_core.precision import choose_precision, machine_key, trusted
from capi_core.train import Trainer

CPU = torch.device("cpu")


def test_explicit_precision_is_never_overridden(tmp_path, monkeypatch):
    model = build_config("cpu-tiny").model
    monkeypatch.setattr(precision, "probe_rates", lambda *a, **k: pytest.fail("explicit precision measured"))
    for dtype in ("fp32", "bf16"):
        choice = choose_precision(dtype, CPU, model, tmp_path)
        assert (choice.dtype, choice.reason) == (dtype, "explicit")
    assert choose_precision("fp32", CPU, model, tmp_path).autocast_dtype is None
    assert choose_precision("bf16", CPU, model, tmp_path).autocast_dtype is torch.bfloat16
    assert choose_precision("auto", torch.device("cuda"), model, tmp_path).dtype == "bf16"
    assert not (tmp_path / "precision").exists()


@pytest.mark.parametrize("rates, expected", [((50.0, 120.0), "bf16"), ((120.0, 50.0), "fp32")])
def test_auto_picks_the_faster_and_caches_it(tmp_path, monkeypatch, rates, expected):
    model = build_config("cpu-tiny").model
    monkeypatch.setattr(precision, "load_average", lambda: 0.5)  # a quiet machine: the decision is kept
    calls = []
    monkeypatch.setattr(precision, "probe_rates", lambda m: calls.append(m) or rates)
    first = choose_precision("auto", CPU, model, tmp_path)
    assert (first.dtype, first.reason, first.cached) == (expected, "measured", False)
    assert (first.fp32_gflops, first.bf16_gflops) == rates
    again = choose_precision("auto", CPU, model, tmp_path)
    assert again.cached and again.dtype == expected and len(calls) == 1  # read back, not measured again
    assert "cached" in again.describe() and f"{rates[1]:.0f} GFLOP/s in bf16" in again.describe()
    (entry,) = (tmp_path / "precision").glob("*.json")
    assert json.loads(entry.read_text())["dtype"] == expected
    # Another model shape is another measurement.
    choose_precision("auto", CPU, build_config("cpu-demo").model, tmp_path)
    assert len(calls) == 2


def test_the_key_follows_the_shape_and_threads():
    tiny, demo = build_config("cpu-tiny").model, build_config("cpu-demo").model
    assert machine_key(tiny, 2) == machine_key(tiny, 2)
    assert machine_key(tiny, 2) != machine_key(tiny, 1)
    assert machine_key(tiny, 2) != machine_key(demo, 2)


def test_the_probe_measures_both_precisions_quickly():
    fp32, bf16 = precision.probe_rates(build_config("cpu-tiny").model, repeats=1)
    assert fp32 > 0 and bf16 > 0


def test_a_corrupt_cache_entry_is_measured_again(tmp_path, monkeypatch):
    model = build_config("cpu-tiny").model
    monkeypatch.setattr(precision, "probe_rates", lambda m: (1.0, 2.0))
    choose_precision("auto", CPU, model, tmp_path)
    (entry,) = (tmp_path / "precision").glob("*.json")
    entry.write_text("[1, 2")
    assert not choose_precision("auto", CPU, model, tmp_path).cached


def test_both_precisions_train_the_tiny_preset_to_the_same_loss(tiny_dataset, tmp_path):
    # bf16 autocast rounds matmul inputs to 8 mantissa bits (relative error 2^-9 ~ 0.2 % per product);
    # over 20 steps of a 2-block model the CAPI loss (~ln 64 = 4.2 nats) drifts by a few hundredths at
    # most, while a real divergence (or a precision that is not applied) moves it by more.
    losses = {}
    for dtype in ("fp32", "bf16"):
        cfg = build_config("cpu-tiny", [f"data.dataset={tiny_dataset}", f"run.output_dir={tmp_path / dtype}",
                                        "data.loader_workers=0", f"run.precision={dtype}"])
        trainer = Trainer(cfg)
        assert trainer.precision.dtype == dtype
        losses[dtype] = trainer.fit()["train/capi_loss"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.1)
    assert losses["bf16"] != losses["fp32"]  # bf16 really ran


def test_a_decision_measured_on_a_busy_machine_is_measured_again_when_quiet(tmp_path, monkeypatch):
    model = build_config("cpu-tiny").model
    cpus = precision.os.cpu_count() or 1
    calls = []
    monkeypatch.setattr(precision, "probe_rates", lambda m: calls.append(m) or (1.0, 2.0))
    monkeypatch.setattr(precision, "load_average", lambda: 3.0 * cpus)
    choose_precision("auto", CPU, model, tmp_path)
    assert choose_precision("auto", CPU, model, tmp_path).cached  # still busy: nothing better to measure
    monkeypatch.setattr(precision, "load_average", lambda: 0.0)
    again = choose_precision("auto", CPU, model, tmp_path)
    assert not again.cached and len(calls) == 2
    assert choose_precision("auto", CPU, model, tmp_path).cached  # the quiet measurement stands
    assert len(calls) == 2


def test_which_cached_decisions_stand():
    assert trusted({"load": 1.0}, load_now=0.0, cpus=2)  # measured quiet
    assert trusted({"load": 2.0}, load_now=0.0, cpus=2)
    assert not trusted({"load": 5.0}, load_now=0.5, cpus=2)  # measured busy, quiet now
    assert trusted({"load": 5.0}, load_now=4.0, cpus=2)  # busy then and now
    assert trusted({}, load_now=0.0, cpus=2)
