"""Our CAPI training step against the same step built from the ``lightly`` package's CAPI modules.

    pip install -e '.[bench]'                         # lightly==1.6.0, for this benchmark only
    .venv/bin/python benchmarks/peer_lightly.py                       # cpu-demo, batch 256
    .venv/bin/python benchmarks/peer_lightly.py --preset cpu-tiny --batch 32 --json peer.json
    .venv/bin/python benchmarks/peer_lightly.py run.precision=bf16    # config overrides apply to both

Both steps are built from one preset in the same process and timed alternately (ours first on even
rounds, lightly's first on odd ones), so machine noise hits both alike; figures are medians after
warm-up steps. Printed: images/s of each and the ratio lightly time / our time (> 1: ours is faster).

- Ours: ``capi_core.train.Trainer(cfg).train_step`` exactly as benchmarks/train_step.py times it.
- Lightly's: the step of lightly's own example (examples/pytorch/capi.py in its repository): a timm
  ``VisionTransformer`` wrapped in ``MaskedVisionTransformerTIMM`` as student backbone, an EMA copy
  of it as teacher backbone (``update_momentum``), ``CAPIPredictorTIMM``, a weight-normalised
  ``CAPIProjectionHead`` as student head and a biased one as the teacher's clustering head,
  ``random_inverse_block_mask`` masks, one ``CAPILoss`` called twice (student loss at the predicted
  positions, clustering loss of the teacher head against its own targets) and one AdamW on
  everything trainable, with one backward of the summed losses.

The same in both: image size, patch, width, depth, heads, MLP ratio, registers (no [cls]), predictor
depth and heads, K, the temperatures (SK input 0.06, student and clustering 0.12), 3 Sinkhorn
iterations, position-wise SK over the full grid before selecting the predicted positions, inverse-block
masks with roll and the same aspect range, the same numbers of visible and predicted tokens, the
precision (our trainer's choice, e.g. fp32 on a CPU without AMX: ``capi_core.precision.choose_precision``), the
device, torch's threads and the process-wide flush-to-zero that our Trainer turns on for CPUs (so
lightly's step also runs without subnormal slow-downs, which a plain lightly script would not get).

What differs (lightly 1.6.0):

- Prediction subsampling: lightly's example predicts every masked patch; here a uniform subset per
  image of the same size as ours is passed instead, so both predict the same number of tokens.
- Sinkhorn-Knopp: ``CAPILoss`` runs it in each of its two calls, so twice per step on the same
  teacher logits; it works on a transposed [N, B, K] view of [B, N, K] with out-of-place ops (a new
  tensor per division). Ours runs it once per step, in place, on the [N, B, K] layout the clustering
  head already produces, with an underflow cut.
- Encoder: timm defaults, i.e. LayerNorm and linear biases, and lightly's fixed 2D sin-cos position
  embedding over registers and patches; ours RMSNorm, no biases, a learned embedding on the patches
  only. Equal matmuls up to the biases.
- Predictor: lightly's has RoPE on q and k, LayerNorms, biases and an explicit softmax(q k^T)
  attention that materialises the attention matrix; its context omits the registers. Ours adds a
  learned position embedding to the mask token, uses RMSNorm without biases, fused SDPA, and
  attends to the registers as well (R more keys per query).
- Heads: lightly's teacher head runs on the registers too and drops them after; its student head's
  scale g is frozen at 1 (ours trains).
- Optimisers: one AdamW over student and clustering head with torch's default implementation (a
  per-tensor loop on CPU); ours fused AdamW in parameter groups plus a second one for the clustering
  head, with lr and momentum schedules. The EMA covers lightly's backbone only, ours the whole
  student (encoder, predictor and head).
- Masks: lightly draws them in a Python loop over the images; ours batched.
- Lightly has no gradient accumulation: it takes the whole batch where ours takes micro-batches.
- Compilation: our trainer compiles its forward for runs long enough to repay it (``run.compile=auto``,
  on for the cpu-demo preset's length: ``capi_core.compilation``), so our step is timed as a user
  gets it; lightly's example runs eagerly. ``run.compile=false`` times ours eager as well.

Model GFLOP/step (torch's FlopCounterMode over one whole step, teacher + student forward + backward)
shows whether the two do the same work. It is counted with SDPA forced to its math backend, because
the counter has no formula for CPU's fused SDPA kernel and would leave out every attention product
except lightly's explicit one.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from capi_core.config import TrainConfig, build_config
from capi_core.masking import sample_masks
from capi_core.train import Trainer
from train_step import _sync

try:
    from lightly.loss import CAPILoss
    from lightly.models import utils as lightly_utils
    from lightly.models.modules import CAPIPredictorTIMM, CAPIProjectionHead, MaskedVisionTransformerTIMM
except ImportError as err:
    _LIGHTLY_MISSING: ImportError | None = err
else:
    _LIGHTLY_MISSING = None

INSTALL_HINT = "this benchmark needs the optional 'lightly' package: pip install -e '.[bench]'"


class LightlyCAPI(nn.Module):
    """CAPI from lightly's modules, shaped like ``cfg``: ``train_step(images [B, C, H, W], ...)``."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        m, masking = cfg.model, cfg.masking
        if m.predictor_dim not in (None, m.embed_dim):
            raise ValueError(f"lightly's predictor has the encoder's width; model.predictor_dim {m.predictor_dim} "
                             f"!= model.embed_dim {m.embed_dim}")
        if masking.strategy not in ("inverse_block", "inverse_block_roll"):
            raise ValueError(f"lightly has only inverse-block masks; masking.strategy is {masking.strategy!r}")
        vit = VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, num_classes=0,
                                global_pool="", embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                                mlp_ratio=m.mlp_ratio, class_token=False, reg_tokens=m.registers,
                                drop_path_rate=m.drop_path)
        self.cfg = cfg
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.student_backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.predictor = CAPIPredictorTIMM(embed_dim=m.embed_dim, grid_size=m.grid_size, depth=m.predictor_depth,
                                           num_heads=m.predictor_heads or m.num_heads, mlp_ratio=m.mlp_ratio)
        with warnings.catch_warnings():  # torch deprecates nn.utils.weight_norm, which lightly's head uses
            warnings.simplefilter("ignore", FutureWarning)
            self.student_head = CAPIProjectionHead(m.embed_dim, cfg.clustering.num_clusters, weight_norm=True)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        lightly_utils.deactivate_requires_grad(self.teacher_backbone)
        self.teacher_head = CAPIProjectionHead(m.embed_dim, cfg.clustering.num_clusters, bias=True)
        self.criterion = CAPILoss(teacher_temperature=cfg.loss.teacher_temp,
                                  student_temperature=cfg.loss.student_temp,
                                  sinkhorn_iterations=cfg.clustering.sinkhorn_iterations)
        self.optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                           betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)

    def forward_student(self, images: torch.Tensor, idx_keep: torch.Tensor, idx_pred: torch.Tensor) -> torch.Tensor:
        """idx_keep [B, R + n_vis], idx_pred [B, n_pred] token indices -> logits [B, n_pred, K]."""
        r = self.num_prefix_tokens
        context = self.student_backbone.encode(images=images, idx_keep=idx_keep)
        predicted = self.predictor(context=context[:, r:], context_positions=idx_keep[:, r:] - r,
                                   query_positions=idx_pred - r)
        return self.student_head(predicted)

    def forward_teacher(self, images: torch.Tensor) -> torch.Tensor:
        """Clustering logits of every patch token [B, N, K]; grad reaches the teacher head only."""
        with torch.no_grad():
            tokens = self.teacher_backbone.encode(images=images)
        return self.teacher_head(tokens)[:, self.num_prefix_tokens:]

    def train_step(self, images: torch.Tensor, mask_ratio: float, n_pred: int, momentum: float,
                   autocast_dtype: torch.dtype | None) -> None:
        b, masking = images.shape[0], self.cfg.masking
        idx_keep, idx_mask = lightly_utils.random_inverse_block_mask(
            size=(b, self.student_backbone.sequence_length), mask_ratio=mask_ratio,
            num_prefix_tokens=self.num_prefix_tokens, min_aspect=masking.min_aspect, max_aspect=masking.max_aspect,
            roll=masking.strategy == "inverse_block_roll", device=images.device)
        # Ours predicts a uniform subset of the masked patches; lightly's example all of them.
        keys = torch.rand(idx_mask.shape, device=images.device)
        idx_pred = idx_mask.gather(1, keys.argsort(dim=1)[:, :n_pred])  # [B, n_pred]
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            student_logits = self.forward_student(images, idx_keep, idx_pred)
            teacher_logits = self.forward_teacher(images)
            student_loss = self.criterion(teacher_logits=teacher_logits, student_logits=student_logits,
                                          teacher_index=idx_pred - self.num_prefix_tokens)
            clustering_loss = self.criterion(teacher_logits=teacher_logits, student_logits=teacher_logits)
        (student_loss + clustering_loss).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        lightly_utils.update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)


