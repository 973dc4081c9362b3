"""What CAPI learns on this machine, against baselines measured in the same run.

    .venv/bin/python benchmarks/learning.py demo                     # cpu-demo: train, then the full test set
    .venv/bin/python benchmarks/learning.py demo --preset cpu-long   # the ~60-minute preset
    .venv/bin/python benchmarks/learning.py noise --seeds 3          # the online probe's noise over seeds
    .venv/bin/python benchmarks/learning.py paired --seeds 4 --variant optim.warmup_fraction=0.1 \
        --variant optim.warmup_fraction=0.3 optim.steps=2000             # noise of a sweep's comparisons
    .venv/bin/python benchmarks/learning.py demo optim.steps=200     # any config override
    .venv/bin/python benchmarks/learning.py score --checkpoint runs/capi --attentive-epochs 10 \
        --attentive-warmup 0                                         # a kept teacher, another probe protocol
    .venv/bin/python benchmarks/learning.py plot --results benchmarks/results/learning-demo-cpu-long.json \
        --out docs/images/cpu-long-curve.png                         # a demo's curve against minutes

``demo`` trains a preset with the trainer's online probe (its curve against minutes is printed and
kept), then scores the final EMA teacher on the whole Fashion-MNIST test set with the protocols of
``capi eval``: weighted k-NN (k=20, T=0.07, cosine) of mean-pooled patch features with all 60,000
train images as its memory, and CAPI's attentive probe on 10,000 train images. Baselines in the same
run and on the same images: the same architecture at its seeded random init, and k-NN on raw pixels.

``score`` scores a checkpoint's teacher (e.g. a ``demo --keep DIR``) the way ``demo`` does, beside its
random init and raw pixels, so that a probe protocol can be compared on one trained network.

``plot`` draws a ``demo`` result's k-NN curve against training minutes, beside its random init and raw
pixels (the README's curve).

``noise`` trains the same configuration with several seeds and reports the spread of the online
probe's ``probe/knn_top1`` and ``probe/knn_gain`` at equal training, and what the probe cost as a
share of each run: the figure behind "differences below N points are noise".

``paired`` trains several variants of one configuration (each ``--variant`` a comma-separated list of
overrides) with the same seeds, as the trials of one sweep are (they share ``run.seed``, so the same
init, batches and masks), and reports the spread over seeds of each pair's *difference*: the noise
that decides whether one trial of a sweep beats another, beside what two independent runs would
differ by (sqrt(2) x one run's spread).

Figures print as a table and are written as JSON to ``benchmarks/results/learning-<name>.json`` with
the machine (CPU model and flags, load average) they were measured on. Nothing here is asserted:
quality targets are read off these figures, never tested by timing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

from run_all import machine  # noqa: E402

from capi_core.atomic import atomic_write, atomic_write_text  # noqa: E402
from capi_core.checkpoint import CheckpointError, load_encoder  # noqa: E402
from capi_core.config import ConfigError, build_config  # noqa: E402
from capi_core.data import resolve_dataset  # noqa: E402
from capi_core.eval.features import extract_features, pooled_features  # noqa: E402
from capi_core.eval.knn import knn_top1  # noqa: E402
from capi_core.eval.online_probe import (FEATURE_BATCH, knn_predictions, load_probe_set,  # noqa: E402
                                         random_init_encoder)
from capi_core.eval.pictures import pyplot  # noqa: E402
from capi_core.eval.probes import ProbeProtocol, probe_input, run_probes  # noqa: E402
from capi_core.precision import choose_precision, flush_denormals  # noqa: E402
from capi_core.train import Callback, JsonlMetrics, Trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Curve(Callback):
    """The online probe's figures against training minutes (probe time excluded) and steps."""

    def __init__(self):
        self.points: list[dict] = []
        self.train_s = 0.0
        self.probe_s = 0.0
        self._mark = None

    def on_start(self, trainer):
        self._mark = time.perf_counter()

    def on_log(self, trainer, step, metrics):
        now = time.perf_counter()
        spent = now - self._mark
        probe = metrics.get("probe/seconds", 0.0)
        self.train_s += spent - probe
        self.probe_s += probe
        self._mark = now
        if "probe/knn_top1" in metrics:
            self.points.append({"step": step, "train_min": round(self.train_s / 60, 2),
                                **{k: round(v, 2) for k, v in metrics.items() if k.startswith("probe/")}})
            p = self.points[-1]
            print(f"  step {step:>5}  {p['train_min']:6.2f} min  k-NN {p['probe/knn_top1']:.2f}%  "
                  f"gain {p['probe/knn_gain']:+.2f}  (probe {probe:.1f} s)", flush=True)

    on_end = on_log


