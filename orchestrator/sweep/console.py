"""What a sweep shows on the console: a plain line per trial event, with the sweep's progress, ETA
and best trial so far (``SweepConsole``, fed by the driver's Tune callback), and the short names
under which trials and their values appear there and in the final table.

Nothing here imports Ray, MLflow or torch: ``capi sweep status`` formats its table with it, fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click


def short_names(paths: list[str]) -> dict[str, str]:
    """Each dotted field by its last part (``model.registers`` -> ``registers``), unless two fields
    share it: then by the full path. Short names keep a trial's values on one console line."""
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: (tail if last.count(tail) == 1 else p) for p, tail in zip(paths, last)}


def show_value(value: Any) -> str:
    """A swept value as a person reads it: floats to 4 significant digits, the rest as written."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe_values(values: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """``registers=4 ema_final=0.994``."""
    names = names or short_names(list(values))
    return " ".join(f"{names.get(k, k)}={show_value(v)}" for k, v in values.items())


def clock(seconds: float) -> str:
    """``1:05:09`` / ``4:02``: elapsed and remaining times on the sweep console."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def stop_reason(probes: int, reports: int, elapsed_s: float, time_limit_s: float | None, scheduler: str,
                reduction_factor: float = 2.0) -> str:
    """Why a trial ended before its last probe: the sweep's time budget, or the scheduler's rung.

    Tune stops every running trial once ``time_limit_s`` is spent, so a trial that ends early at
    that moment was stopped by the budget; otherwise only the scheduler stops trials. ASHA stops a
    trial at a rung (a probe count) when it is not in the top 1/reduction_factor of the trials
    that reached that rung (Li et al., "A System for Massively Parallel Hyperparameter Tuning", 2020).
    """
    if time_limit_s and elapsed_s >= 0.99 * time_limit_s:
        return f"time budget of {time_limit_s:g} s spent, at probe {probes}/{reports}"
    if scheduler == "asha":
        return (f"ASHA rung at probe {probes}/{reports}: not in the top 1/{reduction_factor:g} of the trials "
                f"there")
    if scheduler == "pbt":
        return f"PBT stopped it at probe {probes}/{reports}"
    return f"stopped at probe {probes}/{reports}"


@dataclass
class TrialView:
    """One trial as the sweep console knows it."""

    number: int  # 1-based: the trial's place in the sweep, stable across resumes
    values: dict[str, Any]
    state: str = "running"  # running, done, stopped, failed
    probes: int = 0
    best: float | None = None
    steps: int = 0  # training steps of the whole trial (0: not known)
    step: int = 0  # the last step it is known to have reached


