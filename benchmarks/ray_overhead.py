"""What running through Ray costs: a sweep against its trials run standalone, one run through Ray
Train against the same run standalone, and 1 against 2 workers.

Measured on a local Ray, no GPU needed:

* **sweep**: a real ``capi sweep`` (Ray Tune driving Ray Train trials, one at a time, with a
  local-file MLflow store: everything a user's sweep does) against the same trials trained
  standalone in this process one after another. Overhead = sweep wall time / sum of the standalone
  wall times - 1, reported whole and "beyond start-up", i.e. without ``ray.init`` and each
  trial's worker-group start (measured from the trial's first logged step), which a longer
  sweep amortises. The default sizes make a sweep of about 5 minutes on 2 cores.
* **train**: alternating pairs (``--repeats``) of one run standalone and the same run as a Ray
  Train run with 1 worker holding every CPU (overhead beyond start-up, both timed from their first
  logged step; medians over the pairs), then 2 workers of one CPU each (same global batch),
  compared by the trainer's steady-state images/s (median over log intervals after the first).
  ``--threads 1`` on 2 cores leaves Ray's own processes a core of their own.

* **efficiency** (``--efficiency quickstart``, ``asha`` or ``both``): a sweep's efficiency, the sum
  of its trials' training time (from the estimated start of each trial's first step to its last
  logged step) over the sweep's wall time times its concurrency, and each trial's start-up split into
  its parts from the driver's trial start (``capi_trials.json``) and the trial's ``startup.json``:
  Tune's scheduling and the trial process (actor start, imports; with Ray Train also its controller,
  worker group and process group), opening the trial's MLflow run and building the Trainer, opening
  the data, and the first step.
  ``quickstart`` runs sweeps/quickstart.yaml as it ships; ``asha`` runs a 16-trial ASHA sweep of
  short trials, then the same trials standalone (``capi train``, each for the steps it trained in
  the sweep) back to back in as many lanes as the sweep's concurrency, and compares the wall times.
  ``--launcher ray_train`` runs the same sweeps with every trial as a Ray Train run (the path before
  in-trial training), for a before/after in one session.

* **control** (``--control``): the standalone run alone against the same run beside an idle
  local Ray with a dozen idle actors, alternately. It separates what Ray's mere presence costs a
  small machine from what running inside a Ray Train worker costs.

    python benchmarks/ray_overhead.py                       # ~17 minutes on 2 cores
    python benchmarks/ray_overhead.py --trial-steps 40      # a quick look (~4 minutes)
    python benchmarks/ray_overhead.py --skip-sweep --threads 1 --repeats 3   # Ray with a spare core
    python benchmarks/ray_overhead.py --efficiency both       # ~25 minutes on 2 cores
    python benchmarks/ray_overhead.py --efficiency asha --launcher ray_train
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path

from capi_core.checkpoint_dirs import METRICS_FILE
from capi_core.config import build_config
from capi_core.data import resolve_dataset
from capi_core.train import JsonlMetrics, Trainer
from orchestrator.sweep.storage import NOTES_FILE, TRIALS_DIR
from orchestrator.train import STARTUP_FILE, ScalingOptions, init_local_ray, run_distributed

ROOT = Path(__file__).resolve().parents[1]


def steady_images_per_s(metrics_file: Path) -> float:
    """Median of the trainer's images/s over the log intervals after the first (warm-up)."""
    rates = [json.loads(line)["train/images_per_s"] for line in metrics_file.read_text().splitlines()
             if "train/images_per_s" in line]
    return statistics.median(rates[1:] or rates)


def _log_span(metrics_file: Path) -> tuple[float, float]:
    """Wall-clock times (Unix seconds) of a run's first and last logged steps."""
    lines = metrics_file.read_text().splitlines()
    return json.loads(lines[0])["time"], json.loads(lines[-1])["time"]