def train(preset: str, overrides: list[str], out_dir: Path) -> tuple[Trainer, Curve, float]:
    cfg = build_config(preset, [f"run.output_dir={out_dir}", *overrides])
    curve = Curve()
    trainer = Trainer(cfg, [JsonlMetrics(), curve])
    print(f"{preset}: {cfg.optim.steps} steps at batch {cfg.optim.batch_size}, precision "
          f"{trainer.precision.describe()}", flush=True)
    start = time.perf_counter()
    trainer.fit()
    return trainer, curve, time.perf_counter() - start


def full_test_scores(encoder, cfg, autocast, attentive_train: int, protocol: ProbeProtocol) -> dict[str, float]:
    """k-NN with the whole train split as memory and the attentive probe on ``attentive_train`` images,
    both scored on the whole test split."""
    ds = resolve_dataset(cfg.data.dataset, cfg.data.cache_dir)
    full = load_probe_set(ds, cfg.model.img_size, None, None)
    attentive = None
    if attentive_train:
        attentive = full if attentive_train >= len(full.train_y) else load_probe_set(
            ds, cfg.model.img_size, attentive_train, None)
        tokens = [extract_features(encoder, x, batch_size=FEATURE_BATCH, autocast_dtype=autocast).final
                  for x in (attentive.train_x, attentive.test_x)]
    if attentive is full:
        # The attentive probe's tokens are the whole split's: pooled as pooled_features pools them, they
        # are the k-NN's features, so the images are encoded once per network, not twice.
        f_train, f_test = (probe_input(t, "mean") for t in tokens)
    else:
        f_train = pooled_features(encoder, full.train_x, batch_size=FEATURE_BATCH, autocast_dtype=autocast)
        f_test = pooled_features(encoder, full.test_x, batch_size=FEATURE_BATCH, autocast_dtype=autocast)
    scores = {"knn_full": knn_top1(f_train, full.train_y, f_test, full.test_y, k=20, temperature=0.07)}
    if attentive is not None:
        (result,) = run_probes(tokens[0], attentive.train_y, tokens[1], attentive.test_y, probes=["attentive"],
                               protocol=protocol)
        scores["attentive"] = result.top1
    return scores


def raw_pixels_knn(cfg) -> float:
    full = load_probe_set(resolve_dataset(cfg.data.dataset, cfg.data.cache_dir), cfg.model.img_size, None, None)
    return knn_top1(full.train_x.flatten(1), full.train_y, full.test_x.flatten(1), full.test_y, k=20,
                    temperature=0.07)


def compare(encoder, cfg, autocast, args) -> dict:
    """The trained encoder, its seeded random init and raw pixels on the full test set, printed."""
    protocol = ProbeProtocol(seed=0, epochs=args.attentive_epochs, warmup_fraction=args.attentive_warmup)
    trained = full_test_scores(encoder, cfg, autocast, args.attentive_train, protocol)
    untrained = full_test_scores(random_init_encoder(cfg), cfg, autocast, args.attentive_train, protocol)
    pixels = raw_pixels_knn(cfg)
    rows = [("k-NN, 60k train memory, full test", trained["knn_full"], untrained["knn_full"], pixels)]
    if "attentive" in trained:
        rows.append((f"attentive probe, {args.attentive_train:,} train, full test", trained["attentive"],
                     untrained["attentive"], None))
    print(f"\n{'protocol':<44} {'trained':>8} {'random init':>12} {'raw pixels':>11}")
    for name, a, b, c in rows:
        print(f"{name:<44} {a:>8.2f} {b:>12.2f} {'' if c is None else f'{c:.2f}':>11}")
    if "attentive" in trained:
        print(f"attentive probe: {protocol.epochs} epochs, {protocol.warmup_fraction:.0%} warmup")
    return {"trained": trained, "random_init": untrained, "raw_pixels_knn": pixels,
            "attentive_protocol": {"epochs": protocol.epochs, "warmup_fraction": protocol.warmup_fraction}}


