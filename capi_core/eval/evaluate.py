"""A checkpoint's whole frozen-feature evaluation: probes, the random-init baseline, diagnostics and
pictures, returned as one typed report (``EvalReport``), what ``capi eval run`` writes to eval.json.

The order is the reference evaluation's: final-layer features of the train and test images once,
every probe selected on the train split and scored once on the test split, then CAPI's predictor
pooling beside mean pooling for the k-NN, the k-NN of the same architecture at its seeded random
initialisation on the same images, and, when asked, register diagnostics and pictures on a fixed
subset of the test images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from capi_core.config import TrainConfig
from capi_core.data import DatasetError, load_manifest, resolve_dataset
from capi_core.errors import CapiError
from capi_core.eval.diagnostics import run_diagnostics
from capi_core.eval.features import extract_features, predictor_pooled_tokens
from capi_core.eval.online_probe import ProbeSet, random_init_knn
from capi_core.eval.pictures import write_pictures
from capi_core.eval.probes import ProbeProtocol, ProbeResult, run_probe, run_probes
from capi_core.models.student import Student


class EvalError(CapiError, ValueError):
    """The evaluation cannot run on these images (e.g. their labels do not suit a probe); the message
    names the dataset."""


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how."""

    probes: tuple[str, ...]  # probe names of capi_core.eval.probes (knn, linear_cls, linear_mean, ...)
    protocol: ProbeProtocol = ProbeProtocol()
    batch_size: int = 256  # images per forward pass
    include_registers: bool = False  # let the probes pool over register tokens too
    diagnostic_images: int | None = None  # test images for the register diagnostics; None: none
    picture_images: int | None = None  # test images shown as pictures; None: no pictures


@dataclass
class EvalReport:
    """One evaluation; ``to_dict`` is eval.json."""

    checkpoint: str
    which: str  # "teacher" or "student"
    random_init: bool  # the checkpoint's architecture untrained
    dataset: str
    train_images: int
    test_images: int
    autocast: str  # the feature extraction's autocast dtype, "None" for fp32
    features: str  # which tokens the probes read
    protocol: ProbeProtocol
    probes: list[ProbeResult] = field(default_factory=list)
    knn_random_init: float | None = None  # k-NN top-1 % at random init (trained checkpoints only)
    knn_gain: float | None = None  # knn minus knn_random_init, points
    diagnostics: dict[str, Any] | None = None
    pictures: list[str] | None = None  # PNG paths

    def to_dict(self) -> dict[str, Any]:
        """The JSON report; the optional parts appear only when they were measured."""
        out = {"checkpoint": self.checkpoint, "which": self.which, "random_init": self.random_init,
               "dataset": self.dataset, "train_images": self.train_images, "test_images": self.test_images,
               "autocast": self.autocast, "features": self.features, "protocol": asdict(self.protocol),
               "accuracy": "top-1 %", "probes": [r.to_dict() for r in self.probes]}
        if self.knn_random_init is not None:
            out.update(knn_random_init=self.knn_random_init, knn_gain=self.knn_gain)
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics
        if self.pictures is not None:
            out["pictures"] = self.pictures
        return out


def eval_dataset(dataset: str | None, config: TrainConfig) -> tuple[str, Path]:
    """(name, directory) of the dataset to evaluate on: ``dataset``, else the checkpoint's; DatasetError
    unless it has at least 2 classes, a train and a test split, and the model's channels."""
    name = dataset or config.data.dataset
    path = resolve_dataset(name, config.data.cache_dir)
    manifest = load_manifest(path)
    if len(manifest.class_names) < 2:
        raise DatasetError(f"dataset {name!r} ({path}) has {len(manifest.class_names)} class label(s); "
                           "frozen-feature probes need a labelled dataset with at least 2 classes")
    missing = [s for s in ("train", "test") if s not in manifest.splits]
    if missing:
        raise DatasetError(f"dataset {name!r} ({path}) has no {' and no '.join(missing)} split "
                           f"(it has {', '.join(manifest.splits)}); evaluation needs both")
    if manifest.channels != config.model.in_chans:
        raise DatasetError(f"dataset {name!r} has {manifest.channels}-channel images but the checkpoint's "
                           f"model takes {config.model.in_chans} (model.in_chans)")
    return name, path


