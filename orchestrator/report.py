"""A sweep's report: an HTML page with PNG plots and a table of every trial, logged to the parent run.

The page is self-contained: its PNGs are embedded as data URIs (MLflow's artifact viewer shows
index.html alone, so relative image links would break there); the PNG files are kept beside it.

Plots: the sweep metric against each swept parameter; a parallel-coordinates view of every trial's
values and metric; each trial's k-NN over the same network at random init; learning curves of every trial (from MLflow's
metric history, else the trial's metrics.jsonl); register count against the fraction of high-norm
patch tokens of each trial's final EMA teacher (``capi_core.eval.diagnostics.run_diagnostics`` on a
few held-out images; a trial without a checkpoint is listed as such).
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capi_core.checkpoint import CheckpointError, latest_checkpoint, load_encoder
from capi_core.checkpoint_dirs import METRICS_FILE
from capi_core.data import resolve_dataset
from capi_core.data.format import load_manifest
from capi_core.data.reader import load_split
from capi_core.eval.diagnostics import run_diagnostics
from capi_core.eval.pictures import pyplot
from orchestrator.sweep.spec import SweepSpec
from orchestrator.sweep.storage import (TRIALS_DIR, SweepState, TrialRow, best_trial, load_sweep_run, sweep_noise,
                                        told_apart, trial_rows, trial_run_name)
from orchestrator.tracking import CHECKPOINT_TAG, TRIAL_TAG, child_runs, mlflow_client, safe_uri

CURVE_METRICS = ("train/capi_loss",)  # plotted next to the sweep metric
INDEX = "index.html"


@dataclass
class TrialReport:
    row: TrialRow
    run_id: str | None = None
    checkpoint: str | None = None
    registers: int | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    high_norm: float | None = None  # fraction of patch tokens above the detector's threshold
    images_with_outlier: float | None = None
    note: str = ""


def build_report(storage: str | Path, name: str, out: Path | None = None, images: int = 64,
                 log: bool = True) -> Path:
    """Write ``out`` (default ``<sweep dir>/report``) with index.html and PNGs; log it to the parent run."""
    spec, state, directory = load_sweep_run(storage, name)
    out = Path(out) if out else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    trials = collect(spec, state, directory)
    _diagnose(spec, trials, images)
    pictures = plot_metric_vs_params(spec, trials, out) + [plot_parallel(spec, trials, out), plot_gain(trials, out),
                                                          plot_curves(spec, trials, out), plot_registers(trials, out)]
    (out / INDEX).write_text(render(spec, state, trials, [p for p in pictures if p]))
    if log:
        mlflow_client(state.tracking_uri).log_artifacts(state.parent_run_id, str(out), "report")
    return out / INDEX


# ------------------------------------------------------------------------------------- gathering
def collect(spec: SweepSpec, state: SweepState, directory: Path) -> list[TrialReport]:
    """Every trial with its MLflow run, checkpoint, register count and learning curves."""
    client = mlflow_client(state.tracking_uri)
    try:
        runs = {r.data.tags.get(TRIAL_TAG): r for r in child_runs(state.tracking_uri, state.parent_run_id)}
    except Exception:  # noqa: BLE001 - the store is gone: report from storage alone
        runs = {}
    trials = []
    for row in trial_rows(directory, spec):
        t = TrialReport(row)
        run = runs.get(row.trial_id)
        run_dir = directory / TRIALS_DIR / trial_run_name(spec.name, row.trial_id)
        if run is not None:
            t.run_id = run.info.run_id
            t.checkpoint = run.data.tags.get(CHECKPOINT_TAG)
            for key in (spec.search.metric, *CURVE_METRICS):
                history = client.get_metric_history(t.run_id, key)
                t.curves[key] = sorted((m.step, m.value) for m in history)
        if not any(t.curves.values()):
            t.curves = _jsonl_curves(run_dir / METRICS_FILE, (spec.search.metric, *CURVE_METRICS))
        if t.checkpoint is None:
            found = latest_checkpoint(run_dir)
            t.checkpoint = str(found) if found else None
        if row.params:
            t.registers = spec.trial_config(row.params).model.registers
        trials.append(t)
    return trials


def _jsonl_curves(path: Path, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return curves
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        for k in keys:
            if isinstance(record.get(k), (int, float)):
                curves[k].append((int(record["step"]), float(record[k])))
    return curves


def _diagnose(spec: SweepSpec, trials: list[TrialReport], images: int) -> None:
    """High-norm token fraction of each trial's final EMA teacher on ``images`` held-out images."""
    cache: dict[tuple, Any] = {}
    for t in trials:
        if not t.checkpoint or "://" in t.checkpoint:
            t.note = "no local checkpoint: no register diagnostics"
            continue
        try:
            encoder, config = load_encoder(Path(t.checkpoint), "teacher")
        except (CheckpointError, OSError) as err:
            t.note = f"checkpoint unreadable: {err}"
            continue
        key = (config.data.dataset, str(config.data.cache_dir), config.model.img_size)
        if key not in cache:
            root = resolve_dataset(config.data.dataset, config.data.cache_dir)
            split = "test" if "test" in load_manifest(root).splits else config.data.split
            cache[key] = load_split(root, split, config.model.img_size, limit=images, seed=0)[0]
        outliers = run_diagnostics(encoder, cache[key])["outliers"]
        t.high_norm, t.images_with_outlier = outliers["fraction"], outliers["images_with_outlier"]
        t.registers = config.model.registers


