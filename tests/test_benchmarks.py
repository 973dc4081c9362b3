"""The pure bookkeeping of the benchmarks (their figures are printed, never asserted on speed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ray_overhead import CpuShares  # noqa: E402


def test_cpu_shares_split_the_window_between_training_and_the_rest():
    cpus = os.cpu_count() or 1
    cpu = CpuShares()
    # Unix time, then CPU seconds by (pid, command line); pid 3 starts inside the window.
    cpu.samples = [(100.0, {(1, "ray::RayTrainWorker"): 5.0, (2, "raylet"): 1.0}),
                   (110.0, {(1, "ray::RayTrainWorker"): 20.0, (2, "raylet"): 1.5, (3, "ray::Queue"): 0.5}),
                   (130.0, {(1, "ray::RayTrainWorker"): 30.0, (2, "raylet"): 2.0})]  # outside [t0, t1]
    shares = cpu.shares(99.0, 115.0, lambda pid, cmd: cmd.startswith("ray::RayTrainWorker"))
    assert shares["training"] == pytest.approx(15.0 / (10.0 * cpus))
    assert shares["others"] == pytest.approx(1.0 / (10.0 * cpus))
    assert cpu.shares(105.0, 115.0, lambda pid, cmd: True) is None  # one sample: no interval


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_cpu_shares_sees_a_busy_process():
    # A busy child, not a busy loop here: that would hold the GIL the sampling thread needs.
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with CpuShares(period=0.1) as cpu:
            start = time.time()
            time.sleep(1.5)
            end = time.time()
    finally:
        busy.kill()
        busy.wait()
    shares = cpu.shares(start, end, lambda pid, cmd: pid == busy.pid)
    cpus = os.cpu_count() or 1
    assert shares["training"] > 0.5 / cpus  # a busy loop holds most of one core


def test_every_run_of_the_recipe_study_is_a_valid_config():
    from recipe_study import load_study, overrides_of

    from capi_core.config import build_config

    root = Path(__file__).resolve().parents[1]
    study = load_study(root / "sweeps" / "study" / "cpu_recipe.yaml")
    names = [r["name"] for r in study["runs"]]
    assert len(names) == len(set(names)) and study["reference"] in names
    for r in study["runs"]:
        cfg = build_config(study["base"]["preset"], overrides_of(study, r))
        assert cfg.probe.test_images == 5000 and cfg.optim.steps % cfg.probe.every == 0
