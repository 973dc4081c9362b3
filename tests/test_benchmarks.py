"""The pure bookkeeping of the benchmarks (their figures are printed, never asserted on speed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ray_overhead import CpuShares, sweep_efficiency  # noqa: E402


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


def test_gpu_check_runs_its_parts_on_a_cpu(tmp_path):
    """What benchmarks/gpu_check.py measures, at a small size on the CPU: one bf16-autocast step of the
    vit-b architecture (CAPI's RoPE, drop path) at batch 2, the attention-kernel probe, and the 224-px
    JPEG pipeline from a generated ImageNet-like folder through the importer to normalised batches."""
    import torch

    import gpu_check

    cpu = torch.device("cpu")
    versions = gpu_check.versions(cpu)
    assert versions["torch"] == torch.__version__ and versions["device"] == "cpu"
    threads = torch.get_num_threads()
    try:  # one thread: two OpenMP threads on a shared 2-core machine took 1 to 25 s for this step
        step = gpu_check.step_check(cpu, batch=2, steps=1, warmup=0, peak_flops=1e12, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert step["preset"] == "vit-b" and step["precision"] == "bf16" and step["images_per_s"] > 0
    assert 100 < step["model_gflop_per_step"] < 1000 and step["mfu"] > 0
    assert all(ops for ops in step["attention_kernels"].values())
    imported = gpu_check.imagenet_like(tmp_path / "folder", tmp_path / "ds", images=12)
    assert imported["import_images_per_s"] > 0 and len(list((tmp_path / "folder").glob("*/*.JPEG"))) == 12
    feed = gpu_check.data_check(tmp_path / "ds", cpu, batch=4, batches=2, workers=1)
    assert feed["feed_cpu_images_per_s"] > 0 and "feed_cuda_images_per_s" not in feed
    rows = dict(gpu_check.table({"versions": versions, "peak_bf16_tflops": 1.0, "step": step, "data": feed,
                                 "import": imported, "ray": {"skipped": "Ray is not installed here (ray)"}}))
    assert "MFU" in rows["vit-b step, batch 2"] and "x the step" in rows["data feed, decode cpu"]


def test_data_throughput_measures_import_and_decode_scaling(tmp_path):
    import data_throughput
    from make_imagenet_like import make_folder

    made = make_folder(tmp_path / "f", 16, classes=2)
    assert 20 < made["mean_kb"] < 200  # photo-like JPEGs of ~500x375
    one = data_throughput.import_rate(tmp_path / "f", tmp_path / "one", 1)
    two = data_throughput.import_rate(tmp_path / "f", tmp_path / "two", 2)
    assert one["images"] == two["images"] == 16 and one["stored_mb"] == two["stored_mb"]
    decode = data_throughput.decode_rate(tmp_path / "two", 2, img_size=64, batch=4, batches=2)
    assert decode["processes"] == 2 and decode["images_per_s"] > 0 and decode["images_per_cpu_s"] > 0
    plan = data_throughput.imagenet_plan(per_process=100.0, scaling=0.9, cores=64)
    assert plan["images_per_s"] == pytest.approx(5760) and plan["minutes"] == pytest.approx(1_281_167 / 5760 / 60)


def test_sweep_efficiency_sums_training_and_splits_start_up(tmp_path):
    """Two trials with known timelines: started by the driver at 100 and 103, 10 steps logged every
    2 at 1 s a step from their first log on."""
    import json

    directory = tmp_path / "sweep"
    notes = {}
    for trial, start in (("a_00000", 100.0), ("a_00001", 103.0)):
        run_dir = directory / "trials" / f"sw-{trial}"
        run_dir.mkdir(parents=True)
        notes[trial] = {"number": len(notes) + 1, "started_at": start}
        first_log = start + 10  # step 2 logged 10 s after the start: the first step ended at start + 9
        (run_dir / "startup.json").write_text(json.dumps({
            "entered": start + 4, "built": start + 5, "data_open": start + 6.5, "start_step": 0,
            "first_log": first_log, "first_log_step": 2}))
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": step, "time": first_log + step - 2, "train/capi_loss": 1.0}) + "\n"
            for step in range(2, 11, 2)))
    (directory / "capi_trials.json").write_text(json.dumps(notes))
    result = sweep_efficiency(directory, wall_s=25.0, concurrency=2)
    assert result["trials"] == 2
    assert result["median_startup_s"] == pytest.approx(9.0) and result["median_process_s"] == pytest.approx(4.0)
    assert result["median_build_s"] == pytest.approx(1.0) and result["median_data_s"] == pytest.approx(1.5)
    assert result["median_first_step_s"] == pytest.approx(2.5)
    # Each trained from its first step's start (start + 8) to its last log (start + 18): 10 s.
    assert result["train_sum_s"] == pytest.approx(20.0) and result["efficiency"] == pytest.approx(20 / 50)
    assert result["trial_steps"] == {"a_00000": 10, "a_00001": 10}


def test_matmul_shapes_account_for_every_product_flop_counter_sees():
    """train_step.py's "mm ceiling" times each matrix product of a step alone: the products it records
    must carry exactly the FLOPs torch's counter finds in them (linear with and without bias, batched
    attention-like products, forward and backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from train_step import MatmulShapes, matmul_alone

    torch.manual_seed(0)
    lin, head = torch.nn.Linear(16, 24), torch.nn.Linear(24, 8, bias=False)
    x = torch.randn(3, 5, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter, MatmulShapes() as shapes:
        h = lin(x)
        scores = h @ h.transpose(1, 2)  # [3, 5, 5]: a batched product
        (head(scores @ h)).sum().backward()
    counted = sum(n for op, n in counter.get_flop_counts()["Global"].items()
                  if op.__name__.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm"))
    flops, seconds = matmul_alone(shapes.seen, torch.device("cpu"), repeats=1)
    assert counted > 0 and flops == counted and seconds > 0
    assert sum(shapes.seen.values()) >= 6  # 2 linears and 2 products forward, more backward


def test_step_mfu_is_each_rounds_rate_over_the_peak_measured_just_before_it(monkeypatch):
    """train_step.bench_step re-measures the peak before every round, because on a drifting VM a peak
    measured once, half a minute before the steps, moved MFU by 14 points between runs. With the
    machine's timings replaced by a script (round 1: peak 1e11, steps 0.1 s; round 2: peak 2e11, steps
    0.2 s), each round's MFU must use its own peak and time, and the row their median and range."""
    import torch

    import train_step

    peaks = iter([1e11, 1e11, 2e11, 2e11, 7e11])  # (bf16, fp32) per round, then the mm ceiling's own
    step_times = iter([[0.1, 0.1], [0.2, 0.2]])
    monkeypatch.setattr(train_step, "matmul_peak", lambda dtype, device: next(peaks))
    monkeypatch.setattr(train_step, "_time_steps", lambda trainer, micro, first, steps: next(step_times))
    threads = torch.get_num_threads()
    try:
        row = train_step.bench_step("cpu-tiny", 4, steps=2, warmup=1, overrides=["run.threads=1"], rounds=2)
    finally:
        torch.set_num_threads(threads)
    flops = row["model_gflop_per_step"] * 1e9
    mfus = [flops / 0.1 / 1e11, flops / 0.2 / 2e11]
    assert row["rounds"] == 2 and row["mfu_own_range"] == pytest.approx(sorted(mfus))
    assert row["mfu_vs_own_precision_peak"] == pytest.approx(sum(mfus) / 2)  # the median of two
    assert row["step_s"] == pytest.approx(0.15) and row["images_per_s"] == pytest.approx(4 / 0.15)
    assert row["matmul_ceiling_vs_own_peak"] == pytest.approx(row["matmul_alone_tflops"] * 1e12 / 7e11)