def plot(args) -> None:
    """The k-NN curve of a ``demo`` result against training minutes, with its two baselines, as a PNG."""
    if not args.results or not args.out:
        raise SystemExit("plot needs --results FILE (a demo's JSON) and --out FILE.png")
    try:
        record = json.loads(Path(args.results).read_text())
        points, base, pixels = record["curve"], record["random_init"]["knn_full"], record["raw_pixels_knn"]
        preset, cpu, cores = record["preset"], record["machine"]["cpu"], record["machine"]["cores"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"plot: {args.results} is not a demo result ({err})") from None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    minutes = [0.0] + [p["train_min"] for p in points]
    ax.plot(minutes, [base] + [p["probe/knn_top1"] for p in points], "o-",
            label=f"{preset}: k-NN of the EMA teacher")
    ax.axhline(pixels, ls="--", color="gray", label=f"k-NN on raw pixels ({pixels:.1f} %)")
    ax.axhline(base, ls=":", color="gray", label=f"same network at random init ({base:.1f} %)")
    steps = points[-1]["step"] if points else 0
    ax.set_title(f"{preset}: {steps:,} steps, the online k-NN probe", fontsize=10)
    ax.set_xlabel(f"training minutes ({cores}-core {cpu}, probes excluded)")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    print(f"wrote {out}")


