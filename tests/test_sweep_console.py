"""The sweep console's pure logic: event lines, ETA, best so far, stop reasons, trial numbers, and
the final table's width. No Ray: a fake clock and a list stand in for time and the terminal."""

from __future__ import annotations

import re

from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.cli import sweep as sweep_cli
from orchestrator.sweep.console import SweepConsole, clock, describe_values, short_names, stop_reason
from orchestrator.sweep.storage import TrialRow, list_sweeps, logged_step, number_trials


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_console_lines_eta_and_best_so_far():
    lines, now = [], Clock()
    console = SweepConsole(total=3, reports=4, metric="probe/knn_gain", mode="max", echo=lines.append, now=now)
    console.started("a1_00000", 1, {"model.registers": 0, "optim.ema_final": 0.994})
    console.started("a1_00001", 2, {"model.registers": 4, "optim.ema_final": 0.994})
    now.t += 60
    console.result("a1_00000", 1, 300, 2.5)
    console.result("a1_00001", 1, 300, 3.25)
    assert lines[0] == "[0:00] trial 1/3 started: registers=0 ema_final=0.994"
    assert lines[-1] == "[1:00] trial 2/3 probe 1/4 at step 300: probe/knn_gain 3.25"
    # 2 probes in 60 s; 3 + 3 left of the running trials and 4 of the one not started: 300 s.
    assert console.eta_s() == 300
    now.t += 60
    console.result("a1_00000", 2, 600, 1.0)
    console.ended("a1_00000", stopped=stop_reason(2, 4, 120, None, "asha", 2))
    assert "trial 1/3 stopped early (ASHA rung at probe 2/4: not in the top 1/2" in lines[-2]
    # 3 probes in 120 s; 3 left of the running trial, none of the stopped one, 4 of the one not started.
    assert lines[-1] == ("[2:00] 1/3 trials ended (1 stopped), 1 running, ETA 4:40; best so far: trial 2 "
                         "(registers=4 ema_final=0.994) probe/knn_gain 3.25")
    console.failed("a1_00001", "RuntimeError: boom")
    assert lines[-2].endswith("trial 2/3 failed: RuntimeError: boom") and "1 failed" in lines[-1]
    assert not any("\x1b[" in line for line in lines)


def test_heartbeat_names_each_running_trials_step_and_the_eta_counts_steps():
    lines, now = [], Clock()
    console = SweepConsole(total=4, reports=1, metric="probe/knn_gain", mode="max", echo=lines.append, now=now,
                           steps=2000)
    console.started("q_00000", 1, {"clustering.num_clusters": 16})
    console.started("q_00001", 2, {"clustering.num_clusters": 64})
    now.t += 30
    assert not console.heartbeat_due()  # a line 30 s ago
    now.t += 30
    assert console.heartbeat_due()
    console.heartbeat({"q_00000": None, "q_00001": None})
    assert lines[-1] == "[1:00] running: trial 1/4 starting, trial 2/4 starting"
    assert not console.heartbeat_due()  # the heartbeat is a line too
    now.t += 60
    console.heartbeat({"q_00000": 800, "q_00001": 700})
    # 1,500 steps in 120 s; 1,200 + 1,300 left of the running trials and 2 x 2,000 of those not started.
    assert lines[-1] == "[2:00] running: trial 1/4 at step 800/2000, trial 2/4 at step 700/2000; ETA 8:40"
    # One probe per trial, at its end: when the first trial ends the other is nearly done. Counting
    # probes (1 done, 3 to go) said 13:30 here; counting steps, 4,100 left at 3,900 per 270 s.
    now.t += 100
    console.heartbeat({"q_00000": 2000, "q_00001": 1800})
    assert lines[-1].startswith("[3:40] running: trial 1/4 at step 2000/2000 (final probe), trial 2/4 at step 1800/2000;")
    now.t += 50
    console.result("q_00000", 1, 2000, 8.3)
    console.steps_reached({"q_00000": 2000, "q_00001": 1900})
    console.ended("q_00000")
    assert lines[-1].startswith("[4:30] 1/4 trials ended, 1 running, ETA 4:44; best so far: trial 1")
    assert console.running() == ["q_00001"]


