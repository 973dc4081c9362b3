"""``capi eval``: frozen-feature evaluation of a checkpoint (probes, register diagnostics, pictures)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from capi_core.atomic import atomic_write_text

PROBE_CHOICES = ("knn", "linear", "attentive", "abmilp", "ep")  # "linear" = [cls] and mean-pooled


class _DefaultRun(click.Group):
    """``capi eval CHECKPOINT ...`` is short for ``capi eval run CHECKPOINT ...``."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


@click.group(name="eval", cls=_DefaultRun)
def eval_() -> None:
    """Evaluate a checkpoint's frozen features.

    \b
      capi eval CHECKPOINT [--probes ...] [--diagnostics] [--pictures]   (same as: capi eval run ...)
      capi eval knn CHECKPOINT                                           (quick weighted k-NN)
    """


def _checkpoint_options(f):
    """Arguments shared by ``run`` and ``knn`` (listed in --help in this order)."""
    options = [
        click.argument("checkpoint", type=click.Path(exists=True, path_type=Path)),
        click.option("--dataset", default=None,
                     help="Built-in name (fashion-mnist) or dataset directory. Default: the checkpoint's."),
        click.option("--limit-train", type=click.IntRange(min=0), default=10_000, show_default=True,
                     help="Class-stratified subset of the train split (0 = all of it)."),
        click.option("--limit-test", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Class-stratified subset of the test split (0 = all of it)."),
        click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True,
                     help="Which encoder of the checkpoint: the EMA teacher or the student."),
        click.option("--random-init", is_flag=True,
                     help="Evaluate the checkpoint's architecture at random initialisation (the baseline)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Images per forward pass."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
                     help="Feature extraction; auto: bf16 autocast on CUDA and AMX CPUs, where it is faster."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Random-init weights, probe split, initialisation and batch order."),
    ]
    for option in reversed(options):  # decorators apply bottom-up
        f = option(f)
    return f


def _load_model(checkpoint: Path, which: str, random_init: bool, seed: int, device: str, precision: str):
    """(whole CAPI model on its device, TrainConfig, autocast dtype or None); problems become clear CLI
    errors. The probes read ``model.encoder``; predictor pooling also needs ``model.predictor``."""
    # deferred: torch
    import torch

    from capi_core.checkpoint import load_student
    from capi_core.models.student import Student
    from capi_core.precision import choose_precision, flush_denormals
    from capi_core.train import pick_device

    model, config = load_student(checkpoint, which=which)
    if random_init:
        torch.manual_seed(seed)
        model = Student(config).eval()
    dev = pick_device(device)
    flush_denormals(dev)  # as the trainer does, so that its online probe and this evaluation compute alike
    choice = choose_precision(precision, dev, config.model, config.data.cache_dir)
    return model.to(dev), config, choice.autocast_dtype


def _load_probe_set(dataset: str | None, config, limit_train: int, limit_test: int, seed: int):
    """(name, labelled train and test images for the encoder's input size as a ``ProbeSet``); dataset
    problems name the dataset."""
    # deferred: pyarrow and torch
    from capi_core.eval.evaluate import eval_dataset
    from capi_core.eval.online_probe import load_probe_set

    name, path = eval_dataset(dataset, config)
    return name, load_probe_set(path, config.model.img_size, limit_train or None, limit_test or None, seed=seed,
                                cache_dir=config.data.cache_dir)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


def _parse_probes(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROBE_CHOICES]
    if unknown or not names:
        raise click.BadParameter(f"unknown probe(s) {unknown}; choose from {', '.join(PROBE_CHOICES)}",
                                 param_hint="--probes")
    expanded = []
    for name in names:
        expanded += ["linear_cls", "linear_mean"] if name == "linear" else [name]
    return list(dict.fromkeys(expanded))


@eval_.command("run")
@_checkpoint_options
@click.option("--probes", "probe_list", default=",".join(PROBE_CHOICES), show_default=True,
              help="Comma-separated probes: knn, linear ([cls] and mean-pooled), attentive, abmilp, ep.")
@click.option("--diagnostics", is_flag=True, help="Token-norm (high-norm outliers) and attention-flow diagnostics.")
@click.option("--pictures", is_flag=True, help="PNG pictures: PCA of patch features, attention maps, token norms.")
@click.option("--diagnostic-images", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Test images used by --diagnostics.")
@click.option("--picture-images", type=click.IntRange(min=1), default=8, show_default=True,
              help="Test images shown by --pictures (a fixed subset).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of each parametric probe (default 50, with 10% warmup: near the reference's 12,500 "
                   "steps on a 60,000-image set; fewer are faster and score lower).")
@click.option("--include-registers", is_flag=True, help="Let the probes pool over register tokens too.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory. Default: CHECKPOINT/eval (eval-random-init with --random-init).")
@click.option("--log/--no-log", "log_mlflow", default=True,
              help="Log the results (metrics, the probe table, pictures) to the MLflow run the checkpoint names.")
@click.option("--tracking-uri", default=None,
              help="MLflow store of that run; default: the one the checkpoint names, else MLFLOW_TRACKING_URI.")
def run(checkpoint, random_init, which, dataset, limit_train, limit_test, batch_size, device, precision, seed,
        probe_list, diagnostics, pictures, diagnostic_images, picture_images, epochs, include_registers, out,
        log_mlflow, tracking_uri) -> None:
    """Probe a checkpoint's frozen features; write eval.json (and PNGs) and print a table.

    \b
      capi eval run runs/capi/checkpoints/step-0002000
      capi eval run runs/capi --probes knn,linear --diagnostics --pictures
      capi eval run runs/capi --random-init        # same architecture, untrained: the baseline

    Probe hyperparameters are selected on a held-out 10% of the train split; the test split is
    scored once, with the selected setting. Accuracies are top-1 in %.
    """
    # deferred: torch
    from capi_core.eval.evaluate import EvalSettings, evaluate
    from capi_core.eval.probes import ProbeProtocol

    probes = _parse_probes(probe_list)
    console = Console(stderr=True, highlight=False)
    model, config, autocast = _load_model(checkpoint, which, random_init, seed, device, precision)
    out = out or (checkpoint if checkpoint.is_dir() else checkpoint.parent) / (
        "eval-random-init" if random_init else "eval")
    protocol = ProbeProtocol(seed=seed, **({"epochs": epochs} if epochs else {}))
    settings = EvalSettings(probes=tuple(probes), protocol=protocol, batch_size=batch_size,
                            include_registers=include_registers,
                            diagnostic_images=diagnostic_images if diagnostics else None,
                            picture_images=picture_images if pictures else None)

    with console.status("loading data") as status:

        def stage(message: str) -> None:
            status.update(message)
            if not console.is_terminal:  # no live spinner (CI, logs): one line per stage instead
                console.print(message)

        name, probe_set = _load_probe_set(dataset, config, limit_train, limit_test, seed)
        report = evaluate(model, config, probe_set, settings, checkpoint=str(checkpoint), which=which,
                          random_init=random_init, dataset=name, autocast_dtype=autocast, out=out,
                          stage=stage, say=console.print)
    _write_json(out / "eval.json", report.to_dict())
    _print_table(report.to_dict(), report.probes)
    click.echo(f"wrote {out / 'eval.json'}" + (f" and {len(report.pictures)} pictures" if pictures else ""))
    if log_mlflow and not random_init:  # a baseline belongs to no training run
        _log_to_run(checkpoint, report, tracking_uri)


def _log_to_run(checkpoint: Path, report, tracking_uri: str | None) -> None:
    """Log the evaluation into the MLflow run that trained the checkpoint; a store that is gone or a
    checkpoint of an untracked run only gets a note: the results are on disk already."""
    # deferred: MLflow
    from capi_core.checkpoint import find_checkpoint
    from orchestrator.tracking import best_effort, checkpoint_run, log_eval, resolve_uri, safe_uri

    found = find_checkpoint(checkpoint)
    run_id, saved_uri, step = checkpoint_run(found) if found else (None, None, 0)
    if not run_id:
        click.echo("MLflow: the checkpoint names no MLflow run (trained without tracking); nothing logged")
        return
    uri = resolve_uri(tracking_uri or saved_uri)
    if best_effort(lambda: log_eval(uri, run_id, report.to_dict(), step, report.pictures or []) or True):
        click.echo(f"MLflow: logged to run {run_id} at {safe_uri(uri)} (metrics eval/*, table eval/probes.json)")


def _print_table(report: dict, results) -> None:
    title = escape(f"{report['checkpoint']} ({'random init' if report['random_init'] else report['which']}) on "
             f"{report['dataset']}: {report['train_images']} train / {report['test_images']} test images")
    table = Table(title=title, title_justify="left")
    for col, justify in (("probe", "left"), ("test top-1 %", "right"), ("selected", "left"),
                         ("val top-1 % per setting", "left"), ("params", "right")):
        table.add_column(col, justify=justify)
    for r in results:
        table.add_row(r.probe, "n/a" if r.top1 is None else f"{r.top1:.2f}",
                      ", ".join(f"{k}={v:g}" for k, v in r.selected.items()) or escape(r.note),
                      "  ".join(f"{k}: {v:.1f}" for k, v in r.val_top1.items()),
                      "" if r.params is None else f"{r.params:,}")
    console = Console()
    console.print(table)
    if "knn_gain" in report:
        console.print(f"knn: {report['knn_gain']:+.2f} points over the same architecture at its seeded random init "
                      f"({report['knn_random_init']:.2f}%), same images")
    diag = report.get("diagnostics")
    if diag:
        o = diag["outliers"]
        tau = "none" if o["tau"] is None else f"{o['tau']:.3g}"
        console.print(f"high-norm patch tokens ({diag['measured_on']}, layer {o['layer']}, {o['mode']}): "
                      f"bimodal={o['bimodal']}, tau={tau}, {100 * o['fraction']:.2f}% of patches, "
                      f"{100 * o['images_with_outlier']:.1f}% of images")
        flow = diag["attention_flow"]
        if "patch_to_registers" in flow:
            console.print("patch attention to registers per layer: "
                          + " ".join(f"{v:.3f}" for v in flow["patch_to_registers"]))


@eval_.command("knn")
@_checkpoint_options
@click.option("--k", type=click.IntRange(min=1), default=None, help="Neighbours (default: the checkpoint's probe.k).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Vote temperature (default: the checkpoint's probe.temperature).")
@click.option("--pool", type=click.Choice(["mean", "predictor"]), default="mean", show_default=True,
              help="mean: mean of the final patch tokens (the online probe's feature); predictor: CAPI's "
                   "predictor pooling, the paper's global representation.")
def knn(checkpoint, random_init, which, dataset, limit_train, limit_test, batch_size, device, precision, seed, k,
        temperature, pool) -> None:
    """Quick weighted k-NN top-1 (%) of pooled frozen features on the test split.

    With --pool mean, the same metric as the trainer's online probe/knn_top1, on more images.
    """
    # deferred: torch
    from capi_core.eval.features import pooled_features
    from capi_core.eval.knn import knn_top1
    from capi_core.eval.online_probe import random_init_knn

    model, config, autocast = _load_model(checkpoint, which, random_init, seed, device, precision)
    source = model if pool == "predictor" else model.encoder
    name, probe_set = _load_probe_set(dataset, config, limit_train, limit_test, seed)
    train_x, train_y, test_x, test_y = probe_set.train_x, probe_set.train_y, probe_set.test_x, probe_set.test_y
    k = k or config.probe.k
    temperature = temperature or config.probe.temperature
    click.echo(f"features of {len(train_x)} train and {len(test_x)} test images", err=True)
    top1 = knn_top1(pooled_features(source, train_x, batch_size, pool=pool, autocast_dtype=autocast), train_y,
                    pooled_features(source, test_x, batch_size, pool=pool, autocast_dtype=autocast), test_y, k=k,
                    temperature=temperature)
    what = "random init" if random_init else which
    click.echo(f"knn_top1 {top1:.2f}%  ({checkpoint}, {what}; {pool} pooling; {name}: {len(train_x)} train / "
               f"{len(test_x)} test; k={k}, T={temperature:g})")
    if pool == "mean" and not random_init:
        device_ = next(model.parameters()).device
        base = random_init_knn(config, probe_set, config.data.cache_dir, device_, autocast, k, temperature)
        click.echo(f"knn_random_init {base.knn_top1:.2f}%  (the same architecture at its seeded random init, "
                   f"same images{', cached' if base.cached else ''}); knn_gain {top1 - base.knn_top1:+.2f} points")
