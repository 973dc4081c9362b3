"""The online probe's random-init baseline: cached by what determines it, reused, and subtracted."""

import json

import pytest
import torch

from capi_core.config import build_config
from capi_core.data.format import load_manifest
from capi_core.eval import noise, online_probe
from capi_core.eval.online_probe import (baseline_key, knn_score, load_probe_set, online_probe_set, probe_metrics,
                                         random_init_encoder, random_init_knn)
from capi_core.train import JsonlMetrics, Trainer


def tiny_config(dataset, tmp_path, *overrides, cache=None):
    return build_config("cpu-tiny", [f"data.dataset={dataset}", f"run.output_dir={tmp_path}",
                                     f"data.cache_dir={cache or tmp_path / 'cache'}", "data.loader_workers=0",
                                     *overrides])


def test_random_init_encoder_is_the_trainers_init(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    encoder = random_init_encoder(cfg)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    trainer = Trainer(cfg)
    for a, b in zip(encoder.state_dict().values(), trainer.teacher.encoder.state_dict().values()):
        assert torch.equal(a, b)


def test_baseline_is_computed_once_and_reused(tiny_dataset, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_dataset, tmp_path, "optim.steps=10", "probe.every=5", "run.log_every=5")
    calls = []
    real = online_probe.knn_score

    def counting(encoder, *args, **kwargs):
        calls.append(encoder)
        return real(encoder, *args, **kwargs)

    monkeypatch.setattr(online_probe, "knn_score", counting)
    Trainer(cfg, [JsonlMetrics()]).fit()
    assert len(calls) == 1  # two probes (step 5 and the end), one baseline computation
    (entry,) = (tmp_path / "cache" / "probe-baselines").glob("*.json")
    record = json.loads(entry.read_text())
    assert record["probe_set"].endswith("train / 50 test images")

    # A second run of the same architecture and probe set reads it back; another seed does not.
    calls.clear()
    cache = tmp_path / "cache"
    Trainer(tiny_config(tiny_dataset, tmp_path / "b", "optim.steps=5", cache=cache)).fit()
    assert calls == []
    Trainer(tiny_config(tiny_dataset, tmp_path / "c", "optim.steps=5", "run.seed=1", cache=cache)).fit()
    assert len(calls) == 1


def test_gain_is_trained_minus_random_init(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path, "optim.steps=20", "probe.every=10", "run.log_every=10")
    Trainer(cfg, [JsonlMetrics()]).fit()
    lines = [json.loads(x) for x in (tmp_path / cfg.run.name / "metrics.jsonl").read_text().splitlines()]
    probed = [x for x in lines if "probe/knn_top1" in x]
    assert [x["step"] for x in probed] == [10, 20]  # the periodic probe and the final one
    baseline = random_init_knn(cfg, online_probe_set(tiny_dataset, cfg.model.img_size, cfg.probe)).knn_top1
    for x in probed:
        assert x["probe/knn_random_init"] == baseline
        assert x["probe/knn_gain"] == pytest.approx(x["probe/knn_top1"] - baseline, abs=1e-6)
    assert probe_metrics(70.0, 61.5) == {"probe/knn_top1": 70.0, "probe/knn_random_init": 61.5,
                                         "probe/knn_gain": pytest.approx(8.5)}
    assert repr(probe_metrics(100 * 7357 / 10000, 100 * 6899 / 10000)["probe/knn_gain"]) == "4.58"  # as tables show it


def test_an_encoder_that_does_not_change_gains_nothing(tiny_dataset, tmp_path):
    # lr at its floor: the student stays at its init and so does its EMA, the teacher.
    cfg = tiny_config(tiny_dataset, tmp_path, "optim.steps=5", "optim.lr=1e-12", "optim.min_lr=0")
    metrics = Trainer(cfg).fit()
    assert metrics["probe/knn_gain"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["probe/knn_top1"] == metrics["probe/knn_random_init"]


def test_baseline_key_follows_what_determines_the_score(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path)
    probe_set = online_probe_set(tiny_dataset, cfg.model.img_size, cfg.probe)
    key = baseline_key(cfg, probe_set, 5, 0.07)
    # Training settings do not change an untrained network; the architecture, seed and k-NN do.
    assert baseline_key(tiny_config(tiny_dataset, tmp_path, "optim.lr=3e-3", "loss.teacher_temp=0.03"),
                        probe_set, 5, 0.07) == key
    for change in ("model.registers=0", "run.seed=7", "model.depth=1"):
        assert baseline_key(tiny_config(tiny_dataset, tmp_path, change), probe_set, 5, 0.07) != key
    assert baseline_key(cfg, probe_set, 3, 0.07) != key
    assert baseline_key(cfg, probe_set, 5, 0.07, torch.bfloat16) != key
    smaller = load_probe_set(tiny_dataset, cfg.model.img_size, 100, 20)
    assert smaller.key != probe_set.key and len(smaller.test_y) == 20
    assert load_probe_set(tiny_dataset, cfg.model.img_size, 100, 50, seed=3).key != probe_set.key


def test_a_corrupt_cache_entry_is_recomputed(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path)
    probe_set = online_probe_set(tiny_dataset, cfg.model.img_size, cfg.probe)
    first = random_init_knn(cfg, probe_set, tmp_path / "cache")
    assert not first.cached
    first.path.write_text("{not json")
    again = random_init_knn(cfg, probe_set, tmp_path / "cache")
    assert not again.cached and again.knn_top1 == first.knn_top1
    assert random_init_knn(cfg, probe_set, tmp_path / "cache").cached
    assert knn_score(random_init_encoder(cfg), probe_set, 5, 0.07) == first.knn_top1


def test_the_probe_set_is_cached_decoded_and_read_back_identical(tiny_dataset, tmp_path, monkeypatch):
    first = load_probe_set(tiny_dataset, 16, 100, 50, cache_dir=tmp_path)
    (entry,) = (tmp_path / "probe-sets").glob("*.safetensors")
    from capi_core.eval import online_probe as op

    monkeypatch.setattr(op, "load_split", lambda *a, **k: pytest.fail("decoded again"))
    again = load_probe_set(tiny_dataset, 16, 100, 50, cache_dir=tmp_path)
    assert again.key == first.key and again.description == first.description
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, name), getattr(first, name))
    entry.write_bytes(b"not safetensors")  # a damaged entry is decoded anew, not trusted
    monkeypatch.undo()
    assert torch.equal(load_probe_set(tiny_dataset, 16, 100, 50, cache_dir=tmp_path).test_x, first.test_x)


