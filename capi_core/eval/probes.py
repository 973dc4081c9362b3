"""Supervised probes on frozen features: one training loop, one selection protocol, five heads.

Every parametric head is "pooling -> classifier" trained on pre-extracted tokens of the final layer
(final-normed, as in CAPI's own probes in its ``eval_classification.py``; Beyond-[cls] and EP used
pre-norm tokens, the BN in their heads makes this nearly irrelevant):

==============  ===========================  ==================================================
probe           input                        head
==============  ===========================  ==================================================
``knn``         mean of patch tokens [D]     weighted k-NN, cosine, exp(sim / T) (``knn.py``)
``linear_cls``  [cls] token [D]              BN(affine=False) -> Linear; n/a without a [cls]
``linear_mean`` mean of patch tokens [D]     BN(affine=False) -> Linear  (LP-GAP)
``attentive``   patch tokens [N, D]          CAPI's: one learned query, D/64 heads -> Linear
``abmilp``      patch tokens [N, D]          a = softmax(w.z + b), sum a z -> BN -> Linear
``ep``          patch tokens [N, D]          efficient probing (M queries, no keys) -> BN -> Linear
==============  ===========================  ==================================================

Registers are excluded from every pooling unless ``include_registers=True``.

Selection never sees the test split: ``select_probe`` receives the training features only and holds
out a seeded ``val_fraction`` of them itself (CAPI's reference evaluation holds out 10% of the train
split). The head trained on the rest with the best validation accuracy is then scored on the test
split, once. All accuracies are top-1 in %.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capi_core.eval.features import Tokens
from capi_core.eval.knn import knn_top1
from capi_core.schedules import warmup_cosine


@dataclass(frozen=True)
class ProbeProtocol:
    """How every probe is trained and selected (the eval suite's single source of these defaults)."""

    # AdamW peak lr sweep, selected on the held-out part. High because CPU probes take a few thousand steps
    # (CAPI's 12.5k-step grid reaches down to 1e-5); on Fashion-MNIST features the optimum was 3e-2..1e-1.
    lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1)
    # The reference trains 12,500 steps with 10 % linear warmup (CAPI's eval_classification.py): 10 epochs of
    # ImageNet at batch 1,024. On a small frozen set 10 epochs are far fewer steps (2,100 at batch 256 on
    # Fashion-MNIST's 54,000 fitting images), and the probe had not converged: on two cpu-demo teachers
    # 50 epochs with the warmup scored 0.24 and 0.40 points higher on the held-out split than 10 without
    # (the test split moved with it: +0.49, +0.58); 50 epochs are 10,500 steps there, near the reference's
    # 12,500. Cost: 5x the probe time (the attentive probe on 54,000 images: 47 s -> 235 s on 2 cores).
    epochs: int = 50
    warmup_fraction: float = 0.1  # of the steps, linear from 0, as the reference
    batch_size: int = 256
    weight_decay: float = 5e-4  # on weight matrices only (CAPI's grid minimum; no decay on biases)
    betas: tuple[float, float] = (0.9, 0.95)  # as CAPI's reference probes
    val_fraction: float = 0.1  # of the TRAIN split, held out for selection
    seed: int = 0  # split, initialisation and batch order
    knn_ks: tuple[int, ...] = (10, 20)
    knn_temperature: float = 0.07


# ------------------------------------------------------------------------------------------ heads


def classifier(dim: int, num_classes: int) -> nn.Linear:
    """The final Linear(D, C) of every head, trunc-normal(0.01) weights and zero bias (MAE's linear
    probe): near-zero initial logits, so a CPU probe's short training goes to learning, not to undoing a
    random start."""
    fc = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


class LinearHead(nn.Module):
    """[B, D] -> BN(affine=False) -> Linear -> logits [B, C] (the Beyond-[cls]/EP linear probe)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = classifier(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.bn(x))


def attentive_heads(dim: int) -> int:
    """CAPI's head count D/64, at least 1, lowered until it divides D (small CPU models)."""
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


class AttentiveHead(nn.Module):
    """CAPI's attentive probe (reference ``eval_classification.py``): [B, N, D] -> logits [B, C].

    One learned query (no q projection) attends over the tokens with D/64 heads; keys and values come
    from one Linear(D, 2D) with bias; the [D] result goes straight to Linear(D, C). No norm, no MLP.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.num_heads = attentive_heads(dim)
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.empty(dim), std=0.02))
        self.kv = nn.Linear(dim, 2 * dim)
        self.fc = classifier(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        H = self.num_heads
        k, v = self.kv(x).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)  # each [B, H, N, D/H]
        q = self.query.view(1, H, 1, D // H).expand(B, -1, -1, -1)  # [B, H, 1, D/H]
        pooled = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, D/H]
        return self.fc(pooled.reshape(B, D))


class AbMILPHead(nn.Module):
    """Beyond-[cls] selective aggregation, official configuration (depth 1, no self-attention).

    a_i = softmax_i(w.z_i + b), r = sum_i a_i z_i, then BN(affine=False) -> Linear. [B, N, D] -> [B, C].
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = classifier(dim, num_classes)

    def attention(self, x: Tensor) -> Tensor:
        """Aggregation weights [B, N] (each row sums to 1) for tokens x [B, N, D]."""
        return self.score(x).squeeze(-1).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        r = torch.einsum("bn,bnd->bd", self.attention(x), x)
        return self.fc(self.bn(r))


