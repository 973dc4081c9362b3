"""kill -9 ``capi train``, ``capi data import`` and ``capi sweep run`` at random moments, then check
that what they leave is whole and that running the command again finishes.

Every write of the project goes through ``capi_core.atomic`` (a temporary name, then a rename), so a
process killed at any instant should leave only complete checkpoints, shards and manifests under
their real names, plus hidden temporaries. Each kill is followed by these checks:

- train: every ``checkpoints/step-*`` loads (``load_checkpoint``: both files, valid state, finite
  weights);
- import: every visible ``*.parquet`` reads as Parquet, and a manifest, if there is one, verifies
  (``verify_dataset``: checksums, counts, labels);
- sweep: ``capi_sweep.json``, ``sweep.json`` and Tune's ``experiment_state-*.json``, if present, parse
  (Tune restarts the whole sweep from a damaged state), and every trial checkpoint loads.

The next launch of the same command starts from that state, so the kills chain; for a sweep that is
``capi sweep resume`` once the sweep is saved (``capi sweep run`` refuses an existing sweep and says
so), and ``capi sweep run`` again before. A launch that exits non-zero by itself is a failure. At the
end the command runs uninterrupted (killed, and reported as hung, after ten times the clean run) and
must exit 0 with a complete result.

    python benchmarks/kill_faults.py --count 20            # train and import, 20 kills each
    python benchmarks/kill_faults.py --only sweep --count 20   # the sweep (local Ray: minutes per kill)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from capi_core.checkpoint import load_checkpoint
from capi_core.data.format import MANIFEST, verify_dataset
from orchestrator.sweep.storage import STATE_FILE, sweep_dir

CLI = [sys.executable, "-m", "orchestrator.cli"]


def image_folder(root: Path, classes: int = 4, per_class: int = 150, size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
            (root / f"c{c}" / f"{i}.png").write_bytes(buf.getvalue())
    return root


def run(argv: list[str], cwd: Path, kill_after: float | None) -> tuple[int, str, bool]:
    """(exit code, output, whether it was killed) of one launch, in its own session so that the kill
    reaches the processes it started (loader processes, a local Ray) and nothing else."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(CLI + argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=kill_after)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        log.seek(0)
        return proc.returncode, log.read()[-3000:], killed


def check_train(out: Path) -> list[str]:
    problems = []
    for step in sorted(out.glob("*/checkpoints/step-*")):
        try:
            load_checkpoint(step)
        except Exception as err:  # noqa: BLE001 - every kind of damage is a finding
            problems.append(f"{step}: {err}")
    return problems


def check_import(out: Path) -> list[str]:
    problems = []
    for shard in sorted(out.glob("[!.]*.parquet")):
        try:
            pq.read_metadata(shard)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{shard}: {err}")
    if (out / MANIFEST).exists():
        try:
            verify_dataset(out)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{out / MANIFEST}: {err}")
    return problems


def check_sweep(storage: Path) -> list[str]:
    problems = []
    for name in ("capi_sweep.json", "sweep.json", "experiment_state-*.json"):
        for path in storage.glob(f"*/{name}"):
            try:
                json.loads(path.read_text())
            except ValueError as err:
                problems.append(f"{path}: {err}")
    for step in storage.glob("*/trials/*/checkpoints/step-*"):
        try:
            load_checkpoint(step)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{step}: {err}")
    return problems


def scenario(name: str, work: Path, count: int, seed: int) -> dict:
    rng = random.Random(seed)
    work.mkdir(parents=True)
    folder = image_folder(work / "images")
    dataset = work / "dataset"
    saved = None  # a sweep's mark of having been saved, which makes `capi sweep resume` its re-run
    if name != "import":
        code, out, _ = run(["data", "import", "imagefolder", str(folder), "--out", str(dataset), "--workers", "1"],
                           work, None)
        assert code == 0, out
    if name == "train":
        argv = ["train", "--preset", "cpu-tiny", "--no-tracking", f"data.dataset={dataset}", "model.img_size=24",
                f"run.output_dir={work / 'runs'}", "optim.steps=200", "run.checkpoint_every=10", "run.log_every=5"]
        again, target, check = argv, work / "runs", check_train
    elif name == "import":
        argv = ["data", "import", "imagefolder", str(folder), "--out", str(dataset), "--workers", "2",
                "--shard-rows", "50"]
        again, target, check = argv, dataset, check_import
    else:
        sweep = work / "sweep.yaml"
        sweep.write_text(json.dumps({
            "name": "kill", "storage": str(work / "sweeps"),
            "base": {"preset": "cpu-tiny", "overrides": {"data.dataset": str(dataset), "model.img_size": 24,
                                                         "optim.steps": 60, "probe.every": 20,
                                                         "run.checkpoint_every": 20}},
            "search_space": {"optim.lr": {"choice": [0.001, 0.002]}}, "budget": {"num_samples": 2},
            "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}"}}))
        argv, again, target, check = ["sweep", "run", str(sweep), "--no-export"], \
            ["sweep", "resume", "kill", "--storage", str(work / "sweeps"), "--no-export"], work / "sweeps", check_sweep
        saved = sweep_dir(work / "sweeps", "kill") / STATE_FILE
    start = time.monotonic()
    code, out, _ = run(argv, work, None)  # one clean run: how long the command takes here
    assert code == 0, out
    duration = time.monotonic() - start
    shutil.rmtree(target)
    kills = failures = 0
    findings: list[str] = []
    command = argv
    while kills < count:
        code, out, killed = run(command, work, rng.uniform(0.05, 1.0) * duration)
        if killed:
            kills += 1
            findings += check(target)
            command = argv if saved is not None and not saved.exists() else again
        elif code != 0:
            failures += 1
            findings.append(f"a re-run exited {code}: {out[-800:]}")
            break
        else:  # finished before the kill: start over, so that the next kill lands mid-run
            shutil.rmtree(target)
            command = argv
    # The last run is bounded too: a hang (one did, in ray.init) is a finding, not a benchmark that never ends.
    limit = max(600.0, 10 * duration)
    code, out, hung = run(command, work, limit)
    damaged = check(target)
    result = {"scenario": name, "kills": kills, "rerun_failures": failures, "findings": findings,
              "finished_after": code == 0 and not damaged, "clean_run_s": round(duration, 1)}
    if not result["finished_after"]:  # what the last, uninterrupted run said
        result["final_run"] = {"exit_code": code, "hung": f"killed after {limit:.0f} s" if hung else False,
                               "damaged": damaged, "output": out[-1500:]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20, help="kills per scenario")
    parser.add_argument("--only", choices=["train", "import", "sweep"], action="append",
                        help="scenarios to run (repeatable); default: train and import")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kill-faults-"))
    try:
        results = [scenario(name, root / name, args.count, args.seed) for name in (args.only or ["train", "import"])]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=1))
    sys.exit(0 if all(r["finished_after"] and not r["findings"] and not r["rerun_failures"] for r in results) else 1)


if __name__ == "__main__":
    main()