def test_logged_step_reads_the_last_whole_line_of_a_trials_metrics(tmp_path):
    run = tmp_path / "trials" / "quickstart-abc_00001"
    run.mkdir(parents=True)
    assert logged_step(tmp_path, "quickstart", "abc_00001") is None  # no file yet
    lines = [f'{{"step": {s}, "time": 1.0, "capi_loss": 5.1234}}' for s in range(20, 4020, 20)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 40')  # the writer mid-line
    assert len(lines) * len(lines[0]) > 4096  # more than the tail that is read
    assert logged_step(tmp_path, "quickstart", "abc_00001") == 4000
    assert logged_step(tmp_path, "quickstart", "abc_00000") is None  # another trial's file is not read


def test_stop_reasons_name_the_budget_or_the_scheduler():
    assert stop_reason(1, 4, 3590, 3600, "asha").startswith("time budget of 3600 s spent")
    assert stop_reason(1, 4, 100, 3600, "asha").startswith("ASHA rung at probe 1/4")
    assert stop_reason(3, 4, 100, None, "pbt").startswith("PBT")


def test_names_numbers_and_clock():
    assert short_names(["model.registers", "loss.temp", "optim.temp"]) == {
        "model.registers": "registers", "loss.temp": "loss.temp", "optim.temp": "optim.temp"}
    assert describe_values({"loss.teacher_temp": 0.0412345, "model.registers": 4}) == "teacher_temp=0.04123 registers=4"
    assert (clock(59.6), clock(3725)) == ("1:00", "1:02:05")
    notes = {"x": {"number": 1, "stopped": "r"}}
    assert number_trials(notes, ["x", "y", "z"]) and notes["y"] == {"number": 2} and notes["z"] == {"number": 3}
    assert not number_trials(notes, ["z", "y"])  # numbers never change


def test_final_table_fits_80_columns_and_names_trials_distinctly(capsys):
    rows = [TrialRow(trial_id=f"5d498_{i:05d}", status=s, number=i + 1, probe_evals=4, step=1200, metric=m, last=m,
                     gain=m, params={"optim.ema_final": e, "model.registers": r, "loss.teacher_temp": 0.0412345},
                     stop_reason="ASHA rung at probe 2/4: not in the top 1/2 of the trials there" if s == "STOPPED"
                     else None)
            for i, (s, m, e, r) in enumerate([("TERMINATED", 9.61, 0.994, 4), ("STOPPED", 4.8, 1.0, 0),
                                              ("TERMINATED", 8.0, 0.994, 0), ("TERMINATED", 9.5, 1.0, 4)])]
    sweep_cli._print_trials("probe/knn_gain", "max", ["optim.ema_final", "model.registers", "loss.teacher_temp"],
                            rows, "probe set fashion-mnist: 5,000 train / 5,000 test images")
    out = capsys.readouterr().out
    table = out.split("trial 2 stopped early")[0].splitlines()
    assert max(len(line) for line in table) <= 80, out
    assert not re.search(r"\x1b\[", out)
    body = [line.split() for line in table if line.strip()[:1].isdigit()]
    assert [cells[0] for cells in body] == ["1*", "2", "3", "4"]  # distinct, never cut off
    assert "trial 2 stopped early: ASHA rung at probe 2/4" in out
    assert "best (*): trial 1 (ema_final=0.994 registers=4 teacher_temp=0.04123)" in out


def test_final_table_keeps_parameter_names_whole_when_they_fit(capsys):
    # The quickstart's table once printed "warmup_fracti" over "on": rich folded the header to share
    # 80 columns that the cells did not need.
    rows = [TrialRow(trial_id=f"a_{i}", status="TERMINATED", number=i + 1, probe_evals=2, step=2000, metric=m, last=m,
                     gain=m, params={"optim.warmup_fraction": w, "optim.ema_final": 0.994})
            for i, (m, w) in enumerate([(8.65, 0.3), (8.13, 0.1)])]
    sweep_cli._print_trials("probe/knn_gain", "max", ["optim.ema_final", "optim.warmup_fraction"], rows, None)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "trial" in line and "status" in line)
    assert header.split() == ["trial", "status", "ema_final", "warmup_fraction", "best", "knn_gain", "probes", "step"]
    assert max(len(line) for line in lines[:lines.index(header) + 4]) <= 80


def test_the_table_says_which_trials_the_best_is_told_apart_from(capsys):
    from orchestrator.sweep.storage import told_apart

    rows = [TrialRow(trial_id=f"b_{i}", status="TERMINATED", number=i + 1, probe_evals=1, step=2000, metric=m,
                     last=m, gain=m, params={"clustering.num_clusters": k})
            for i, (m, k) in enumerate([(7.5, 16), (7.6, 64), (8.4, 256), (9.0, 1024)])]
    apart, within = told_apart(rows, "max", "probe/knn_gain", 1.0)
    assert [r.label for r in apart] == ["1", "2"] and [r.label for r in within] == ["3"]
    assert told_apart(rows, "max", "train/capi_loss", 1.0) is None  # not in k-NN points
    assert told_apart(rows, "max", "probe/knn_gain", None) is None
    sweep_cli._print_trials("probe/knn_gain", "max", ["clustering.num_clusters"], rows, None, 1.0)
    def printed() -> str:  # the console wraps at 80 columns
        return " ".join(capsys.readouterr().out.split())

    assert "the best leads trial(s) 1, 2 by more than 1.0 points; trial(s) 3 within the noise of it" in printed()
    sweep_cli._print_trials("probe/knn_gain", "max", ["clustering.num_clusters"], rows, None, 2.0)
    assert "every other trial is within 2.0 points of the best" in printed()
    sweep_cli._print_trials("probe/knn_gain", "max", ["clustering.num_clusters"], rows, None, 0.3)
    assert "the best leads every other trial by more than 0.3 points" in printed()


def test_status_of_an_unknown_sweep_lists_the_existing_ones(tmp_path):
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "capi_sweep.json").write_text("{}")
    (tmp_path / "not-a-sweep").mkdir()
    assert list_sweeps(tmp_path) == ["alpha", "beta"]
    result = CliRunner().invoke(main, ["sweep", "status", "nope", "--storage", str(tmp_path)])
    assert result.exit_code == 1 and "sweeps there: alpha, beta" in result.output and "Traceback" not in result.output