class CpuShares:
    """Samples every process's CPU time (Linux ``/proc``) every ``period`` seconds in a thread, so that a
    run's CPU can be split afterwards into the training process and everything else.

    ``shares(t0, t1, training)``: between the first and last samples within the Unix times t0 and t1,
    the CPU used by the processes for which ``training(pid, command_line)`` holds, and by all the
    others, as fractions of the machine (1.0 = every core busy). None without ``/proc``.
    """

    def __init__(self, period: float = 2.0):
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuShares:
        if Path("/proc/self/stat").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), self._cpu_by_process()))
            if self._stop.wait(self.period):
                return

    @staticmethod
    def _cpu_by_process() -> dict[tuple[int, str], float]:
        ticks = os.sysconf("SC_CLK_TCK")
        out = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            except OSError:  # exited meanwhile
                continue
            fields = stat.rsplit(")", 1)[1].split()  # utime and stime are fields 14 and 15 of stat
            out[(int(pid), cmd)] = (int(fields[11]) + int(fields[12])) / ticks
        return out

    def shares(self, t0: float, t1: float, training: Callable[[int, str], bool]) -> dict[str, float] | None:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        (a_t, a), (b_t, b) = inside[0], inside[-1]
        # By pid: a Ray worker retitles its process as it takes tasks (ray::IDLE, ray::ImplicitFunc.train).
        before = {pid: v for (pid, _), v in a.items()}
        used = {(pid, cmd): v - before.get(pid, 0.0) for (pid, cmd), v in b.items()}
        machine = (b_t - a_t) * (os.cpu_count() or 1)
        train = sum(v for (pid, cmd), v in used.items() if training(pid, cmd))
        return {"training": train / machine, "others": (sum(used.values()) - train) / machine}


def _ray_worker(pid: int, cmd: str) -> bool:
    return cmd.startswith("ray::RayTrainWorker")


def _timeline(name: str, metrics_file: Path, start: float, end: float, cpu: CpuShares,
              training: Callable[[int, str], bool]) -> dict[str, float]:
    """A run's start-up (start to first log), training (first to last log) and tail (last log to the
    return: final checkpoint, teardown), and how the machine's CPU was shared while it trained."""
    first, last = _log_span(metrics_file)
    out = {f"{name}_startup_s": first - start, f"{name}_train_s": last - first, f"{name}_tail_s": end - last}
    shares = cpu.shares(first, last, training)
    if shares:
        out[f"{name}_cpu_training"], out[f"{name}_cpu_others"] = shares["training"], shares["others"]
    return out


def _describe(result: dict[str, float], name: str) -> str:
    text = (f"start-up {result[f'{name}_startup_s']:.1f} s, training {result[f'{name}_train_s']:.1f} s, "
            f"tail {result[f'{name}_tail_s']:.1f} s")
    if f"{name}_cpu_training" in result:
        text += (f"; CPU while training: the trainer {result[f'{name}_cpu_training']:.0%}, "
                 f"other processes {result[f'{name}_cpu_others']:.0%}")
    return text


def _overrides(args, out: Path, name: str) -> list[str]:
    return [f"data.dataset={args.dataset}", f"optim.steps={args.trial_steps}", f"optim.batch_size={args.batch}",
            f"run.log_every={args.log_every}", f"run.output_dir={out}", f"run.name={name}",
            f"run.threads={_threads(args)}", "data.loader_workers=0", "probe.every=0"]


def _threads(args) -> int:
    """The trainer's torch threads: ``--threads``, else every CPU."""
    return args.threads or os.cpu_count() or 1


