"""What every baseline shares: its config, a counted training loop, budget-matched widths and
the common face for a list of independent dense subnets.

Training budgets are counted in optimizer steps x batch size: every loop here draws full
batches from one seeded stream (the same pipeline as SteppingNet's construction) and records
each optimizer step in a :class:`StepLog`, which ends up in ``net.history``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dyninfer.data import ImageSet
from dyninfer.nn.tagged import TaggedNet, fold_module


@dataclass(frozen=True)
class BaselineConfig:
    """The training budget and optimizer every baseline shares (SGD + Nesterov, cosine LR)."""

    steps: int = 1000                # optimizer steps; the budget is steps x batch_size samples
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{type(self).__name__}.lr must be a number > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"{type(self).__name__}.momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"{type(self).__name__}.weight_decay must be >= 0, got {self.weight_decay!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class StepLog:
    """Counts optimizer steps and samples, per phase (e.g. "train", "finetune-2")."""

    def __init__(self) -> None:
        self.steps = 0
        self.samples = 0
        self.phases: dict[str, int] = {}
        self.losses: dict[str, list[float]] = {}

    def record(self, batch: int, phase: str, loss: float | None = None) -> None:
        self.steps += 1
        self.samples += int(batch)
        self.phases[phase] = self.phases.get(phase, 0) + 1
        if loss is not None:
            self.losses.setdefault(phase, []).append(loss)

    def add(self, steps: int, batch: int, phase: str) -> None:
        """Record ``steps`` optimizer steps of ``batch`` samples made by a loop that is not ours."""
        self.steps += int(steps)
        self.samples += int(steps) * int(batch)
        if steps:
            self.phases[phase] = self.phases.get(phase, 0) + int(steps)

    def as_dict(self) -> dict:
        """``optimizer_steps``, ``samples``, ``phases`` and each phase's mean loss over its last 10 %."""
        tail = {}
        for phase, values in self.losses.items():
            last = values[-max(1, len(values) // 10):]
            tail[phase] = sum(last) / len(last)
        return {"optimizer_steps": self.steps, "samples": self.samples, "phases": dict(self.phases),
                "final_loss": tail}


def batch_stream(data: ImageSet, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless full batches: shuffled, augmented, seeded; the pipeline every method trains on."""
    if len(data) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(data)} training samples of {data.name!r}; "
                         f"use a batch size <= {len(data)}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from data.batches(batch_size, shuffle=True, augment=True, generator=generator, drop_last=True)


def sgd(params, config: BaselineConfig, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires gradients")
    return torch.optim.SGD(params, lr=config.lr if lr is None else lr, momentum=config.momentum,
                           nesterov=config.momentum > 0, weight_decay=config.weight_decay)


def run_steps(step: Callable[[torch.Tensor, torch.Tensor], float], optimizer: torch.optim.Optimizer,
              stream: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, log: StepLog, phase: str,
              progress: bool = False) -> None:
    """Call ``step(x, y)`` (which must make exactly one optimizer step) ``steps`` times under a
    cosine LR schedule, recording each in ``log``."""
    if steps <= 0:
        return
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    bar = tqdm(range(steps), disable=not progress, desc=phase, leave=False)
    for _ in bar:
        x, y = next(stream)
        loss = step(x, y)
        scheduler.step()
        log.record(x.shape[0], phase, loss)
    bar.close()


def loss_step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """A step function: zero grads, backward ``loss_fn(x, y)``, one optimizer step."""

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def split_steps(total: int, parts: int) -> list[int]:
    """``total`` steps over ``parts`` runs as evenly as possible; the larger runs get the rest."""
    base, rest = divmod(total, parts)
    return [base + (1 if i >= parts - rest else 0) for i in range(parts)]


# ---------------------------------------------------------------------------- model plumbing
def input_shape_of(model: nn.Module, data: ImageSet) -> tuple[int, int, int]:
    shape = tuple(getattr(model, "dyninfer_config", {}).get("input_shape", data.input_shape))
    if tuple(data.input_shape) != shape:
        raise ValueError(f"model was built for inputs {shape} but the data has {tuple(data.input_shape)}")
    return shape  # type: ignore[return-value]


def reference_of(model: nn.Module, reference_macs: int | None, input_shape: Sequence[int]) -> int:
    """MACs of the original (unexpanded) network that every MAC fraction is relative to."""
    if reference_macs is not None:
        if int(reference_macs) < 1:
            raise ValueError(f"reference_macs must be a positive int, got {reference_macs!r}")
        return int(reference_macs)
    from dyninfer import cost
    from dyninfer.methods.stepping import reference_macs_of

    if getattr(model, "dyninfer_config", None):
        return reference_macs_of(model)
    return cost.macs(model, tuple(input_shape))


def prefix_counts(widths: Sequence[int], multiplier: float, lower: Sequence[int] | None = None) -> list[int]:
    """Channels per layer at a global width ``multiplier`` (rounded, at least ``lower`` or 1)."""
    lower = lower or [1] * len(widths)
    return [min(w, max(lo, math.floor(multiplier * w + 0.5))) for w, lo in zip(widths, lower)]


def match_prefix_counts(net: TaggedNet, budgets: Sequence[float], reference_macs: int,
                        max_multiplier: float = 1.0) -> tuple[list[list[int]], list[float]]:
    """Global width multipliers so subnet k's exact MACs (under ``net``'s rule) are the largest
    not above ``budgets[k-1] * reference_macs``; sets ``net``'s prefix tags to them.

    Subnets are matched in order with counts never below the previous subnet's, so this
    serves the full rule (MACs depend on c_k) and the causal one (on c_1..c_k) alike.
    Returns (counts per subnet per layer, multiplier per subnet).
    """
    n = net.num_subnets
    if len(budgets) != n:
        raise ValueError(f"got {len(budgets)} budgets for {n} subnets")
    widths = net.widths()
    counts: list[list[int]] = []
    multipliers: list[float] = []

    def macs_at(k: int, candidate: list[int]) -> int:
        net.set_prefix_tags(counts + [candidate] * (n - len(counts)))
        return net.subnet_macs(subnet=k)

    for k, budget in enumerate(budgets, start=1):
        limit = budget * reference_macs * (1 + 1e-12)
        lower = counts[-1] if counts else [1] * len(widths)
        if macs_at(k, list(lower)) > limit:
            raise ValueError(
                f"budget {budget} is below the smallest subnet {k} can be "
                f"({macs_at(k, list(lower)) / reference_macs:.4f} of the original MACs with "
                f"{lower} channels); use a larger budget")
        lo, hi = 0.0, float(max_multiplier)
        if macs_at(k, prefix_counts(widths, hi, lower)) <= limit:
            lo = hi
        else:
            for _ in range(40):
                mid = (lo + hi) / 2
                if macs_at(k, prefix_counts(widths, mid, lower)) <= limit:
                    lo = mid
                else:
                    hi = mid
        counts.append(prefix_counts(widths, lo, lower))
        multipliers.append(lo)
    net.set_prefix_tags(counts)
    return counts, multipliers


@torch.no_grad()
def evaluate_subnets(forward_all: Callable[[torch.Tensor], list[torch.Tensor]], data: ImageSet,
                     num_subnets: int, batch_size: int = 512) -> list[float]:
    """Top-1 accuracy of every subnet; ``forward_all(x)`` gives the list of their logits."""
    if len(data) == 0:
        raise ValueError(f"cannot evaluate on an empty data set ({data.name!r})")
    correct = [0] * num_subnets
    for x, y in data.batches(batch_size):
        for k, logits in enumerate(forward_all(x)):
            correct[k] += int((logits.argmax(1) == y).sum())
    return [c / len(data) for c in correct]


def check_subnet(subnet: int | None, num_subnets: int) -> int:
    k = num_subnets if subnet is None else subnet
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_subnets:
        raise ValueError(f"subnet must be an int in 1..{num_subnets}, got {subnet!r}")
    return k


def check_input(x: torch.Tensor, input_shape: Sequence[int]) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"expected input of shape (batch, {', '.join(map(str, input_shape))}), "
                         f"got {tuple(x.shape)}")


@torch.no_grad()
def recalibrate_bn(net: TaggedNet, subnet: int, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                   count: int) -> None:
    """Subnet ``subnet``'s switchable BN statistics as the exact average over ``count`` batches
    (US-Nets, once-for-all). Forward passes only: no optimizer step, no affine change."""
    net.reset_bn_statistics(subnet)
    norms = [net.norm_of(i, subnet) for i in range(net.num_hidden)]
    norms = [m for m in norms if getattr(m, "running_mean", None) is not None]
    saved = [m.momentum for m in norms]
    was_training = net.training
    net.train()
    try:
        for t in range(count):
            for m in norms:
                m.momentum = 1.0 / (t + 1)  # running average of batch statistics
            x, _ = next(batches)
            net(x, subnet)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        net.train(was_training)


# ---------------------------------------------------------------------------- independent subnets
class SubnetList(nn.Module):
    """N independent dense networks behind the common face (individual copies, slicing).

    Nothing is shared at run time, so stepping up means recomputing from scratch.
    """

    def __init__(self, subnets: Sequence[nn.Module], input_shape: Sequence[int], reference_macs: int,
                 budgets: Sequence[float] | None = None, history: dict | None = None):
        super().__init__()
        self.subnets = nn.ModuleList(subnets)
        self.input_shape = tuple(input_shape)
        self.reference_macs = int(reference_macs)
        self.budgets = list(budgets) if budgets is not None else None
        self.history = history or {}

    @property
    def num_subnets(self) -> int:
        return len(self.subnets)

    def macs(self) -> list[int]:
        from dyninfer import cost

        return [cost.macs(m, self.input_shape) for m in self.subnets]

    def mac_fractions(self) -> list[float]:
        return [m / self.reference_macs for m in self.macs()]

    def forward(self, x: torch.Tensor, subnet: int | None = None) -> torch.Tensor:
        k = check_subnet(subnet, self.num_subnets)
        check_input(x, self.input_shape)
        return self.subnets[k - 1](x)

    def evaluate(self, data: ImageSet, batch_size: int = 512) -> list[float]:
        was_training = self.training
        self.eval()
        try:
            return evaluate_subnets(lambda x: [m(x) for m in self.subnets], data, self.num_subnets, batch_size)
        finally:
            self.train(was_training)

    def export(self, subnet: int) -> nn.Module:
        """Subnet k as a dense module with BatchNorm folded in."""
        return fold_module(self.subnets[check_subnet(subnet, self.num_subnets) - 1], self.input_shape)
