"""A sweep's storage: the layout of its directory, the state kept beside Tune's, and what the
trials' result files say. Nothing here imports Ray or MLflow: ``capi sweep status`` and the report
read a sweep from these files alone.

Layout of ``<storage>/<name>/`` (the Tune experiment directory):

* Tune's own state (``experiment_state-*.json``, ``tuner.pkl``, a directory per trial with
  ``result.json``), which ``capi sweep resume`` restores;
* ``capi_sweep.json``: the MLflow store, experiment and parent run id, so a resume reuses them;
* ``sweep.json`` (the validated sweep, local paths made absolute) and ``sweep.yaml`` (as written);
* ``capi_trials.json``: what the driver learns about each trial that Tune's files do not say: its
  number in the sweep (1, 2, ... in the order Tune created the trials; Tune's ids are hashes under
  some searchers) and why it was stopped early (the scheduler's rung or the time budget);
* ``trials/<name>-<trial id>/``: each trial's Ray Train run (checkpoints, metrics.jsonl). The name is
  stable per trial, so a restarted trial resumes from its latest checkpoint instead of starting over;
  a trial that finished before an interruption reports its last checkpoint's metrics and trains no more.

Limits: storage must be a local or shared filesystem every node sees. Nothing here imports torch
either: ``capi sweep status`` answers in about a second.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capi_core.atomic import atomic_write_text
from capi_core.checkpoint_dirs import METRICS_FILE, STATE, latest_checkpoint
from capi_core.config import TrainConfig
from capi_core.data import DatasetError, resolve_dataset
from capi_core.errors import CapiError
from capi_core.eval.noise import ProbeNoise, probe_noise, trials_are_paired
from orchestrator.sweep.spec import SweepSpec

PROBE_EVALS = "probe_evals"  # Tune time attribute: probe evaluations so far (scheduler units)
STATE_FILE = "capi_sweep.json"
SPEC_FILE = "sweep.json"
YAML_FILE = "sweep.yaml"
TRIALS_DIR = "trials"
NOTES_FILE = "capi_trials.json"
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")  # Tune statuses that `capi sweep resume` continues


class SweepError(CapiError, RuntimeError):
    """A sweep cannot start, resume or finish; the message says why and what to do."""


@dataclass
class SweepState:
    """What a sweep keeps next to Tune's state so that a resume tracks into the same MLflow runs."""

    name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    # MLflow's source tags of the driver's command (command line, user, git commit), for the trials'
    # runs: in a Ray worker the command line is Ray's.
    source: dict[str, str] = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / STATE_FILE, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: Path) -> SweepState:
        path = Path(directory) / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise SweepError(f"{directory} holds no sweep started by capi ({STATE_FILE} is missing)") from None
        except (OSError, ValueError, TypeError) as err:
            raise SweepError(f"{path} is unreadable: {err}") from None


@dataclass
class TrialRow:
    """One trial as the sweep's table shows it."""

    trial_id: str
    status: str  # PENDING, RUNNING, TERMINATED, ERROR (Tune's), or "STOPPED" (by the scheduler)
    params: dict[str, Any]
    metric: float | None  # the best value of search.metric over the trial's reports
    last: float | None  # the last reported value
    probe_evals: int  # reports seen
    step: int | None  # training step of the last report
    error: str | None = None
    gain: float | None = None  # probe/knn_gain (points over random init) in the report with the best metric
    random_init: float | None = None  # probe/knn_random_init: the same network untrained, same probe set
    number: int | None = None  # the trial's place in the sweep, 1-based (``capi_trials.json``)
    stop_reason: str | None = None  # why a STOPPED trial was stopped (scheduler rung, time budget)

    @property
    def label(self) -> str:
        """How tables name the trial: its number, else (not yet numbered) its Tune id."""
        return str(self.number) if self.number is not None else self.trial_id


@dataclass
class SweepOutcome:
    name: str
    path: Path
    state: SweepState
    metric: str
    mode: str
    trials: list[TrialRow] = field(default_factory=list)
    noise: str | None = None  # which probe set, and the difference below which scores are noise
    noise_threshold: float | None = None  # that difference, in k-NN points

    @property
    def best(self) -> TrialRow | None:
        return best_trial(self.trials, self.mode)

    @property
    def unfinished(self) -> list[TrialRow]:
        """Trials an interruption (Ctrl-C) or the time budget left pending, running or paused."""
        return [r for r in self.trials if r.status in UNFINISHED]


def best_trial(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.metric is not None and math.isfinite(r.metric)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.metric)


# Metrics in k-NN points, the unit the probe's measured noise is in.
POINT_METRICS = ("probe/knn_gain", "probe/knn_top1")


