"""The trainer's online probe, with the random-init baseline every score is read against.

A k-NN accuracy means little alone: on Fashion-MNIST an untrained ViT already reaches 57-69 % (it
depends on the patch size), so a sweep that ranks trials by the raw score can crown noise. Every
probe therefore also scores the same architecture at its seeded random initialisation on the same
probe images, and reports ``probe/knn_gain`` = trained minus random init.

- The probe set is fixed per (dataset, image size, probe sizes): class-stratified subsets of the train
  split (the k-NN memory) and of the test split (the queries), drawn with fixed seeds, decoded once,
  never augmented. Every trial of a sweep is scored on the same images.
- The baseline is a pure function of the architecture, the init seed, the precision and the probe set,
  so it is computed once and cached on disk under ``<cache>/probe-baselines/<key>.json``; later probes,
  runs and sweep trials read it back.
- Features are the mean of the final-normed patch tokens (registers excluded) of the EMA teacher, in
  large batches: the probe is a forward pass and a matrix product, nothing trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from capi_core.atomic import atomic_write
from capi_core.config import ProbeConfig, TrainConfig
from capi_core.data import cache_root
from capi_core.data.format import load_manifest
from capi_core.data.reader import load_split
from capi_core.eval.features import pooled_features
from capi_core.eval.knn import knn_predict
# How far apart two probe scores must be to mean something lives in noise (no torch, for the CLI's tables).
from capi_core.eval.noise import MEASURED_NOISE, ProbeNoise, probe_noise  # noqa: F401 - re-exported
from capi_core.models.student import Student

BASELINE_VERSION = 2  # bump when the baseline's definition changes, so stale cache entries are not read
# (2: features in batches of 256; bf16 products may round differently at another batch size)
# Probe sets up to this size are cached decoded: the whole of Fashion-MNIST at 28x28 (70,000 images in
# float32, 220 MB), whose decoding cost each sweep trial 4.6 s of its probe on one core (2-core AMD EPYC,
# 2026-12-07); reading it back takes well under a second.
CACHED_BYTES = 256 * 2**20
# Images per forward pass of the probe. Larger is not faster on CPU: the cpu-demo encoder (bf16 autocast)
# embedded 10,240 images in 2.59-3.23 s at 256 against 3.44-3.72 s at 1,024 on one thread (medians of
# 5-6 alternated rounds, four runs, real and random images), 1.72 against 2.33 on two, and 2.8-2.9
# against 3.6-3.7 s each when two processes did it at once (as the quickstart's two trials do); 64 and
# 128 were no faster than 256. A 2-core AMD EPYC VM, 2026-12-07 (benchmarks/probe_cost.py). A batch of
# 256 holds ~5 MB of MLP activations ([256 x 20 tokens, 512] in bf16); 1,024 holds four times that.
FEATURE_BATCH = 256
PROBE_METRIC = "probe/knn_top1"  # present in a trainer's metrics exactly at its probe steps
METRICS = (PROBE_METRIC, "probe/knn_random_init", "probe/knn_gain")


@dataclass(frozen=True)
class ProbeSet:
    """Fixed, decoded, un-augmented probe images: a k-NN memory (``train_*``) and queries (``test_*``)."""

    train_x: Tensor  # [N, C, H, W]
    train_y: Tensor  # [N]
    test_x: Tensor  # [M, C, H, W]
    test_y: Tensor  # [M]
    description: str  # e.g. "fashion-mnist: 10,000 train / 10,000 test images"
    key: str  # hex digest of what determines the images


def load_probe_set(dataset_dir: str | Path, img_size: int, train_images: int | None, test_images: int | None,
                   seed: int = 0, cache_dir: str | Path | None = None) -> ProbeSet:
    """Class-stratified ``train_images`` of the train split (drawn with ``seed``) and ``test_images`` of the
    test split (its train split if it has none; drawn with ``seed + 1``); None takes the whole split.

    Sets of at most ``CACHED_BYTES`` are kept decoded under ``<cache>/probe-sets/<key>.safetensors``: every
    trial of a sweep probes the same images.
    """
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    test_split = "test" if "test" in manifest.splits else "train"
    n_train = _subset_size(manifest.splits.get("train", 0), train_images)
    n_test = _subset_size(manifest.splits[test_split], test_images)
    identity = {"shards": sorted(s.sha256 for s in manifest.shards if s.split in ("train", test_split)),
                "test_split": test_split, "img_size": img_size, "train": n_train, "test": n_test, "seed": seed}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    description = f"{manifest.name}: {n_train:,} train / {n_test:,} {test_split} images"
    path = cache_root(cache_dir) / "probe-sets" / f"{key[:32]}.safetensors"
    with contextlib.suppress(OSError, ValueError, KeyError, SafetensorError):
        t = load_file(path)
        return ProbeSet(t["train_x"], t["train_y"], t["test_x"], t["test_y"], description, key)
    train_x, train_y = load_split(dataset_dir, "train", img_size, limit=train_images, seed=seed)
    test_x, test_y = load_split(dataset_dir, test_split, img_size, limit=test_images, seed=seed + 1)
    if train_x.nbytes + test_x.nbytes <= CACHED_BYTES:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    return ProbeSet(train_x, train_y, test_x, test_y, description, key)


def _subset_size(split_size: int, limit: int | None) -> int:
    return split_size if limit is None or limit >= split_size else limit


def online_probe_set(dataset_dir: str | Path, img_size: int, cfg: ProbeConfig,
                     cache_dir: str | Path | None = None) -> ProbeSet:
    """The trainer's probe set: ``cfg.train_images`` / ``cfg.test_images``, seed 0, the same for every run."""
    return load_probe_set(dataset_dir, img_size, cfg.train_images, cfg.test_images, seed=0, cache_dir=cache_dir)


