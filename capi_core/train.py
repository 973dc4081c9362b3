"""The CAPI training loop, plain PyTorch, in the step order of CAPI's reference ``train_capi.py``.

One step: the EMA teacher encodes the full image; its clustering head turns every patch token into
logits; position-wise Sinkhorn-Knopp makes soft assignments (the clustering head's target and, at
the predicted positions, the student's); the student encodes the visible patches and predicts
the assignments of the masked ones. The two losses own disjoint parameters, so one backward of
their sum gives each exactly its own gradient. Then: main optimiser step, EMA, clustering step.

The trainer knows nothing of where metrics go: callbacks do (JSON lines, a progress bar, MLflow,
Ray). It runs unchanged in one process or as one rank of torch.distributed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from capi_core import checkpoint as ckpt
from capi_core.cadence import is_checkpoint_step, is_log_step, is_probe_step
from capi_core.checkpoint_dirs import METRICS_FILE
from capi_core.compilation import choose_compile
from capi_core.config import ConfigError, TrainConfig
from capi_core.data import resolve_dataset
from capi_core.data.format import load_manifest
from capi_core.data.reader import train_batches
from capi_core.errors import CapiError
from capi_core.eval.diagnostics import diag_metrics, run_diagnostics
from capi_core.eval.online_probe import ProbeSet, knn_score, online_baseline, probe_metrics
from capi_core.eval.pictures import write_pictures
from capi_core.losses import capi_loss, cluster_usage, clustering_loss, target_entropy
from capi_core.masking import mask_ratio_at, sample_masks
from capi_core.memory import check_fits
from capi_core.models.heads import ClusteringHead
from capi_core.models.student import Student, param_groups
from capi_core.precision import choose_precision, flush_denormals
from capi_core.schedules import Schedules, ema_update_
from capi_core.sinkhorn import sinkhorn_knopp


class NonFiniteLossError(CapiError, RuntimeError):
    """Training produced non-finite losses several checks in a row."""


class Callback:
    """Receives what the trainer does. Called on every rank; ``trainer.is_main`` tells rank 0."""

    def on_start(self, trainer: Trainer) -> None: ...

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path | None, metrics: dict[str, float]) -> None:
        """``path`` is the written checkpoint on rank 0 and None on the other ranks."""

    def on_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None: ...


class JsonlMetrics(Callback):
    """Appends every logged metric dict to ``path`` (default ``<run_dir>/metrics.jsonl``) on rank 0,
    with the wall-clock ``time`` (Unix seconds) it was logged at."""

    def __init__(self, path: Path | None = None):
        self.path = path

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if trainer.is_main:
            path = Path(self.path or trainer.run_dir / METRICS_FILE)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")

    on_end = on_log


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles (recorded with benchmark figures; precision no longer keys on it)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def _step_seed(seed: int, step: int, rank: int) -> int:
    # Masks depend only on (seed, step, rank): a resumed run draws exactly the masks it would have.
    return (seed * 1_000_003 + step * 9_973 + rank) % (2**63 - 1)


class Trainer:
    """CAPI pretraining for one process (one rank when torch.distributed is initialised)."""

    def __init__(self, config: TrainConfig, callbacks: Iterable[Callback] = (), resume: Path | str | None = None,
                 metadata: dict[str, Any] | None = None):
        self.config = config
        self.callbacks = list(callbacks)
        self.metadata = dict(metadata or {})  # carried in checkpoints, e.g. the MLflow run id
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        self.run_dir = Path(config.run.output_dir) / config.run.name
        if config.run.threads:
            torch.set_num_threads(config.run.threads)

        optim = config.optim
        if optim.batch_size % (self.world_size * optim.grad_accumulation):
            raise ConfigError(f"optim.batch_size {optim.batch_size} is not divisible by workers x grad_accumulation "
                              f"({self.world_size} x {optim.grad_accumulation})")
        self.micro_batch = optim.batch_size // (self.world_size * optim.grad_accumulation)
        self.device = pick_device(config.run.device)
        check_fits(config, self.world_size, self.device)  # before any allocation that could take the machine
        flush_denormals(self.device)  # on the CPU: subnormal floats would take microcode (capi_core.precision)
        # Measured once per machine and model shape, then cached: see capi_core.precision.
        self.precision = choose_precision(config.run.precision, self.device, config.model, config.data.cache_dir)
        self.autocast_dtype = self.precision.autocast_dtype

        torch.manual_seed(config.run.seed)  # identical init on every rank
        self.student = Student(config).to(self.device)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()  # EMA only: no gradient reaches it
        self.clustering_head = ClusteringHead(config.model.embed_dim, config.clustering.num_clusters).to(self.device)
        fused = optim.fused and self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(param_groups(self.student, optim), lr=optim.lr, betas=optim.betas,
                                           weight_decay=optim.weight_decay, fused=fused)
        self.clustering_optimizer = torch.optim.AdamW(self.clustering_head.parameters(),
                                                      lr=optim.lr * config.clustering.lr_ratio, betas=optim.betas,
                                                      weight_decay=config.clustering.weight_decay, fused=fused)
        self.schedules = Schedules.from_config(config)
        self._probe_set: ProbeSet | None = None
        self._baseline: float | None = None
        self.step = 0
        if resume is not None:
            self._resume(resume)

        self.student_ddp: torch.nn.Module = self.student
        self.clustering_ddp: torch.nn.Module = self.clustering_head
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.student_ddp = DistributedDataParallel(self.student, device_ids=device_ids)
            self.clustering_ddp = DistributedDataParallel(self.clustering_head, device_ids=device_ids)
        self.compile = choose_compile(config.run.compile, self.device, optim.steps)
        if self.compile.enabled and self.distributed:
            self.student_ddp = torch.compile(self.student_ddp)  # DDP's own compile support: the wrapped module
        elif self.compile.enabled:
            # The whole forward in one graph: the teacher's forward, the heads, Sinkhorn-Knopp and the losses
            # fuse with the student's. On the cpu-demo step at one thread (bf16, batch 64): 679 img/s eager,
            # 756 with only the student compiled, 798 with the whole forward (capi_core.compilation).
            self.forward_losses = torch.compile(self.forward_losses)
        self._teacher_params = list(self.teacher.parameters())
        self._student_params = list(self.student.parameters())

    # ----------------------------------------------------------------------------------- schedules
    def schedule(self, step: int) -> dict[str, float]:
        """lr, clustering lr, EMA momentum and mask ratio at ``step``."""
        s = self.schedules
        return {"lr": s.lr(step), "clustering_lr": s.clustering_lr(step), "momentum": s.momentum(step),
                "mask_ratio": mask_ratio_at(self.config.masking, step, self.config.optim.steps)}

    def _apply_schedule(self, sched: dict[str, float]) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = sched["lr"] * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.config.optim.weight_decay * group.get("wd_mult", 1.0)
        for group in self.clustering_optimizer.param_groups:
            group["lr"] = sched["clustering_lr"]

    # --------------------------------------------------------------------------------------- step
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_losses(self, images: torch.Tensor, visible: torch.Tensor, predict: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both losses for one micro-batch.

        images [B, C, H, W]; visible [B, n_vis]; predict [B, n_pred].
        Returns (capi_loss, clustering_loss, targets [B*n_pred, K], clustering logits [N, B, K]).
        """
        loss_cfg, clust_cfg = self.config.loss, self.config.clustering
        registers = self.config.model.registers
        with self._autocast():
            with torch.no_grad():
                tokens = self.teacher.encoder(images)[:, registers:]  # [B, N, D], registers stripped
            logits_c = self.clustering_ddp(tokens.transpose(0, 1))  # [N, B, K]; grad to the head only
            assignments = sinkhorn_knopp(logits_c.detach(), loss_cfg.teacher_temp, clust_cfg.sinkhorn_iterations,
                                         positionwise=clust_cfg.positionwise)
            loss_c = clustering_loss(logits_c, assignments, loss_cfg.clustering_temp)
            # Targets: SK over all tokens first, then the predicted rows, as the reference does: SK balances
            # each position over the whole batch, not over the few images that predict it.
            rows = torch.arange(images.shape[0], device=images.device)[:, None]
            targets = assignments.transpose(0, 1)[rows, predict].flatten(0, 1)  # [B*n_pred, K]
            student_logits = self.student_ddp(images, visible, predict)
            loss_s = capi_loss(student_logits, targets, loss_cfg.student_temp)
        return loss_s, loss_c, targets, logits_c

    def train_step(self, micro_batches: list[torch.Tensor], step: int, diagnostics: bool = True
                   ) -> dict[str, torch.Tensor]:
        """One optimiser step over ``grad_accumulation`` micro-batches; returns detached metric tensors.

        ``diagnostics=False`` leaves out ``target_entropy``, which only log steps read. Its xlogy over the
        cpu-demo's [640, K] targets takes 0.69 ms alone at K = 256 and 2.8 ms at K = 1,024 on one thread
        (Intel Xeon VM, 2026-12-08): ~1-2.5 % of the step, below what an alternated whole-step comparison
        resolves on that VM (116.7 against 116.3 ms at K = 1,024), but work no step that does not log needs.
        """
        cfg = self.config
        sched = self.schedule(step)
        self._apply_schedule(sched)
        self.optimizer.zero_grad(set_to_none=True)
        self.clustering_optimizer.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(_step_seed(cfg.run.seed, step, self.rank))
        n = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        for i, images in enumerate(micro_batches):
            visible, predict = sample_masks(cfg.masking.strategy, cfg.model.grid_size, sched["mask_ratio"],
                                            cfg.masking.prediction_subsampling, images.shape[0], gen,
                                            cfg.masking.min_aspect, cfg.masking.max_aspect, cfg.masking.block_roll)
            visible, predict = visible.to(self.device), predict.to(self.device)
            sync = i == n - 1 or not self.distributed
            with contextlib.nullcontext() if sync else self._no_sync():
                loss_s, loss_c, targets, logits_c = self.forward_losses(images, visible, predict)
                ((loss_s + loss_c) / n).backward()
            with torch.no_grad():
                values = {"capi_loss": loss_s, "clustering_loss": loss_c}
                if diagnostics:
                    values["target_entropy"] = target_entropy(targets)
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float() / n
        self.optimizer.step()
        ema_update_(self._teacher_params, self._student_params, sched["momentum"])
        self.clustering_optimizer.step()
        sums["_clustering_logits"] = logits_c.detach()  # last micro-batch, for cluster usage at log steps
        return sums

    @contextlib.contextmanager
    def _no_sync(self):
        with self.student_ddp.no_sync(), self.clustering_ddp.no_sync():
            yield

    # ---------------------------------------------------------------------------------------- fit
    def fit(self) -> dict[str, float]:
        cfg = self.config
        # The manifest is checked against its shards (counts, paths, sizes) before the run directory
        # exists, so a refused dataset or configuration leaves nothing behind.
        dataset_dir = resolve_dataset(cfg.data.dataset, cfg.data.cache_dir)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        per_rank_batch = self.micro_batch * cfg.optim.grad_accumulation
        batches = train_batches(cfg.data, cfg.model.img_size, per_rank_batch, rank=self.rank,
                                world_size=self.world_size, seed=cfg.run.seed, start_step=self.step,
                                device=self.device)
        for cb in self.callbacks:
            cb.on_start(self)
        # On CPU a finiteness check is free; on GPU it is a host sync, so check only at log steps.
        check_every = 1 if self.device.type == "cpu" else cfg.run.log_every
        nonfinite, metrics = 0, {}
        t0, images_seen = time.perf_counter(), 0
        self.student_ddp.train()
        while self.step < cfg.optim.steps:
            images, _ = next(batches)
            images = images.to(self.device, non_blocking=True)
            log_step = is_log_step(self.step + 1, cfg)  # the step about to run is logged once it is done
            out = self.train_step(list(images.split(self.micro_batch)), self.step, diagnostics=log_step)
            self.step += 1
            images_seen += images.shape[0] * self.world_size
            if self.step % check_every == 0 or self.step == cfg.optim.steps:
                total = out["capi_loss"] + out["clustering_loss"]
                nonfinite = 0 if bool(torch.isfinite(total)) else nonfinite + 1
                if nonfinite >= cfg.run.max_nonfinite:
                    raise NonFiniteLossError(
                        f"loss was non-finite at {nonfinite} checks in a row (step {self.step}); "
                        f"try a lower optim.lr or run.precision=fp32")
            last = self.step == cfg.optim.steps
            if log_step:
                elapsed = time.perf_counter() - t0
                metrics = self._metrics(out, images_seen / max(elapsed, 1e-9))
                if is_probe_step(self.step, cfg) and not last:
                    metrics.update(self.probe(dataset_dir))
                for cb in self.callbacks:
                    cb.on_log(self, self.step, metrics)
                # images/s counts training only: the probe and the callbacks' own time are left out.
                t0, images_seen = time.perf_counter(), 0
            if is_checkpoint_step(self.step, cfg) and not last:
                self._checkpoint(metrics)
        metrics = dict(metrics)
        metrics.update(self.probe(dataset_dir))
        metrics.update(self.final_diagnostics())
        self._checkpoint(metrics)
        for cb in self.callbacks:
            cb.on_end(self, self.step, metrics)
        return metrics

    def _metrics(self, out: dict[str, torch.Tensor], images_per_s: float) -> dict[str, float]:
        sched = self.schedule(self.step - 1)
        # Usage of the head's own predictions: SK outputs are balanced by construction and would
        # hide a collapsed head.
        probs = torch.softmax(out["_clustering_logits"].float() / self.config.loss.clustering_temp, dim=-1)
        used, perplexity = cluster_usage(probs)
        return {
            "train/capi_loss": float(out["capi_loss"]),
            "train/clustering_loss": float(out["clustering_loss"]),
            "train/target_entropy": float(out["target_entropy"]),
            "train/clusters_used": float(used),
            "train/cluster_perplexity": float(perplexity),
            "train/lr": sched["lr"],
            "train/momentum": sched["momentum"],
            "train/mask_ratio": sched["mask_ratio"],
            "train/images_per_s": images_per_s,
            "train/epoch": self.step * self.config.optim.batch_size / max(self._train_size(), 1),
        }

    def _train_size(self) -> int:
        if not hasattr(self, "_n_train"):
            manifest = load_manifest(resolve_dataset(self.config.data.dataset, self.config.data.cache_dir))
            self._n_train = manifest.splits.get(self.config.data.split, 0)
        return self._n_train

    # -------------------------------------------------------------------------------------- probe
    @torch.no_grad()
    def probe(self, dataset_dir: Path) -> dict[str, float]:
        """The online probe: weighted k-NN top-1 (%) of the EMA teacher's mean-pooled patch features on a
        fixed probe set, the same architecture at its seeded random init (cached on disk), the gain, and
        the probe's own cost in seconds."""
        p, start = self.config.probe, time.perf_counter()
        if self._probe_set is None:
            self._probe_set, baseline = online_baseline(self.config, dataset_dir, self.device, self.autocast_dtype)
            self._baseline = baseline.knn_top1
        trained = knn_score(self.teacher.encoder, self._probe_set, p.k, p.temperature, self.autocast_dtype)
        # probe/seconds: what this probe cost (the first also loads the images and, uncached, the baseline).
        return {**probe_metrics(trained, self._baseline), "probe/seconds": time.perf_counter() - start}

    @torch.no_grad()
    def final_diagnostics(self) -> dict[str, float]:
        """On rank 0, at the end: the ``diag/`` metrics of the EMA teacher on the probe's first query
        images, and its pictures (PCA of the patch features, attention, token norms) in
        ``<run>/pictures``, which tracking logs with the run. The probe's images, because they are
        already decoded and are the held-out split."""
        p = self.config.probe
        if not self.is_main or self._probe_set is None or not (p.diagnostic_images or p.picture_images):
            return {}
        encoder, queries = self.teacher.encoder, self._probe_set.test_x
        metrics = {}
        if p.diagnostic_images:
            report = run_diagnostics(encoder, queries[:p.diagnostic_images])
            metrics = diag_metrics(report)
        if p.picture_images:
            tau = report["outliers"]["tau"] if p.diagnostic_images else None
            (self.run_dir / "pictures").mkdir(parents=True, exist_ok=True)
            write_pictures(encoder, queries[:p.picture_images], self.run_dir / "pictures", tau=tau)
        return metrics

    @property
    def probe_set(self) -> ProbeSet | None:
        """The probe images once the first probe has loaded them (their description names the set)."""
        return self._probe_set

    # -------------------------------------------------------------------------------- checkpoints
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {
            **ckpt.with_prefix(self.student.state_dict(), "student."),
            **ckpt.with_prefix(self.teacher.state_dict(), "teacher."),
            **ckpt.with_prefix(self.clustering_head.state_dict(), "clustering."),
            "rng.torch_cpu": torch.get_rng_state(),
        }
        main_t, main_meta = ckpt.optimizer_to_flat(self.optimizer, "optim.main.")
        clust_t, clust_meta = ckpt.optimizer_to_flat(self.clustering_optimizer, "optim.clustering.")
        tensors.update(main_t)
        tensors.update(clust_t)
        state = {"step": self.step, "config": self.config.model_dump(mode="json"),
                 "optim": {"main": main_meta, "clustering": clust_meta}, "metadata": self.metadata}
        return tensors, state

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        path = None
        if self.is_main:
            tensors, state = self.state_tensors()
            state["metrics"] = {k: v for k, v in metrics.items() if math.isfinite(v)}
            path = ckpt.save_checkpoint(self.run_dir / "checkpoints" / ckpt.checkpoint_name(self.step), tensors, state)
            ckpt.prune_checkpoints(self.run_dir, self.config.run.keep_checkpoints)
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.step, path, metrics)

    def _resume(self, resume: Path | str) -> None:
        target = ckpt.resume_checkpoint(Path(resume))  # a checkpoint, or a run directory's newest
        if target is None:
            return
        tensors, state = ckpt.load_checkpoint(target)
        saved = ckpt.check_state(state, target / ckpt.STATE, resume=True)
        if saved.model != self.config.model or saved.clustering.num_clusters != self.config.clustering.num_clusters:
            raise ckpt.CheckpointError(f"{target} was written for a different model configuration")
        parts = {"student.": self.student, "teacher.": self.teacher, "clustering.": self.clustering_head}
        for prefix, module in parts.items():
            ckpt.check_matches(module, ckpt.split_prefix(tensors, prefix), target / ckpt.WEIGHTS)
        for prefix, module in parts.items():
            module.load_state_dict(ckpt.split_prefix(tensors, prefix))
        try:
            ckpt.optimizer_from_flat(self.optimizer, tensors, state["optim"]["main"], "optim.main.")
            ckpt.optimizer_from_flat(self.clustering_optimizer, tensors, state["optim"]["clustering"],
                                     "optim.clustering.")
            torch.set_rng_state(tensors["rng.torch_cpu"])
        except (KeyError, ValueError, RuntimeError) as err:  # torch's own words for a mismatched state
            raise ckpt.CheckpointError(f"{target}: the optimiser or RNG state does not fit this run: "
                                       f"{type(err).__name__}: {err}") from None
        self.step = state["step"]
        self.metadata = {**self.metadata, **state.get("metadata", {})}  # e.g. the saved MLflow run id wins
        self.resumed_from = target
