"""Sweep files: the schema, the combination checks, file:line errors, the shipped sweeps, `capi sweep validate`."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from capi_core.config import ConfigError, build_config
from orchestrator.cli import main
from orchestrator.sweep.spec import Resources, SweepSpecError, SweepSpecWarning, load_sweep
from orchestrator.sweep.storage import trial_rows

REPO = Path(__file__).resolve().parent.parent
# sweeps/study/ holds study files for benchmarks/recipe_study.py, not sweeps.
SHIPPED = sorted(p for p in (REPO / "sweeps").rglob("*.yaml") if p.parent.name != "study")

# Seven lines that validate; most cases append to them, so the lines they point at stay put.
MINIMAL = """\
name: t
base:
  preset: cpu-tiny
  overrides: {probe.every: 5}
search_space:
  loss.teacher_temp: {grid: [0.04, 0.08]}
search: {algorithm: grid}
"""


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(SweepSpecError) as err:
        load_sweep(path)
    return err.value.problems


def test_minimal_sweep_validates(tmp_path):
    spec = load_sweep(write(tmp_path, MINIMAL, "ok.yaml"))
    assert spec.name == "t" and spec.num_trials() == 2
    # defaults come from capi_core's preset, not from the sweep loader
    assert spec.base_config == build_config("cpu-tiny", ["probe.every=5"])


# (id, file text, line, field, a fragment of the message)
BAD = [
    ("unknown top-level key", MINIMAL + "schedular: asha\n", 8, "schedular", "unknown key"),
    ("unknown nested key", MINIMAL + "scheduler:\n  type: asha\n  max_tt: 3\n", 10, "scheduler.max_tt",
     "did you mean 'max_t'"),
    ("wrong type", MINIMAL + "budget:\n  num_samples: many\n", 9, "budget.num_samples", "valid integer"),
    ("out of range", MINIMAL + "scheduler:\n  type: asha\n  grace_period: 0\n", 10, "scheduler.grace_period",
     "greater than or equal to 1"),
    ("unknown search path", MINIMAL.replace("search: {algorithm: grid}\n", "  loss.teacher_tmp: {grid: [0.1]}\n"
                                            "search: {algorithm: grid}\n"), 7, "search_space.loss.teacher_tmp",
     "did you mean 'loss.teacher_temp'"),
    ("invalid grid value for the field", MINIMAL.replace("search: {algorithm: grid}\n", """\
  masking.strategy:
    grid:
      - random
      - spiral
search: {algorithm: grid}
"""), 10, "search_space.masking.strategy.grid[1]", "'spiral' is invalid for masking.strategy"),
    ("uniform lo >= hi", """\
name: t
base: {preset: cpu-tiny}
search_space:
  optim.lr: {uniform: [0.01, 0.001]}
budget: {num_samples: 4}
""", 4, "search_space.optim.lr.uniform", "lower bound 0.01 must be below the upper bound 0.001"),
    ("loguniform lo <= 0", """\
name: t
base: {preset: cpu-tiny}
search_space:
  optim.min_lr: {loguniform: [0, 0.0001]}
budget: {num_samples: 4}
""", 4, "search_space.optim.min_lr.loguniform", "above 0"),
    ("unknown algorithm", MINIMAL.replace("{algorithm: grid}", "{algorithm: bayes}"), 7, "search.algorithm",
     "'grid', 'random' or 'optuna'"),
    ("unknown scheduler", MINIMAL + "scheduler:\n  type: hyperband\n", 9, "scheduler.type",
     "unknown scheduler type 'hyperband'"),
    ("asha without probe.every", MINIMAL.replace("overrides: {probe.every: 5}", "overrides: {optim.lr: 0.001}")
     + "scheduler:\n  type: asha\n", 9, "scheduler.type", "probe.every is 0"),
    ("rope with 6 registers", """\
name: t
base:
  preset: cpu-tiny
  overrides: {model.pos_embed: rope}
search_space:
  model.registers: {grid: [0, 4, 6]}