def sweep_overhead(args, out: Path) -> dict[str, float]:
    """A grid sweep over ``args.trials`` teacher temperatures vs the same runs standalone."""
    from orchestrator.sweep.spec import load_sweep
    from orchestrator.sweep.tune import run_sweep

    temps = [round(0.04 + 0.02 * i, 3) for i in range(args.trials)]
    standalone, standalone_startup = [], 0.0
    for t in temps:
        run = _standalone_run(args, out, f"standalone-{t}", [f"loss.teacher_temp={t}"])
        standalone.append(run["standalone_wall_s"])
        standalone_startup += run["standalone_startup_s"]

    overrides = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in _overrides(args, out, "sweep")
                 if not o.startswith(("run.output_dir", "run.name"))}
    sweep_file = out / "sweep.yaml"
    sweep_file.write_text(json.dumps({  # JSON is YAML
        "name": "overhead", "storage": str(out / "sweeps"), "mlflow": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"},
        "base": {"preset": args.preset, "overrides": overrides},
        "search_space": {"loss.teacher_temp": {"grid": temps}},
        "search": {"algorithm": "grid", "metric": "probe/knn_top1", "mode": "max"},
        "budget": {"num_samples": args.trials, "max_concurrent_trials": 1},
        "resources": {"workers": 1, "cpus_per_worker": _threads(args), "gpus_per_worker": 0},
    }))
    spec = load_sweep(sweep_file)
    start_wall, start = time.time(), time.perf_counter()
    with CpuShares() as cpu:
        outcome = run_sweep(spec, sweep_file)
    sweep_wall = time.perf_counter() - start
    if len(outcome.trials) != args.trials or any(t.status != "TERMINATED" for t in outcome.trials):
        raise RuntimeError(f"the sweep did not finish its trials: {[(t.trial_id, t.status) for t in outcome.trials]}")
    metrics = sorted((out / "sweeps" / "overhead" / "trials").glob(f"*/{METRICS_FILE}"))
    lines = [[json.loads(x) for x in m.read_text().splitlines()] for m in metrics]
    lines.sort(key=lambda rows: rows[0]["time"])
    startup, previous_end = 0.0, start_wall  # the previous trial's end (or the sweep's start) to the first log
    for rows in lines:
        startup += rows[0]["time"] - previous_end
        previous_end = rows[-1]["time"]
    # CPU while the trials trained (each trial's first to last log), averaged over the trials.
    shares = [x for rows in lines if (x := cpu.shares(rows[0]["time"], rows[-1]["time"], _ray_worker))]
    base = sum(standalone)
    # Both sides timed from each run's first logged step to its end: what a longer sweep scales with.
    result = {"sweep_trials": args.trials, "sweep_wall_s": sweep_wall, "standalone_sum_s": base,
              "sweep_startup_s": startup, "sweep_standalone_startup_s": standalone_startup,
              "sweep_overhead": sweep_wall / base - 1,
              "sweep_overhead_beyond_startup": (sweep_wall - startup) / (base - standalone_startup) - 1}
    if shares:
        result["sweep_cpu_training"] = statistics.mean(x["training"] for x in shares)
        result["sweep_cpu_others"] = statistics.mean(x["others"] for x in shares)
    print(f"  sweep of {args.trials} trials {sweep_wall:6.1f} s (start-up {startup:.1f} s) vs standalone sum "
          f"{base:6.1f} s (start-up {standalone_startup:.1f} s): overhead {100 * result['sweep_overhead']:+.1f} % whole, "
          f"{100 * result['sweep_overhead_beyond_startup']:+.1f} % beyond start-up (target < 10 %)" + (
              f"; CPU while trials trained: the trainer {result['sweep_cpu_training']:.0%}, other processes "
              f"{result['sweep_cpu_others']:.0%}" if shares else ""), flush=True)
    return result


def _standalone_run(args, out: Path, name: str, extra: tuple[str, ...] | list[str] = ()) -> dict[str, float]:
    """One run in this process, timed as ``_timeline`` describes; ``extra``: more overrides."""
    cfg = build_config(args.preset, [*_overrides(args, out, name), *extra])
    start_wall, start = time.time(), time.perf_counter()
    with CpuShares() as cpu:
        Trainer(cfg, [JsonlMetrics()]).fit()
    result = {"standalone_wall_s": time.perf_counter() - start}
    result.update(_timeline("standalone", out / name / METRICS_FILE, start_wall, time.time(), cpu,
                            lambda pid, cmd: pid == os.getpid()))
    result["standalone_images_per_s"] = steady_images_per_s(out / name / METRICS_FILE)
    print(f"  standalone, {_threads(args)} thread(s): {result['standalone_wall_s']:6.1f} s "
          f"({_describe(result, 'standalone')}), {result['standalone_images_per_s']:.0f} images/s", flush=True)
    return result


