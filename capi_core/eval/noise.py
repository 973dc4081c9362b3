"""How far apart two online-probe scores must be to mean something: the spread of
``probe/knn_top1`` over training seeds where it was measured, else the binomial sampling error of the
probe's query images. Computed from a dataset's manifest alone, without torch, so that sweep tables
(``capi sweep status``) can print it quickly.
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class ProbeNoise:
    sigma: float  # points
    measured: bool  # from MEASURED_NOISE rather than the binomial floor
    probe_set: str  # what the probe set is

    @property
    def threshold(self) -> float:
        """Differences below two standard deviations are not told apart from noise."""
        return 2.0 * self.sigma

    def sentence(self) -> str:
        how = ("the spread of probe/knn_top1 over training seeds, measured by `benchmarks/learning.py noise`" if
               self.measured else "the binomial sampling error of the probe's query images; not measured for "
               "this probe set (`benchmarks/learning.py noise` measures it)")
        return (f"probe set {self.probe_set}; differences below {self.threshold:.1f} points are noise "
                f"(2 x {self.sigma:.2f}: {how})")


def probe_noise(dataset_dir: str | Path, img_size: int, cfg: ProbeConfig) -> ProbeNoise:
    """The probe's noise for a dataset and probe settings, from the manifest alone (no image is read)."""
    manifest = load_manifest(dataset_dir)
    test_split = "test" if "test" in manifest.splits else "train"
    n_train = min(cfg.train_images, manifest.splits.get("train", 0))
    n_test = min(cfg.test_images, manifest.splits[test_split])
    described = f"{manifest.name}: {n_train:,} train / {n_test:,} {test_split} images"
    measured = MEASURED_NOISE.get((manifest.name, img_size, n_train, n_test))
    if measured is not None:
        return ProbeNoise(measured, True, described)
    return ProbeNoise(100.0 * math.sqrt(0.25 / max(n_test, 1)), False, described)
