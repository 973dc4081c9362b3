"""How far apart two online-probe scores must be to mean something.

Two scores are told apart when they differ by more than two standard deviations of their
*difference*. What that standard deviation is depends on how the two runs relate:

- Trials of one sweep share ``run.seed``: the same init (unless the sweep changes the model's shape),
  the same batches and the same masks. Much of a run's luck is its seed's, so their difference
  spreads far less than two independent runs' would: measured on four-trial grids over three seeds,
  0.68 points against 1.6 with 20,000 images as the k-NN memory (``benchmarks/learning.py paired``).
- Runs with different seeds or architectures differ by sqrt(2) x the spread of one run's score over
  training seeds (``benchmarks/learning.py noise``), or, where that was not measured, by the binomial
  sampling error of the probe's query images.

Computed from a dataset's manifest alone, without torch, so that sweep tables (``capi sweep status``)
can print it quickly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from capi_core.config import ProbeConfig
from capi_core.data.format import load_manifest


# Standard deviation (points) of probe/knn_top1 over training seeds at equal training, measured with
# `benchmarks/learning.py noise`, keyed by (dataset name, image size, probe train images, probe test images).
MEASURED_NOISE: dict[tuple[str, int, int, int], float] = {
    # The quickstart's trial (cpu-demo recipe, 1,200 steps, one core each, two at a time) with seeds 0-3,
    # its final EMA teacher scored on each probe set (2026-12-02, 2-core Xeon with AMX, bf16). With
    # 5,000 + 5,000 images the runs read 72.58, 71.02, 72.40 and 71.00 %. Splitting each spread with the
    # runs' discordant queries (benchmarks/learning.py, split_noise) puts only 0.24-0.37 of it on the
    # sampling of queries: the rest shrinks with the memory, not with more queries.
    ("fashion-mnist", 28, 5000, 5000): 0.86,
    ("fashion-mnist", 28, 10000, 10000): 0.77,
    ("fashion-mnist", 28, 20000, 10000): 0.67,
    ("fashion-mnist", 28, 60000, 10000): 0.44,
}

# Standard deviation (points) over training seeds of the difference between two trials of one sweep
# (same seed, same architecture), same key; the root of the mean variance over every pair of variants.
# Measured with `benchmarks/learning.py paired`, 2,000 steps, seeds 0-2, one core per run, the in-memory
# data path (2026-12-07, 2-core AMD EPYC, bf16; docs/cpu_recipe/results/):
# - 20,000 / 10,000: 0.69 on the 2 x 2 grid warmup 0.1 / 0.3 x momentum flat / rising and 0.67 on
#   K = 16 / 64 / 256 / 1,024, pooled 0.68. (Before the in-memory data path the first grid read 0.45.)
# - 60,000 / 10,000 (the whole train split as memory): 0.49 on the K grid, whose final teachers were also
#   scored that way; 0.52 on the same grid as the quickstart now runs it, 2,300 steps with that probe
#   online (2026-12-07, the same VM kind; docs/cpu_recipe/results/learning-paired-clusters-2300.json).
#   The table keeps the larger, the quickstart's own.
MEASURED_PAIRED_NOISE: dict[tuple[str, int, int, int], float] = {
    ("fashion-mnist", 28, 20000, 10000): 0.68,
    ("fashion-mnist", 28, 60000, 10000): 0.52,
}


@dataclass(frozen=True)
class ProbeNoise:
    sigma: float  # points: the spread of one run's score over training seeds
    measured: bool  # from MEASURED_NOISE rather than the binomial floor
    probe_set: str  # what the probe set is
    paired_sigma: float | None = None  # points: the spread of the difference of two same-seed trials

    @property
    def difference_sigma(self) -> float:
        """The standard deviation of the difference of two scores: paired where measured, else sqrt(2) sigma."""
        return self.paired_sigma if self.paired_sigma is not None else math.sqrt(2.0) * self.sigma

    @property
    def threshold(self) -> float:
        """Differences below two standard deviations of a difference are not told apart from noise."""
        return 2.0 * self.difference_sigma

    def sentence(self) -> str:
        if self.paired_sigma is not None:
            how = (f"2 x {self.paired_sigma:.2f}, the spread over seeds of the difference of two trials that "
                   f"share their seed, measured by `benchmarks/learning.py paired`; runs with other seeds "
                   f"differ by up to {2 * math.sqrt(2.0) * self.sigma:.1f} by chance")
        elif self.measured:
            how = (f"2 x sqrt(2) x {self.sigma:.2f}, the spread of probe/knn_top1 over training seeds, measured "
                   f"by `benchmarks/learning.py noise`")
        else:
            how = (f"2 x sqrt(2) x {self.sigma:.2f}, the binomial sampling error of the probe's query images; "
                   f"not measured for this probe set (`benchmarks/learning.py noise` measures it)")
        return f"probe set {self.probe_set}; differences below {self.threshold:.1f} points are noise ({how})"


def probe_noise(dataset_dir: str | Path, img_size: int, cfg: ProbeConfig, paired: bool = False) -> ProbeNoise:
    """The probe's noise for a dataset and probe settings, from the manifest alone (no image is read).
    ``paired``: the scores compared are trials of one sweep that share seed and architecture."""
    manifest = load_manifest(dataset_dir)
    test_split = "test" if "test" in manifest.splits else "train"
    n_train = min(cfg.train_images, manifest.splits.get("train", 0))
    n_test = min(cfg.test_images, manifest.splits[test_split])
    described = f"{manifest.name}: {n_train:,} train / {n_test:,} {test_split} images"
    key = (manifest.name, img_size, n_train, n_test)
    paired_sigma = MEASURED_PAIRED_NOISE.get(key) if paired else None
    measured = MEASURED_NOISE.get(key)
    if measured is not None:
        return ProbeNoise(measured, True, described, paired_sigma)
    return ProbeNoise(100.0 * math.sqrt(0.25 / max(n_test, 1)), False, described, paired_sigma)


def trials_are_paired(swept: Iterable[str]) -> bool:
    """Whether the trials of a sweep over these dotted fields share seed and architecture (so their
    scores compare as paired): nothing under ``model.`` (another shape draws another init) and not
    ``run.seed``."""
    return not any(name.startswith("model.") or name == "run.seed" for name in swept)
