"""SteppingNet (Sun et al., "SteppingNet: A Stepping Neural Network with Incremental Accuracy
Enhancement"): nested subnets built by moving neurons between them by importance under MAC
budgets, then retrained with distillation.

Where things happen, by function:
  * importance (Eq. 1-3) ............ :func:`importance`
  * moving neurons under budgets .... :func:`move_neurons` (cascade rule of Fig. 5 in :func:`construct`)
  * construction loop (Fig. 3) ...... :func:`construct`
  * suppression + joint schedule .... :func:`train_step`
  * retraining with KD (Eq. 4) ...... :meth:`SteppingNet.retrain`
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dyninfer import checkpoint as ckpt
from dyninfer import progress
from dyninfer.checks import check_path, check_subnet
from dyninfer.data import BatchStream, ImageSet
from dyninfer.methods.face import TaggedSubnets, load_tagged
from dyninfer.methods.budget import (
    BaselineConfig, StepLog, batch_stream, distilled_loss, note_resumed, run_steps, sgd, work_path,
)
from dyninfer.methods.registry import DEFAULT_EXPANSION, Setup, check_expansion, register_method
from dyninfer.models.registry import original_macs
from dyninfer.nn.tagged import TaggedNet, fold_batchnorm
from dyninfer.runtime.bench import bench_setting, scratch_times
from dyninfer.runtime.compaction import cached_compact
from dyninfer.runtime.session import Session
from dyninfer.train import FrozenTeacher, TrainConfig, derive_seed, fit, kd_loss as shared_kd_loss, warmup_factor

SCHEDULES = ("joint", "sequential")
UNMEASURED = ("wait", "paper")
QUOTAS = ("adaptive", "paper")
LR_SCHEDULES = ("cosine", "constant")
TAG_UPDATES = ("sum", "mean")


@dataclass(frozen=True)
class SteppingConfig:
    """Every constant of the method. The paper's (Section III and IV) unless marked "beyond the
    paper"; each of those can be switched back to the paper's behaviour for ablations.

    Weight decay means the same in every dyninfer method: each live weight decays by
    ``weight_decay * w`` once per batch (torch's SGD ``weight_decay``), however many subnets use it.
    """

    alpha_growth: float = 1.5        # Eq. 3: alpha_1 = 1, alpha_{k+1} = 1.5 alpha_k
    beta: float = 0.9                # learning-rate suppression beta^(j-i)
    gamma: float = 0.4               # Eq. 4: gamma CE + (1 - gamma) KD
    temperature: float = 1.0         # KD temperature
    iterations: int = 300            # N_t: at most this many construction iterations
    batches_per_iteration: int = 250  # m: batches every subnet trains per iteration
    prune_threshold: float = 1e-5    # unstructured magnitude pruning after each iteration
    # Beyond the paper: "joint" trains every subnet from one pass per batch (exactly the sequential
    # schedule's gradients, see suppression_factors); "sequential" is the paper's loop.
    schedule: str = "joint"
    suppression: bool = True         # ablation switch (Fig. 8)
    distillation: bool = True        # ablation switch (Fig. 8)
    importance_batches: int = 4      # batches used to estimate dL/dr before each move
    # Beyond the paper: divide each layer's scores by their mean so layers compete on equal
    # footing. Raw Eq. 3 scores let wide FC layers (many small scores) lose almost all neurons:
    # LeNet-5 on CIFAR-10 kept 10 of 240 fc1 neurons and subnet 1 fell to 20.8 % accuracy.
    normalize_importance: bool = True
    # Beyond the paper: a channel no reader of its subnets sees yet scores exactly 0 by Eq. 3;
    # "wait" keeps it (ranked by its last measured score) until its readers arrive or nothing
    # measured is left to move; "paper" moves it on as least important (it then drifts to the end).
    unmeasured: str = "wait"
    # "paper" moves (P_expanded - P_1) / N_t per round; beyond the paper, "adaptive" moves (MACs
    # over budget) / (iterations left), aiming at 75 % of N_t. Either way the last neuron of a round
    # is the one that overshoots least. "paper" is the default by measurement: with fill-back it
    # used the budgets as well and kept every subnet's increment useful (LeNet-5 x2 / CIFAR-10,
    # benchmarks/results/stepping_construction_lenet-5_cifar10.md).
    quota: str = "paper"
    fill_back: bool = True           # beyond the paper: re-admit the best moved neurons while budgets allow
    # Beyond the paper, before the fill-back: move each channel to the smallest subnet whose logits it
    # reaches (promote_to_serving); the fill-back then admits only channels that serve the subnet they
    # join and takes no channel's reader from its own subnet (fill_back's serve_own). The measurement
    # below predates serve_own; with it, Table I's LeNet-5 / CIFAR-10 at the paper's budgets gave 60.55 /
    # 60.55 / 70.91 / 70.89 % against the default's 62.29 / 62.33 / 70.44 / 71.14 %
    # (benchmarks/results/stepping_table1_lenet5_cifar10_paper_budgets_lr05_30ep_promote_serve.md). Measured on LeNet-5 x2 / CIFAR-10 at 4,500 steps (one seed): subnet 4
    # then gains 1.45 points over subnet 3 instead of none, but subnet 2 loses 2.6 (42.21 / 47.38 / 62.70 /
    # 64.15 % vs 41.67 / 50.00 / 63.52 / 63.46 %; benchmarks/results/stepping_promote_lenet-5_cifar10.md
    # against the "ours" row of stepping_figs78_lenet-5_cifar10.md), so it is not the default.
    promote: bool = False
    granularity: int = 1             # beyond the paper: channels moved together per layer (1: the paper)
    # "constant" (the paper's fixed rate), or beyond the paper "cosine": a warm-up over 5 % of the
    # construction steps, then a cosine to 0.1 lr. Constant is the default by measurement (same file).
    lr_schedule: str = "constant"
    # What r_j of Eq. 2 scales: "output" (the neuron's whole output after BatchNorm, bias included)
    # or "weighted_sum" (the paper's letter: w_j . x, bias and BN shift excluded). Beyond the paper,
    # "output" is the default: a move takes the whole output out of the subnet, bias included, so
    # dL/dr of the output is the first-order estimate of what the move does; and measured on LeNet-5
    # x2 / CIFAR-10 (benchmarks/results/stepping_construction_lenet-5_cifar10.md) it kept subnet 1 at
    # 38.8 % where "weighted_sum" reached 30.6 % (one seed).
    importance_of: str = "output"
    # Ablation of the shared weight-decay semantics: True decays a weight once per subnet that
    # trains it (sum_j beta^(j-i): 3.4x at beta 0.9, N = 4, for tag 1), as dyninfer did before.
    decay_per_subnet: bool = False
    min_channels: int = 1            # every layer keeps this many neurons in subnet 1
    # Beyond the paper: subnet 1 also keeps ceil(min_width x width) channels of every layer. A count
    # floor treats layers alike although their channels' costs differ 12-fold (LeNet-5 x2 / CIFAR-10:
    # a conv1 channel is 6.35 % of the original's MACs, a conv2 channel of subnet 1 about 0.5 %), so one
    # that spares the cheap layers (min_channels=2: 2 conv2 channels) already fills subnet 1's 15 %
    # with conv1, while min_channels=1 let subnet 1 hang on one conv2 channel whose ReLU died. 0 (off)
    # is the paper's rule and the default (one seed per setting so far). Measured with increment_width
    # below, both 0.08: Fig. 6's LeNet-5 / CIFAR-10 at 18,000 steps 53.31 / 62.71 / 71.97 / 72.60 % (seed 1:
    # 52.75 / 61.36 / 70.59 / 70.44; 10.00 /
    # 41.30 / 66.86 / 68.49 without, another teacher of the same recipe;
    # benchmarks/results/compare_lenet-5_cifar10_teacher_lr001_18000*.md),
    # Table I's 60.10 / 65.94 / 70.59 / 71.47 % (62.29 / 62.33 / 70.44 / 71.14 without;
    # stepping_table1_lenet5_cifar10_paper_budgets_lr05_30ep{_widths,}.md).
    min_width: float = 0.0
    # Beyond the paper: every subnet's increment (tag 1..N) keeps ceil(increment_width x width)
    # channels of every layer, convolutions included, through the moves and the fill-back (fc_floor
    # floors only fully connected layers). Without it an increment can spend its budget on conv1
    # channels that reach the logits through one conv2 channel (LeNet-5 x2 / CIFAR-10 with
    # min_width=0.08: subnet 2 added 2 conv1, 1 conv2 and 3 fc2 channels and gained 3.5 points).
    # 0 (off) is the paper's rule and the default.
    increment_width: float = 0.0
    # Beyond the paper: every subnet's increment keeps at least ceil(fc_floor x width / N) neurons
    # of each fully connected layer, through the moves and the fill-back. Without it the last
    # increment of LeNet-5 x2 / CIFAR-10 kept 1 fc1 and 1 fc2 neuron in 6 of 7 runs (fc neurons
    # are cheap, so the least important ones go first), and its conv channels reached the
    # logits through one unit. 0 is the paper's rule and the default by measurement (LeNet-5 x2 /
    # CIFAR-10, 4,500 steps, one seed; benchmarks/results/stepping_fc_floor_lenet-5_cifar10.md):
    # 0.5 gives 36.74 / 53.79 / 60.27 / 60.40 %, 1.0 gives 41.57 / 55.31 / 58.36 / 58.21 % against
    # 41.67 / 50.00 / 63.52 / 63.46 % without: subnet 2 gains, subnets 3-4 lose, and subnet 4 still
    # adds nothing over subnet 3 (its fc neurons stay, its conv increment shrinks to 2-5 channels).
    fc_floor: float = 0.0
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    retrain_epochs: int = 10
    retrain_lr: float = 0.01
    # Beyond the paper: the retraining LR ramps linearly over this many epochs before its cosine
    # (0: none). It lets LeNet-3C1L retrain at the rate its original network trains at (0.05), where
    # without it the network collapses and the CPU preset had to run at 0.005.
    retrain_warmup_epochs: float = 0.0
    # How retraining combines the subnets' gradients on a shared weight. "sum" (the paper): a tag-i
    # weight moves by sum_{j>=i} beta^(j-i) dL_j, so per batch tag 1 moves 3.4x as far as tag 4
    # (beta 0.9, N = 4) and the last increments, starting untrained beside trained ones, learn
    # slowest. Beyond the paper, "mean" divides by sum_{j>=i} beta^(j-i): every tag's update is the
    # suppression-weighted mean of its subnets' gradients, and the LR sets every tag's step alike.
    retrain_tag_update: str = "sum"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("schedule", SCHEDULES), ("unmeasured", UNMEASURED), ("quota", QUOTAS),
                              ("lr_schedule", LR_SCHEDULES), ("importance_of", ("weighted_sum", "output")),
                              ("retrain_tag_update", TAG_UPDATES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("iterations", "batches_per_iteration", "importance_batches", "min_channels", "batch_size",
                     "granularity", "retrain_epochs", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < 1 and name not in ("retrain_epochs", "seed"):
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("suppression", "distillation", "normalize_importance", "fill_back", "promote", "decay_per_subnet",
                     "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {self.beta}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.alpha_growth <= 0:
            raise ValueError(f"alpha_growth must be > 0, got {self.alpha_growth}")
        if self.retrain_epochs < 0:
            raise ValueError(f"retrain_epochs must be >= 0, got {self.retrain_epochs}")
        if (isinstance(self.retrain_warmup_epochs, bool) or not isinstance(self.retrain_warmup_epochs, (int, float))
                or self.retrain_warmup_epochs < 0):
            raise ValueError(f"retrain_warmup_epochs must be a number >= 0, got {self.retrain_warmup_epochs!r}")
        if isinstance(self.fc_floor, bool) or not isinstance(self.fc_floor, (int, float)) or not 0 <= self.fc_floor <= 1:
            raise ValueError(f"fc_floor must be a number in [0, 1], got {self.fc_floor!r}")
        for name in ("min_width", "increment_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")

    def construction_lr(self, step: int, total: int) -> float:
        """Learning rate of construction step ``step`` of ``total`` (a pure function: resumable)."""
        if self.lr_schedule == "constant" or total <= 1:
            return self.lr
        warmup = max(1, total // 20)
        if step < warmup:
            return self.lr * (0.1 + 0.9 * (step + 1) / warmup)
        t = (step - warmup) / max(1, total - warmup)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))

    def retraining_lr(self, batch: int, total: int, batches_per_epoch: int) -> float:
        """Learning rate of retraining batch ``batch`` of ``total``: a cosine from ``retrain_lr`` to 0
        over all of them, times a linear ramp over the first ``retrain_warmup_epochs`` epochs
        (the schedule :func:`dyninfer.train.fit` gives the original networks)."""
        lr = self.retrain_lr * 0.5 * (1 + math.cos(math.pi * batch / max(1, total)))
        return lr * warmup_factor(batch, round(self.retrain_warmup_epochs * batches_per_epoch))


def check_budgets(budgets: Sequence[float], num_subnets: int | None = None) -> list[float]:
    """Budgets are fractions of the original network's MACs: strictly increasing, in (0, 1]."""
    try:
        values = [float(b) for b in budgets]
    except (TypeError, ValueError):
        raise ValueError(f"budgets must be a list of numbers, got {budgets!r}") from None
    if not values:
        raise ValueError("budgets must name at least one subnet, e.g. [0.1, 0.3, 0.5, 0.85]")
    bad = [b for b in values if not (0 < b <= 1) or math.isnan(b)]
    if bad:
        raise ValueError(f"budgets must lie in (0, 1] (fractions of the original MACs); got {bad} in {values}")
    if any(b >= c for b, c in zip(values, values[1:])):
        raise ValueError(f"budgets must be strictly increasing, got {values}")
    if num_subnets is not None and len(values) != num_subnets:
        raise ValueError(f"got {len(values)} budgets for {num_subnets} subnets; give one budget per subnet")
    return values


# ---------------------------------------------------------------------------- losses and steps
def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return shared_kd_loss(student, teacher, temperature)


def subnet_loss(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
                config: SteppingConfig) -> torch.Tensor:
    """CE, or Eq. 4: gamma CE + (1 - gamma) KL(teacher || subnet) when a teacher is given."""
    return distilled_loss(logits, y, teacher_logits, config.gamma, config.temperature)


def suppression_factors(config: SteppingConfig, num_subnets: int, mean: bool = False):
    """Loss weights and per-tag gradient factors realising LR suppression beta^(j-i).

    Sequential: training subnet j scales tag-i gradients by beta^(j-i). Joint: backpropagating
    sum_j beta^j L_j once and scaling tag-i gradients by beta^(-i) gives, for tag-i weights,
    sum_{j>=i} beta^(j-i) dL_j/dW exactly, since dL_j/dW = 0 for j < i (causal rule).
    ``mean`` divides that by sum_{j>=i} beta^(j-i) (``retrain_tag_update="mean"``).
    Returns (loss weights, factor(tags), decay(tags)) for the joint schedule: suppression scales
    gradients only; every live weight decays once per batch (see :class:`SteppingConfig`), so a
    tag-1 weight is not decayed N times (3.4x at beta 0.9, N = 4) for being in every subnet.
    """
    beta = config.beta if config.suppression else 1.0
    n = num_subnets
    weights = [beta ** k for k in range(1, n + 1)]
    share = tag_shares(beta, n)

    def factor(tags: torch.Tensor) -> torch.Tensor:
        return beta ** (-tags) / share(tags) if mean else beta ** (-tags)

    def decay(tags: torch.Tensor) -> torch.Tensor:  # 1 for a live weight, 0 for a dropped one (tag N+1)
        live = (tags <= n).to(tags.dtype)
        return share(tags) * live if config.decay_per_subnet else live  # per subnet: sum_{j=i}^{N} beta^(j-i)

    return weights, factor, decay


def tag_shares(beta: float, num_subnets: int):
    """tags -> sum_{j=i}^{N} beta^(j-i) for tag i <= N (the total weight of the subnets a tag-i
    weight serves), 1 for a dropped channel (tag N+1), whose gradient is 0 anyway."""
    def share(tags: torch.Tensor) -> torch.Tensor:
        m = (num_subnets - tags + 1).clamp(min=0)
        total = m if beta == 1.0 else (1 - beta ** m) / (1 - beta)
        return torch.where(m > 0, total, torch.ones_like(total))
    return share


class SubnetTraining:
    """SteppingNet's training step (Eq. 4 with weight-update suppression) as the loss and hooks
    of :func:`dyninfer.train.fit`, shared by construction and retraining.

    Joint schedule: one fit step per batch: every subnet from one ``forward_all``, the sum of
    beta^j L_j backpropagated once, then per-tag gradient factors and weight decay
    (:func:`suppression_factors`). Sequential (the paper's loop): ``steps_per_batch`` = N fit
    steps per batch, subnet j on the batch after subnets 1..j-1 stepped on it, each step scaling
    tag-i gradients by beta^(j-i) and holding the weights of larger subnets fixed (momentum must
    not move what subnet j does not use); :meth:`repeat` feeds each batch N times.

    ``targets(x)`` gives the teacher's logits (once per batch) or None. ``correct`` counts each
    subnet's correct training predictions, ``losses`` each batch's per-subnet losses; both are
    for progress reports (no extra pass) and reset by the caller.
    """

    def __init__(self, net: TaggedNet, config: SteppingConfig, targets=None, mean: bool = False):
        self.net, self.config = net, config
        self.n = net.num_subnets
        self.joint = config.schedule == "joint"
        self.steps_per_batch = 1 if self.joint else self.n
        self.targets = targets if targets is not None else (lambda x: None)
        self.weights, self.factor, self.decay = suppression_factors(config, self.n, mean)
        self.share = tag_shares(config.beta if config.suppression else 1.0, self.n) if mean else None
        self.correct, self.seen, self.losses = [0] * self.n, 0, []
        self._subnet, self._teacher, self._frozen = 1, None, None

    def repeat(self, batches):
        """Each batch of ``batches`` ``steps_per_batch`` times, for the sequential schedule."""
        for batch in batches:
            for _ in range(self.steps_per_batch):
                yield batch

    def loss(self, _model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if self.joint:
            teacher = self.targets(x)
            out = self.net.forward_all(x, straight_through=True)
            _count_correct(self.correct, out.logits, y)
            losses = [subnet_loss(lg, y, teacher, cfg) for lg in out.logits]
            self.losses.append([float(loss.detach()) for loss in losses])
            self.seen += len(y)
            return sum(w * loss for w, loss in zip(self.weights, losses))
        j = self._subnet
        if j == 1:  # a new batch
            self._teacher = self.targets(x)
            self.losses.append([])
            self.seen += len(y)
        logits = self.net(x, subnet=j, straight_through=True)
        self.correct[j - 1] += int((logits.detach().argmax(1) == y).sum())
        loss = subnet_loss(logits, y, self._teacher, cfg)
        self.losses[-1].append(float(loss.detach()))
        return loss

    def on_after_backward(self, _state=None) -> None:
        wd = self.config.weight_decay
        if self.joint:
            self.net.shape_gradients(self.factor, self.decay, wd)
            return
        j, beta = self._subnet, self.config.beta if self.config.suppression else 1.0

        def scale(tags: torch.Tensor) -> torch.Tensor:  # 0 for neurons outside subnet j
            f = torch.where(tags <= j, beta ** (j - tags), torch.zeros_like(tags))
            return f if self.share is None else f / self.share(tags)

        def decay(tags: torch.Tensor) -> torch.Tensor:  # once per batch: in its own subnet's turn
            return scale(tags) if self.config.decay_per_subnet else (tags == j).to(tags.dtype)

        self.net.shape_gradients(scale, decay, wd)
        self._frozen = _frozen_above(self.net, j)
        self._frozen.__enter__()

    def on_batch_end(self, _state=None) -> None:
        if not self.joint:
            self._frozen.__exit__(None, None, None)
            self._subnet = self._subnet % self.n + 1


def train_step(net: TaggedNet, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               config: SteppingConfig, teacher_logits: torch.Tensor | None = None,
               correct: list[int] | None = None) -> list[float]:
    """One batch for every subnet (ascending), with weight-update suppression, outside the
    training loop (:class:`SubnetTraining` is what the loop runs). Returns the subnets' losses.

    ``correct`` (one count per subnet), when given, is increased by each subnet's correct
    predictions on this (training) batch. (In the sequential schedule subnet j is counted after
    subnets 1..j-1 stepped on the batch.)
    """
    training = SubnetTraining(net, config, targets=lambda _x: teacher_logits)
    for _ in range(training.steps_per_batch):
        optimizer.zero_grad(set_to_none=True)
        training.loss(net, x, y).backward()
        training.on_after_backward()
        optimizer.step()
        training.on_batch_end()
    if correct is not None:
        for k, c in enumerate(training.correct):
            correct[k] += c
    return training.losses[-1]


def _count_correct(correct: list[int] | None, logits: Sequence[torch.Tensor], y: torch.Tensor) -> None:
    if correct is not None:
        for k, lg in enumerate(logits):
            correct[k] += int((lg.detach().argmax(1) == y).sum())


class _frozen_above:
    """Context: slices owned by subnets larger than ``subnet`` keep their values."""

    def __init__(self, net: TaggedNet, subnet: int):
        self.net, self.subnet = net, subnet

    def __enter__(self):
        self.saved = []
        for p, tags, dim in self.net.param_tags():
            idx = torch.nonzero(tags > self.subnet).squeeze(1)
            if len(idx) and tags.numel() == p.shape[dim]:
                self.saved.append((p, dim, idx, p.detach().index_select(dim, idx).clone()))

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, dim, idx, values in self.saved:
                p.index_copy_(dim, idx, values)
        return False


def make_optimizer(net: nn.Module, lr: float, config: SteppingConfig) -> torch.optim.Optimizer:
    # Weight decay is applied in shape_gradients, per tag, so the optimizer gets none.
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=config.momentum, nesterov=config.momentum > 0)


# ---------------------------------------------------------------------------- importance
def importance(net: TaggedNet, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               config: SteppingConfig) -> list[torch.Tensor]:
    """Eq. 1-3: M_j = sum_{k >= tag_j} alpha_k |dL_k / dr_j| for every channel j of every tag group.

    r_j is fixed to 1 and scales, with ``importance_of="output"`` (the default), neuron j's whole
    output z_j after its (eval-mode) BatchNorm, so dL/dr_j = sum over batch and positions of
    dL/dz_j z_j; with ``"weighted_sum"`` (Eq. 2's letter) only w_j . x: z_j = s_j r_j (w_j . x) + c_j
    with c_j the bias and BN shift folded together, so dL/dr_j = sum of dL/dz_j (z_j - c_j). Either
    way one backward per subnet through the activations only. Where a residual
    add ties several layers into one group, one r_j scales the channel in all of them, so its
    derivative is the sum over those layers. A channel no reader sees (``TaggedNet.reachable``)
    gets exactly 0 here; :func:`construct` tells such channels apart.
    """
    n = net.num_subnets
    alphas = [config.alpha_growth ** (k - 1) for k in range(1, n + 1)]
    dtype = net.classifier.weight.dtype
    grads = [[torch.zeros(len(net.tags(g)), dtype=dtype, device=net.tags(g).device) for g in range(net.num_groups)]
             for _ in range(n)]
    was_training = net.training
    net.eval()  # running BN statistics: estimating importance must not change the model
    shifts = [_folded_bias(net, i) if config.importance_of == "weighted_sum" else
              torch.zeros(net.layers[i].weight.shape[0], dtype=dtype, device=net.layers[i].weight.device)
              for i in range(net.num_hidden)]
    try:
        for x, y in batches:
            out = net.forward_all(x, keep_preacts=True)
            for k in range(n):
                loss = F.cross_entropy(out.logits[k], y)
                dz = torch.autograd.grad(loss, out.preacts, retain_graph=k < n - 1, allow_unused=True)
                per_group: dict[int, torch.Tensor] = {}
                for i, (z, g, rows) in enumerate(zip(out.preacts, dz, out.rows)):
                    if g is None:
                        continue
                    dims = [d for d in range(z.dim()) if d != 1]
                    group = net.layer_group[i]
                    score = torch.zeros(len(grads[k][group]), dtype=z.dtype, device=z.device)
                    shift = shifts[i][rows].view(-1, *([1] * (z.dim() - 2)))
                    score[rows] = (g * (z - shift)).detach().sum(dim=dims)
                    per_group[group] = per_group[group] + score if group in per_group else score
                for group, score in per_group.items():
                    grads[k][group] += score.abs()
    finally:
        net.train(was_training)
    scores = []
    for group in range(net.num_groups):
        tags = net.tags(group)
        score = torch.zeros(len(tags), dtype=dtype, device=tags.device)
        for k in range(1, n + 1):
            score += torch.where(tags <= k, alphas[k - 1] * grads[k - 1][group], torch.zeros((), device=tags.device))
        if config.normalize_importance:  # over measured channels: unmeasured zeros must not deflate the mean
            live = score[(tags <= n) & (score > 0)]
            score = score / live.mean().clamp(min=1e-12) if len(live) else score
        scores.append(score)
    return scores


@torch.no_grad()
def _folded_bias(net: TaggedNet, layer: int) -> torch.Tensor:
    """Per output channel of hidden ``layer``: the constant its output carries (bias and eval-mode
    BatchNorm shift folded together), i.e. what r_j of Eq. 2 does not scale."""
    conv, norm = net.layers[layer], net.norm_of(layer, net.num_subnets)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.weight.shape[0], dtype=conv.weight.dtype,
                                                                          device=conv.weight.device)
    if getattr(norm, "running_mean", None) is None:
        return bias
    return fold_batchnorm(conv.weight.detach(), bias, norm)[1]


