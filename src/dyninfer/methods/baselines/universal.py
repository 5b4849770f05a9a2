"""Universally slimmable networks (Yu & Huang, ICCV 2019): any width in [min, max].

Training, per batch (one optimizer step): the sandwich rule runs the largest width, the
smallest and ``num_random`` widths drawn uniformly in between; the largest learns from the
labels and every other width distils from the largest's (detached) output (in-place
distillation). BatchNorm is shared while training; afterwards each evaluated width gets its
own BatchNorm whose statistics are recalibrated on training batches (forward passes only).

In tagged terms a method that re-tags every step: the widths of a step become the prefix
tags of a ``full``-rule network with 2 + ``num_random`` subnets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from dyninfer.data import ImageSet
from dyninfer.methods.baselines._common import (
    BaselineConfig, StepLog, Supervision, batch_stream, input_shape_of, prefix_counts, recalibrate_bn,
    reference_of, run_steps, sgd,
)
from dyninfer.methods.baselines.slimmable import SlimmableNet, build
from dyninfer.nn.tagged import TaggedNet
from dyninfer.train import kd_loss
from dyninfer.methods.registry import Setup, register_method
from dyninfer.methods.stepping import check_budgets


@dataclass(frozen=True)
class USConfig(BaselineConfig):
    """US-Nets constants; defaults are the paper's (n = 4 widths per step, T = 1)."""

    num_random: int = 2               # random widths per step besides the smallest and largest
    max_multiplier: float = 1.0       # largest width (of the given model's channels)
    min_multiplier: float | None = None  # smallest width; None: the smallest budget's width
    temperature: float = 1.0          # in-place distillation temperature
    calibration_samples: int = 2048   # training images per width for BN recalibration

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_random < 0:
            raise ValueError(f"USConfig.num_random must be >= 0, got {self.num_random}")
        if not 0 < self.max_multiplier <= 1:
            raise ValueError(f"USConfig.max_multiplier must be in (0, 1], got {self.max_multiplier}")
        if self.min_multiplier is not None and not 0 < self.min_multiplier <= self.max_multiplier:
            raise ValueError(f"USConfig.min_multiplier must be in (0, max_multiplier], got {self.min_multiplier}")
        if self.calibration_samples < 1:
            raise ValueError(f"USConfig.calibration_samples must be >= 1, got {self.calibration_samples}")


def sandwich_widths(low: float, high: float, num_random: int, generator: torch.Generator) -> list[float]:
    """The sandwich rule: [smallest, sorted random widths in (low, high), largest]."""
    draws = (low + (high - low) * torch.rand(num_random, generator=generator)).tolist()
    return [low, *sorted(draws), high]


class _SampledWidths(list):
    """The widths drawn at each step (kept in the history), checkpointed with the run."""

    def state_dict(self) -> dict:
        return {"widths": list(self)}

    def load_state_dict(self, state: dict) -> None:
        self[:] = [list(w) for w in state["widths"]]


def train(model: nn.Sequential, train_set: ImageSet, budgets: Sequence[float], config: USConfig | None = None,
          *, reference_macs: int | None = None, teacher: nn.Module | None = None) -> SlimmableNet:
    """Train a US-Net from ``model`` and return it at the widths matching ``budgets``. With
    ``teacher``, the largest width distils from it; the others keep the in-place KD from the largest."""
    supervision = Supervision(teacher)
    cfg = config or USConfig()
    shape = input_shape_of(model, train_set)
    reference = reference_of(model, reference_macs, shape)
    torch.manual_seed(cfg.seed)
    # The evaluated widths, solved on a throw-away tagged view (shares the model's layers).
    _, counts, multipliers = build(model, budgets, shape, reference, switchable_bn=False)
    low = multipliers[0] if cfg.min_multiplier is None else cfg.min_multiplier
    high = cfg.max_multiplier
    if multipliers[-1] > high + 1e-9:
        raise ValueError(f"the largest budget needs width {multipliers[-1]:.3f} > max_multiplier {high}")

    sampler = TaggedNet(model, 2 + cfg.num_random, shape, rule="full")  # shared BN
    widths = sampler.widths()
    n = sampler.num_subnets
    generator = torch.Generator().manual_seed(cfg.seed + 7)
    sampled = _SampledWidths()
    optimizer = sgd(sampler.parameters(), cfg)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        step_widths = sandwich_widths(low, high, cfg.num_random, generator)
        sampled.append(step_widths)
        sampler.set_prefix_tags([prefix_counts(widths, w) for w in step_widths])
        largest = sampler(x, n)
        loss = supervision.loss(largest, y, supervision.targets(x))
        inplace = largest.detach()
        for k in range(1, n):
            loss = loss + kd_loss(sampler(x, k), inplace, cfg.temperature)
        return loss

    log = StepLog()
    sampler.train()
    run_steps(sampler, loss_fn, optimizer, batch_stream(train_set, cfg.batch_size, cfg.seed),
              cfg.steps, log, "sandwich", cfg.progress, callbacks=[sampled], generators=[generator])

    net = deploy(model, train_set, budgets, cfg, reference_macs=reference)
    net.history.update({"config": cfg.to_dict(), "batch_size": cfg.batch_size, "width_range": [low, high],
                        "sampled_widths": list(sampled), **log.as_dict()})
    return net


def deploy(model: nn.Sequential, train_set: ImageSet, budgets: Sequence[float], config: USConfig | None = None,
           *, reference_macs: int | None = None) -> SlimmableNet:
    """A trained US-Net ``model`` at the widths matching ``budgets`` (any, e.g. another method's
    exact MAC fractions), each width with its own BatchNorm recalibrated on training batches.

    Forward passes only: the weights and BN affine parameters are not changed.
    """
    cfg = config or USConfig()
    shape = input_shape_of(model, train_set)
    reference = reference_of(model, reference_macs, shape)
    net, counts, multipliers = build(model, budgets, shape, reference, switchable_bn=True)
    batches = -(-cfg.calibration_samples // cfg.batch_size)
    for k in range(1, net.num_subnets + 1):
        recalibrate_bn(net, k, batch_stream(train_set, cfg.batch_size, cfg.seed + 1000 + k), batches)
    net.eval()
    history = {"method": "us", "multipliers": multipliers, "channels": counts,
               "calibration_batches_per_width": batches}
    return SlimmableNet(net, list(budgets), reference, multipliers, history)



@register_method("us", "universally slimmable (sandwich rule, in-place KD, BN recalibrated)", order=20, config=USConfig)
def build_for_comparison(s: Setup):
    """US-Nets at the budgets, or with option ``at`` (a method run earlier) at that method's exact
    MAC fractions: any width can be deployed after training."""
    budgets = s.budgets
    if "at" in s.options:
        if s.options["at"] not in s.previous:
            raise ValueError(f"us option at={s.options['at']!r} must name a method compared before us; "
                             f"so far: {sorted(s.previous)}")
        budgets = check_budgets([min(1.0, f) for f in s.previous[s.options["at"]]])
    model = s.create(float(s.options.get("expansion", 1.0)))
    return train(model, s.train, budgets, s.config(USConfig), reference_macs=s.reference_macs, teacher=s.teacher)


__all__ = ["USConfig", "deploy", "sandwich_widths", "train"]