def demo(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer, curve, wall = train(args.preset, args.overrides, Path(args.keep or tmp))
    cfg, autocast = trainer.config, trainer.autocast_dtype
    print(f"trained in {wall / 60:.1f} min ({curve.train_s / 60:.1f} training, {curve.probe_s / 60:.1f} probing); "
          f"scoring on the full test set", flush=True)
    scores = compare(trainer.teacher.encoder, cfg, autocast, args)
    return {"preset": args.preset, "overrides": args.overrides, "wall_min": round(wall / 60, 2),
            "train_min": round(curve.train_s / 60, 2), "probe_min": round(curve.probe_s / 60, 2),
            "curve": curve.points, **scores}


def score(args) -> dict:
    if not args.checkpoint:
        raise SystemExit("score needs --checkpoint DIR (a run directory or one of its checkpoints)")
    try:
        encoder, cfg = load_encoder(Path(args.checkpoint))
    except CheckpointError as err:
        raise SystemExit(f"score: {err}") from None
    autocast = choose_precision(cfg.run.precision, torch.device("cpu"), cfg.model, cfg.data.cache_dir).autocast_dtype
    print(f"scoring the teacher of {args.checkpoint} ({cfg.optim.steps} steps planned) on the full test set, "
          f"features in {'bf16' if autocast else 'fp32'}", flush=True)
    return {"checkpoint": str(args.checkpoint), **compare(encoder.eval(), cfg, autocast, args)}


# Probe sets the noise runs also score their final teacher on, to split the spread over seeds into
# what more query images would remove and what training itself varies: (memory images, query images).
NOISE_PROBES = ((5_000, 5_000), (10_000, 10_000), (20_000, 10_000), (None, None))


def _correct(encoder, cfg, autocast, train_images, test_images) -> list[bool]:
    """Per query: does the weighted k-NN of ``encoder`` on this probe set get it right?"""
    ps = load_probe_set(resolve_dataset(cfg.data.dataset, cfg.data.cache_dir), cfg.model.img_size, train_images,
                        test_images, seed=0)
    return (knn_predictions(encoder, ps, cfg.probe.k, cfg.probe.temperature, autocast) == ps.test_y).tolist()


def _probe_name(train_images, test_images) -> str:
    return "full" if train_images is None else f"{train_images // 1000}k/{test_images // 1000}k"


def _noise_run(preset: str, overrides: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer, curve, wall = train(preset, [*overrides, f"run.seed={seed}"], Path(tmp))
    correct = {_probe_name(*p): _correct(trainer.teacher.encoder, trainer.config, trainer.autocast_dtype, *p)
               for p in NOISE_PROBES}
    return {"seed": seed, "wall_s": round(wall, 1), "probe_share": round(curve.probe_s / wall, 3),
            **curve.points[-1], "correct": correct}


def split_noise(correct: list[list[bool]]) -> dict[str, float]:
    """The spread over seeds of one probe set's top-1 and the part of it that is query sampling.

    ``correct`` is [seeds][queries]. Two runs' scores differ by (b - c) / n, where b and c count the
    queries only one of them gets right; if which of those discordant queries each run wins were a coin
    toss, the difference would have variance (b + c) / n^2, i.e. each run a variance of (b + c) / (2 n^2):
    the part that more queries would shrink as 1/n. What is left of the spread is training itself.
    """
    t = torch.tensor(correct, dtype=torch.float64)  # [S, n]
    seeds, n = t.shape
    top1 = 100 * t.mean(1)
    pairs = [(i, j) for i in range(seeds) for j in range(i + 1, seeds)]
    discordant = statistics.mean(float((t[i] != t[j]).sum()) for i, j in pairs)
    sampling = 100 * (discordant / (2 * n * n)) ** 0.5
    std = float(top1.std())
    return {"queries": n, "mean": float(top1.mean()), "std": std, "sampling_std": sampling,
            "training_std": max(std ** 2 - sampling ** 2, 0.0) ** 0.5}


def noise(args) -> dict:
    """``args.parallel`` runs at a time, each in its own process (give them run.threads=1 to share cores
    the way sweep trials do)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.parallel, mp_context=ctx) as pool:
        runs = list(pool.map(_noise_run, *zip(*[(args.preset, args.overrides, s) for s in range(args.seeds)])))
    top1 = [r["probe/knn_top1"] for r in runs]
    gain = [r["probe/knn_gain"] for r in runs]
    summary = {"knn_top1_mean": statistics.mean(top1), "knn_top1_std": statistics.stdev(top1),
               "knn_gain_mean": statistics.mean(gain), "knn_gain_std": statistics.stdev(gain),
               "probe_share_max": max(r["probe_share"] for r in runs),
               "final_teacher": {name: split_noise([r["correct"][name] for r in runs])
                                 for name in runs[0]["correct"]}}
    for r in runs:
        del r["correct"]
    print(f"\nthe final teacher on other probe sets (memory/queries): top-1 mean, std over seeds, and its "
          f"parts (query sampling, training)")
    for name, f in summary["final_teacher"].items():
        print(f"  {name:>8}  {f['mean']:6.2f}  std {f['std']:.2f}  sampling {f['sampling_std']:.2f}  "
              f"training {f['training_std']:.2f}")
    print(f"\nprobe/knn_top1 over {args.seeds} seeds: {summary['knn_top1_mean']:.2f} +- "
          f"{summary['knn_top1_std']:.2f} (std); gain {summary['knn_gain_mean']:+.2f} +- "
          f"{summary['knn_gain_std']:.2f}; the probe took at most {100 * summary['probe_share_max']:.1f} % of a run")
    return {"preset": args.preset, "overrides": args.overrides, "runs": runs, **summary}


def _final_run(preset: str, overrides: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer, curve, wall = train(preset, [*overrides, f"run.seed={seed}"], Path(tmp))
    # The final teacher also on the whole train split as memory (the test split's 10,000 queries): how
    # much quieter a comparison gets with a larger memory.
    full = _correct(trainer.teacher.encoder, trainer.config, trainer.autocast_dtype, None, None)
    return {"seed": seed, "overrides": overrides, "wall_s": round(wall, 1), "curve": curve.points,
            **curve.points[-1], "knn_full_top1": 100 * sum(full) / len(full)}


def paired_spread(gains: list[list[float]]) -> dict[str, float]:
    """``gains`` [variants][seeds]: for each pair of variants the mean and the std over seeds of their
    difference, and the std pooled over pairs (the root of the mean variance): what two trials of one
    sweep differ by when nothing but training's noise separates them."""
    pairs = {}
    for i in range(len(gains)):
        for j in range(i + 1, len(gains)):
            d = [a - b for a, b in zip(gains[i], gains[j])]
            pairs[f"{i}-{j}"] = {"mean": statistics.mean(d), "std": statistics.stdev(d)}
    pooled = statistics.mean(p["std"] ** 2 for p in pairs.values()) ** 0.5
    single = statistics.mean(statistics.variance(g) for g in gains) ** 0.5
    return {"pairs": pairs, "pooled_diff_std": pooled, "single_std": single,
            "independent_diff_std": single * 2 ** 0.5}


def paired(args) -> dict:
    variants = [[o for o in v.split(",") if o] for v in args.variant]
    if len(variants) < 2:
        raise SystemExit("paired needs at least two --variant")
    jobs = [(args.preset, [*args.overrides, *v], s) for s in range(args.seeds) for v in variants]
    for _, overrides, _ in jobs[:len(variants)]:  # a refused variant fails here, not after an hour of runs
        try:
            build_config(args.preset, overrides)
        except ConfigError as err:
            raise SystemExit(f"variant {' '.join(overrides)}: {err}") from None
    partial = RESULTS / f"learning-{args.name or 'paired-' + args.preset}.partial.json"
    ctx = multiprocessing.get_context("spawn")
    runs: list[dict | None] = [None] * len(jobs)
    with ProcessPoolExecutor(args.parallel, mp_context=ctx) as pool:
        futures = {pool.submit(_final_run, *job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            runs[futures[future]] = future.result()
            # Finished runs are kept as they come, so a failure or an interrupt loses only what was running.
            RESULTS.mkdir(exist_ok=True)
            atomic_write_text(partial, json.dumps({"variants": variants, "runs": runs}, indent=1))
    partial.unlink(missing_ok=True)
    gains = [[r["probe/knn_gain"] for r in runs[i::len(variants)]] for i in range(len(variants))]
    spread = paired_spread(gains)
    full = paired_spread([[r["knn_full_top1"] for r in runs[i::len(variants)]] for i in range(len(variants))])
    print(f"\nk-NN gain at the last step over seeds 0-{args.seeds - 1}:")
    for i, (v, g) in enumerate(zip(variants, gains)):
        print(f"  {i}: {' '.join(v) or '(base)':<48} " + "  ".join(f"{x:+.2f}" for x in g)
              + f"   mean {statistics.mean(g):+.2f}")
    for name, p in spread["pairs"].items():
        print(f"  difference {name}: {p['mean']:+.2f} +- {p['std']:.2f} (std over seeds)")
    print(f"the difference of two same-seed trials spreads {spread['pooled_diff_std']:.2f} points (pooled over "
          f"pairs); one run spreads {spread['single_std']:.2f}, so two independent runs would differ by "
          f"{spread['independent_diff_std']:.2f}")
    print(f"scored with the whole train split as memory: the difference spreads {full['pooled_diff_std']:.2f}, one "
          f"run {full['single_std']:.2f}")
    return {"preset": args.preset, "overrides": args.overrides, "variants": variants, "runs": runs,
            "gains": gains, **spread, "full_memory": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("demo", "score", "noise", "paired", "plot"))
    parser.add_argument("overrides", nargs="*", help="config overrides, section.field=value")
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--seeds", type=int, default=3, help="noise: runs with seeds 0..N-1")
    parser.add_argument("--parallel", type=int, default=1, help="noise: runs at a time, each in its own process")
    parser.add_argument("--attentive-train", type=int, default=10_000,
                        help="demo: train images for the attentive probe (0: skip it)")
    parser.add_argument("--attentive-epochs", type=int, default=ProbeProtocol.epochs,
                        help="demo, score: epochs of the attentive probe (default %(default)s, capi eval's)")
    parser.add_argument("--attentive-warmup", type=float, default=ProbeProtocol.warmup_fraction,
                        help="demo, score: the attentive probe's warmup, a fraction of its steps")
    parser.add_argument("--checkpoint", default=None, metavar="DIR", help="score: a run directory or checkpoint")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="demo: train into DIR and keep its checkpoints (default: a temporary directory)")
    parser.add_argument("--variant", action="append", default=[], metavar="A=X,B=Y",
                        help="paired: one variant's overrides, comma-separated (give two or more)")
    parser.add_argument("--name", default=None, help="results file name (default: what and preset)")
    parser.add_argument("--results", default=None, metavar="FILE", help="plot: a demo's results JSON")
    parser.add_argument("--out", default=None, metavar="FILE", help="plot: the PNG to write")
    args = parser.parse_intermixed_args()
    if args.what == "plot":
        return plot(args)
    figures = {"demo": demo, "score": score, "noise": noise, "paired": paired}[args.what](args)
    record = {"machine": machine(), **figures}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"learning-{args.name or f'{args.what}-{args.preset}'}.json"
    atomic_write_text(out, json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    flush_denormals()  # for the evaluations outside a Trainer (which sets it itself), as the trainer does
    main()