def _ray_run(args, out: Path, name: str, workers: int, cpus_per_worker: int) -> dict[str, float]:
    """One Ray Train run on a local Ray started for it, as ``capi train --workers`` starts one."""
    import ray

    key = f"ray-{workers}w"
    start = time.perf_counter()
    init_local_ray(num_cpus=os.cpu_count() or 1, log_to_driver=False)  # as capi train starts one
    result = {"ray_init_s": time.perf_counter() - start}
    try:
        cfg = build_config(args.preset, [*_overrides(args, out, name), f"run.threads={cpus_per_worker}"])
        start_wall, start = time.time(), time.perf_counter()
        with CpuShares() as cpu:
            run_distributed(cfg, ScalingOptions(workers=workers, cpus_per_worker=cpus_per_worker, max_failures=0),
                            tracking=None)
        result[f"{key}_wall_s"] = time.perf_counter() - start
        result.update(_timeline(key, out / name / METRICS_FILE, start_wall, time.time(), cpu, _ray_worker))
        result[f"{key}_images_per_s"] = steady_images_per_s(out / name / METRICS_FILE)
    finally:
        ray.shutdown()
    print(f"  Ray Train, {workers} worker(s) x {cpus_per_worker} CPU: {result[f'{key}_wall_s']:6.1f} s "
          f"({_describe(result, key)}), {result[f'{key}_images_per_s']:.0f} images/s", flush=True)
    return result


def train_overhead(args, out: Path) -> dict[str, float]:
    """``args.repeats`` alternating pairs of one run standalone and the same run through Ray Train with
    1 worker of ``--threads`` CPUs (medians over the pairs), then 2 workers of half the CPUs each.

    Overhead beyond start-up compares the time from the first logged step to the end (training,
    reports, final probe and checkpoint, teardown); 1 vs 2 workers compares steady-state images/s.
    Each Ray run starts its own local Ray, so that none is running beside a standalone run.
    """
    cpus, threads = os.cpu_count() or 1, _threads(args)
    pairs = []
    for i in range(args.repeats):
        pair = {}
        for kind in ("standalone", "ray") if i % 2 == 0 else ("ray", "standalone"):
            pair.update(_standalone_run(args, out, f"standalone-{i}") if kind == "standalone"
                        else _ray_run(args, out, f"ray-1w-{i}", 1, threads))
        rest = pair["standalone_wall_s"] - pair["standalone_startup_s"]
        pair["train_overhead_beyond_startup"] = (pair["ray-1w_wall_s"] - pair["ray-1w_startup_s"]) / rest - 1
        pair["train_overhead_training_only"] = pair["ray-1w_train_s"] / pair["standalone_train_s"] - 1
        print(f"  pair {i + 1}: Ray Train {100 * pair['train_overhead_beyond_startup']:+.1f} % beyond start-up, "
              f"training alone {100 * pair['train_overhead_training_only']:+.1f} %", flush=True)
        pairs.append(pair)
    result = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    result["threads"], result["pairs"] = threads, args.repeats
    if cpus >= 2:
        two = _ray_run(args, out, "ray-2w", 2, cpus // 2)
        result.update({k: v for k, v in two.items() if k != "ray_init_s"})
        result["two_vs_one_worker"] = result["ray-2w_images_per_s"] / result["ray-1w_images_per_s"]
    spare = f"; Ray's processes have {cpus - threads} spare core(s)" if threads < cpus else ""
    print(f"  Ray Train (1 worker x {threads} CPU) vs standalone beyond start-up, median of {args.repeats}: "
          f"{100 * result['train_overhead_beyond_startup']:+.1f} % (target < 10 %), of which training alone "
          f"{100 * result['train_overhead_training_only']:+.1f} %; ray.init {result['ray_init_s']:.1f} s{spare}"
          + (f"; 2 workers vs 1: {result['two_vs_one_worker']:.2f}x images/s" if "two_vs_one_worker" in result
             else ""), flush=True)
    return result


def beside_idle_ray(args, out: Path) -> dict[str, float]:
    """The control experiment: the same standalone run alone and beside an idle local Ray holding
    ``args.idle_actors`` idle actors (about the processes of one Ray Train run), alternately
    ``args.repeats`` times. Ray's processes wake ~100 times a second each; on a small machine that
    alone slows a trainer that has no Ray in it at all."""
    import ray

    @ray.remote(num_cpus=0)
    class Idle:
        def ready(self) -> bool:
            return True

    times: dict[str, list[float]] = {"alone": [], "beside idle Ray": []}
    for i in range(args.repeats):
        for label in (("alone", "beside idle Ray") if i % 2 == 0 else ("beside idle Ray", "alone")):
            if label != "alone":
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
                actors = [Idle.remote() for _ in range(args.idle_actors)]
                ray.get([a.ready.remote() for a in actors])
            try:
                name = f"control-{i}-{label.split()[0]}"
                Trainer(build_config(args.preset, _overrides(args, out, name)), [JsonlMetrics()]).fit()
            finally:
                if label != "alone":
                    ray.shutdown()
            first, last = _log_span(out / name / METRICS_FILE)
            times[label].append(last - first)
            print(f"  standalone run {label}: training {times[label][-1]:.1f} s", flush=True)
    result = {"control_alone_train_s": statistics.median(times["alone"]),
              "control_beside_idle_ray_train_s": statistics.median(times["beside idle Ray"])}
    result["control_idle_ray_slowdown"] = result["control_beside_idle_ray_train_s"] / result["control_alone_train_s"] - 1
    print(f"  beside an idle Ray with {args.idle_actors} idle actors the same standalone run trains "
          f"{100 * result['control_idle_ray_slowdown']:+.1f} % longer (median of {args.repeats})", flush=True)
    return result


# ------------------------------------------------------------------------------ sweep efficiency
def trial_timeline(run_dir: Path, started_at: float) -> dict[str, float]:
    """One trial's start-up parts and training time (seconds) from its metrics.jsonl, its
    startup.json and the driver's start time. The first log comes ``first_log_step`` steps in, so the
    first step's end is estimated as the first log less the steps after it at the run's median step
    time (between later logs)."""
    rows = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines() if '"train/' in x]
    times = json.loads((run_dir / STARTUP_FILE).read_text())
    gaps = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(rows, rows[1:]) if b["step"] > a["step"]]
    step_s = statistics.median(gaps) if gaps else 0.0
    steps_to_first_log = times["first_log_step"] - times.get("start_step", 0)
    first_step_end = times["first_log"] - (steps_to_first_log - 1) * step_s
    return {"process_s": times["entered"] - started_at, "build_s": times["built"] - times["entered"],
            "data_s": times["data_open"] - times["built"], "first_step_s": first_step_end - times["data_open"],
            "startup_s": first_step_end - started_at,
            "train_s": rows[-1]["time"] - (first_step_end - step_s), "steps": rows[-1]["step"], "end": rows[-1]["time"]}