# ----------------------------------------------------------------------------------------- plots
def save_figure(plt, fig, path: Path) -> Path:
    """Lay out, write at 100 dpi and close ``fig``; the path written."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metric_vs_params(spec: SweepSpec, trials: list[TrialReport], out: Path) -> list[Path]:
    """One PNG per swept parameter: each trial's best metric against its value (categorical if needed)."""
    plt = pyplot()
    paths = []
    scored = [t for t in trials if t.row.metric is not None and math.isfinite(t.row.metric)]
    for param in spec.search_space:
        points = [(t.row.params.get(param), t.row.metric, t.row.status) for t in scored if param in t.row.params]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in points)
        labels = sorted({repr(x) for x, _, _ in points}) if not numeric else []
        for x, y, status in points:
            xpos = x if numeric else labels.index(repr(x))
            ax.scatter(xpos, y, marker="o" if status in ("TERMINATED", "RUNNING") else "x",
                       color="tab:blue" if status == "TERMINATED" else "tab:orange")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif spec.search_space[param].kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel(f"best {spec.search.metric}")
        ax.set_title(f"{spec.search.metric} vs {param} (x: stopped early or unfinished)", fontsize=9)
        paths.append(save_figure(plt, fig, out / f"metric_vs_{_slug(param)}.png"))
    return paths


def plot_parallel(spec: SweepSpec, trials: list[TrialReport], out: Path) -> Path | None:
    """Parallel coordinates: one axis per swept field and one for the metric, one line per scored trial,
    coloured by its metric, so that the values of the good trials read off at a glance. Each axis is
    scaled to its own range (categorical values to their sorted order)."""
    scored = [t for t in trials if t.row.metric is not None and math.isfinite(t.row.metric)]
    params = list(spec.search_space)
    if not scored or not params:
        return None
    plt = pyplot()
    axes_values = [[t.row.params.get(p) for t in scored] for p in params] + [[t.row.metric for t in scored]]
    labels = params + [spec.search.metric]
    columns, ticks = [], []
    for values in axes_values:
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric:
            order = sorted({repr(v) for v in values})
            values = [order.index(repr(v)) for v in values]
            ticks.append(order)
        else:
            ticks.append(None)
        lo, hi = min(values), max(values)
        columns.append([(v - lo) / (hi - lo) if hi > lo else 0.5 for v in values])
    metric = [t.row.metric for t in scored]
    lo, hi = min(metric), max(metric)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(labels)), 3.5))
    for i, t in enumerate(scored):
        ax.plot(range(len(labels)), [c[i] for c in columns], color=cmap((t.row.metric - lo) / (hi - lo) if hi > lo
                                                                        else 1.0),
                linestyle="-" if t.row.status == "TERMINATED" else "--", marker="o", label=t.row.label)
    for x, (values, tick) in enumerate(zip(axes_values, ticks)):
        ax.axvline(x, color="#999", linewidth=0.8)
        if tick is None:  # numeric: its range at the ends
            marks = [(0.0, f"{min(values):.3g}"), (1.0, f"{max(values):.3g}")]
        else:  # categorical: every value at its place
            marks = [(i / (len(tick) - 1) if len(tick) > 1 else 0.5, text) for i, text in enumerate(tick)]
        for y, text in marks:
            ax.annotate(text, (x, y), fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks([])
    ax.set_title(f"trials across the swept fields, coloured by {spec.search.metric} (dashed: stopped early)",
                 fontsize=9)
    return save_figure(plt, fig, out / "parallel_coordinates.png")


def plot_gain(trials: list[TrialReport], out: Path) -> Path | None:
    """Each trial's online k-NN beside the same network's at its seeded random init on the same
    probe images: what training added (``probe/knn_gain``), next to what the architecture gives
    untrained."""
    points = [t for t in trials if t.row.gain is not None and t.row.random_init is not None]
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(points) + 2), 3.5))
    xs = range(len(points))
    base = [t.row.random_init for t in points]
    ax.bar(xs, base, color="#bbb", label="random init")
    ax.bar(xs, [t.row.gain for t in points], bottom=base, color="tab:green", label="gain from training")
    for x, t in zip(xs, points):
        ax.annotate(f"{t.row.gain:+.1f}", (x, t.row.random_init + max(t.row.gain, 0)), ha="center", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(xs), [f"trial {t.row.label}" for t in points], fontsize=8)
    low = min(min(base), min(b + t.row.gain for b, t in zip(base, points)))
    ax.set_ylim(max(0.0, low - 5), None)
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title("k-NN of each trial's EMA teacher over its random init (probe/knn_gain)", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(plt, fig, out / "gain_over_random_init.png")


def plot_curves(spec: SweepSpec, trials: list[TrialReport], out: Path) -> Path:
    """Learning curves of every trial: the sweep metric and the CAPI loss against the step."""
    plt = pyplot()
    keys = (spec.search.metric, *CURVE_METRICS)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for ax, key in zip(axes, keys):
        for t in trials:
            points = t.curves.get(key) or []
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) < 20 else None, label=f"trial {t.row.label}")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    axes[0].legend(fontsize=7)
    return save_figure(plt, fig, out / "learning_curves.png")