def _count_flops(step: Callable[[], object]) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def compare(preset: str = "cpu-demo", batch: int = 256, steps: int = 5, warmup: int = 2,
            overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Time our step and lightly's on ``preset`` at ``batch``; medians over ``steps`` after ``warmup``.

    Our step runs in the precision our trainer chooses (``run.precision``); lightly's on a CPU is timed
    in both fp32 and bf16 autocast (on CUDA in bf16), and its faster one is the peer: a user of lightly
    would pick its best precision, which need not be ours (its bf16 attention backward is slow on CPUs).

    Returns the shared shape, per side {step_s, images_per_s, model_gflop_per_step, trainable_params}
    (``lightly``: its best precision, named by ``lightly_precision``; ``lightly_fp32`` / ``lightly_bf16``:
    each) and ``ratio`` = lightly's best step time / our step time. Raises ImportError if lightly is missing.
    """
    if _LIGHTLY_MISSING is not None:
        raise ImportError(f"{INSTALL_HINT} ({_LIGHTLY_MISSING})")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(preset, [f"optim.batch_size={batch}", f"run.output_dir={tmp}", *overrides])
        trainer = Trainer(cfg)
        device, m = trainer.device, cfg.model
        torch.manual_seed(cfg.run.seed)
        peer = LightlyCAPI(cfg).to(device)
        images = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=device)
        micro = list(images.split(trainer.micro_batch))
        gen = torch.Generator().manual_seed(0)  # only to read our token counts off our own mask sampler
        visible, predict = sample_masks(cfg.masking.strategy, m.grid_size, trainer.schedule(0)["mask_ratio"],
                                        cfg.masking.prediction_subsampling, 1, gen, cfg.masking.min_aspect,
                                        cfg.masking.max_aspect, cfg.masking.block_roll)
        n_vis, n_pred = visible.shape[1], predict.shape[1]

        def ours(step: int) -> None:
            trainer.train_step(micro, step)

        def lightly(dtype: torch.dtype | None) -> Callable[[int], None]:
            def step_fn(step: int) -> None:
                sched = trainer.schedule(step)
                peer.train_step(images, sched["mask_ratio"], n_pred, sched["momentum"], dtype)
            return step_fn

        peer_precisions = {"bf16": torch.bfloat16} if device.type == "cuda" else {"fp32": None, "bf16": torch.bfloat16}
        sides = {"ours": ours, **{f"lightly_{name}": lightly(dtype) for name, dtype in peer_precisions.items()}}
        for i in range(warmup):
            for fn in sides.values():
                fn(i)
        flops = {name: _count_flops(lambda fn=fn: fn(warmup)) for name, fn in sides.items()}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(steps):
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            for name in order:
                _sync(device)
                t = time.perf_counter()
                sides[name](warmup + 1 + i)
                _sync(device)
                times[name].append(time.perf_counter() - t)

    params = {"ours": _trainable(trainer.student) + _trainable(trainer.clustering_head),
              **{name: _trainable(peer) for name in sides if name != "ours"}}
    result = {"preset": preset, "batch": batch, "steps": steps, "warmup": warmup, "device": str(device),
              "threads": torch.get_num_threads(), "precision": "bf16" if trainer.autocast_dtype else "fp32",
              "compile": trainer.compile.describe(),
              "tokens_per_image": m.num_patches, "visible_tokens": n_vis, "predicted_tokens": n_pred}
    for name in sides:
        step_s = statistics.median(times[name])
        result[name] = {"step_s": step_s, "images_per_s": batch / step_s,
                        "model_gflop_per_step": flops[name] / 1e9, "trainable_params": params[name]}
    best = min((name for name in sides if name != "ours"), key=lambda name: result[name]["step_s"])
    result["lightly"], result["lightly_precision"] = result[best], best.removeprefix("lightly_")
    result["ratio"] = result["lightly"]["step_s"] / result["ours"]["step_s"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-demo")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="also write the result to this JSON file")
    ap.add_argument("overrides", nargs="*", help="config overrides for both steps, e.g. run.precision=bf16")
    args = ap.parse_args()
    try:
        r = compare(args.preset, args.batch, args.steps, args.warmup, args.overrides)
    except ImportError as err:
        sys.exit(str(err))
    print(f"{r['preset']}, batch {r['batch']}, {r['precision']}, {r['device']}, {r['threads']} threads; tokens: "
          f"{r['tokens_per_image']} per image, {r['visible_tokens']} visible, {r['predicted_tokens']} predicted; "
          f"median of {r['steps']} steps after {r['warmup']} warm-up; our step's compile: {r['compile']}")
    print(f"{'step':15} {'img/s':>9} {'ms/step':>9} {'GFLOP/step':>11} {'params':>10}")
    for name in ("ours", *(k for k in r if k.startswith("lightly_") and k != "lightly_precision")):
        s = r[name]
        label = f"ours ({r['precision']})" if name == "ours" else name.replace("_", " (") + ")"
        print(f"{label:15} {s['images_per_s']:>9.1f} {s['step_s'] * 1e3:>9.1f} {s['model_gflop_per_step']:>11.2f} "
              f"{s['trainable_params']:>10,}")
    print(f"ratio (lightly's best, {r['lightly_precision']}, time / our time): {r['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
