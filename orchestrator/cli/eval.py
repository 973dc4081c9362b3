"""``capi eval``: frozen-feature evaluation of a checkpoint (probes, register diagnostics, pictures)."""

from __future__ import annotations

import json
from pathlib import Path

import click

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
    import torch

    from capi_core.checkpoint import CheckpointError, load_student
    from capi_core.train import pick_device, use_bf16

    try:
        model, config = load_student(checkpoint, which=which)
    except CheckpointError as err:
        raise click.ClickException(str(err)) from None
    if random_init:
        from capi_core.models.student import Student

        torch.manual_seed(seed)
        model = Student(config).eval()
    try:
        dev = pick_device(device)
    except RuntimeError as err:
        raise click.UsageError(str(err)) from None
    return model.to(dev), config, torch.bfloat16 if use_bf16(precision, dev, config.model) else None


def _load_probe_set(dataset: str | None, config, limit_train: int, limit_test: int, seed: int):
    """(name, labelled train and test images for the encoder's input size as a ``ProbeSet``); dataset
    problems name the dataset."""
    from capi_core.data import DatasetError, load_manifest, resolve_dataset
    from capi_core.eval.online_probe import load_probe_set

    name = dataset or config.data.dataset
    try:
        path = resolve_dataset(name, config.data.cache_dir)
        manifest = load_manifest(path)
    except DatasetError as err:
        raise click.ClickException(str(err)) from None
    if len(manifest.class_names) < 2:
        raise click.ClickException(f"dataset {name!r} ({path}) has {len(manifest.class_names)} class label(s); "
                                   "frozen-feature probes need a labelled dataset with at least 2 classes")
    missing = [s for s in ("train", "test") if s not in manifest.splits]
    if missing:
        raise click.ClickException(f"dataset {name!r} ({path}) has no {' and no '.join(missing)} split "
                                   f"(it has {', '.join(manifest.splits)}); evaluation needs both")
    if manifest.channels != config.model.in_chans:
        raise click.ClickException(f"dataset {name!r} has {manifest.channels}-channel images but the checkpoint's "
                                   f"model takes {config.model.in_chans} (model.in_chans)")
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
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Probe training epochs (default: protocol's).")
@click.option("--include-registers", is_flag=True, help="Let the probes pool over register tokens too.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory. Default: CHECKPOINT/eval (eval-random-init with --random-init).")
def run(checkpoint, random_init, which, dataset, limit_train, limit_test, batch_size, device, precision, seed,
        probe_list, diagnostics, pictures, diagnostic_images, picture_images, epochs, include_registers, out) -> None:
    """Probe a checkpoint's frozen features; write eval.json (and PNGs) and print a table.

    \b
      capi eval run runs/capi/checkpoints/step-0002000
      capi eval run runs/capi --probes knn,linear --diagnostics --pictures
      capi eval run runs/capi --random-init        # same architecture, untrained: the baseline

    Probe hyperparameters are selected on a held-out 10% of the train split; the test split is
    scored once, with the selected setting. Accuracies are top-1 in %.
    """
    probes = _parse_probes(probe_list)
    from dataclasses import asdict, replace

    from rich.console import Console

    from capi_core.eval.features import extract_features
    from capi_core.eval.probes import ProbeProtocol, run_probes

    console = Console(stderr=True, highlight=False)
    model, config, autocast = _load_model(checkpoint, which, random_init, seed, device, precision)
    encoder = model.encoder
    out = out or (checkpoint if checkpoint.is_dir() else checkpoint.parent) / (
        "eval-random-init" if random_init else "eval")
    protocol = ProbeProtocol(seed=seed)
    if epochs:
        protocol = replace(protocol, epochs=epochs)

    with console.status("loading data") as status:

        def stage(message: str) -> None:
            status.update(message)
            if not console.is_terminal:  # no live spinner (CI, logs): one line per stage instead
                console.print(message)

        name, probe_set = _load_probe_set(dataset, config, limit_train, limit_test, seed)
        train_x, train_y, test_x, test_y = probe_set.train_x, probe_set.train_y, probe_set.test_x, probe_set.test_y
        stage(f"features of {len(train_x)} train and {len(test_x)} test images")
        train_tokens = extract_features(encoder, train_x, batch_size=batch_size, autocast_dtype=autocast).final
        test_tokens = extract_features(encoder, test_x, batch_size=batch_size, autocast_dtype=autocast).final
        report = {
            "checkpoint": str(checkpoint), "which": which, "random_init": random_init, "dataset": name,
            "train_images": len(train_x), "test_images": len(test_x), "autocast": str(autocast),
            "features": "last layer, after the final norm; registers excluded" if not include_registers
            else "last layer, after the final norm; registers included",
            "protocol": asdict(protocol), "accuracy": "top-1 %",
        }
        try:
            results = run_probes(train_tokens, train_y, test_tokens, test_y, probes=probes, protocol=protocol,
                                 include_registers=include_registers,
                                 progress=lambda p: stage(f"probe {p}"))
        except ValueError as err:
            raise click.ClickException(f"dataset {name!r}: {err}") from None
        if "knn" in probes:  # CAPI's own global representation (CAPI paper, Table 5), beside mean pooling
            from capi_core.eval.features import predictor_pooled_tokens
            from capi_core.eval.probes import run_probe

            stage("probe knn_predictor (predictor pooling)")
            pooled = [predictor_pooled_tokens(model.predictor, t, batch_size, autocast)
                      for t in (train_tokens, test_tokens)]
            result = run_probe("knn", pooled[0], train_y.long(), pooled[1], test_y.long(),
                               int(max(train_y.max(), test_y.max())) + 1, protocol)
            results.insert(probes.index("knn") + 1, replace(result, probe="knn_predictor"))
        for r in results:
            console.print(f"{r.probe}: " + ("n/a" if r.top1 is None else f"{r.top1:.2f}%"))
        report["probes"] = [r.to_dict() for r in results]
        if "knn" in probes and not random_init:  # the online probe's baseline, on these images
            from capi_core.eval.online_probe import random_init_knn

            stage("k-NN of the same architecture at its seeded random init")
            knn = next(r for r in results if r.probe == "knn")
            base = random_init_knn(config, probe_set, config.data.cache_dir, next(encoder.parameters()).device,
                                   autocast, int(knn.selected["k"]), protocol.knn_temperature)
            report["knn_random_init"] = base.knn_top1
            report["knn_gain"] = knn.top1 - base.knn_top1
            console.print(f"knn at random init: {base.knn_top1:.2f}% (gain {report['knn_gain']:+.2f} points)")
        del train_tokens, test_tokens

        if diagnostics:
            from capi_core.eval.diagnostics import run_diagnostics

            stage(f"diagnostics on {min(diagnostic_images, len(test_x))} test images")
            report["diagnostics"] = run_diagnostics(encoder, test_x[:diagnostic_images], batch_size=min(batch_size, 64))
        if pictures:
            from capi_core.eval.pictures import write_pictures

            stage("pictures")
            tau = report.get("diagnostics", {}).get("outliers", {}).get("tau")
            report["pictures"] = [str(p) for p in write_pictures(encoder, test_x[:picture_images], out, tau=tau)]
    _write_json(out / "eval.json", report)
    _print_table(report, results)
    click.echo(f"wrote {out / 'eval.json'}" + (f" and {len(report['pictures'])} pictures" if pictures else ""))


def _print_table(report: dict, results) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

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