def plot_registers(trials: list[TrialReport], out: Path) -> Path | None:
    """Register count against the high-norm patch-token fraction, one point per diagnosed trial."""
    points = [(t.registers, t.high_norm, f"trial {t.row.label}") for t in trials if t.high_norm is not None]
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for registers, fraction, label in points:
        ax.scatter(registers, 100 * fraction)
        ax.annotate(label, (registers, 100 * fraction), fontsize=6)
    ax.set_xlabel("registers")
    ax.set_ylabel("high-norm patch tokens (%)")
    ax.set_title("high-norm tokens of the final EMA teacher", fontsize=9)
    return save_figure(plt, fig, out / "registers_vs_high_norm.png")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


# ------------------------------------------------------------------------------------------ page
def render(spec: SweepSpec, state: SweepState, trials: list[TrialReport], pictures: list[Path]) -> str:
    e = html.escape
    best = best_trial([t.row for t in trials], spec.search.mode)
    params = list(spec.search_space)
    head = ["trial", "Tune id", "status", *params, f"best {spec.search.metric}", "gain", "last", "probes", "step", "registers",
            "high-norm tokens", "MLflow run", "note"]
    rows = []
    for t in trials:
        r = t.row
        cells = [r.label + (" (best)" if best and r.trial_id == best.trial_id else ""), r.trial_id, r.status,
                 *[r.params.get(p, "") for p in params], _num(r.metric),
                 "" if r.gain is None else f"{r.gain:+.1f}", _num(r.last), r.probe_evals, r.step or "",
                 "" if t.registers is None else t.registers,
                 "" if t.high_norm is None else f"{100 * t.high_norm:.2f}%", t.run_id or "",
                 t.note or (r.error or "")]
        rows.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    summary = (f"best: trial {e(best.label)} with {e(spec.search.metric)} = {best.metric:.4g} "
               f"({e(json.dumps(best.params))})" if best else "no trial reported the metric yet")
    if best is not None and best.gain is not None:
        summary += f", {best.gain:+.1f} k-NN points over the same network at random init"
    probe_noise = sweep_noise(spec)
    noise = None if probe_noise is None else probe_noise.sentence()
    split = told_apart([t.row for t in trials], spec.search.mode, spec.search.metric,
                       None if probe_noise is None else probe_noise.threshold)
    if noise and split is not None and (split[0] or split[1]):
        noise += (f"; the best leads trial(s) {', '.join(r.label for r in split[0]) or 'none'} by more than that, "
                  f"and trial(s) {', '.join(r.label for r in split[1]) or 'none'} are within it")
    missing = [t.row.trial_id for t in trials if t.high_norm is None]
    # Embedded, not linked: MLflow's artifact viewer shows index.html alone, where relative links break.
    figures = "\n".join(f'<figure><img src="{data_uri(p)}" alt="{e(p.stem)}" title="{e(p.name)}"></figure>'
                         for p in pictures)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sweep {e(spec.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}figure{{display:inline-block;margin:0.5em}}</style></head>
<body><h1>Sweep {e(spec.name)}</h1>
<p>{len(trials)} trials, {e(spec.search.algorithm)} search for the {e(spec.search.mode)} of
{e(spec.search.metric)}, scheduler {e(spec.scheduler.type)}. {summary}.</p>
<p>Gain: probe/knn_gain, a trial's k-NN top-1 minus that of the same architecture at its seeded random
initialisation on the same probe images. {e(noise[0].upper() + noise[1:]) + '.' if noise else ''}</p>
<p>MLflow: {e(safe_uri(state.tracking_uri))}, experiment {e(state.experiment)},
parent run {e(state.parent_run_id)}.</p>
<h2>Trials</h2>
<table><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>
{chr(10).join(rows)}
</table>
<p>High-norm tokens: patch tokens of the last block (before the final norm) above the valley threshold of
the log-norm histogram (capi_core.eval.diagnostics.norm_report); 0% where the histogram has no second mode.
{('Not measured for trials without a local checkpoint: ' + e(', '.join(missing)) + '.') if missing else ''}</p>
<h2>Plots</h2>
{figures}
</body></html>
"""


def data_uri(path: Path) -> str:
    """A PNG as a ``data:`` URI, so that the page shows it with no file beside it."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