search: {algorithm: grid}
""", 6, "search_space.model.registers.grid[2]", "rope' needs registers to be a multiple of 4, got 6"),
    ("grid larger than budget", MINIMAL + "budget:\n  num_samples: 1\n", 9, "budget.num_samples",
     "grid has 2 points but budget.num_samples is 1"),
    ("num_samples not a multiple of the grid", MINIMAL + "budget:\n  num_samples: 3\n", 9, "budget.num_samples",
     "not a multiple of the search_space grid's 2 points"),
    ("negative max_concurrent", MINIMAL + "budget:\n  max_concurrent_trials: -2\n", 9,
     "budget.max_concurrent_trials", "greater than or equal to 1"),
    ("zero time limit", MINIMAL + "budget:\n  time_limit_s: 0\n", 9, "budget.time_limit_s", "greater than 0"),
    ("infinite failures", MINIMAL + "failure: {max_failures: -1}\n", 8, "failure.max_failures",
     "greater than or equal to 0"),
    ("yaml syntax error", "name: t\nbase:\n  preset: [cpu-tiny\nsearch_space: {}\n", 4, "YAML syntax error",
     "flow sequence on line 3"),
    ("pbt mutation not searched", MINIMAL.replace("grid}", "random}") + """\
budget: {num_samples: 4}
scheduler:
  type: pbt
  perturbation_interval: 1
  hyperparam_mutations: [loss.teacher_temp, optim.lr]
""", 12, "scheduler.hyperparam_mutations[1]", "'optim.lr' is not in search_space"),
    ("pbt mutation of a shape", """\
name: t
base:
  preset: cpu-tiny
  overrides: {probe.every: 5, run.checkpoint_every: 5, run.keep_checkpoints: 4}
search_space:
  model.registers: {choice: [0, 4]}
budget: {num_samples: 4}
scheduler:
  type: pbt
  perturbation_interval: 1
  hyperparam_mutations:
    - model.registers
""", 12, "scheduler.hyperparam_mutations[0]", "changes parameter shapes"),
    ("pbt retention deletes donors", """\
name: t
base:
  preset: cpu-tiny
  overrides:
    probe.every: 5
    run.checkpoint_every: 5
    run.keep_checkpoints: 2
search_space:
  optim.lr: {loguniform: [0.0001, 0.01]}
budget: {num_samples: 4}
scheduler: {type: pbt, perturbation_interval: 1, hyperparam_mutations: [optim.lr]}
""", 7, "base.overrides.run.keep_checkpoints", "keep all 4 a trial writes"),
    ("pbt without checkpoints", """\
name: t
base:
  preset: cpu-tiny
  overrides:
    probe.every: 5
search_space:
  optim.lr: {loguniform: [0.0001, 0.01]}
budget: {num_samples: 4}
scheduler: {type: pbt, perturbation_interval: 1, hyperparam_mutations: [optim.lr]}
""", 4, "base.overrides.run.checkpoint_every", "set run.checkpoint_every to a divisor of 5"),
    ("uniform on an integer field", """\
name: t
base: {preset: cpu-tiny}
search_space:
  clustering.num_clusters: {uniform: [16, 64]}
budget: {num_samples: 4}
""", 4, "search_space.clustering.num_clusters.uniform", "is an integer; use randint"),
    ("masking ratio that leaves no masked patch next to a coarse patch grid", """\
name: t
base: {preset: cpu-demo, overrides: {model.patch_size: 4}}
search_space:
  masking.ratio: {uniform: [0.1, 0.6]}
  model.patch_size: {choice: [4, 14]}
budget: {num_samples: 4}
""", 5, "search_space.model.patch_size", "masking.ratio=0.1 with model.patch_size=14 cannot run"),
    ("masking ramp that ends with no masked patch", """\
name: t
base:
  preset: cpu-tiny
  overrides: [masking.schedule=linear, masking.ratio_end=0.7]
search_space:
  masking.ratio_end: {grid: [0.5, 0.05]}
search: {algorithm: grid}
""", 6, "search_space.masking.ratio_end.grid[1]", "leaves no masked or no visible patch"),
    ("duplicate key", MINIMAL + "search: {algorithm: random}\n", 8, "search", "duplicate key"),
    ("grid algorithm with a sampled dimension", """\
name: t
base: {preset: cpu-tiny}
search_space:
  optim.lr: {choice: [0.001, 0.002]}
