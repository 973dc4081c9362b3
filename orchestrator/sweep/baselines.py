"""A sweep's random-init probe baselines, scored once by the driver before its first trial starts.

Every trial's online probe reads its score against the same architecture at its seeded random init
(``capi_core.eval.online_probe``), and trials that share an architecture share that score through the
on-disk cache. But trials that start together would each compute it: in the quickstart the first two
trials both did, and their final probe took 70 s against the 35 s of the two trials after them (2-core
AMD EPYC VM, 2026-12-07). So a local sweep whose trials train on the CPU scores each distinct
baseline once, here, on all of the machine's cores, before Ray starts.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable

import torch

from capi_core.config import ConfigError, TrainConfig
from capi_core.data import resolve_dataset
from capi_core.errors import CapiError
from capi_core.eval.online_probe import baseline_inputs, online_baseline
from capi_core.precision import choose_precision, flush_denormals
from orchestrator.sweep.spec import SweepSpec

MAX_COMBINATIONS = 1_000  # grid points enumerated to find the distinct baselines; a larger space is left to its trials


def planned_baselines(spec: SweepSpec) -> list[TrainConfig] | None:
    """One trial config per distinct baseline the sweep's trials will read, or None when the driver cannot
    know them: a range (uniform, loguniform, randint) over a field the baseline depends on (the
    architecture, the seed, the probe) gives every trial its own, and a space of more than
    ``MAX_COMBINATIONS`` points is not enumerated. Combinations that cannot run are skipped."""
    finite = {path: dist.args for path, dist in spec.search_space.items() if dist.kind in ("grid", "choice")}
    ranges = {path: dist.extremes() for path, dist in spec.search_space.items() if path not in finite}
    if math.prod(len(values) for values in finite.values()) > MAX_COMBINATIONS:
        return None
    low = {path: ends[0][1] for path, ends in ranges.items()}
    planned: dict[str, TrainConfig] = {}
    for values in itertools.product(*finite.values()):
        params = {**dict(zip(finite, values)), **low}
        try:
            config = spec.trial_config(params)
            identity = _identity(config)
            if any(_identity(spec.trial_config({**params, path: ends[-1][1]})) != identity
                   for path, ends in ranges.items()):
                return None
        except ConfigError:
            continue  # a combination no trial can run (the spec's checks say why)
        planned.setdefault(identity, config)
    return list(planned.values())


def warm_baselines(spec: SweepSpec, say: Callable[[str], None]) -> None:
    """Score (or find cached) each baseline of ``planned_baselines`` in this process, saying what it did."""
    configs = planned_baselines(spec)
    if configs is None:
        say("probe baselines: not known before the trials (a range over a field they depend on, or a space "
            "too large to list), so each trial scores its own")
        return
    cpu = torch.device("cpu")
    flush_denormals(cpu)  # as the trainer does
    for config in configs:
        start = time.perf_counter()
        try:
            precision = choose_precision(config.run.precision, cpu, config.model, config.data.cache_dir)
            dataset_dir = resolve_dataset(config.data.dataset, config.data.cache_dir)
            probe_set, baseline = online_baseline(config, dataset_dir, cpu, precision.autocast_dtype)
        except (CapiError, OSError, ValueError) as err:  # only a saving: the trials score it themselves
            say(f"probe baseline: not scored in the driver ({err}); each trial scores its own")
            continue
        how = "cached" if baseline.cached else f"scored in {time.perf_counter() - start:.0f} s, once for the trials"
        say(f"probe baseline: {baseline.knn_top1:.2f} % k-NN at random init on {probe_set.description} ({how})")


def _identity(config: TrainConfig) -> str:
    return json.dumps(baseline_inputs(config), sort_keys=True)