def _ignore(message: str) -> None:
    pass


def evaluate(model: Student, config: TrainConfig, probe_set: ProbeSet, settings: EvalSettings, *,
             checkpoint: str, which: str, random_init: bool, dataset: str,
             autocast_dtype: torch.dtype | None = None, out: Path | None = None,
             stage: Callable[[str], None] = _ignore, say: Callable[[str], None] = _ignore) -> EvalReport:
    """Evaluate ``model`` (the whole CAPI model: the probes read ``model.encoder``, predictor pooling
    ``model.predictor``) on ``probe_set``; pictures go to ``out``.

    ``checkpoint``, ``which``, ``random_init`` and ``dataset`` describe what is evaluated, for the
    report. ``stage`` hears what is being done now, ``say`` each result as it comes. EvalError if the
    probes cannot use the dataset's labels.
    """
    encoder, protocol, batch_size = model.encoder, settings.protocol, settings.batch_size
    train_x, train_y, test_x, test_y = probe_set.train_x, probe_set.train_y, probe_set.test_x, probe_set.test_y
    stage(f"features of {len(train_x)} train and {len(test_x)} test images")
    train_tokens = extract_features(encoder, train_x, batch_size=batch_size, autocast_dtype=autocast_dtype).final
    test_tokens = extract_features(encoder, test_x, batch_size=batch_size, autocast_dtype=autocast_dtype).final
    report = EvalReport(
        checkpoint=checkpoint, which=which, random_init=random_init, dataset=dataset,
        train_images=len(train_x), test_images=len(test_x), autocast=str(autocast_dtype),
        features="last layer, after the final norm; registers " + ("included" if settings.include_registers
                                                                   else "excluded"),
        protocol=protocol)
    try:
        results = run_probes(train_tokens, train_y, test_tokens, test_y, probes=settings.probes, protocol=protocol,
                             include_registers=settings.include_registers, progress=lambda p: stage(f"probe {p}"))
    except ValueError as err:
        raise EvalError(f"dataset {dataset!r}: {err}") from None
    if "knn" in settings.probes:  # CAPI's own global representation (CAPI paper, Table 5), beside mean pooling
        stage("probe knn_predictor (predictor pooling)")
        pooled = [predictor_pooled_tokens(model.predictor, t, batch_size, autocast_dtype)
                  for t in (train_tokens, test_tokens)]
        result = run_probe("knn", pooled[0], train_y.long(), pooled[1], test_y.long(),
                           int(max(train_y.max(), test_y.max())) + 1, protocol)
        results.insert(settings.probes.index("knn") + 1, replace(result, probe="knn_predictor"))
    for r in results:
        say(f"{r.probe}: " + ("n/a" if r.top1 is None else f"{r.top1:.2f}%"))
    report.probes = results
    if "knn" in settings.probes and not random_init:  # the online probe's baseline, on these images
        stage("k-NN of the same architecture at its seeded random init")
        knn = next(r for r in results if r.probe == "knn")
        base = random_init_knn(config, probe_set, config.data.cache_dir, next(encoder.parameters()).device,
                               autocast_dtype, int(knn.selected["k"]), protocol.knn_temperature)
        report.knn_random_init, report.knn_gain = base.knn_top1, knn.top1 - base.knn_top1
        say(f"knn at random init: {base.knn_top1:.2f}% (gain {report.knn_gain:+.2f} points)")
    del train_tokens, test_tokens

    if settings.diagnostic_images is not None:
        stage(f"diagnostics on {min(settings.diagnostic_images, len(test_x))} test images")
        report.diagnostics = run_diagnostics(encoder, test_x[:settings.diagnostic_images],
                                             batch_size=min(batch_size, 64))
    if settings.picture_images is not None:
        stage("pictures")
        tau = (report.diagnostics or {}).get("outliers", {}).get("tau")
        report.pictures = [str(p) for p in write_pictures(encoder, test_x[:settings.picture_images], out, tau=tau)]
    return report