def told_apart(rows: list[TrialRow], mode: str, metric: str, threshold: float | None
               ) -> tuple[list[TrialRow], list[TrialRow]] | None:
    """The scored trials other than the best, split into those the best leads by more than ``threshold``
    and those within it; None where the metric is not in k-NN points or no threshold is known."""
    best = best_trial(rows, mode)
    if best is None or threshold is None or metric not in POINT_METRICS:
        return None
    others = [r for r in rows if r is not best and r.metric is not None and math.isfinite(r.metric)]
    apart = [r for r in others if abs(best.metric - r.metric) > threshold]
    return apart, [r for r in others if r not in apart]


def sweep_dir(storage: str | Path, name: str) -> Path:
    return Path(storage).expanduser().resolve() / name


def trial_dirname(trial) -> str:
    """Tune's directory of a trial in the sweep directory, ``trial_<trial id>`` (``trial_rows`` finds a
    trial that Tune has not yet recorded by this name)."""
    return f"trial_{trial.trial_id}"


def trial_run_name(sweep: str, trial_id: str) -> str:
    """The Train run of a trial, ``<sweep>-<trial id>`` under ``trials/``: stable across the trial's
    restarts, so a restart resumes its run."""
    return f"{sweep}-{trial_id}"


def logged_step(directory: Path, sweep: str, trial_id: str) -> int | None:
    """The last step a trial's run logged to its ``metrics.jsonl`` (``None`` before its first line, or
    where its files are not on this machine). Only the file's tail is read: a long run's file is
    thousands of lines, and the sweep console asks every minute. A PBT trial that continued a donor's
    run writes under a longer name; its newest file wins."""
    files = list((directory / TRIALS_DIR).glob(f"{trial_run_name(sweep, trial_id)}*/{METRICS_FILE}"))
    if not files:
        return None
    path = max(files, key=lambda p: p.stat().st_mtime)
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):  # the last whole line: the writer may be half-way through one
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def save_sweep_run(directory: Path, spec: SweepSpec, state: SweepState, source: Path | None) -> None:
    """Write what ``load_sweep_run`` reads back: the validated spec, the sweep file as written
    (``source``, if any) and the MLflow state. The state goes last: it marks a saved sweep (`capi sweep
    run` refuses to start over one, `capi sweep resume` needs one), so a process killed in between
    leaves a directory that the same `capi sweep run` starts again, never a state without its spec."""
    atomic_write_text(directory / SPEC_FILE, spec.model_dump_json(indent=1))
    if source is not None:
        shutil.copyfile(source, directory / YAML_FILE)
    state.save(directory)


def list_sweeps(storage: str | Path) -> list[str]:
    """Names of the sweeps capi started under ``storage`` (directories with a ``capi_sweep.json``)."""
    root = Path(storage)
    return sorted(p.parent.name for p in root.glob(f"*/{STATE_FILE}")) if root.is_dir() else []


def load_sweep_run(storage: str | Path, name: str) -> tuple[SweepSpec, SweepState, Path]:
    """The spec and MLflow state a sweep directory holds (written by ``save_sweep_run``)."""
    directory = sweep_dir(storage, name)
    if not directory.is_dir():
        known = list_sweeps(directory.parent)
        raise SweepError(f"no sweep {name!r} in {directory.parent}; "
                         + (f"sweeps there: {', '.join(known)}" if known else "it holds no sweep")
                         + " (--storage names another directory)")
    state = SweepState.load(directory)
    try:
        spec = SweepSpec.model_validate_json((directory / SPEC_FILE).read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"{directory / SPEC_FILE} is unreadable: {err}") from None
    return spec, state, directory


def load_trial_notes(directory: Path) -> dict[str, dict[str, Any]]:
    """trial id -> {"number": k, "stopped": reason, "started_at": Unix seconds}, as the driver recorded
    them (empty if none yet)."""
    notes = _read_json(Path(directory) / NOTES_FILE)
    return notes if isinstance(notes, dict) else {}


def save_trial_notes(directory: Path, notes: dict[str, dict[str, Any]]) -> None:
    atomic_write_text(Path(directory) / NOTES_FILE, json.dumps(notes, indent=1))


def number_trials(notes: dict[str, dict[str, Any]], trial_ids: list[str]) -> bool:
    """Give every trial in ``trial_ids`` (Tune's creation order) without a number the next one;
    True if any was added. Numbers never change, so a resumed sweep keeps its trials' names."""
    taken = max((n.get("number", 0) for n in notes.values()), default=0)
    added = False
    for trial_id in trial_ids:
        if "number" not in notes.get(trial_id, {}):
            taken += 1
            notes.setdefault(trial_id, {})["number"] = taken
            added = True
    return added


