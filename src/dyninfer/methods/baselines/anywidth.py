"""Any-width networks (Vu et al., CVPRW 2020): channel groups with the causal rule.

Group c of every layer reads only groups <= c (block-lower-triangular weights), BatchNorm is
shared, and all widths train jointly: one pass of the largest width gives every width's
logits, and the summed loss takes one optimizer step per batch. In tagged terms these are
SteppingNet's layers, runtime and joint training step with fixed regular tags instead of
learned ones, so the result *is* a :class:`~dyninfer.methods.stepping.SteppingNet` and steps
up incrementally (``start(x)`` / ``step()``) the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from dyninfer.data import ImageSet
from dyninfer.methods import stepping
from dyninfer.methods.baselines._common import (
    BaselineConfig, StepLog, Supervision, batch_stream, input_shape_of, match_prefix_counts, reference_of, run_steps,
)
from dyninfer.nn.tagged import TaggedNet
from dyninfer.methods.registry import DEFAULT_EXPANSION, Setup, register_method


@dataclass(frozen=True)
class AnyWidthConfig(BaselineConfig):
    """Any-width training: the equally weighted sum of every width's cross-entropy."""


class AnyWidthNet(stepping.SteppingNet):
    """A causal tagged network with regular channel groups (the SteppingNet face and runtime)."""

    def channels(self) -> list[list[int]]:
        counts = self.net.counts()
        return [[sum(c[:k]) for c in counts] for k in range(1, self.num_subnets + 1)]


def build(model: nn.Sequential, budgets: Sequence[float], input_shape: Sequence[int],
          reference_macs: int) -> tuple[TaggedNet, list[list[int]], list[float]]:
    """The causal tagged net of ``model`` with group widths matched to ``budgets``.

    The triangle drops the upper blocks, so the largest subnet reaches only about half of the
    model's MACs: give a width-expanded model for budgets near 1.
    """
    budgets = stepping.check_budgets(budgets)
    net = TaggedNet(model, len(budgets), input_shape)
    counts, multipliers = match_prefix_counts(net, budgets, reference_macs)
    return net, counts, multipliers


def train(model: nn.Sequential, train_set: ImageSet, budgets: Sequence[float], config: AnyWidthConfig | None = None,
          *, reference_macs: int | None = None, teacher: nn.Module | None = None) -> AnyWidthNet:
    """Train an any-width network from ``model`` (expanded like SteppingNet's for large budgets)."""
    cfg = config or AnyWidthConfig()
    shape = input_shape_of(model, train_set)
    reference = reference_of(model, reference_macs, shape)
    torch.manual_seed(cfg.seed)
    net, counts, multipliers = build(model, budgets, shape, reference)
    # SteppingNet's joint step without its extras: no suppression (beta = 1), no distillation.
    scfg = stepping.SteppingConfig(suppression=False, distillation=False, schedule="joint", batch_size=cfg.batch_size,
                                   lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed,
                                   progress=cfg.progress)
    optimizer = stepping.make_optimizer(net, cfg.lr, scfg)  # weight decay is applied per tag in the step

    supervision = Supervision(teacher, scfg.gamma, scfg.temperature)  # the step mixes CE and KD as Eq. 4
    training = stepping.SubnetTraining(net, scfg, targets=supervision.targets)

    log = StepLog()
    net.train()
    run_steps(net, lambda x, y: training.loss(net, x, y), optimizer, batch_stream(train_set, cfg.batch_size, cfg.seed),
              cfg.steps, log, "joint", cfg.progress, callbacks=[training])
    net.eval()
    history = {"method": "anywidth", "config": cfg.to_dict(), "batch_size": cfg.batch_size,
               "multipliers": multipliers, "channels": counts, **log.as_dict()}
    return AnyWidthNet(net, list(budgets), reference, scfg, history)



@register_method("anywidth", "any-width (causal rule, regular groups, joint losses)", order=30, config=AnyWidthConfig)
def build_for_comparison(s: Setup) -> AnyWidthNet:
    model = s.create(float(s.options.get("expansion", DEFAULT_EXPANSION.get(s.model_name, 2.0))))
    return train(model, s.train, s.budgets, s.config(AnyWidthConfig), reference_macs=s.reference_macs,
                 teacher=s.teacher)


__all__ = ["AnyWidthConfig", "AnyWidthNet", "build", "train"]