def sweep_efficiency(directory: Path, wall_s: float, concurrency: int) -> dict[str, float]:
    """The efficiency of a finished sweep in ``directory`` and its trials' median start-up parts."""
    notes = json.loads((directory / NOTES_FILE).read_text())
    trials = {}
    for trial_id, note in notes.items():
        run_dirs = [d for d in (directory / TRIALS_DIR).glob(f"*{trial_id}*") if (d / STARTUP_FILE).exists()]
        if run_dirs and "started_at" in note:
            trials[trial_id] = trial_timeline(run_dirs[0], note["started_at"])
    train = sum(t["train_s"] for t in trials.values())
    out = {"trials": len(trials), "wall_s": wall_s, "concurrency": concurrency, "train_sum_s": train,
           "efficiency": train / (wall_s * concurrency)}
    for part in ("startup_s", "process_s", "build_s", "data_s", "first_step_s"):
        out[f"median_{part}"] = statistics.median(t[part] for t in trials.values())
    out["max_startup_s"] = max(t["startup_s"] for t in trials.values())
    out["max_process_s"] = max(t["process_s"] for t in trials.values())
    out["last_log"] = max(t["end"] for t in trials.values())
    out["trial_steps"] = {k: t["steps"] for k, t in trials.items()}
    return out


def _cpu(sampled: tuple[CpuShares, float], result: dict) -> dict[str, float]:
    """The machine's CPU from the sweep's start to its last trial's last log (Ray's processes are gone
    once the sweep returns), in cores: the training processes' and the rest's."""
    cpu, start = sampled
    shares = cpu.shares(start, result["last_log"], _trial_process) or {}
    cores = os.cpu_count() or 1
    return {f"cpu_cores_{k}": v * cores for k, v in shares.items()}