def final_metrics(run_dir: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The metrics saved in a finished run's last checkpoint (with its step), or None if unfinished."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return None
    try:
        state = json.loads((found / STATE).read_text())
    except (OSError, ValueError):
        return None
    if int(state.get("step", 0)) < config.optim.steps:
        return None
    return {"step": int(state["step"]), **state.get("metrics", {})}


def sweep_noise(spec: SweepSpec) -> ProbeNoise | None:
    """The noise of the sweep's probe set for its trials' comparisons; None if the dataset cannot be
    read here."""
    cfg = spec.base_config
    try:
        return probe_noise(resolve_dataset(cfg.data.dataset, cfg.data.cache_dir), cfg.model.img_size,
                           cfg.probe, paired=trials_are_paired(spec.search_space))
    except (DatasetError, OSError):
        return None


def noise_note(spec: SweepSpec) -> str | None:
    """Which probe set the trials were scored on and the difference below which their scores are
    noise, for the table's footer and the parent run; None if the dataset cannot be read here."""
    noise = sweep_noise(spec)
    return None if noise is None else noise.sentence()


def trial_rows(directory: Path, spec: SweepSpec) -> list[TrialRow]:
    """Every trial of a sweep directory, read from Tune's JSON files (nothing is unpickled)."""
    directory = Path(directory)
    states = _trial_states(directory)
    trial_dirs = {trial_id: directory / logdir for trial_id, (_, logdir) in states.items()}
    claimed = set(trial_dirs.values())
    # Trials Tune has not yet written to its state file (a sweep just starting): found by directory name.
    for trial_dir in sorted(p for p in directory.glob("trial_*") if p.is_dir()):
        trial_id = trial_dir.name.removeprefix("trial_")
        if trial_id not in trial_dirs and trial_dir not in claimed:
            trial_dirs[trial_id] = trial_dir
    notes = load_trial_notes(directory)
    rows = []
    for trial_id, trial_dir in sorted(trial_dirs.items()):
        params = _read_json(trial_dir / "params.json") or {}
        results = _read_results(trial_dir / "result.json")
        scored = [r for r in results if isinstance(r.get(spec.search.metric), (int, float))]
        values = [r[spec.search.metric] for r in scored]
        pick = max if spec.search.mode == "max" else min
        best_result = pick(scored, key=lambda r: r[spec.search.metric]) if scored else {}
        status = states[trial_id][0] if trial_id in states else "PENDING" if not results else "TERMINATED"
        evals = int(results[-1].get(PROBE_EVALS, 0)) if results else 0
        if status == "TERMINATED" and evals < spec.reports_per_trial():
            status = "STOPPED"
        error = (trial_dir / "error.txt").read_text().strip().splitlines()[-1:] if (trial_dir / "error.txt").exists() \
            else None
        step = results[-1].get("step") if results else None
        if status == "RUNNING":  # between its probes a trial reports nothing to Tune; its own log says more
            logged = logged_step(directory, spec.name, trial_id)
            step = max(step or 0, logged) if logged is not None else step
        rows.append(TrialRow(trial_id=trial_id, status=status,
                             params={k: params[k] for k in spec.search_space if k in params},
                             metric=pick(values) if values else None, last=values[-1] if values else None,
                             probe_evals=evals, step=step,
                             error=error[0] if error else None, gain=best_result.get("probe/knn_gain"),
                             random_init=best_result.get("probe/knn_random_init"),
                             number=notes.get(trial_id, {}).get("number"),
                             stop_reason=notes.get(trial_id, {}).get("stopped") if status == "STOPPED" else None))
    # By number, as the console named them; trials not numbered yet last, by id.
    return sorted(rows, key=lambda r: (r.number is None, r.number or 0, r.trial_id))


def _trial_states(directory: Path) -> dict[str, tuple[str, str]]:
    """trial id -> (Tune status, trial directory relative to the sweep) from the newest experiment state.

    Newest by the session timestamp in the file name, not by mtime: Tune's final sync rewrites every
    session's file, so an older session's stale file can be the last one touched. The directory comes
    from the state because a restored trial may log into a new one (``trial_<id>_<suffix>``).
    """
    states = sorted(directory.glob("experiment_state-*.json"), key=lambda p: p.name)
    if not states:
        return {}
    data = _read_json(states[-1]) or {}
    out = {}
    for item in data.get("trial_data", []):
        trial = item[0] if isinstance(item, list) else item
        if isinstance(trial, str):
            trial = json.loads(trial)
        if isinstance(trial, dict) and "trial_id" in trial:
            logdir = trial.get("relative_logdir") or f"trial_{trial['trial_id']}"
            out[trial["trial_id"]] = (trial.get("status", "UNKNOWN"), logdir)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_results(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return out