@dataclass
class SweepConsole:
    """The live view of a sweep: one plain line per trial event (start, probe, end), each with the
    elapsed time, and after every end how many trials are done, the ETA and the best so far with its
    values. Plain lines read the same in a terminal, a log file and a CI page; ``echo`` drops colour
    where the output is no terminal.

    While trials run, a line every ``heartbeat_s`` says which step each has reached (read from the
    trials' own metric files by the caller): a trial probed only at its end is otherwise silent for
    its whole run.

    The ETA assumes the remaining training steps go at the pace of the steps so far (with as many
    trials at once); where steps are not known, the remaining probes at the pace of the probes so far.
    It is an upper bound where a scheduler stops trials early. Counting steps rather than probes
    matters for a sweep probed once per trial: after the first of two concurrent trials ends, the
    other is nearly done too, and the quickstart counted it as not begun ("ETA 14:51" for 5 minutes).
    """

    total: int  # trials in the sweep
    reports: int  # probe evaluations of a full trial
    metric: str
    mode: str
    echo: Callable[[str], None] = click.echo
    now: Callable[[], float] = time.monotonic
    steps: int = 0  # training steps of a trial when its values do not say (0: not known)
    heartbeat_s: float = 60.0
    trials: dict[str, TrialView] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # field -> short name

    def __post_init__(self) -> None:
        self.start = self.last_said = self.now()

    # ------------------------------------------------------------------------------ events
    def started(self, trial_id: str, number: int, values: dict[str, Any], steps: int | None = None) -> None:
        """A trial's (re)start; ``steps``: its training steps where the sweep varies them."""
        if not self.names:
            self.names = short_names(list(values))
        known = self.trials.get(trial_id)
        self.trials[trial_id] = TrialView(number, dict(values), probes=known.probes if known else 0,
                                          best=known.best if known else None, steps=steps or self.steps,
                                          step=known.step if known else 0)
        self._say(f"{self._label(trial_id)} started: {describe_values(values, self.names)}")

    def result(self, trial_id: str, probes: int, step: int | None, value: float | None) -> None:
        trial = self._trial(trial_id)
        trial.probes = max(trial.probes, probes)
        trial.step = max(trial.step, step or 0)
        if isinstance(value, (int, float)) and (trial.best is None or self._better(value, trial.best)):
            trial.best = float(value)
        shown = "n/a" if value is None else f"{value:.4g}"
        self._say(f"{self._label(trial_id)} probe {probes}/{self.reports} at step {step}: {self.metric} {shown}")

    def ended(self, trial_id: str, stopped: str | None = None) -> None:
        """A trial's end: done (all probes) or ``stopped`` early, with the reason."""
        trial = self._trial(trial_id)
        trial.state = "stopped" if stopped else "done"
        if not stopped:
            trial.step = max(trial.step, trial.steps)
        best = "" if trial.best is None else f", best {self.metric} {trial.best:.4g}"
        self._say(f"{self._label(trial_id)} " + (f"stopped early ({stopped}){best}" if stopped else f"done{best}"))
        self._summary()

    def failed(self, trial_id: str, error: str) -> None:
        self._trial(trial_id).state = "failed"
        self._say(f"{self._label(trial_id)} failed: {error}")
        self._summary()

    def steps_reached(self, steps: dict[str, int | None]) -> None:
        """What the running trials' metric files say: the step each has logged (``None``: unknown)."""
        for trial_id, step in steps.items():
            if step is not None and trial_id in self.trials:
                self.trials[trial_id].step = max(self.trials[trial_id].step, step)

    def running(self) -> list[str]:
        """Ids of the trials running now, by their number."""
        return sorted((i for i, t in self.trials.items() if t.state == "running"),
                      key=lambda i: self.trials[i].number)

    def heartbeat_due(self) -> bool:
        """Whether a trial is running and the console has been silent for ``heartbeat_s``."""
        return bool(self.running()) and self.now() - self.last_said >= self.heartbeat_s

    def heartbeat(self, steps: dict[str, int | None]) -> None:
        """``running: trial 1/4 at step 800/2000, trial 2/4 at step 760/2000; ETA 5:10``."""
        self.steps_reached(steps)
        shown = []
        for trial_id in self.running():
            trial = self.trials[trial_id]
            if trial.step:
                of = f"/{trial.steps}" if trial.steps else ""
                # At its last step a trial runs its final probe and diagnostics (~1 minute on one core).
                end = " (final probe)" if trial.steps and trial.step >= trial.steps else ""
                shown.append(f"{self._label(trial_id)} at step {trial.step}{of}{end}")
            else:
                shown.append(f"{self._label(trial_id)} starting")
        line = "running: " + ", ".join(shown)
        eta = self.eta_s()
        if eta is not None:
            line += f"; ETA {clock(eta)}"
        self._say(line)

    # ----------------------------------------------------------------------------- figures
    def best(self) -> TrialView | None:
        scored = [t for t in self.trials.values() if t.best is not None]
        if not scored:
            return None
        return (max if self.mode == "max" else min)(scored, key=lambda t: t.best)

    def eta_s(self) -> float | None:
        """Seconds left at the pace so far: steps (or, where a trial's steps are not known, probes)
        still to run over those run per second."""
        elapsed = self.now() - self.start
        views = list(self.trials.values())
        if self.steps and all(t.steps for t in views):
            done = sum(t.step for t in views)
            if not done:
                return None
            left = sum(max(0, t.steps - t.step) for t in views if t.state == "running")
            left += (self.total - len(views)) * self.steps
            return left * elapsed / done
        done = sum(t.probes for t in views)
        if not done:
            return None
        left = sum(self.reports - t.probes for t in views if t.state == "running")
        left += (self.total - len(views)) * self.reports
        return left * elapsed / done

    def summary_line(self) -> str:
        states = [t.state for t in self.trials.values()]
        ended = sum(s != "running" for s in states)
        parts = [f"{ended}/{self.total} trials ended"]
        details = [f"{states.count(s)} {s}" for s in ("stopped", "failed") if states.count(s)]
        if details:
            parts[0] += f" ({', '.join(details)})"
        if states.count("running"):
            parts.append(f"{states.count('running')} running")
        eta = self.eta_s()
        if eta is not None and ended < self.total:
            parts.append(f"ETA {clock(eta)}")
        line = ", ".join(parts)
        best = self.best()
        if best is not None:
            line += (f"; best so far: trial {best.number} ({describe_values(best.values, self.names)}) "
                     f"{self.metric} {best.best:.4g}")
        return line

    # ---------------------------------------------------------------------------- internals
    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def _trial(self, trial_id: str) -> TrialView:
        if trial_id not in self.trials:  # an event of a trial restored before this console saw it start
            self.trials[trial_id] = TrialView(len(self.trials) + 1, {}, steps=self.steps)
        return self.trials[trial_id]

    def _label(self, trial_id: str) -> str:
        return f"trial {self._trial(trial_id).number}/{self.total}"

    def _summary(self) -> None:
        self._say(self.summary_line())

    def _say(self, text: str) -> None:
        self.last_said = self.now()
        self.echo(f"[{clock(self.last_said - self.start)}] {text}")
