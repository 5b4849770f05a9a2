"""Slimmable networks (Yu et al., ICLR 2019): one network, N global widths, switchable BN.

In tagged terms: the ``full`` connectivity rule with fixed regular tags (subnet k owns the
first c_k channels of every layer and uses every connection among them) and one BatchNorm per
subnet. Widths are chosen so each subnet's exact MACs match a budget. Training sums the losses
of all widths on each batch: one optimizer step per batch. Stepping up recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from dyninfer.data import ImageSet
from dyninfer.methods.baselines._common import (
    BaselineConfig, StepLog, Supervision, batch_stream, evaluate_subnets, input_shape_of,
    match_prefix_counts, reference_of, run_steps, sgd,
)
from dyninfer.methods.face import TaggedSubnets
from dyninfer.nn.tagged import TaggedNet
from dyninfer.methods.registry import Setup, register_method
from dyninfer.methods.stepping import check_budgets


@dataclass(frozen=True)
class SlimmableConfig(BaselineConfig):
    """Slimmable training: the sum of every width's cross-entropy per batch."""


class SlimmableNet(TaggedSubnets, nn.Module):
    """Nested-width subnets with the full rule and per-subnet BatchNorm (slimmable, US-Nets)."""

    def __init__(self, net: TaggedNet, budgets: Sequence[float], reference_macs: int,
                 multipliers: Sequence[float], history: dict | None = None):
        super().__init__()
        if net.rule != "full":
            raise ValueError(f"a SlimmableNet needs the full connectivity rule, got rule={net.rule!r}")
        self.net = net
        self.budgets = list(budgets)
        self.reference_macs = int(reference_macs)
        self.multipliers = [float(m) for m in multipliers]
        self.history = history or {}

    def channels(self) -> list[list[int]]:
        """Channels per hidden layer of each subnet."""
        counts = self.net.counts()
        return [[sum(c[:k]) for c in counts] for k in range(1, self.num_subnets + 1)]

    def evaluate(self, data: ImageSet, batch_size: int = 512) -> list[float]:
        """Top-1 accuracy of every subnet (one pass per subnet: the full rule shares nothing)."""
        was_training = self.net.training
        self.net.eval()
        try:
            return evaluate_subnets(lambda x: self.net.forward_all(x).logits, data, self.num_subnets, batch_size)
        finally:
            self.net.train(was_training)

    def export(self, subnet: int) -> nn.Sequential:
        """Subnet k as a dense module of its exact widths, its own BatchNorm folded in."""
        return self.net.dense(subnet)


def build(model: nn.Sequential, budgets: Sequence[float], input_shape: Sequence[int], reference_macs: int,
          switchable_bn: bool = True) -> tuple[TaggedNet, list[list[int]], list[float]]:
    """The full-rule tagged net of ``model`` with widths matched to ``budgets``."""

    budgets = check_budgets(budgets)
    net = TaggedNet(model, len(budgets), input_shape, rule="full", switchable_bn=switchable_bn)
    counts, multipliers = match_prefix_counts(net, budgets, reference_macs)
    return net, counts, multipliers


def train(model: nn.Sequential, train_set: ImageSet, budgets: Sequence[float], config: SlimmableConfig | None = None,
          *, reference_macs: int | None = None, teacher: nn.Module | None = None) -> SlimmableNet:
    """Train a slimmable network from ``model`` (usually the original, expansion 1.0); with
    ``teacher``, every width distils from it (:class:`~dyninfer.methods.budget.Supervision`)."""
    cfg = config or SlimmableConfig()
    shape = input_shape_of(model, train_set)
    reference = reference_of(model, reference_macs, shape)
    torch.manual_seed(cfg.seed)
    net, counts, multipliers = build(model, budgets, shape, reference)
    n = net.num_subnets
    log = StepLog()
    optimizer = sgd(net.parameters(), cfg)

    supervision = Supervision(teacher)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        targets = supervision.targets(x)
        return sum(supervision.loss(net(x, k), y, targets) for k in range(1, n + 1))

    net.train()
    run_steps(net, loss_fn, optimizer, batch_stream(train_set, cfg.batch_size, cfg.seed),
              cfg.steps, log, "joint", cfg.progress)
    net.eval()
    history = {"method": "slimmable", "config": cfg.to_dict(), "batch_size": cfg.batch_size,
               "multipliers": multipliers, "channels": counts, **log.as_dict()}
    return SlimmableNet(net, list(budgets), reference, multipliers, history)



@register_method("slimmable", "slimmable (full rule, switchable BN, summed losses)", order=10, config=SlimmableConfig)
def build_for_comparison(s: Setup) -> SlimmableNet:
    model = s.create(float(s.options.get("expansion", 1.0)))
    return train(model, s.train, s.budgets, s.config(SlimmableConfig), reference_macs=s.reference_macs,
                 teacher=s.teacher)


__all__ = ["SlimmableConfig", "SlimmableNet", "build", "train"]