def test_noise_threshold_is_two_standard_deviations_of_a_difference(tiny_dataset, monkeypatch):
    cfg = build_config("cpu-tiny").probe
    n_test = 50  # cpu-tiny's probe queries; the tiny dataset has more test images
    binomial = noise.probe_noise(tiny_dataset, 16, cfg)
    assert not binomial.measured and binomial.paired_sigma is None
    assert binomial.sigma == pytest.approx(100 * (0.25 / n_test) ** 0.5)
    assert binomial.threshold == pytest.approx(2 * 2 ** 0.5 * binomial.sigma)  # two independent scores

    manifest = load_manifest(tiny_dataset)
    key = (manifest.name, 16, cfg.train_images, n_test)
    monkeypatch.setitem(noise.MEASURED_NOISE, key, 0.7)
    monkeypatch.setitem(noise.MEASURED_PAIRED_NOISE, key, 0.4)
    independent = noise.probe_noise(tiny_dataset, 16, cfg)
    assert independent.measured and independent.threshold == pytest.approx(2 * 2 ** 0.5 * 0.7)
    paired = noise.probe_noise(tiny_dataset, 16, cfg, paired=True)
    assert paired.threshold == pytest.approx(0.8)  # same-seed trials: their own, smaller spread
    assert "differences below 0.8 points are noise" in paired.sentence()


def test_trials_pair_only_when_they_share_seed_and_architecture():
    assert noise.trials_are_paired(["optim.warmup_fraction", "loss.teacher_temp", "masking.ratio"])
    assert not noise.trials_are_paired(["optim.lr", "model.registers"])  # another shape, another init
    assert not noise.trials_are_paired(["run.seed"])


def test_the_quickstart_reports_its_paired_noise():
    from orchestrator.sweep.spec import load_sweep
    from orchestrator.sweep.storage import noise_note

    note = noise_note(load_sweep("sweeps/quickstart.yaml"))
    assert note is not None and "60,000 train / 10,000 test" in note
    assert "differences below 1.0 points are noise" in note and "share their seed" in note


def test_a_probe_set_larger_than_the_cache_limit_is_not_cached(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(online_probe, "CACHED_BYTES", 150 * 16 * 16 * 4 - 1)  # one float short of 150 16x16 images
    load_probe_set(tiny_dataset, 16, 100, 50, cache_dir=tmp_path)
    assert not (tmp_path / "probe-sets").exists()
    monkeypatch.setattr(online_probe, "CACHED_BYTES", 150 * 16 * 16 * 4)
    load_probe_set(tiny_dataset, 16, 100, 50, cache_dir=tmp_path)
    assert len(list((tmp_path / "probe-sets").glob("*.safetensors"))) == 1