def _describe_efficiency(label: str, r: dict) -> str:
    cpu = (f"; CPU over the sweep: training {r['cpu_cores_training']:.2f} cores, everything else "
           f"{r['cpu_cores_others']:.2f}") if "cpu_cores_training" in r else ""
    return (f"  {label}: {r['trials']} trials in {r['wall_s']:.0f} s at concurrency {r['concurrency']}, training "
            f"{r['train_sum_s']:.0f} s: efficiency {r['efficiency']:.0%}; a trial's start-up (median) "
            f"{r['median_startup_s']:.1f} s = process {r['median_process_s']:.1f} + MLflow run and Trainer "
            f"{r['median_build_s']:.1f} "
            f"+ data {r['median_data_s']:.1f} + first step {r['median_first_step_s']:.1f}; the longest "
            f"{r['max_startup_s']:.1f} s (process {r['max_process_s']:.1f})" + cpu)


def _run_sweep_file(doc: dict, out: Path, launcher: str) -> tuple[Path, float, int]:
    """Run the sweep ``doc`` (a parsed sweep file) into ``out``; its directory, wall time, concurrency."""
    from orchestrator.sweep.spec import load_sweep
    from orchestrator.sweep.tune import run_sweep

    doc = {**doc, "storage": str(out / "sweeps"), "mlflow": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"},
           "resources": {**doc.get("resources", {}), "launcher": launcher}}
    file = out / f"{doc['name']}.yaml"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(doc))  # JSON is YAML
    spec = load_sweep(file)
    start, start_wall = time.perf_counter(), time.time()
    with CpuShares() as cpu:
        outcome = run_sweep(spec, file)
    wall = time.perf_counter() - start
    bad = [(t.trial_id, t.status) for t in outcome.trials if t.status not in ("TERMINATED", "STOPPED")]
    if bad:
        raise RuntimeError(f"trials did not finish: {bad}")
    return outcome.path, wall, spec.budget.max_concurrent_trials or 1, (cpu, start_wall)


def _trial_process(pid: int, cmd: str) -> bool:
    """A process that trains: a Tune function trial's actor (in-trial; Ray titles it ``ray::IDLE``
    between Tune's calls while its training thread runs) or a Ray Train worker."""
    return cmd.startswith(("ray::ImplicitFunc", "ray::IDLE", "ray::RayTrainWorker"))