search: {algorithm: grid}
""", 4, "search_space.optim.lr.choice", "enumerates grid dimensions only"),
    ("optuna with a grid dimension", MINIMAL.replace("grid}", "optuna}") + "budget: {num_samples: 4}\n", 6,
     "search_space.loss.teacher_temp.grid", "use choice instead of grid"),
    ("random search without num_samples", MINIMAL.replace("grid}", "random}"), 7, "search.algorithm",
     "needs budget.num_samples"),
    ("two distributions in one dimension", """\
name: t
base: {preset: cpu-tiny}
search_space:
  optim.lr:
    grid: [0.001]
    choice: [0.002]
search: {algorithm: grid}
""", 4, "search_space.optim.lr", "exactly one of grid, choice"),
    ("unknown override path", MINIMAL.replace("{probe.every: 5}", "{probe.every: 5, optim.lrr: 0.1}"), 4,
     "base.overrides.optim.lrr", "did you mean 'optim.lr'"),
    ("invalid override value", """\
name: t
base:
  preset: cpu-tiny
  overrides:
    optim:
      lr: fast
search_space:
  loss.teacher_temp: {grid: [0.04, 0.08]}
search: {algorithm: grid}
""", 6, "base.overrides.optim.lr", "valid number"),
    ("invalid override in list form", """\
name: t
base:
  preset: cpu-tiny
  overrides:
    - probe.every=5
    - loss.student_temp=-1
search_space:
  loss.teacher_temp: {grid: [0.04, 0.08]}
search: {algorithm: grid}
""", 6, "base.overrides.loss.student_temp", "greater than 0"),
    ("unknown preset", MINIMAL.replace("cpu-tiny", "cpu-huge"), 3, "base.preset", "choose one of cpu-tiny"),
    ("preset and no config missing", MINIMAL.replace("  preset: cpu-tiny\n", ""), 2, "base",
     "exactly one of preset and config"),
    ("missing config file", MINIMAL.replace("preset: cpu-tiny", "config: nowhere.yaml"), 3, "base.config",
     "cannot read config"),
    ("missing name", MINIMAL.replace("name: t\n", ""), 1, "name", "Field required"),
    ("bad name", MINIMAL.replace("name: t", "name: My Sweep"), 1, "name", "should match pattern"),
    ("batch not divisible by workers", MINIMAL + "resources: {workers: 3}\n", 8, "resources.workers",
     "optim.batch_size 32 is not divisible by resources.workers"),
    ("in-trial training of several workers", MINIMAL + "resources:\n  workers: 2\n  launcher: in_trial\n", 10,
     "resources.launcher", "in_trial trains in one process: it needs workers: 1"),
    ("unknown launcher", MINIMAL + "resources:\n  launcher: inline\n", 9, "resources.launcher",
     "'auto', 'in_trial' or 'ray_train'"),
    ("asha max_t beyond the reports", MINIMAL + "scheduler: {type: asha, max_t: 9}\n", 8, "scheduler.max_t",
     "exceeds the 4 probe evaluations"),
    ("asha grace period that never stops", MINIMAL + "scheduler:\n  type: asha\n  grace_period: 4\n", 10,
     "scheduler.grace_period", "grace_period 4 must be below max_t 4"),
    ("probe not at log steps", MINIMAL.replace("probe.every: 5", "probe.every: 4") + "scheduler: asha\n", 4,
     "base.overrides.probe.every", "not a multiple of run.log_every 5"),
    ("searching steps under asha", MINIMAL.replace("search: {algorithm: grid}\n", """\
  optim.steps: {grid: [10, 20]}
search: {algorithm: grid}
""") + "budget: {num_samples: 4}\nscheduler: asha\n", 7, "search_space.optim.steps",
     "cannot be searched with scheduler asha"),
    ("gpus on a cpu run", MINIMAL.replace("{probe.every: 5}", "{run.device: cpu}") + "resources:\n"
     "  gpus_per_worker: 1\n", 9, "resources.gpus_per_worker", "base run.device is cpu"),
    ("randint upper bound is exclusive", """\
name: t
base: {preset: cpu-tiny}
search_space:
  model.registers: {randint: [0, 18]}