# ---------------------------------------------------------------------------- moving neurons
def _saving_estimates(net: TaggedNet, group: int, subnet: int) -> torch.Tensor:
    """MACs subnet ``subnet`` saves if each channel of ``group`` left it: its rows in every layer
    that writes the group, plus its columns in every layer (or the classifier) that reads it."""
    saving = torch.zeros(len(net.tags(group)), device=net.tags(group).device)
    for i in net.group_layers(group):
        in_ok = net.input_tags(i) <= subnet
        saving += net.weight_mask(i)[:, in_ok].flatten(1).sum(1) * net.out_positions[i]
    for i in net.group_readers(group):
        mask = net.weight_mask(i)
        if i < net.num_hidden:
            mask = mask[net.layer_tags(i) <= subnet]
            positions = net.out_positions[i]
        else:
            positions = 1
        per_input = mask.transpose(0, 1).flatten(1).sum(1)  # MACs per input feature of the reader
        saving += per_input.view(-1, net.in_repeat[i]).sum(1) * positions
    return saving


@dataclass
class _Unit:
    """Channels of one tag group that move together (``granularity`` of them)."""

    waiting: bool       # every channel unmeasured: moved only when nothing measured is left
    score: float        # mean importance
    group: int
    channels: list[int]
    saving: float       # estimated MACs the subnet saves without them