def knn_predictions(encoder: nn.Module, probe_set: ProbeSet, k: int, temperature: float,
                    autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Class predictions [M] of the weighted k-NN on ``encoder``'s mean-pooled patch features, one per
    query of ``probe_set``."""
    f_train = pooled_features(encoder, probe_set.train_x, batch_size=FEATURE_BATCH, autocast_dtype=autocast_dtype)
    f_test = pooled_features(encoder, probe_set.test_x, batch_size=FEATURE_BATCH, autocast_dtype=autocast_dtype)
    return knn_predict(f_train, probe_set.train_y, f_test, k=k, temperature=temperature,
                       num_classes=int(max(probe_set.train_y.max(), probe_set.test_y.max())) + 1)


def knn_score(encoder: nn.Module, probe_set: ProbeSet, k: int, temperature: float,
              autocast_dtype: torch.dtype | None = None) -> float:
    """Weighted k-NN top-1 (%) of ``encoder``'s mean-pooled patch features on ``probe_set``."""
    preds = knn_predictions(encoder, probe_set, k, temperature, autocast_dtype)
    # From the exact count, so that 7,357 of 10,000 logs as 73.57 rather than float32's 73.57000112.
    return 100.0 * int((preds == probe_set.test_y.long()).sum()) / len(probe_set.test_y)


def _initial_network(config: TrainConfig) -> dict[str, Any]:
    """What determines the encoder at its random init: the architecture and the init seed."""
    return {"model": config.model.model_dump(mode="json"), "seed": config.run.seed}


def baseline_key(config: TrainConfig, probe_set: ProbeSet, k: int, temperature: float,
                 autocast_dtype: torch.dtype | None = None) -> str:
    """What determines the random-init score: the encoder's architecture and init seed (``run.seed``),
    the precision of its forward pass, the k-NN's settings and the probe images. (``baseline_inputs`` is
    the same at the level of a config, before the images and the dtype are resolved.)"""
    what = {"version": BASELINE_VERSION, **_initial_network(config), "k": k, "temperature": temperature,
            "probe_set": probe_set.key, "dtype": str(autocast_dtype)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def random_init_encoder(config: TrainConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The encoder exactly as the trainer initialises it (``torch.manual_seed(run.seed)``, then the
    student), built without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        return Student(config).encoder.to(device)


@dataclass(frozen=True)
class Baseline:
    knn_top1: float
    cached: bool  # read from the cache rather than computed now
    path: Path


def random_init_knn(config: TrainConfig, probe_set: ProbeSet, cache_dir: str | Path | None = None,
                    device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                    k: int | None = None, temperature: float | None = None) -> Baseline:
    """The k-NN score of the seeded random-init encoder on ``probe_set``, from the cache when it is there.
    ``k`` and ``temperature`` default to the config's probe settings."""
    k, temperature = k or config.probe.k, temperature or config.probe.temperature
    key = baseline_key(config, probe_set, k, temperature, autocast_dtype)
    path = cache_root(cache_dir) / "probe-baselines" / f"{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return Baseline(float(json.loads(path.read_text())["knn_top1"]), True, path)
    score = knn_score(random_init_encoder(config, device), probe_set, k, temperature, autocast_dtype)
    record = {"knn_top1": score, "probe_set": probe_set.description, **_initial_network(config), "k": k,
              "temperature": temperature, "dtype": str(autocast_dtype)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return Baseline(score, False, path)


def online_baseline(config: TrainConfig, dataset_dir: str | Path, device: torch.device | str = "cpu",
                    autocast_dtype: torch.dtype | None = None) -> tuple[ProbeSet, Baseline]:
    """A run's probe set and the random-init baseline its online probe reads every score against."""
    probe_set = online_probe_set(dataset_dir, config.model.img_size, config.probe, config.data.cache_dir)
    return probe_set, random_init_knn(config, probe_set, config.data.cache_dir, device, autocast_dtype)


def baseline_inputs(config: TrainConfig) -> dict[str, Any]:
    """What of a run's config its online baseline depends on: the architecture, the init seed, the probe
    and its dataset, the precision setting. Runs that agree on these share one cached baseline
    (``baseline_key`` then adds the resolved probe images and dtype), so a sweep can score it once."""
    return {**_initial_network(config),
            "probe": config.probe.model_dump(mode="json", include={"train_images", "test_images", "k", "temperature"}),
            "dataset": str(config.data.dataset), "cache": str(config.data.cache_dir),
            "precision": config.run.precision}


def probe_metrics(trained: float, baseline: float) -> dict[str, float]:
    """The three logged names: the trained score, the baseline and their difference (points), the
    difference rounded to 1e-6 (scores are counts over at most millions of queries) so that tables show
    4.58, not 4.579999999999998."""
    return dict(zip(METRICS, (trained, baseline, round(trained - baseline, 6))))