def asha_sweep(args) -> dict:
    """16 short trials (random lr and teacher temperature), ASHA from the first probe on."""
    import yaml

    base = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())["base"]
    base["overrides"].update({"optim.steps": args.asha_steps, "probe.every": args.asha_steps // 3,
                              "probe.train_images": 5000, "probe.test_images": 5000})
    return {"name": "asha16", "base": base,
            "search_space": {"optim.lr": {"loguniform": [5e-4, 5e-3]}, "loss.teacher_temp": {"uniform": [0.04, 0.12]}},
            "search": {"algorithm": "random", "metric": "probe/knn_gain", "mode": "max", "seed": 0},
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "budget": {"num_samples": 16, "max_concurrent_trials": 2},
            "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}}


def standalone_lanes(doc: dict, directory: Path, steps: dict[str, int], out: Path, lanes: int) -> float:
    """The sweep's trials as ``capi train`` commands, each for the steps it trained in the sweep, run
    back to back in ``lanes`` parallel lanes (in the sweep's trial order); their wall time."""
    overrides = [f"{k}={v}" for k, v in doc["base"]["overrides"].items()]
    commands = []
    for trial_dir in sorted(directory.glob("trial_*")):
        trial_id = trial_dir.name.removeprefix("trial_")
        if trial_id not in steps:
            continue
        params = json.loads((trial_dir / "params.json").read_text())
        commands.append([str(Path(sys.executable).with_name("capi")), "train", "--preset", doc["base"]["preset"],
                         "--tracking-uri", f"sqlite:///{out / 'standalone.db'}", "--experiment", "standalone",
                         *overrides, *(f"{k}={v}" for k, v in params.items()), f"optim.steps={steps[trial_id]}",
                         f"run.output_dir={out / 'standalone'}", f"run.name=t-{trial_id}"])
    # The MLflow database is created here, once: two first runs creating it at once collide in its
    # migrations (sqlite), and the sweep's trials did not pay for creating theirs either.
    from orchestrator.tracking import mlflow_client
    mlflow_client(f"sqlite:///{out / 'standalone.db'}").search_experiments()
    start = time.perf_counter()
    with ThreadPoolExecutor(lanes) as pool:
        for done in pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), commands):
            if done.returncode:
                raise RuntimeError(f"standalone run failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def efficiency(args, out: Path) -> dict:
    """The quickstart's and/or the 16-trial ASHA sweep's efficiency (see the module's docstring)."""
    import yaml

    results = {}
    if args.efficiency in ("quickstart", "both"):
        doc = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
        directory, wall, lanes, shares = _run_sweep_file(doc, out / "quickstart", args.launcher)
        r = sweep_efficiency(directory, wall, lanes)
        results["quickstart"] = {**r, **_cpu(shares, r)}
        print(_describe_efficiency(f"quickstart ({args.launcher})", results["quickstart"]), flush=True)
    if args.efficiency in ("asha", "both"):
        doc = asha_sweep(args)
        directory, wall, lanes, shares = _run_sweep_file(doc, out / "asha", args.launcher)
        r = sweep_efficiency(directory, wall, lanes)
        r.update(_cpu(shares, r))
        print(_describe_efficiency(f"16-trial ASHA sweep ({args.launcher})", r), flush=True)
        r["standalone_wall_s"] = standalone_lanes(doc, directory, r["trial_steps"], out / "asha", lanes)
        r["wall_vs_standalone"] = wall / r["standalone_wall_s"]
        results["asha"] = r
        print(f"  the same trials standalone, {lanes} lanes back to back: {r['standalone_wall_s']:.0f} s; the sweep "
              f"took {r['wall_vs_standalone']:.2f}x (target <= 1.25x)", flush=True)
    return results


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-demo")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--trials", type=int, default=2, help="trials in the sweep (run one at a time)")
    ap.add_argument("--trial-steps", type=int, default=400,
                    help="optimiser steps per trial; 400 at batch 64 is ~2.5 min of cpu-demo on 2 cores")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-train", action="store_true", help="skip the single-run and 1-vs-2-worker part")
    ap.add_argument("--control", action="store_true",
                    help="also run the standalone trainer alone and beside an idle Ray (see beside_idle_ray)")
    ap.add_argument("--idle-actors", type=int, default=12, help="idle actors of the --control Ray")
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternating standalone / Ray pairs of the single-run part and of --control")
    ap.add_argument("--efficiency", choices=["quickstart", "asha", "both"],
                    help="measure sweep efficiency and trial start-up instead (see the docstring)")
    ap.add_argument("--launcher", default="auto", choices=["auto", "ray_train"],
                    help="the sweeps' resources.launcher for --efficiency (ray_train: the path before in-trial)")
    ap.add_argument("--asha-steps", type=int, default=300, help="steps of a full trial of the ASHA sweep")
    ap.add_argument("--threads", type=int, default=0,
                    help="the trainer's torch threads (default: every CPU); fewer leave Ray's own processes "
                         "a spare core, which shows what Ray costs when it does not compete with the trainer")
    return ap


def measure(args) -> dict[str, float]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    resolve_dataset(args.dataset)  # a built-in is imported on first use: not part of any timing
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    print(f"ray overhead: preset {args.preset}, batch {args.batch}, "
          + (f"{args.trial_steps} steps per run, " if not args.efficiency else "")
          + f"{cpus} CPUs, load average {load:.1f}" + ("  (busy machine: figures are noisy)" if load > cpus / 2 else ""),
          flush=True)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="capi-ray-overhead-") as tmp:
        if args.efficiency:
            return efficiency(args, Path(tmp))
        if not args.skip_sweep:
            results.update(sweep_overhead(args, Path(tmp) / "sweep"))
        if not args.skip_train:
            results.update(train_overhead(args, Path(tmp) / "train"))
        if args.control:
            results.update(beside_idle_ray(args, Path(tmp) / "control"))
    return results


if __name__ == "__main__":
    print(json.dumps(measure(parser().parse_args()), indent=1))
