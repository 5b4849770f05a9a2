"""What every baseline shares beyond the counted loop (:mod:`dyninfer.methods.budget`):
budget-matched widths, BN recalibration and the common face for a list of independent dense
subnets.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from dyninfer import cost
from dyninfer.checks import check_input, check_path, check_subnet  # noqa: F401  (re-exported for the baselines)
from dyninfer.data import ImageSet
from dyninfer.methods.budget import (  # noqa: F401  (the baselines' shared loop, re-exported)
    BaselineConfig, StepLog, Supervision, batch_stream, run_steps, sgd, split_steps,
)
from dyninfer.models.registry import original_macs
from dyninfer.nn.tagged import TaggedNet, fold_module


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
    if getattr(model, "dyninfer_config", None):
        return original_macs(model)
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

    def macs(self, path: str = "incremental") -> list[int]:
        """MACs of each subnet: nothing is shared, so both paths run the whole subnet."""
        check_path(path)
        return [cost.macs(m, self.input_shape) for m in self.subnets]

    def mac_fractions(self, path: str = "incremental") -> list[float]:
        return [m / self.reference_macs for m in self.macs(path)]

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