def unit_size(net: TaggedNet, group: int, granularity: int) -> int:
    """Channels of ``group`` moved together: ``granularity``, but at most width / N, so a narrow
    layer can still spread over every subnet."""
    return max(1, min(granularity, net.group_widths[group] // net.num_subnets))


WINDOW = 8  # how far down the importance order the last unit of a round may be taken from
# The adaptive quota aims to meet the budgets after this share of N_t, so that the last moves are
# still followed by training before construction ends (what is left goes to retraining).
MOVE_SHARE = 0.75


def increment_floors(net: TaggedNet, share: float, width_share: float = 0.0) -> list[int]:
    """Per tag group, the fewest channels each increment (tag 1..N) keeps: ceil(share x width / N)
    for fully connected groups (every writer has one output position), 0 for convolutions; and
    ceil(width_share x width) for every group where that is more."""
    n = net.num_subnets
    fc = [math.ceil(share * width / n) if share > 0 and all(net.out_positions[i] == 1 for i in net.group_layers(g))
          else 0 for g, width in enumerate(net.group_widths)]
    return [max(f, math.ceil(width_share * width)) for f, width in zip(fc, net.group_widths)]


def subnet_floors(net: TaggedNet, min_channels: int, min_width: float = 0.0) -> list[int]:
    """Per tag group, the fewest channels subnet 1 (so every subnet) keeps: ``min_channels``, or
    ceil(``min_width`` x width) where that is more, never more than the group has."""
    return [min(width, max(min_channels, math.ceil(min_width * width))) for width in net.group_widths]


def _floor_macs(net: TaggedNet, first: Sequence[int], increments: Sequence[int] | None = None) -> list[int]:
    """Every subnet's MACs if subnet 1 kept only ``first`` channels per tag group and every later
    increment only ``increments``, all weights live: the least the construction's floors let
    each subnet cost (pruning inside it aside)."""
    probe = copy.deepcopy(net)
    n = probe.num_subnets
    increments = increments or [0] * probe.num_groups
    for g in range(probe.num_groups):
        tags = torch.full_like(probe.tags(g), n + 1)
        start = 0
        for i, count in enumerate([max(first[g], increments[g])] + [increments[g]] * (n - 1), start=1):
            tags[start:start + count] = i
            start += count
        probe.tags(g).copy_(tags)
    return probe.macs_per_subnet()


def _per_group(net: TaggedNet, min_channels: int | Sequence[int]) -> list[int]:
    """``min_channels`` as one floor per tag group (an int applies to every group)."""
    if isinstance(min_channels, int):
        return [min_channels] * net.num_groups
    if len(min_channels) != net.num_groups:
        raise ValueError(f"min_channels names {len(min_channels)} floors for {net.num_groups} tag groups")
    return list(min_channels)


def move_neurons(net: TaggedNet, scores: list[torch.Tensor], subnet: int, amount: float,
                 min_channels: int | Sequence[int] = 1, *, measured: list[torch.Tensor] | None = None,
                 granularity: int = 1, exact: bool = True, floors: Sequence[int] | None = None) -> tuple[int, float]:
    """Move the least important channels of tag ``subnet`` to ``subnet + 1`` until the MACs they
    take out of the subnet reach ``amount``. Returns (channels moved, estimated MACs saved).

    Channels move in units of :func:`unit_size` per tag group. Channels ``measured`` marks
    False go after every measured one. When the next unit would carry the round past
    ``amount``, the one of the next ``WINDOW`` that reaches it with the least overshoot is taken
    instead. With ``exact=False`` nothing is taken when stopping short lands closer, and no
    unmeasured channel is taken at all (the rest of the gap waits for the next round). A moved channel loses its synapses into the smaller subnet
    and gains those to its new peers; both follow from the causal mask, and its pruned weights
    are revived (``set_tags``). ``floors`` (per group) is how many channels of its own the
    subnet's increment keeps (:func:`increment_floors`); ``min_channels`` (one for every group, or
    per group: :func:`subnet_floors`) how many the subnet keeps in all.
    """
    least = _per_group(net, min_channels)
    units = _units(net, scores, subnet, measured, granularity, descending=False)
    kept = [int((net.tags(g) <= subnet).sum()) for g in range(net.num_groups)]
    own = [int((net.tags(g) == subnet).sum()) for g in range(net.num_groups)]
    floors = floors or [0] * net.num_groups
    chosen: list[_Unit] = []
    saved = 0.0
    while saved < amount:
        # every subnet keeps its min_channels per group: it must stay connected; and its
        # increment keeps its floor of each group (fc_floor, increment_width)
        units = [u for u in units if kept[u.group] - len(u.channels) >= least[u.group]
                 and own[u.group] - len(u.channels) >= floors[u.group]]
        if not units:
            break
        pick = units[0]
        if pick.waiting and not exact:
            break  # only unmeasured channels left: they wait for their readers (or the final round)
        if saved + pick.saving > amount:
            window = [u for u in units[:WINDOW] if u.waiting == pick.waiting]
            reaching = [u for u in window if saved + u.saving >= amount]
            pick = min(reaching, key=lambda u: u.saving) if reaching else pick
            if not exact and saved + pick.saving - amount > amount - saved:
                break
        units.remove(pick)
        chosen.append(pick)
        kept[pick.group] -= len(pick.channels)
        own[pick.group] -= len(pick.channels)
        saved += pick.saving
    for unit in chosen:
        net.set_tags(unit.group, torch.tensor(unit.channels), subnet + 1)
    return sum(len(u.channels) for u in chosen), saved


def _units(net: TaggedNet, scores: list[torch.Tensor], tag: int, measured: list[torch.Tensor] | None,
           granularity: int, descending: bool) -> list[_Unit]:
    """The channels with ``tag`` grouped into move units, in order: measured before waiting, then
    least (``descending``: most) important first. A group's remainder (fewer than a unit) stays."""
    units = []
    sign = -1.0 if descending else 1.0
    for g in range(net.num_groups):
        idx = torch.nonzero(net.tags(g) == tag).squeeze(1).tolist()
        if not idx:
            continue
        saving = _saving_estimates(net, g, min(tag, net.num_subnets))
        waiting = {c: measured is not None and not bool(measured[g][c]) for c in idx}
        idx.sort(key=lambda c: (waiting[c], sign * float(scores[g][c])))
        size = unit_size(net, g, granularity)
        for start in range(0, len(idx) - size + 1, size):
            members = idx[start:start + size]
            units.append(_Unit(all(waiting[c] for c in members), sum(float(scores[g][c]) for c in members) / size,
                               g, members, sum(float(saving[c]) for c in members)))
    units.sort(key=lambda u: (u.waiting, sign * u.score))
    return units


def drop_idle(net: TaggedNet, raw: list[torch.Tensor], min_channels: int | Sequence[int] = 1) -> dict:
    """Drop the channels that cost MACs but change no subnet's logits on the importance samples,
    before the fill-back spends what they cost. Returns how many were dropped of each kind.

    *Silent*: a channel a reader sees whose Eq. 3 score ``raw`` is exactly 0, i.e. its output is
    0 on every importance sample (a dead ReLU: hundreds of LeNet-5 x2's 408 fc neurons die at lr
    0.05). Kept, a silent channel of the classifier's source group is an increment's only
    "feature": the subnet then answers exactly like the one below it while paying for every
    channel that feeds it. *Unread*: a channel no reader sees (``TaggedNet.reachable``),
    including those whose only readers were silent. Subnet 1 keeps ``min_channels`` channels of
    every group (or per group, as :func:`move_neurons`) whatever they score, as the moves
    guarantee (a network needs them to run).
    """
    n = net.num_subnets
    least = _per_group(net, min_channels)
    dropped = {"silent": 0, "unread": 0}

    def drop(g: int, idle: torch.Tensor, kind: str) -> None:
        tags = net.tags(g)
        spare = int((tags == 1).sum()) - least[g]  # tag-1 channels that may go
        first = idle[tags[idle] == 1]
        keep = first[:max(0, len(first) - max(spare, 0))]
        idle = idle[~torch.isin(idle, keep)]
        if len(idle):
            net.set_tags(g, idle, n + 1)
            dropped[kind] += len(idle)

    for g, seen in enumerate(net.reachable()):
        drop(g, torch.nonzero(seen & (raw[g] == 0)).squeeze(1), "silent")
    for g, seen in enumerate(net.reachable()):
        drop(g, torch.nonzero(~seen & (net.tags(g) <= n)).squeeze(1), "unread")
    return dropped


@torch.no_grad()
def promote_to_serving(net: TaggedNet) -> int:
    """Give every channel the tag of the smallest subnet whose logits it influences
    (``TaggedNet.serving``); returns how many channels moved. No subnet's logits change: a
    smaller subnet loses only channels that never reached its logits, and the connections the
    new tags newly allow start pruned (a larger subnet computes exactly what it did).

    Construction leaves such channels behind: a conv channel kept in subnet 3 whose only reader
    is a tag-4 channel of the next layer costs subnet 3 its MACs for nothing (LeNet-5 x2 /
    CIFAR-10 left subnet 3 five conv1 channels read only by subnet 4). Subnet 1 keeps all it has:
    keeping one of its channels while moving that channel's inputs would cut a connection it
    uses (its inputs can only be tag 1, so leaving tag 1 alone is consistent).
    """
    if net.exits:
        raise ValueError("promote_to_serving handles the classifier only; this net has exit heads")
    before = [net.connectivity(i) for i in range(net.num_hidden)]
    moved = 0
    for g, level in enumerate(net.serving()):
        tags = net.tags(g)
        up = (tags >= 2) & (tags <= net.num_subnets) & (level <= net.num_subnets) & (level > tags)
        if up.any():
            tags[up] = level[up]
            moved += int(up.sum())
    for i in range(net.num_hidden):
        new = net.connectivity(i) & ~before[i]
        if new.any():  # start pruned: no subnet gains a connection (or a MAC) it did not have
            alive = net.alive(i)
            alive[new.view(*new.shape, *([1] * (alive.dim() - 2))).expand_as(alive)] = False
    return moved


def served_late(net: TaggedNet) -> list[int]:
    """Per tag group, the channels of subnets 2..N whose output reaches only larger subnets'
    logits: subnet t computes (and pays for) them without using them. (Channels that reach no
    logits at all are counted in the construction's ``unreachable``.)"""
    n = net.num_subnets
    return [int(((tags >= 2) & (tags <= n) & (level > tags) & (level <= n)).sum())
            for tags, level in ((net.tags(g), lv) for g, lv in enumerate(net.serving()))]


def fill_back(net: TaggedNet, scores: list[torch.Tensor], limits: Sequence[float], granularity: int = 1,
              measured: list[torch.Tensor] | None = None, patience: int | None = None, passes: int = 4,
              floors: Sequence[int] | None = None, serve_own: bool = False) -> list[int]:
    """Re-admit the best channels moved out of subnet i (tags i+1..N+1, the dropped ones included)
    into it, while every subnet stays within its MAC limit. Returns how many channels each
    subnet re-admitted. Dropped channels are in no subnet, so Eq. 3 cannot score them: they are
    ranked by their last measured score (``unmeasured="wait"`` carries it; under the paper's
    rule they score 0 and are never re-admitted) and tried after the channels still in a subnet.

    Moves overshoot (a conv neuron can be worth many times a round's quota), so construction
    ends below its budgets; this spends what is left. A trial is undone if it breaks a limit, if
    the admitted channels would reach no logits (an fc1 neuron can join subnet i only once an
    fc2 neuron of subnet i reads it), or if it leaves a channel that reached the logits without
    a reader (taking the last fc2 neuron of tag i+1 would orphan the fc1 neurons of that tag).
    Units that scored 0 are not re-admitted. Subnets are filled from 1 up to N: subnet i takes its
    picks out of the larger subnets' increments, so an increment is composed only after every
    smaller subnet is done with it. (Filled from N down, subnet 3 took the best fc neurons of the
    just-filled tag 4 and left LeNet-5 x2 / CIFAR-10's tag 4 with 5 conv channels feeding one fc1
    and one fc2 neuron: 25 % of the MACs for no accuracy, 63.14 % at subnets 3 and 4 alike;
    filled upward, tag 4 kept 66 fc1 and 29 fc2 neurons.) ``passes`` sweeps repeat while
    admissions make further ones possible. A subnet stops after ``patience`` undone trials in a
    row (None: it tries every candidate). No unit is taken out of an increment that would leave
    it below its ``floors`` (per group, :func:`increment_floors`).

    ``serve_own`` (construction's ``promote``) asks more of a trial: the admitted channels must
    change subnet i's logits, not only some subnet's, and no channel may stop serving the subnet
    it served (``TaggedNet.serving``). Without it, subnet i can take every tag-(i+1) reader of
    other tag-(i+1) channels, which subnet i+1 then computes for nothing: LeNet-5 x2 / CIFAR-10 at
    the paper's budgets kept two conv1 channels, most of subnet 2's increment, that only subnet 3
    read once subnet 1 had taken every tag-2 conv2 channel, and subnet 2 answered like subnet 1.
    """
    n = net.num_subnets
    floors = floors or [0] * net.num_groups
    # MACs per layer per subnet, kept current: a trial re-counts only the layers it touches
    table = [net.layer_macs_per_subnet(i) for i in range(net.num_hidden + 1)]
    reach = net.serving() if serve_own else net.reachable()
    admitted = [0] * n
    for _ in range(passes):
        before = sum(admitted)
        for i in range(1, n + 1):
            units = [u for tag in range(i + 1, n + 2)
                     for u in _units(net, scores, tag, measured, granularity, descending=True)]
            # a unit that scored 0 (dead ReLUs, or never measured) has nothing to say it helps
            units = sorted((u for u in units if u.score > 0), key=lambda u: (u.waiting, -u.score))
            misses = 0
            for unit in units:
                if patience is not None and misses >= patience:
                    break
                tags = net.tags(unit.group)
                source = int(tags[unit.channels[0]])
                if source <= n and int((tags == source).sum()) - len(unit.channels) < floors[unit.group]:
                    continue  # the increment it would leave keeps its floor
                touched = sorted(set(net.group_layers(unit.group)) | set(net.group_readers(unit.group)))
                undo = _trial_move(net, unit.group, unit.channels, i)
                rows = {j: net.layer_macs_per_subnet(j) for j in touched}
                totals = [sum(rows[j][k] if j in rows else table[j][k] for j in range(len(table))) for k in range(n)]
                ok = all(m <= lim for m, lim in zip(totals, limits))
                if ok and serve_own:  # levels: serves subnet i itself, and no channel serves later than before
                    after = net.serving()
                    ok = bool((after[unit.group][unit.channels] <= i).all()) and all(
                        bool((a <= b).all()) for a, b in zip(after, reach))
                elif ok:
                    after = net.reachable()
                    ok = bool(after[unit.group][unit.channels].all()) and all(
                        bool((a | ~b).all()) for a, b in zip(after, reach))
                if ok:
                    for j, row in rows.items():
                        table[j] = row
                    reach = after
                    admitted[i - 1] += len(unit.channels)
                    misses = 0
                else:
                    undo()
                    misses += 1
        if sum(admitted) == before:
            break
    return admitted


def _trial_move(net: TaggedNet, group: int, channels: list[int], tag: int):
    """Move ``channels`` to ``tag``; returns a function that restores their tags and pruning masks."""
    index = torch.tensor(channels)
    tags = net.tags(group)[index].clone()
    alive = {i: net.alive(i)[index].clone() for i in net.group_layers(group)}
    net.set_tags(group, index, tag)

    def undo() -> None:
        net.tags(group)[index] = tags
        for i, rows in alive.items():
            net.alive(i)[index] = rows

    return undo


# ---------------------------------------------------------------------------- the face
# How one from-scratch execution of a subnet runs: one pass of dense prefix rectangles (a causal
# net's zero upper blocks multiplied), or the chain of step blocks 1..k (the triangle, one op per
# block). SteppingNet.choose_scratch measures which is faster here.
SCRATCH_EXECUTIONS = ("rectangle", "chain")


class SteppingNet(TaggedSubnets, nn.Module):
    """Nested subnets with incremental accuracy; subnet k+1 reuses all of subnet k's results."""

    def __init__(self, net: TaggedNet, budgets: Sequence[float], reference_macs: int,
                 config: SteppingConfig | None = None, history: dict | None = None,
                 scratch_execution: Sequence[str] | None = None):
        super().__init__()
        self.net = net
        self.budgets = check_budgets(budgets, net.num_subnets)
        self.reference_macs = int(reference_macs)
        self.config = config or SteppingConfig()
        self.history = history or {}
        self.scratch_execution = list(scratch_execution or [SCRATCH_EXECUTIONS[0]] * net.num_subnets)
        bad = [e for e in self.scratch_execution if e not in SCRATCH_EXECUTIONS]
        if bad or len(self.scratch_execution) != net.num_subnets:
            raise ValueError(f"scratch_execution must name one of {SCRATCH_EXECUTIONS} per subnet "
                             f"({net.num_subnets}), got {list(scratch_execution)}")

    def forward(self, x: torch.Tensor, subnet: int | None = None) -> torch.Tensor:
        """Subnet ``subnet`` (default: the largest) from scratch.

        In training mode (``self.net.training``) the masked training form, through which
        gradients reach the weights. In eval mode the compacted inference form (cached, rebuilt
        when weights, tags or statistics change): the dense rectangles ``dy.export.subnet`` runs
        and ``mac_fractions(path="scratch")`` counts, so what is reported is what runs. Its weights
        are BatchNorm-folded copies: in eval mode no gradient reaches the parameters. A subnet that
        :meth:`choose_scratch` found faster as its chain of step blocks runs as that chain (and
        ``macs(path="scratch")`` counts the chain); the dense export stays one rectangle pass. The compacted
        form runs on CPU; a net on another device, or one compaction cannot fold (BatchNorm without
        running statistics), runs the masked form in eval mode too.
        """
        if self.net.training or self.net.classifier.weight.device.type != "cpu":
            return self.net(x, subnet)
        try:
            compacted = self.compact()
        except ValueError:
            return self.net(x, subnet)
        k = check_subnet(self.num_subnets if subnet is None else subnet, self.num_subnets)
        if self.scratch_execution[k - 1] == "chain":
            session = Session(compacted, x, 1)
            for _ in range(k - 1):
                session.step()
            return session.logits
        return compacted(x, k)

    def macs(self, path: str = "incremental") -> list[int]:
        """MACs of each subnet along ``path`` (see :meth:`TaggedSubnets.macs`). ``"scratch"``
        counts the execution :attr:`scratch_execution` names for each subnet: the dense
        rectangles, or the chain of step blocks (the causal triangle, pruned weights included,
        since the dense step blocks multiply them as zeros)."""
        if check_path(path) == "incremental" or set(self.scratch_execution) == {"rectangle"}:
            return super().macs(path)
        rectangles = super().macs("scratch")
        unpruned = copy.deepcopy(self.net)
        for i in range(unpruned.num_hidden + 1):
            unpruned.alive(i).fill_(True)
        chains = unpruned.macs_per_subnet()
        return [c if e == "chain" else r for e, r, c in zip(self.scratch_execution, rectangles, chains)]

    def choose_scratch(self, batch: int = 1, threads: int | None = None, repeats: int = 20) -> list[dict]:
        """Measure, on this machine, each subnet from scratch as one pass of dense rectangles and
        as its chain of step blocks (a session from subnet 1), and keep the faster for
        ``forward(x, subnet=k)`` in eval mode and for ``macs(path="scratch")``.

        One setting (``batch``, ``threads``) is measured: what is faster can change with them.
        Returns, per subnet, both medians (ms) and the choice; :meth:`save` keeps the choice.
        """
        setting = bench_setting(self.compact(), batch, threads or torch.get_num_threads(), repeats=repeats)
        return self.prefer_faster(*scratch_times(setting))

    def prefer_faster(self, rectangle_ms: Sequence[float], chain_ms: Sequence[float]) -> list[dict]:
        """Keep, per subnet, the from-scratch execution measured faster (``rectangle_ms[k-1]``: one
        pass of dense rectangles; ``chain_ms[k-1]``: a session stepping 1 -> k); subnet 1's two are
        the same pass and stay the rectangle. Returns both times and the choice per subnet."""
        if len(rectangle_ms) != self.num_subnets or len(chain_ms) != self.num_subnets:
            raise ValueError(f"need one rectangle and one chain time per subnet ({self.num_subnets}), got "
                             f"{len(rectangle_ms)} and {len(chain_ms)}")
        rows = [{"subnet": k, "rectangle_ms": float(r), "chain_ms": float(c),
                 "chosen": "chain" if k > 1 and c < r else "rectangle"}
                for k, (r, c) in enumerate(zip(rectangle_ms, chain_ms), start=1)]
        self.scratch_execution = [r["chosen"] for r in rows]
        return rows

    def start(self, x: torch.Tensor, subnet: int = 1):
        """Incremental session at ``subnet``; ``.step()`` computes only the next subnet's neurons."""
        return Session(self.compact(), x, subnet)

    def compact(self):
        """The inference form: channels sorted by tag, dense per-step blocks, BN folded (cached)."""
        return cached_compact(self)

    def retrain(self, train: ImageSet, teacher: nn.Module | None = None, *, epochs: int | None = None,
                test: ImageSet | None = None, config: SteppingConfig | None = None,
                checkpoint: str | Path | None = None, resume: bool = True) -> list[dict]:
        """Eq. 4: retrain all subnets (ascending, with suppression) distilling from ``teacher``.

        ``teacher`` is the original network; without it (or with distillation off) plain CE.
        With ``checkpoint`` (a path stem) every epoch ends with an atomic checkpoint that
        ``resume=True`` continues from exactly (each epoch's batch order derives from the seed).
        """
        cfg = config or self.config
        epochs = cfg.retrain_epochs if epochs is None else epochs
        # Tags are final now: channels in tag order make every subnet's slice a view (same
        # function; before the optimizer, whose state would otherwise be in the old order).
        self.net.order_by_tag()
        use_teacher = None
        if cfg.distillation and teacher is not None:
            use_teacher = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        optimizer = make_optimizer(self.net, cfg.retrain_lr, cfg)
        log: list[dict] = []
        origin = {}
        if checkpoint is not None:  # what the checkpoint must belong to: this net as found, data, teacher
            origin = {"epochs": epochs, "data": _data_identity(train), "start": _fingerprint(self.net),
                      "teacher": _fingerprint(teacher) if use_teacher is not None else None}
        if checkpoint is not None and not resume:
            ckpt.remove(checkpoint)
        if checkpoint is not None and resume and ckpt.exists(checkpoint):
            state = _restore(checkpoint, "stepping-retraining", self.net, optimizer, cfg, self.budgets,
                             RETRAIN_FIELDS, origin)
            log = state["log"]
            if len(log) >= epochs:
                warnings.warn(f"retraining checkpoint {checkpoint} is complete ({epochs} epochs); "
                              "nothing was trained (resume=False starts over)", stacklevel=2)
                self.net.eval()
                return log
            if cfg.progress:
                progress.write(f"resuming retraining from {checkpoint} after epoch {len(log)}")
        epochs_loop = _RetrainingEpochs(self, train, test, cfg, epochs, optimizer, use_teacher, checkpoint, origin, log)
        per_epoch = epochs_loop.batches_per_epoch * epochs_loop.training.steps_per_batch
        if len(log) < epochs:
            loop = TrainConfig(steps=epochs * per_epoch, batch_size=cfg.batch_size, schedule="none", seed=cfg.seed,
                               progress=cfg.progress, checkpoint_every=per_epoch)
            with torch.random.fork_rng():  # seeded per epoch; leave the caller's RNG as it was
                fit(self.net, train, loop, loss_fn=epochs_loop.training.loss, optimizer=optimizer,
                    batches=epochs_loop.training.repeat(epochs_loop), callbacks=[epochs_loop.training, epochs_loop],
                    start_step=len(log) * per_epoch, desc="retrain")
        self.net.eval()
        self.history.setdefault("retrain", []).extend(log)
        return log

    @torch.no_grad()
    def evaluate(self, data: ImageSet, batch_size: int = 512) -> list[float]:
        """Top-1 accuracy of every subnet, from one pass of the largest (causal rule)."""
        was_training = self.net.training
        self.net.eval()
        correct = [0] * self.num_subnets
        for x, y in data.batches(batch_size):
            for k, logits in enumerate(self.net.forward_all(x).logits):
                correct[k] += int((logits.argmax(1) == y).sum())
        self.net.train(was_training)
        return [c / len(data) for c in correct]

    # -------------------------------------------------------------- persistence
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """safetensors (weights, tags, masks) + JSON (budgets, config, model, history)."""
        self._save_tagged(path, "stepping", {"config": asdict(self.config), "history": self.history,
                                             "scratch_execution": self.scratch_execution, **(extra or {})})

    @classmethod
    def load(cls, path: str | Path) -> "SteppingNet":
        net, meta = load_tagged(path, "stepping")
        # a net saved before a field existed was built the way dyninfer worked then
        config = SteppingConfig(**{**BEFORE_FIELDS, **meta["config"]})
        return cls(net, meta["budgets"], meta["reference_macs"], config, meta.get("history"),
                   meta.get("scratch_execution"))


# ---------------------------------------------------------------------------- construction
reference_macs_of = original_macs  # the name this module has exported since it landed


# The config fields that shape each phase: a phase's checkpoint resumes only if they are unchanged
# (fields of the other phase, and ``progress``, may differ).
CONSTRUCTION_FIELDS = ("alpha_growth", "beta", "iterations", "batches_per_iteration", "prune_threshold", "schedule",
                       "suppression", "importance_batches", "normalize_importance", "unmeasured", "quota",
                       "fill_back", "granularity", "lr_schedule", "importance_of", "decay_per_subnet",
                       "min_channels", "min_width", "increment_width", "fc_floor", "batch_size",
                       "lr", "momentum", "weight_decay", "seed")
RETRAIN_FIELDS = ("beta", "gamma", "temperature", "schedule", "suppression", "distillation", "decay_per_subnet",
                  "batch_size", "momentum", "weight_decay", "retrain_lr", "retrain_warmup_epochs",
                  "retrain_tag_update", "seed")


def construct(model: nn.Module, train: ImageSet, budgets: Sequence[float], config: SteppingConfig | None = None,
              *, reference_macs: int | None = None, checkpoint: str | Path | None = None,
              resume: bool = True) -> SteppingNet:
    """Fig. 3: build N nested subnets from ``model`` (the width-expanded network).

    Starts with subnet 1 = the whole network; each iteration trains every subnet m batches,
    prunes, then moves the least important neurons of each over-budget subnet to the next one
    (subnet N drops them). Budgets are fractions of the ORIGINAL network's MACs.

    With ``checkpoint`` (a path stem), every iteration ends with an atomic checkpoint, and
    ``resume=True`` continues an interrupted construction from it exactly: each iteration's
    batches and random state are derived from (seed, iteration), not from what ran before.
    """
    cfg = config or SteppingConfig()
    budgets = check_budgets(budgets)
    input_shape = tuple(getattr(model, "dyninfer_config", {}).get("input_shape", train.input_shape))
    if tuple(train.input_shape) != input_shape:
        raise ValueError(f"model was built for inputs {input_shape} but the data has {train.input_shape}")
    reference = int(reference_macs) if reference_macs is not None else reference_macs_of(model)
    # A copy: the caller's model stays what it was (e.g. usable as the retraining teacher).
    net = TaggedNet(copy.deepcopy(model), len(budgets), input_shape)
    limits = [b * reference for b in budgets]
    least = subnet_floors(net, cfg.min_channels, cfg.min_width)
    floor = _floor_macs(net, least)[0]
    if floor > limits[0]:  # before any training: the floor alone breaks subnet 1's budget
        rule = f"min_channels={cfg.min_channels}" + (f" and min_width={cfg.min_width}" if cfg.min_width else "")
        raise ValueError(f"{rule} {'keep' if cfg.min_width else 'keeps'} subnet 1 at {floor / reference:.4f} of the "
                         f"reference MACs or more ({least} channels per layer, their weights live), above its "
                         f"budget {budgets[0]}; lower {'them' if cfg.min_width else 'min_channels'} or raise the "
                         f"first budget")
    increments = increment_floors(net, cfg.fc_floor, cfg.increment_width)
    floors = _floor_macs(net, least, increments)
    broken = [i for i, (m, lim) in enumerate(zip(floors, limits), start=1) if m > lim]
    if broken:
        raise ValueError(f"the increment floors (fc_floor={cfg.fc_floor}, increment_width={cfg.increment_width}: "
                         f"{increments} channels per layer and increment) keep subnet(s) {broken} at "
                         f"{[round(floors[i - 1] / reference, 4) for i in broken]} of the reference MACs or more, "
                         f"above their budgets {[budgets[i - 1] for i in broken]}; lower them or raise the budgets")
    optimizer = make_optimizer(net, cfg.lr, cfg)
    origin = {"reference_macs": reference, "data": _data_identity(train), "start": _fingerprint(net)}
    history = {"iterations": [], **origin, "expanded_macs": net.subnet_macs(), "construction_seconds": 0.0,
               "budgets_met": False}
    if checkpoint is not None and not resume:
        ckpt.remove(checkpoint)
    if checkpoint is not None and resume and ckpt.exists(checkpoint):
        history = _restore(checkpoint, "stepping-construction", net, optimizer, cfg, budgets, CONSTRUCTION_FIELDS,
                           origin)
    # The paper's fixed amount per iteration, from the expanded network's MACs (also on resume).
    amount = max(history["expanded_macs"] - limits[0], 0) / cfg.iterations
    carried = _carried(net, history)
    first = len(history["iterations"])
    if first and cfg.progress:
        progress.write(f"resuming construction from {checkpoint} after iteration {first}"
                       + (" (budgets already met)" if history["budgets_met"] else ""))

    def meets(macs):
        return all(m <= lim for m, lim in zip(macs, limits))

    def stream(*key):
        return BatchStream(train, cfg.batch_size, derive_seed(cfg.seed, *key, "data"))

    rounds = _ConstructionRounds(net, cfg, history, limits, budgets, reference, amount, carried, optimizer,
                                 stream, meets, checkpoint)
    per_iteration = cfg.batches_per_iteration * rounds.training.steps_per_batch
    note_resumed(first * per_iteration)  # a budget counted by the caller includes the restored iterations
    if first < cfg.iterations and not history["budgets_met"]:
        loop = TrainConfig(steps=cfg.iterations * per_iteration, batch_size=cfg.batch_size, schedule="none",
                           seed=cfg.seed, progress=cfg.progress, checkpoint_every=per_iteration)
        with torch.random.fork_rng():  # seeded per iteration; leave the caller's RNG as it was
            fit(net, train, loop, loss_fn=rounds.training.loss, optimizer=optimizer,
                batches=rounds.training.repeat(rounds), callbacks=[rounds.training, rounds],
                start_step=first * per_iteration, desc="construct")

    trims = 0
    while not meets(net.macs_per_subnet()):  # N_t reached: finish the moves without training
        batches = stream("trim", trims)
        moved = _move_round(net, [next(batches) for _ in range(cfg.importance_batches)], cfg, limits, amount, 1,
                            carried)
        history.setdefault("trims", []).append(moved)
        trims += 1
        if sum(moved["moved"]) == 0:
            raise RuntimeError(
                f"budgets {budgets} cannot be met: subnet MAC fractions are stuck at "
                f"{[round(m / reference, 4) for m in net.macs_per_subnet()]} with min_channels={cfg.min_channels}"
                + "".join(f", {k}={getattr(cfg, k)}" for k in ("min_width", "increment_width", "fc_floor")
                          if getattr(cfg, k))
                + (f" and granularity={cfg.granularity} (channels move in units of up to {cfg.granularity}; a "
                   f"smaller granularity reaches smaller budgets)" if cfg.granularity > 1 else "")
            )
    if trims:
        warnings.warn(f"construction reached N_t={cfg.iterations} iterations before every budget was met; "
                      f"{trims} further move rounds were made without training", stacklevel=2)
    history["trim_rounds"] = trims
    if cfg.fill_back:
        batches = stream("fill-back")
        raw = importance(net, [next(batches) for _ in range(cfg.importance_batches)], cfg)
        scores, measured = _scores(net, raw, cfg, carried)
        history["dropped_idle"] = drop_idle(net, raw, least)
    if cfg.promote:
        history["promoted"] = promote_to_serving(net)
    if cfg.fill_back:
        history["fill_back"] = fill_back(net, scores, limits, cfg.granularity, measured,
                                         floors=increment_floors(net, cfg.fc_floor, cfg.increment_width),
                                         serve_own=cfg.promote)
    history.pop("carried_scores", None)
    final = net.macs_per_subnet()
    empty = [k + 1 for k in range(1, len(final)) if final[k] == final[k - 1]]
    if empty:
        warnings.warn(f"subnet(s) {empty} add no channel to the subnet below at the end of construction"
                      + (": every channel left in their increment was silent (Eq. 3 score 0: a dead ReLU) or "
                         "unread, and none of the dropped ones could be re-admitted" if cfg.fill_back else "")
                      + "; they answer like the subnet below at the same MACs (a longer or lower-lr construction "
                        "keeps more neurons alive)", stacklevel=2)
    history["final_macs"] = [m / reference for m in final]
    history["final_counts"] = net.counts()
    if not net.exits:  # serving() reads the classifier; exit heads serve depths, not widths
        history["served_late"] = served_late(net)
    history["unreachable"] = [int((~r & (net.tags(g) <= net.num_subnets)).sum()) for g, r in
                              enumerate(net.reachable())]
    net.eval()
    return SteppingNet(net, budgets, reference, cfg, history)


class _RetrainingEpochs:
    """Eq. 4's retraining epochs as callbacks of the one training loop: epoch e's batch order and
    random state derive from (seed, e), the LR anneals by a cosine over every batch of every
    epoch, and each epoch ends with a record (test accuracy of every subnet when ``test`` is
    given) and a checkpoint (rank 0)."""

    def __init__(self, stepped: "SteppingNet", train: ImageSet, test: ImageSet | None, cfg: SteppingConfig,
                 epochs: int, optimizer, teacher, checkpoint, origin: dict, log: list[dict]):
        self.stepped, self.train, self.test, self.cfg, self.epochs = stepped, train, test, cfg, epochs
        self.optimizer, self.checkpoint, self.origin, self.log = optimizer, checkpoint, origin, log
        self.training = SubnetTraining(stepped.net, cfg, targets=teacher, mean=cfg.retrain_tag_update == "mean")
        self.batches_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.batches = None
        self.started = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.batches)

    def on_batch_start(self, state) -> None:
        cfg, t = self.cfg, self.training
        b = state.step // t.steps_per_batch
        epoch, within = divmod(b, self.batches_per_epoch)
        if within == 0 and state.step % t.steps_per_batch == 0:  # an epoch starts
            self.started = time.perf_counter()
            torch.manual_seed(derive_seed(cfg.seed, epoch, "retrain-torch"))
            order = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, "retrain-data"))
            self.batches = iter(self.train.batches(cfg.batch_size, shuffle=True, augment=True, generator=order))
            t.correct, t.seen, t.losses = [0] * t.n, 0, []
        lr = cfg.retraining_lr(b, self.epochs * self.batches_per_epoch, self.batches_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def on_batch_end(self, state) -> None:
        t, net = self.training, self.stepped.net
        if state.step % (self.batches_per_epoch * t.steps_per_batch):
            return
        epoch = state.step // (self.batches_per_epoch * t.steps_per_batch)
        entry = {"epoch": epoch, "seconds": time.perf_counter() - self.started,
                 "loss": [sum(c) / len(c) for c in zip(*t.losses)]}
        if self.test is not None:
            state.sync_buffers()
            entry["test_top1"] = self.stepped.evaluate(self.test)
            net.train()
        self.log.append(entry)
        if self.checkpoint is not None and state.rank == 0:
            _save_checkpoint(self.checkpoint, "stepping-retraining", net, self.optimizer, self.cfg,
                             self.stepped.budgets, {**self.origin, "log": self.log})
        state.postfix = f"epoch {epoch}/{self.epochs} loss " + " ".join(f"{v:.3f}" for v in entry["loss"])


class _ConstructionRounds:
    """Fig. 3's iterations as callbacks of the one training loop: each iteration's batches come
    from a stream seeded by (seed, iteration) and its random state from (seed, iteration), so a
    resumed construction repeats nothing; the construction LR is set per batch; at the end of an
    iteration: prune, move neurons (or stop once every budget is met), checkpoint (rank 0).

    Under torchrun every rank scores the same importance batches on the same weights and rank 0's
    buffers (BN statistics, then the moved tags and masks) are broadcast around each move, so all
    ranks hold one network.
    """

    def __init__(self, net, cfg, history, limits, budgets, reference, amount, carried, optimizer, stream, meets,
                 checkpoint):
        self.net, self.cfg, self.history, self.limits, self.budgets = net, cfg, history, limits, budgets
        self.reference, self.amount, self.carried, self.optimizer = reference, amount, carried, optimizer
        self.stream_of, self.meets, self.checkpoint = stream, meets, checkpoint
        self.training = SubnetTraining(net, cfg)
        self.batches: BatchStream | None = None
        self.started = 0.0

    def __iter__(self):
        return self

    def __next__(self):  # the current iteration's training batches
        return next(self.batches)

    def _batch(self, state) -> int:
        return state.step // self.training.steps_per_batch

    def on_batch_start(self, state) -> None:
        cfg = self.cfg
        b = self._batch(state)
        it, within = divmod(b, cfg.batches_per_iteration)
        if within == 0 and state.step % self.training.steps_per_batch == 0:  # an iteration starts
            self.started = time.perf_counter()
            torch.manual_seed(derive_seed(cfg.seed, it, "torch"))
            self.batches = self.stream_of(it)
            self.net.train()
            t = self.training
            t.correct, t.seen, t.losses = [0] * t.n, 0, []
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.construction_lr(b, cfg.iterations * cfg.batches_per_iteration)

    def on_batch_end(self, state) -> None:
        cfg, net, history, t = self.cfg, self.net, self.history, self.training
        if state.step % (cfg.batches_per_iteration * t.steps_per_batch):
            return
        it = self._batch(state) // cfg.batches_per_iteration - 1  # the iteration that just ended
        net.prune(cfg.prune_threshold)
        macs = net.macs_per_subnet()
        entry = {"iteration": it + 1, "macs": [m / self.reference for m in macs],
                 "loss": [sum(c) / len(c) for c in zip(*t.losses)], "train_acc": [c / t.seen for c in t.correct]}
        if self.meets(macs):
            history["budgets_met"] = True
            state.stop = True
        else:
            state.sync_buffers()  # every rank scores with rank 0's BN statistics
            entry.update(_move_round(net, [next(self.batches) for _ in range(cfg.importance_batches)], cfg,
                                     self.limits, self.amount,
                                     max(1, math.ceil(MOVE_SHARE * cfg.iterations) - it), self.carried))
            state.sync_buffers()  # and holds rank 0's tags and masks
            history["carried_scores"] = [c.tolist() for c in self.carried]
        history["iterations"].append(entry)
        history["world_size"] = state.world_size  # ranks training data-parallel (torchrun)
        history["construction_seconds"] += time.perf_counter() - self.started
        if self.checkpoint is not None and state.rank == 0:
            _save_checkpoint(self.checkpoint, "stepping-construction", net, self.optimizer, cfg, self.budgets, history)
        state.postfix = ("MACs/budget " + " ".join(f"{m / self.reference:.2f}/{b:.2f}" for m, b in
                                                   zip(net.macs_per_subnet(), self.budgets))
                         + " | train acc " + " ".join(f"{100 * a:.0f}" for a in entry["train_acc"])
                         + " | loss " + " ".join(f"{v:.2f}" for v in entry["loss"]))


def _fingerprint(module: nn.Module) -> str:
    return ckpt.fingerprint(module.state_dict())


def _data_identity(data: ImageSet) -> dict:
    """Name, size, classes and a hash of the labels: a checkpoint is refused on other data."""
    return {"name": data.name, "n": len(data), "num_classes": data.num_classes,
            "labels": ckpt.fingerprint({"labels": data.labels})}


def _save_checkpoint(path: str | Path, kind: str, net: TaggedNet, optimizer: torch.optim.Optimizer,
                     cfg: SteppingConfig, budgets: list[float], state: dict) -> None:
    """Atomic: net (weights, tags, pruning masks, BN), optimizer momentum, the loop's state, config."""
    opt_tensors, opt_skeleton = ckpt.pack_state(optimizer.state_dict(), "optimizer")
    tensors = {f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    meta = {"kind": kind, "model": net.dyninfer_config, "budgets": budgets, "config": asdict(cfg),
            "state": state, "optimizer": opt_skeleton}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ckpt.save(path, {**tensors, **opt_tensors}, json.loads(json.dumps(meta, default=str)))


def _restore(path: str | Path, kind: str, net: TaggedNet, optimizer: torch.optim.Optimizer,
             cfg: SteppingConfig, budgets: list[float], fields: Sequence[str], expected: dict) -> dict:
    """Load a ``kind`` checkpoint into ``net``/``optimizer`` and return the loop's state, after
    checking that every setting that shaped it (``fields``, model, budgets, ``expected``) is unchanged."""
    tensors, meta = ckpt.load(path)
    where = f"{kind} checkpoint {str(ckpt.paths(path)[0])!r}"
    if meta.get("kind") != kind:
        raise ckpt.CheckpointMismatchError(f"{where} holds {meta.get('kind')!r}, not {kind!r}")
    saved, state = meta["config"], meta["state"]
    # a field the checkpoint predates had the value BEFORE_FIELDS records
    changed = [f"{k} (checkpoint {saved.get(k, BEFORE_FIELDS.get(k))!r}, now {getattr(cfg, k)!r})" for k in fields
               if saved.get(k, BEFORE_FIELDS.get(k)) != getattr(cfg, k)]
    if meta["model"] != json.loads(json.dumps(net.dyninfer_config)):  # JSON has lists where the model has tuples
        changed.append(f"model (checkpoint {meta['model']}, now {net.dyninfer_config})")
    if meta["budgets"] != budgets:
        changed.append(f"budgets (checkpoint {meta['budgets']}, now {budgets})")
    changed += [f"{k} (checkpoint {state.get(k)!r}, now {v!r})" for k, v in expected.items() if state.get(k) != v]
    if changed:
        raise ckpt.CheckpointMismatchError(f"cannot resume from {where}: " + "; ".join(changed)
                                                 + "; start over with resume=False (CLI: --no-resume) or use another path")
    net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
    optimizer.load_state_dict(ckpt.unpack_state(meta["optimizer"], tensors))
    return state


def _carried(net: TaggedNet, history: dict) -> list[torch.Tensor]:
    """Each channel's last measured score (restored from a checkpoint's history when resuming)."""
    saved = history.get("carried_scores")
    dtype = net.classifier.weight.dtype
    if saved is not None:
        return [torch.tensor(c, dtype=dtype) for c in saved]
    return [torch.zeros(w, dtype=dtype) for w in net.group_widths]


def _scores(net: TaggedNet, raw: list[torch.Tensor], cfg: SteppingConfig, carried: list[torch.Tensor]):
    """Eq. 3 scores ``raw`` as the moves see them, and which channels were measured (None: the
    paper's rule, where an unmeasured channel simply scores 0). An unmeasured channel keeps its
    last measured score, which ``carried`` remembers."""
    scores = list(raw)
    if cfg.unmeasured == "paper":
        return scores, None
    measured = net.reachable()
    for g, (score, seen) in enumerate(zip(scores, measured)):
        carried[g] = torch.where(seen, score, carried[g].to(score))
        scores[g] = carried[g].clone()
    return scores, measured


def _move_round(net: TaggedNet, batches, cfg: SteppingConfig, limits: list[float], amount: float,
                rounds_left: int, carried: list[torch.Tensor]) -> dict:
    """One round of moves for every subnet over budget, with the cascade rule of Fig. 5.

    Returns per subnet the channels moved, and of the channels subnet N dropped, how many had an
    Eq. 3 score of exactly 0 and how many were unmeasured.
    """
    raw = importance(net, batches, cfg)
    scores, measured = _scores(net, raw, cfg, carried)
    reach = measured if measured is not None else net.reachable()
    n = net.num_subnets
    floors = increment_floors(net, cfg.fc_floor, cfg.increment_width)
    least = subnet_floors(net, cfg.min_channels, cfg.min_width)
    before = [net.tags(g).clone() for g in range(net.num_groups)]
    moved = []
    for i in range(1, n + 1):
        macs = net.macs_per_subnet()
        over = macs[i - 1] > limits[i - 1]
        # Subnet i starts passing neurons on only once its own increment exceeds its budget's.
        allowed = i == 1 or macs[i - 1] - macs[i - 2] > limits[i - 1] - limits[i - 2]
        count = 0
        if over and allowed:
            gap = macs[i - 1] - limits[i - 1]
            if cfg.quota == "paper":  # the paper's fixed amount, but no more than the overshoot
                count, _ = move_neurons(net, scores, i, min(amount, gap), least, measured=measured,
                                        granularity=cfg.granularity, floors=floors)
            else:  # spread what is over budget over the rounds left; the last round closes it
                count, _ = move_neurons(net, scores, i, gap / max(1, rounds_left), least,
                                        measured=measured, granularity=cfg.granularity, exact=rounds_left <= 1,
                                        floors=floors)
        moved.append(count)
    dropped = [(before[g] <= n) & (net.tags(g) > n) for g in range(net.num_groups)]
    return {"moved": moved,
            "dropped_zero_score": sum(int((raw[g][d] == 0).sum()) for g, d in enumerate(dropped)),
            "dropped_unmeasured": sum(int((~reach[g][d]).sum()) for g, d in enumerate(dropped))}


# ---------------------------------------------------------------------------- in the comparison harness
class _StepView(ImageSet):
    """A training set seen as one epoch of exactly ``steps`` full batches from the shared stream,
    so :meth:`SteppingNet.retrain` (which counts in epochs) spends an exact number of steps."""

    def __init__(self, base: ImageSet, steps: int, batch_size: int, seed: int):
        super().__init__(base.images, base.labels, base.num_classes, base.name, base.mean, base.std,
                         base.augmentation)
        self._base, self._steps, self._batch_size, self._seed = base, steps, batch_size, seed

    def __len__(self) -> int:
        return self._steps * self._batch_size

    def batches(self, batch_size: int, **_: Any):
        if batch_size != self._batch_size:
            raise ValueError(f"this view yields batches of {self._batch_size}, asked for {batch_size}")
        stream = batch_stream(self._base, batch_size, self._seed)
        for _ in range(self._steps):
            yield next(stream)


# How dyninfer built SteppingNets before these SteppingConfig fields existed: a net saved then is
# loaded (and retrained) that way.
BEFORE_FIELDS = {"unmeasured": "paper", "quota": "paper", "fill_back": False, "granularity": 1,
                 "lr_schedule": "constant", "importance_of": "output", "decay_per_subnet": True,
                 "promote": False, "fc_floor": 0.0, "min_width": 0.0, "increment_width": 0.0,
                 "retrain_warmup_epochs": 0.0, "retrain_tag_update": "sum"}
# The paper's construction rules (Section III), for ablations against ours.
PAPER_RULES = {"unmeasured": "paper", "quota": "paper", "fill_back": False, "granularity": 1,
               "lr_schedule": "constant"}
# SteppingConfig fields a comparison may set through its options.
CONSTRUCTION_OPTIONS = ("unmeasured", "quota", "fill_back", "promote", "granularity", "lr_schedule", "importance_of",
                        "normalize_importance", "decay_per_subnet",
                        "suppression", "alpha_growth", "beta", "gamma", "min_channels", "min_width",
                        "increment_width", "fc_floor", "retrain_tag_update")


def _check_options(method: str, rules: dict):
    def check(options: dict) -> None:
        _parse_options(options, rules, method, "")

    return check


@register_method("stepping", "SteppingNet (construct + retrain, causal, learned tags)", order=0,
                 check=_check_options("stepping", {}))
def build_for_comparison(s: Setup):
    """SteppingNet: construct + retrain with a SteppingConfig scaled to the budget.

    Options: ``expansion`` (default: the paper's per model), ``construct_fraction`` (0.6 of the
    steps plan construction; what it leaves when it meets the budgets early goes to retraining),
    ``iterations`` (N_t; default: 4 batches per iteration, at most 300), ``teacher_fraction`` (0: retrain with
    plain CE; > 0: that share of the budget first trains the original network as the Eq. 4
    teacher; its steps count), and the SteppingConfig fields in ``CONSTRUCTION_OPTIONS``.
    """
    return _build(s, {})


@register_method("stepping-paper", "SteppingNet with the paper's move rules (ablation)", order=1,
                 check=_check_options("stepping-paper", PAPER_RULES))
def build_with_paper_rules(s: Setup):
    """SteppingNet constructed by the paper's move rules: unmeasured neurons score 0 and move on,
    a fixed quota per round, no fill-back, one neuron at a time, constant learning rate. The
    importance itself (normalised per layer, r scaling the output) is shared with ``stepping``."""
    return _build(s, PAPER_RULES, "stepping-paper")


def _parse_options(options: dict, rules: dict, method: str, model_name: str):
    """(expansion, construct_fraction, teacher_fraction, iterations, rules) from a comparison's
    options, or a ValueError naming the bad one (also run up front, before anything trains)."""
    opts = dict(options)
    expansion = check_expansion(method, opts.pop("expansion", DEFAULT_EXPANSION.get(model_name, 2.0)))
    construct_fraction = float(opts.pop("construct_fraction", 0.6))
    teacher_fraction = float(opts.pop("teacher_fraction", 0.0))
    iterations = opts.pop("iterations", None)
    rules = {**rules, **{k: opts.pop(k) for k in CONSTRUCTION_OPTIONS if k in opts}}
    if opts:
        raise ValueError(f"unknown {method} options {sorted(opts)}; accepted: expansion, construct_fraction, "
                         f"iterations, teacher_fraction, {', '.join(CONSTRUCTION_OPTIONS)}")
    if not 0 < construct_fraction <= 1 or not 0 <= teacher_fraction < 1:
        raise ValueError(f"{method} needs construct_fraction in (0, 1] and teacher_fraction in [0, 1); "
                         f"got {construct_fraction}, {teacher_fraction}")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
        raise ValueError(f"{method} option iterations must be an int >= 1, got {iterations!r}")
    try:
        SteppingConfig(**rules)
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad {method} option: {err}") from None
    return expansion, construct_fraction, teacher_fraction, iterations, rules


def _build(s: Setup, rules: dict, method: str = "stepping"):
    expansion, construct_fraction, teacher_fraction, iterations, rules = _parse_options(
        s.options, rules, method, s.model_name)
    if s.teacher is not None and teacher_fraction:
        raise ValueError(f"{method}: a comparison teacher is given, so teacher_fraction must be 0 (got {teacher_fraction})")
    steplog = StepLog()
    teacher = s.teacher  # the comparison's shared teacher: Eq. 4 in retraining
    teacher_steps = round(s.steps * teacher_fraction)
    if teacher_steps:
        teacher = s.create(1.0).train()
        cfg = BaselineConfig(steps=teacher_steps, batch_size=s.batch_size, lr=s.lr, seed=s.seed)
        optimizer = sgd(teacher.parameters(), cfg)
        run_steps(teacher, lambda x, y: F.cross_entropy(teacher(x), y), optimizer,
                  batch_stream(s.train, s.batch_size, s.seed), teacher_steps, steplog, "teacher", s.progress)
        teacher.eval()
    remaining = s.steps - teacher_steps
    planned = max(1, min(remaining, round(remaining * construct_fraction)))
    iterations = int(iterations) if iterations is not None else min(300, max(1, planned // 4))
    iterations = max(1, min(iterations, planned))
    per_iteration = planned // iterations
    config = SteppingConfig(iterations=iterations, batches_per_iteration=per_iteration,
                            batch_size=s.batch_size, lr=s.lr, retrain_lr=s.lr, retrain_epochs=1,
                            distillation=teacher is not None, seed=s.seed, progress=s.progress, **rules)
    model = s.create(expansion)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = construct(model, s.train, s.budgets, config, reference_macs=s.reference_macs,
                        checkpoint=work_path("construction"))  # inside compare: resumes an interrupted run
    construct_steps = len(net.history["iterations"]) * per_iteration
    steplog.add(construct_steps, s.batch_size, "construct")
    retrain_steps = remaining - construct_steps
    if retrain_steps > 0:
        net.retrain(_StepView(s.train, retrain_steps, s.batch_size, s.seed + 1), teacher=teacher)
        steplog.add(retrain_steps, s.batch_size, "retrain")
    net.history.update({"method": method, "expansion": expansion, "batch_size": s.batch_size,
                        "stepping_config": {k: getattr(config, k) for k in ("iterations", "batches_per_iteration",
                                                                               "lr", "distillation",
                                                                               *CONSTRUCTION_OPTIONS[:6], "fc_floor",
                                                                               "min_channels", "min_width",
                                                                               "increment_width",
                                                                               "retrain_tag_update")},
                        # per subnet, the channels of each tag group it computes (as slimmable's "channels")
                        "channels": [[sum(per_tag[:i]) for per_tag in net.history["final_counts"]]
                                     for i in range(1, net.num_subnets + 1)],
                        "construction_warnings": [str(w.message) for w in caught], **steplog.as_dict()})
    return net


__all__ = ["SteppingConfig", "SteppingNet", "CONSTRUCTION_FIELDS", "construct", "importance", "move_neurons", "train_step",
           "check_budgets", "suppression_factors"]
