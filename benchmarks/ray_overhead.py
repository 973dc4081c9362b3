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

* **control** (``--control``): the standalone run alone against the same run beside an idle
  local Ray with a dozen idle actors, alternately. It separates what Ray's mere presence costs a
  small machine from what running inside a Ray Train worker costs.

    python benchmarks/ray_overhead.py                       # ~17 minutes on 2 cores
    python benchmarks/ray_overhead.py --trial-steps 40      # a quick look (~4 minutes)
    python benchmarks/ray_overhead.py --skip-sweep --threads 1 --repeats 3   # Ray with a spare core
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from capi_core.config import build_config
from capi_core.data import resolve_dataset
from capi_core.train import JsonlMetrics, Trainer
from orchestrator.train import METRICS_FILE, ScalingOptions, init_local_ray, run_distributed


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
        used = {k: v - a.get(k, 0.0) for k, v in b.items()}
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
    ap.add_argument("--threads", type=int, default=0,
                    help="the trainer's torch threads (default: every CPU); fewer leave Ray's own processes "
                         "a spare core, which shows what Ray costs when it does not compete with the trainer")
    return ap


def measure(args) -> dict[str, float]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    resolve_dataset(args.dataset)  # a built-in is imported on first use: not part of any timing
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    print(f"ray overhead: preset {args.preset}, batch {args.batch}, {args.trial_steps} steps per run, "
          f"{cpus} CPUs, load average {load:.1f}" + ("  (busy machine: figures are noisy)" if load > cpus / 2 else ""),
          flush=True)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="capi-ray-overhead-") as tmp:
        if not args.skip_sweep:
            results.update(sweep_overhead(args, Path(tmp) / "sweep"))
        if not args.skip_train:
            results.update(train_overhead(args, Path(tmp) / "train"))
        if args.control:
            results.update(beside_idle_ray(args, Path(tmp) / "control"))
    return results


if __name__ == "__main__":
    print(json.dumps(measure(parser().parse_args()), indent=1))
