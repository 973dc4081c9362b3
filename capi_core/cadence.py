"""When a training run probes and checkpoints: the one rule that the trainer follows and that the
sweep file check, ASHA's rung count, the Tune reporter and the sweep table read.

A step is counted after its optimiser update (step ``s`` of ``optim.steps``, 1-based). The trainer
probes only at log steps, so its periodic probe falls every lcm(probe.every, run.log_every) steps
(``probe_interval``; 0: never before the end), and it always probes at the last step. It writes a
checkpoint every ``run.checkpoint_every`` steps and at the last. Reading these instead of restating
them keeps a sweep's scheduler units (probe evaluations) equal to the probes the trainer makes.

Torch-free on purpose, unlike its neighbour ``capi_core.schedules``: ``capi sweep validate`` reads
it before any heavy import.
"""

from __future__ import annotations

import math

from capi_core.config import TrainConfig


# What the trainer logs at a probe step (``Trainer._metrics`` and ``Trainer.probe``): the reports Tune
# receives, so the only metrics a sweep can rank trials on. tests/test_train.py checks a real run's.
REPORTED_METRICS = (
    "train/capi_loss", "train/clustering_loss", "train/target_entropy", "train/clusters_used",
    "train/cluster_perplexity", "train/lr", "train/momentum", "train/mask_ratio", "train/images_per_s",
    "train/epoch", "probe/knn_top1", "probe/knn_random_init", "probe/knn_gain", "probe/seconds",
)


def is_log_step(step: int, config: TrainConfig) -> bool:
    """Whether the trainer logs its metrics after step ``step``: every ``run.log_every`` steps and at the last."""
    return step == config.optim.steps or step % config.run.log_every == 0


def probe_interval(config: TrainConfig) -> int:
    """Steps between the trainer's periodic probes; 0 if it probes only at the last step."""
    every = config.probe.every
    return math.lcm(every, config.run.log_every) if every else 0


def is_probe_step(step: int, config: TrainConfig) -> bool:
    """Whether the trainer probes after step ``step``."""
    interval = probe_interval(config)
    return step == config.optim.steps or bool(interval and step % interval == 0)


def is_checkpoint_step(step: int, config: TrainConfig) -> bool:
    """Whether the trainer writes a checkpoint after step ``step``."""
    every = config.run.checkpoint_every
    return step == config.optim.steps or bool(every and step % every == 0)


def probe_evals(step: int, every: int) -> int:
    """Probe evaluations made once the probe at step ``step`` is done, probing every ``every`` steps
    (``probe_interval``; 0: only at the last step) and at the last."""
    return (step - 1) // every + 1 if every else 1


def probes_per_run(config: TrainConfig) -> int:
    """Probe evaluations of a full run: a sweep scheduler's ``max_t``."""
    return probe_evals(config.optim.steps, probe_interval(config))


def checkpoints_per_run(config: TrainConfig) -> int:
    """Checkpoints a full run writes (before retention prunes them)."""
    every = config.run.checkpoint_every
    return (config.optim.steps - 1) // every + 1 if every else 1
