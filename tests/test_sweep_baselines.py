"""A sweep scores each distinct random-init baseline once, in the driver, and its trials read it back."""

from __future__ import annotations

import textwrap

import pytest

from capi_core.eval import online_probe
from capi_core.train import Trainer
from orchestrator.sweep.baselines import planned_baselines, warm_baselines
from orchestrator.sweep.spec import load_sweep


def spec_of(tmp_path, search_space: str, dataset="fashion-mnist", overrides: str = "", algorithm: str = "grid"):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: t
        base:
          preset: cpu-tiny
          overrides: {{probe.every: 5, data.dataset: "{dataset}", run.output_dir: "{tmp_path / 'runs'}"{overrides}}}
        search_space:
        """) + textwrap.indent(textwrap.dedent(search_space), "  ") + f"search: {{algorithm: {algorithm}}}\n" + ("budget: {num_samples: 6}\n" if algorithm == "random" else ""))
    return load_sweep(path)


def test_training_settings_share_one_baseline(tmp_path):
    spec = spec_of(tmp_path, """\
        loss.teacher_temp: {grid: [0.02, 0.05, 0.1]}
        optim.lr: {loguniform: [1e-4, 1e-2]}
        clustering.num_clusters: {choice: [16, 64]}
        """, algorithm="random")
    (config,) = planned_baselines(spec)
    assert config.model == spec.base_config.model and config.run.seed == spec.base_config.run.seed


def test_one_baseline_per_architecture_and_seed(tmp_path):
    spec = spec_of(tmp_path, """\
        model.registers: {grid: [0, 4]}
        run.seed: {grid: [0, 1]}
        optim.lr: {grid: [1e-3, 3e-3]}
        """)
    planned = planned_baselines(spec)
    assert sorted((c.model.registers, c.run.seed) for c in planned) == [(0, 0), (0, 1), (4, 0), (4, 1)]


def test_a_range_over_the_architecture_leaves_each_trial_its_own(tmp_path):
    spec = spec_of(tmp_path, "model.drop_path: {uniform: [0.0, 0.2]}\n", algorithm="random")
    assert planned_baselines(spec) is None


def test_a_space_too_large_to_enumerate_is_left_to_the_trials(tmp_path, monkeypatch):
    from orchestrator.sweep import baselines

    spec = spec_of(tmp_path, "optim.lr: {grid: [1e-3, 2e-3, 3e-3]}\n")
    monkeypatch.setattr(baselines, "MAX_COMBINATIONS", 2)
    assert planned_baselines(spec) is None


def test_the_driver_scores_it_once_and_the_trial_reads_it_back(tiny_dataset, tmp_path, monkeypatch):
    spec = spec_of(tmp_path, "loss.teacher_temp: {grid: [0.02, 0.05]}\n", dataset=tiny_dataset,
                   overrides=f', data.cache_dir: "{tmp_path / "cache"}", data.loader_workers: 0, optim.steps: 5')
    said = []
    warm_baselines(spec, said.append)
    (line,) = said
    assert line.startswith("probe baseline: ") and "at random init on " in line and "once for the trials" in line
    warm_baselines(spec, said.append)
    assert said[-1].endswith("(cached)")

    calls = []
    real = online_probe.knn_score
    monkeypatch.setattr(online_probe, "knn_score", lambda encoder, *a, **k: calls.append(1) or real(encoder, *a, **k))
    metrics = Trainer(spec.trial_config({"loss.teacher_temp": 0.05})).fit()
    assert calls == []  # random_init_knn scored nothing: the baseline came from the driver's cache
    assert f"{metrics['probe/knn_random_init']:.2f} % k-NN" in line


def test_a_sweep_whose_baseline_varies_continuously_says_so(tmp_path):
    said = []
    warm_baselines(spec_of(tmp_path, "model.drop_path: {uniform: [0.0, 0.2]}\n", algorithm="random"), said.append)
    assert said == ["probe baselines: not known before the trials (a range over a field they depend on, or a space "
                    "too large to list), so each trial scores its own"]


def test_a_baseline_the_driver_cannot_score_is_left_to_the_trials(tmp_path):
    said = []
    spec = spec_of(tmp_path, "loss.teacher_temp: {grid: [0.02, 0.05]}\n", dataset=tmp_path / "nowhere")
    warm_baselines(spec, said.append)
    (line,) = said
    assert line.startswith("probe baseline: not scored in the driver (") and "nowhere" in line
    assert line.endswith("; each trial scores its own")


@pytest.mark.parametrize("field", ["model.depth", "probe.train_images"])
def test_fields_the_baseline_depends_on_split_it(tmp_path, field):
    values = "[1, 2]" if field == "model.depth" else "[100, 200]"
    spec = spec_of(tmp_path, f"{field}: {{grid: {values}}}\n")
    assert len(planned_baselines(spec)) == 2


@pytest.mark.parametrize("ray_address", ["", "10.0.0.1:6379"])
def test_only_a_sweep_whose_trials_share_this_machine_warms_them(tiny_dataset, tmp_path, monkeypatch, ray_address):
    from orchestrator.sweep import tune as sweep_tune

    class RayStarted(Exception):
        pass

    def stop_at_ray(*args, **kwargs):
        raise RayStarted

    warmed = []
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    monkeypatch.setattr(sweep_tune, "warm_baselines", lambda spec, say: warmed.append(spec.name))
    monkeypatch.setattr(sweep_tune, "init_ray", stop_at_ray)  # what follows is Ray's, tested in test_sweep_run
    spec = spec_of(tmp_path, "loss.teacher_temp: {grid: [0.02, 0.05]}\n", dataset=tiny_dataset)
    spec = spec.model_copy(update={"mlflow": spec.mlflow.model_copy(
        update={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})})
    with pytest.raises(RayStarted):
        sweep_tune.run_sweep(spec)
    assert warmed == ([] if ray_address else ["t"])  # a Ray job's trials may run on other nodes