budget: {num_samples: 4}
""", 4, "search_space.model.registers.randint[1]", "17 is invalid for model.registers"),
]


@pytest.mark.parametrize(("text", "line", "field", "fragment"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_sweep_names_field_and_line(tmp_path, text, line, field, fragment):
    problems = problems_of(write(tmp_path, text))
    matching = [p for p in problems if p.startswith(f"{tmp_path / 'bad.yaml'}:{line}: {field}")]
    assert matching, problems
    assert any(fragment in p for p in matching), problems


def test_empty_file(tmp_path):
    problems = problems_of(write(tmp_path, "# nothing yet\n"))
    assert problems == [f"{tmp_path / 'bad.yaml'}:1: the file is empty; a sweep needs name, base and search_space"]


def test_every_problem_is_listed_at_once(tmp_path):
    text = MINIMAL.replace("name: t", "name: T!") + "budget:\n  num_samples: 0\nfailure: {}\nextra: 1\n"
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in problems] == ["1", "9", "11"], problems


def test_combination_problems_are_all_listed(tmp_path):
    path = write(tmp_path, """\
        name: t
        base: {preset: cpu-tiny, overrides: {model.pos_embed: rope}}
        search_space:
          model.registers: {grid: [2, 4, 6]}
          masking.strategy: {grid: [random, spiral]}
        budget: {num_samples: 1}
        search: {algorithm: grid}
        """)
    problems = problems_of(path)
    assert len(problems) == 4, problems  # registers 2 and 6, 'spiral', and the grid of 6 over 1 trial
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in problems] == ["4", "4", "5", "6"]


def test_relative_config_file_and_its_errors(tmp_path):
    (tmp_path / "base.yaml").write_text("preset: cpu-tiny\noptim: {steps: 12}\n")
    spec = load_sweep(write(tmp_path, MINIMAL.replace("preset: cpu-tiny", "config: base.yaml"), "ok.yaml"))
    assert spec.base_config.optim.steps == 12 and spec.base_config.probe.every == 5
    (tmp_path / "base.yaml").write_text("preset: cpu-tiny\noptim: {steps: -1}\n")
    problems = problems_of(write(tmp_path, MINIMAL.replace("preset: cpu-tiny", "config: base.yaml")))
    assert problems[0].startswith(f"{tmp_path / 'bad.yaml'}:3: base.config:") and "optim.steps" in problems[0]


def test_warnings_name_the_line_but_do_not_stop(tmp_path):
    path = write(tmp_path, MINIMAL + "budget:\n  max_concurrent_trials: 8\n", "ok.yaml")
    with pytest.warns(SweepSpecWarning, match=r"ok\.yaml:9: budget\.max_concurrent_trials: 8 exceeds"):
        spec = load_sweep(path)
    assert spec.budget.max_concurrent_trials == 8


def test_valid_pbt_sweep(tmp_path):
    spec = load_sweep(write(tmp_path, """\
        name: pbt
        base:
          preset: cpu-tiny
          overrides: {probe.every: 5, run.checkpoint_every: 5, run.keep_checkpoints: 4}
        search_space:
          optim.lr: {loguniform: [0.0001, 0.01]}
          loss.teacher_temp: {uniform: [0.03, 0.1]}
        search: {seed: 3}
        budget: {num_samples: 4}
        scheduler: {type: pbt, perturbation_interval: 2, hyperparam_mutations: [optim.lr]}
        """, "ok.yaml"))
    assert spec.scheduler.type == "pbt" and spec.reports_per_trial() == 4 and spec.search.seed == 3


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_sweeps_validate(path, recwarn):
    spec = load_sweep(path)
    assert not [w for w in recwarn if issubclass(w.category, SweepSpecWarning)]
    assert spec.num_trials() >= spec.grid_size() >= 1
    for name, dist in spec.search_space.items():  # every value a trial can get builds a config
        for _, value in dist.extremes():
            assert spec.trial_config({name: value})


def test_shipped_sweeps_cover_the_issue():
    names = {p.relative_to(REPO / "sweeps").as_posix() for p in SHIPPED}
    assert {"quickstart.yaml", "temperatures.yaml", "clusters.yaml", "mask_schedules.yaml",
            "registers.yaml"} <= names
    gpu = [p for p in SHIPPED if p.parent.name == "gpu"]
    assert gpu and all(load_sweep(p).resources.gpus_per_worker == 1 for p in gpu)
    assert all(load_sweep(p).base.preset == "vit-b" for p in gpu)


def test_quickstart_fits_two_cores():
    spec = load_sweep(REPO / "sweeps" / "quickstart.yaml")
    assert 3 <= spec.num_trials() <= 4 and spec.base.preset == "cpu-demo"
    # Every trial to the end: ASHA at step 600 stopped the trials the full runs ranked first.
    assert spec.scheduler.type == "none" and spec.search.metric == "probe/knn_gain"
    # One probe, at the last step, on the full protocol: the quietest a 3-minute trial can afford.
    probe = spec.base_config.probe
    assert probe.every == spec.base_config.optim.steps and (probe.train_images, probe.test_images) == (60_000, 10_000)
    assert spec.resources.workers == 1 and spec.budget.max_concurrent_trials == 2
    assert spec.budget.max_concurrent_trials * spec.resources.cpus_per_worker <= 2


def test_trial_config_applies_params_on_the_base(tmp_path):
    spec = load_sweep(write(tmp_path, MINIMAL, "ok.yaml"))
    config = spec.trial_config({"loss.teacher_temp": 0.08, "model.registers": 8, "masking.strategy": "block"})
    assert config.loss.teacher_temp == 0.08 and config.model.registers == 8 and config.masking.strategy == "block"
    assert config.probe.every == 5  # the base override survives
    assert config.model.embed_dim == build_config("cpu-tiny").model.embed_dim  # and the preset
    assert spec.base_config.loss.teacher_temp == build_config("cpu-tiny").loss.teacher_temp  # base untouched
    with pytest.raises(ConfigError, match="model.registers"):
        spec.trial_config({"model.registers": 17})
    with pytest.raises(ConfigError, match="did you mean 'loss.teacher_temp'"):
        spec.trial_config({"loss.teacher_tmp": 0.1})


def test_grid_size_counts_grid_dimensions_only(tmp_path):
    spec = load_sweep(write(tmp_path, """\
        name: t
        base: {preset: cpu-tiny}
        search_space:
          loss.teacher_temp: {grid: [0.04, 0.06, 0.08]}
          model.registers: {grid: [0, 4]}
          optim.lr: {loguniform: [0.0001, 0.01]}
          masking.strategy: {choice: [random, block]}
        budget: {num_samples: 12}
        """, "ok.yaml"))
    assert spec.grid_size() == 6 and spec.num_trials() == 12 and spec.repeats() == 2
    grid_only = load_sweep(write(tmp_path, MINIMAL, "grid.yaml"))
    assert grid_only.grid_size() == 2 and grid_only.num_trials() == 2 and grid_only.repeats() == 1


def test_override_forms_are_equivalent(tmp_path):
    forms = ["{optim: {lr: 0.002}, probe.every: 5}", "{optim.lr: 0.002, probe: {every: 5}}",
             "[optim.lr=0.002, probe.every=5]"]
    configs = [load_sweep(write(tmp_path, MINIMAL.replace("{probe.every: 5}", form), f"f{i}.yaml")).base_config
               for i, form in enumerate(forms)]
    assert configs[0] == configs[1] == configs[2] and configs[0].optim.lr == 0.002


def test_cli_validate_ok_and_errors(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["sweep", "validate", str(REPO / "sweeps" / "quickstart.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output and "4 trials" in ok.output and "clustering.num_clusters" in ok.output
    assert "scheduler: none" in ok.output
    bad = write(tmp_path, MINIMAL + "scheduler:\n  type: asha\n  grace_period: 0\n")
    result = runner.invoke(main, ["sweep", "validate", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:10: scheduler.grace_period: Input should be greater than or equal to 1" in result.output


def test_validation_does_not_import_ray():
    code = ("import sys; from orchestrator.sweep.spec import load_sweep; load_sweep('sweeps/quickstart.yaml'); "
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_trial_rows_read_the_newest_tune_session(tmp_path):
    """After a resume, Tune's final sync rewrites the killed session's stale state file last, and a
    restored trial may log into a new directory: statuses and results must come from the newest
    session's file (by its name) and the directory it names (the bug fixed in issue 6)."""
    spec = load_sweep(Path("sweeps/quickstart.yaml"))
    metric = spec.search.metric

    def state(name, trials):
        data = {"trial_data": [[json.dumps({"trial_id": t, "status": s, "relative_logdir": d}), "{}"]
                               for t, s, d in trials]}
        (tmp_path / f"experiment_state-{name}.json").write_text(json.dumps(data))

    def results(logdir, values):
        (tmp_path / logdir).mkdir()
        lines = [json.dumps({metric: v, "step": i, "probe_evals": spec.reports_per_trial()}) for i, v in
                 enumerate(values, 1)]
        (tmp_path / logdir / "result.json").write_text("\n".join(lines))

    results("trial_a_0", [40.0, 50.0])
    (tmp_path / "trial_a_1").mkdir()  # the restored trial's abandoned directory
    results("trial_a_1_x1", [45.0])
    state("2026-01-01_10-00-01", [("a_0", "TERMINATED", "trial_a_0"), ("a_1", "TERMINATED", "trial_a_1_x1")])
    state("2026-01-01_09-59-00", [("a_0", "RUNNING", "trial_a_0"), ("a_1", "PENDING", "trial_a_1")])  # touched last
    rows = {r.trial_id: r for r in trial_rows(tmp_path, spec)}
    assert set(rows) == {"a_0", "a_1"}
    assert [rows[t].status for t in ("a_0", "a_1")] == ["TERMINATED", "TERMINATED"]
    assert rows["a_1"].metric == 45.0 and rows["a_0"].metric == (50.0 if spec.search.mode == "max" else 40.0)


