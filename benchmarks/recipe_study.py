"""The CPU recipe study: which settings make a 2-core machine learn most per minute.

    .venv/bin/python benchmarks/recipe_study.py run sweeps/study/cpu_recipe.yaml      # trains what is missing
    .venv/bin/python benchmarks/recipe_study.py report sweeps/study/cpu_recipe.yaml   # plots + table into docs/

A study file names a base configuration (a preset and overrides, as a sweep's ``base``) and a list of
runs, each a name and the overrides that make it differ from the base (one axis at a time, or a
combination). Every run trains with the project's trainer, single-threaded, two at a time (the way
``make quickstart`` runs its trials), and is scored by the trainer's own online probe at each
``probe.every`` steps: weighted k-NN on the study's probe set, its random-init baseline and the gain.
Each run's curve (gain against steps and against training minutes, probe time excluded) is written
as JSON under the study's results directory as soon as the run ends, so an interrupted study resumes
where it stopped. ``report`` draws the gain of every run against minutes and the final gain along
each axis, and writes a markdown table beside the plots.

Minutes are measured with two runs sharing the machine's 2 cores; they compare runs with each other,
and the machine and its load are recorded with every result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

ROOT = Path(__file__).resolve().parents[1]


def load_study(path: Path) -> dict:
    study = yaml.safe_load(path.read_text())
    for key in ("name", "base", "runs", "results"):
        if key not in study:
            raise SystemExit(f"{path}: a study needs '{key}'")
    return study


def overrides_of(study: dict, run: dict) -> list[str]:
    base = study["base"]
    merged = {**base.get("overrides", {}), **study.get("probe", {}), **run.get("overrides", {})}
    return [f"{k}={v}" for k, v in merged.items()]


def train_one(preset: str, overrides: list[str], out: Path) -> None:
    """One run in this process: train, keep the probe curve, write it to ``out``."""
    from learning import Curve
    from run_all import machine

    from capi_core.config import build_config
    from capi_core.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(preset, [*overrides, f"run.output_dir={tmp}"])
        curve = Curve()
        trainer = Trainer(cfg, [curve])
        trainer.fit()
    record = {"preset": preset, "overrides": overrides, "machine": machine(), "curve": curve.points,
              "train_min": round(curve.train_s / 60, 2), "probe_min": round(curve.probe_s / 60, 2),
              "precision": trainer.precision.describe()}
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(record, indent=1))
    os.replace(tmp_out, out)


def run(study_path: Path, parallel: int) -> None:
    study = load_study(study_path)
    results = ROOT / study["results"]
    results.mkdir(parents=True, exist_ok=True)
    todo = [r for r in study["runs"] if not (results / f"{r['name']}.json").exists()]
    print(f"{len(study['runs']) - len(todo)} of {len(study['runs'])} runs done; {len(todo)} to train, "
          f"{parallel} at a time", flush=True)

    def one(r: dict) -> None:
        args = [sys.executable, __file__, "_one", study["base"]["preset"], str(results / f"{r['name']}.json"),
                *overrides_of(study, r), "run.threads=1", "data.loader_workers=0"]
        with open(results / f"{r['name']}.log", "w") as log:
            code = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        print(f"{r['name']}: {'done' if code == 0 else f'failed ({code}), see its .log'}", flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, todo))


def report(study_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = load_study(study_path)
    results = ROOT / study["results"]
    done = {r["name"]: (r, json.loads((results / f"{r['name']}.json").read_text()))
            for r in study["runs"] if (results / f"{r['name']}.json").exists()}
    out = ROOT / study.get("report", f"docs/{study['name']}")
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (_, rec) in done.items():
        pts = rec["curve"]
        ax.plot([p["train_min"] for p in pts], [p["probe/knn_gain"] for p in pts], marker="o", ms=3, label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("training minutes (1 core each, two runs at a time)")
    ax.set_ylabel("k-NN gain over random init (points)")
    ax.set_title(f"{study['name']}: gain against minutes")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "gain_vs_minutes.png", dpi=110)
    plt.close(fig)

    axes: dict[str, list[tuple[str, str, float]]] = {}
    for name, (r, rec) in done.items():
        for key, value in r.get("overrides", {}).items():
            axes.setdefault(key, []).append((name, str(value), rec["curve"][-1]["probe/knn_gain"]))
    base = done.get(study.get("reference", ""), (None, None))[1]
    if axes:
        fig, plots = plt.subplots(1, len(axes), figsize=(3.2 * len(axes), 3.4), squeeze=False)
        for ax, (key, points) in zip(plots[0], sorted(axes.items())):
            labels = ([f"{study.get('reference')}"] if base else []) + [f"{v}\n({n})" for n, v, _ in points]
            values = ([base["curve"][-1]["probe/knn_gain"]] if base else []) + [g for _, _, g in points]
            ax.bar(range(len(values)), values, color=["grey"] * bool(base) + ["C0"] * len(points))
            ax.set_xticks(range(len(values)), labels, fontsize=6, rotation=30)
            ax.set_title(key, fontsize=8)
            ax.set_ylabel("final gain (points)", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "gain_by_axis.png", dpi=110)
        plt.close(fig)

    lines = ["| run | differs from the base by | steps | training min | final k-NN | random init | gain |",
             "|---|---|---|---|---|---|---|"]
    for name, (r, rec) in sorted(done.items(), key=lambda kv: -kv[1][1]["curve"][-1]["probe/knn_gain"]):
        last = rec["curve"][-1]
        diff = ", ".join(f"`{k}={v}`" for k, v in r.get("overrides", {}).items()) or "(the base)"
        lines.append(f"| {name} | {diff} | {last['step']} | {rec['train_min']:.1f} | {last['probe/knn_top1']:.2f} | "
                     f"{last['probe/knn_random_init']:.2f} | {last['probe/knn_gain']:+.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}/gain_vs_minutes.png, gain_by_axis.png and table.md")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        train_one(sys.argv[2], sys.argv[4:], Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("run", "report"))
    parser.add_argument("study", type=Path)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    args = parser.parse_args()
    run(args.study, args.parallel) if args.what == "run" else report(args.study)


if __name__ == "__main__":
    main()