def ep_num_params(dim: int, num_classes: int, num_queries: int = 32, d_out: int = 1) -> int:
    """Trainable parameters of ``EfficientProbe``: D^2/d_out + M*D + (D/d_out)*C + C, as in EP's code."""
    return dim * dim // d_out + num_queries * dim + dim // d_out * num_classes + num_classes


class EfficientProbe(nn.Module):
    """Efficient probing, EP_M: [B, N, D] -> [B, C] (Psomas et al., "Attention, Please! Revisiting Attentive
    Probing Through the Lens of Efficiency", ICLR 2026).

    M learnable queries score the tokens directly in feature space (no key projection: u_j = W_K^T q_j
    can be learned as one vector); one bias-free value projection D -> D/d_out is split channel-wise
    into M blocks, query j pools block j only, and the blocks are concatenated -> BN -> Linear.
    """

    def __init__(self, dim: int, num_classes: int, num_queries: int = 32, d_out: int = 1):
        super().__init__()
        if dim % d_out or (dim // d_out) % num_queries:
            raise ValueError(f"efficient probe: D/d_out = {dim}/{d_out} must be an integer divisible by "
                             f"the number of queries M = {num_queries}")
        out_dim = dim // d_out
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.value = nn.Linear(dim, out_dim, bias=False)
        self.bn = nn.BatchNorm1d(out_dim, affine=False, eps=1e-6)
        self.fc = classifier(out_dim, num_classes)

    def attention(self, x: Tensor) -> Tensor:
        """Per-query weights over tokens [B, M, N] for x [B, N, D]."""
        return (torch.einsum("md,bnd->bmn", self.queries, x) / math.sqrt(x.shape[-1])).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        v = self.value(x).unflatten(-1, (self.num_queries, -1))  # [B, N, M, D_o/M]
        y = torch.einsum("bmn,bnmc->bmc", self.attention(x), v).flatten(1)  # [B, D_o]
        return self.fc(self.bn(y))


def ep_queries(dim: int) -> int:
    """EP's default M = 32 where it divides D, else the largest power of two below it that does."""
    return next(m for m in (32, 16, 8, 4, 2, 1) if dim % m == 0)


# --------------------------------------------------------------------------- inputs and registry


@dataclass(frozen=True)
class Probe:
    """A parametric probe: which tokens it reads and the head it trains."""

    source: str  # "cls" [B, D], "mean" [B, D] or "tokens" [B, N(+R), D]
    head: Callable[[int, int], nn.Module]  # (D, num_classes) -> module


PROBES: dict[str, Probe] = {
    "linear_cls": Probe("cls", LinearHead),
    "linear_mean": Probe("mean", LinearHead),
    "attentive": Probe("tokens", AttentiveHead),
    "abmilp": Probe("tokens", AbMILPHead),
    "ep": Probe("tokens", lambda dim, c: EfficientProbe(dim, c, num_queries=ep_queries(dim))),
}
ALL_PROBES = ("knn", *PROBES)


def probe_input(tokens: Tokens, source: str, include_registers: bool = False) -> Tensor | None:
    """The tensor a probe trains on, or None when the model lacks it (``cls`` without a [cls] token)."""
    patches = torch.cat([tokens.registers, tokens.patches], dim=1) if include_registers else tokens.patches
    if source == "cls":
        return tokens.cls
    if source == "mean":
        return patches.float().mean(dim=1)
    if source == "tokens":
        return patches
    raise ValueError(f"unknown probe source {source!r}")


# ---------------------------------------------------------------------------------- training loop


def _seeded_head(factory: Callable[[int, int], nn.Module], dim: int, num_classes: int, seed: int) -> nn.Module:
    # Initialise from a fixed seed without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(dim, num_classes)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The probe's lr at ``step`` of ``total`` as a fraction of its peak, as CAPI's reference probes: linear
    from 0 to 1 over ``warmup`` steps, then a full cosine to 0 (without warmup, the cosine from step 0)."""
    return warmup_cosine(step, total, warmup, start=0.0, base=1.0, final=0.0, truncate=1.0)


def train_head(head: nn.Module, x: Tensor, y: Tensor, lr: float, protocol: ProbeProtocol) -> nn.Module:
    """Train ``head`` on frozen inputs x [N, ...] and labels y [N]; returns it in eval mode.

    AdamW (decay on weight matrices only) with a per-step schedule (``lr_factor``) peaking at ``lr``, cross
    entropy, shuffled mini-batches from a seeded generator: the result is a function of the inputs.
    """
    decay = [p for p in head.parameters() if p.ndim > 1]
    no_decay = [p for p in head.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": protocol.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=protocol.betas)
    n = x.shape[0]
    bs = min(protocol.batch_size, n)
    per_epoch = n // bs  # drop the ragged last batch: BatchNorm needs > 1 sample, and it keeps steps equal
    total = protocol.epochs * per_epoch
    warmup = int(protocol.warmup_fraction * total)
    gen = torch.Generator().manual_seed(protocol.seed)
    head.train()
    step = 0
    for _ in range(protocol.epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, total, warmup)
            loss = F.cross_entropy(head(x[idx].float()), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


@torch.no_grad()
def accuracy(head: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in % of a trained head on x [N, ...], y [N]."""
    head.eval()
    correct = sum((head(x[i:i + batch_size].float()).argmax(dim=1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, x.shape[0], batch_size))
    return 100.0 * correct / max(x.shape[0], 1)


# ------------------------------------------------------------------------------ selection and test


@dataclass
class Selection:
    """The outcome of hyperparameter selection on the training split."""

    setting: dict[str, float]  # the chosen hyperparameters, e.g. {"lr": 0.003} or {"k": 20}
    val_top1: dict[str, float]  # validation top-1 % per candidate, keyed "lr=0.003"
    model: nn.Module | None = field(default=None, repr=False)  # the selected head (None for k-NN)


def split_train(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (fit, val) of a seeded random split of n training samples."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 2:
        raise ValueError(f"{n} training samples are too few to hold out a validation part")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:], order[:n_val]


def select_probe(name: str, x: Tensor, y: Tensor, num_classes: int, protocol: ProbeProtocol) -> Selection:
    """Choose a probe's hyperparameters from TRAINING features x [N, ...] and labels y [N] alone.

    The training set is split (seeded) into a fit and a validation part; one candidate per setting is
    fitted and scored on validation. This function cannot see the test split: it is never passed.
    """
    fit, val = split_train(x.shape[0], protocol.val_fraction, protocol.seed)
    if name == "knn":
        scores = {f"k={k}": knn_top1(x[fit], y[fit], x[val], y[val], k=k, temperature=protocol.knn_temperature,
                                     num_classes=num_classes) for k in protocol.knn_ks}
        best = max(protocol.knn_ks, key=lambda k: scores[f"k={k}"])  # ties -> first (smaller k)
        return Selection({"k": best}, scores)
    probe = PROBES[name]
    scores, heads = {}, {}
    for lr in protocol.lrs:
        head = _seeded_head(probe.head, x.shape[-1], num_classes, protocol.seed)
        heads[lr] = train_head(head, x[fit], y[fit], lr, protocol)
        scores[f"lr={lr:g}"] = accuracy(heads[lr], x[val], y[val])
    best = max(protocol.lrs, key=lambda lr: scores[f"lr={lr:g}"])
    return Selection({"lr": best}, scores, heads[best])


@dataclass
class ProbeResult:
    """One probe's report row; ``top1`` is the test top-1 % or None when the probe does not apply."""

    probe: str
    top1: float | None
    selected: dict[str, float]
    val_top1: dict[str, float]
    params: int | None = None  # trainable parameters of the head
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def run_probe(name: str, train_x: Tensor | None, train_y: Tensor, test_x: Tensor | None, test_y: Tensor,
              num_classes: int, protocol: ProbeProtocol = ProbeProtocol()) -> ProbeResult:
    """Select on the training split, then score the selected probe on the test split once."""
    if train_x is None or test_x is None:
        return ProbeResult(name, None, {}, {}, note="n/a: the model has no [cls] token")
    sel = select_probe(name, train_x, train_y, num_classes, protocol)
    if name == "knn":  # k-NN has nothing to fit: the whole training split is its memory
        top1 = knn_top1(train_x, train_y, test_x, test_y, k=int(sel.setting["k"]),
                        temperature=protocol.knn_temperature, num_classes=num_classes)
        return ProbeResult(name, top1, sel.setting, sel.val_top1, params=0)
    params = sum(p.numel() for p in sel.model.parameters())
    return ProbeResult(name, accuracy(sel.model, test_x, test_y), sel.setting, sel.val_top1, params=params)


def run_probes(
    train: Tokens,
    train_y: Tensor,
    test: Tokens,
    test_y: Tensor,
    probes: Sequence[str] = ALL_PROBES,
    protocol: ProbeProtocol = ProbeProtocol(),
    include_registers: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[ProbeResult]:
    """Run the named probes (see ``ALL_PROBES``) on final-layer tokens of the train and test splits."""
    unknown = [p for p in probes if p not in ALL_PROBES]
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; choose from {', '.join(ALL_PROBES)}")
    for split, y in (("train", train_y), ("test", test_y)):
        if y.numel() == 0 or y.min() < 0:
            raise ValueError(f"the {split} split has no labels (or negative ones); supervised probes need labels")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    results = []
    for name in probes:
        if progress:
            progress(name)
        source = "mean" if name == "knn" else PROBES[name].source
        results.append(run_probe(name, probe_input(train, source, include_registers), train_y.long(),
                                 probe_input(test, source, include_registers), test_y.long(), num_classes,
                                 protocol))
    return results