def test_trial_rows_show_a_running_trials_logged_step(tmp_path):
    """`capi sweep status` during a one-probe trial: Tune has no result yet, the trial's metrics.jsonl
    has its step."""
    spec = load_sweep(Path("sweeps/quickstart.yaml"))
    data = {"trial_data": [[json.dumps({"trial_id": t, "status": s, "relative_logdir": f"trial_{t}"}), "{}"]
                           for t, s in (("a_0", "RUNNING"), ("a_1", "PENDING"))]}
    (tmp_path / "experiment_state-2026-01-01_10-00-00.json").write_text(json.dumps(data))
    for t in ("a_0", "a_1"):
        (tmp_path / f"trial_{t}").mkdir()
    run = tmp_path / "trials" / f"{spec.name}-a_0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 740, "time": 1.0}\n{"step": 760, "time": 2.0}\n')
    rows = {r.trial_id: r for r in trial_rows(tmp_path, spec)}
    assert (rows["a_0"].status, rows["a_0"].step) == ("RUNNING", 760)
    assert (rows["a_1"].status, rows["a_1"].step) == ("PENDING", None)


def test_missing_dataset_stops_a_local_sweep_before_ray(tmp_path, monkeypatch):
    """The base run's dataset is checked on this machine before a local Ray starts; nothing is written."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such-dataset"
    file = write(tmp_path, MINIMAL.replace("overrides: {probe.every: 5}",
                                           f"overrides: {{probe.every: 5, data.dataset: '{missing}'}}") +
                 f"storage: {tmp_path / 'sweeps'}\nmlflow: {{tracking_uri: 'sqlite:///{tmp_path / 'm.db'}'}}\n",
                 "s.yaml")
    result = CliRunner().invoke(main, ["sweep", "run", str(file)])
    assert result.exit_code != 0
    assert "base data.dataset" in result.output and str(missing) in result.output
    assert not (tmp_path / "sweeps" / "t").exists() and not (tmp_path / "m.db").exists()


def test_one_worker_trials_train_in_their_trial_unless_ray_train_is_asked_for():
    assert Resources().in_trial() and Resources(launcher="in_trial").in_trial()
    assert not Resources(launcher="ray_train").in_trial()
    assert not Resources(workers=2).in_trial()  # DDP needs Ray Train's worker group


def test_the_summary_says_how_trials_share_the_cores():
    spec = load_sweep(Path(__file__).parents[1] / "sweeps" / "quickstart.yaml")
    assert spec.core_sharing(2).startswith("cores: 2 trials at a time, each trains in its Tune trial's process "
                                           "with 1 torch thread: 2 threads on this machine's 2 cores; Ray's own")
    assert "oversubscribed" in spec.core_sharing(1)  # the same sweep on one core
    ddp = spec.model_copy(update={"resources": Resources(workers=2)})
    assert "each is a Ray Train run of 2 workers with 1 torch thread per worker: 4 threads" in ddp.core_sharing(4)
