"""Baselines without shared training of subnets: individually trained narrow copies, and
slices of one full model (brute force, or with each slice's classifier fine-tuned).

Widths are global multipliers matched to the budgets exactly as for slimmable networks
(``full`` rule, first c_k channels of every layer), so every row of a comparison differs only
in how the weights were obtained. Every subnet is an independent dense network: stepping up
recomputes from scratch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from dyninfer.data import ImageSet
from dyninfer.methods.baselines._common import (
    BaselineConfig, StepLog, SubnetList, Supervision, batch_stream, input_shape_of, reference_of, run_steps, sgd,
    split_steps,
)
from dyninfer.methods.baselines.slimmable import build
from dyninfer.methods.registry import Setup, register_method
from dyninfer.models._common import init_weights


@dataclass(frozen=True)
class IndividualConfig(BaselineConfig):
    """``steps`` is the budget of all copies together, split evenly across them."""


@dataclass(frozen=True)
class SliceConfig(BaselineConfig):
    """``finetune_fraction`` of ``steps`` (at least one per slice) fine-tunes the slices'
    classifiers, split evenly across them; the rest trains the full model. 0 is brute force."""

    finetune_fraction: float = 0.0
    finetune_lr: float | None = None  # None: lr

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.finetune_fraction < 1:
            raise ValueError(f"SliceConfig.finetune_fraction must be in [0, 1), got {self.finetune_fraction}")


def reinitialise(model: nn.Module) -> nn.Module:
    """Fresh weights with the zoo's initialisation (a narrow copy starts from scratch); frozen
    layers (a zero-padded shortcut's fixed 1x1 pad) keep theirs."""
    for m in model.modules():
        frozen = any(not p.requires_grad for p in m.parameters(recurse=False))
        if m is not model and hasattr(m, "reset_parameters") and not frozen:
            m.reset_parameters()
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    init_weights(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in saved:
                p.copy_(saved[name])
    return model


def _ce_loss(model: nn.Module, supervision: Supervision):
    return lambda x, y: supervision.loss(model(x), y, supervision.targets(x))


def train_individual(model: nn.Sequential, train_set: ImageSet, budgets: Sequence[float],
                     config: IndividualConfig | None = None, *, reference_macs: int | None = None,
                     teacher: nn.Module | None = None) -> SubnetList:
    """N narrow copies of ``model`` (widths matched to ``budgets``), each trained from scratch
    on its share of ``config.steps`` (distilling from ``teacher`` when one is given)."""
    supervision = Supervision(teacher)
    cfg = config or IndividualConfig()
    shape = input_shape_of(model, train_set)
    reference = reference_of(model, reference_macs, shape)
    tagged, counts, multipliers = build(copy.deepcopy(model), budgets, shape, reference, switchable_bn=False)
    n = tagged.num_subnets
    if cfg.steps < n:
        raise ValueError(f"{n} individually trained subnets need at least {n} steps, got {cfg.steps}")
    log = StepLog()
    subnets = []
    for k, steps in enumerate(split_steps(cfg.steps, n), start=1):
        torch.manual_seed(cfg.seed + k)
        narrow = reinitialise(tagged.dense(k, fold_bn=False)).train()
        optimizer = sgd(narrow.parameters(), cfg)
        run_steps(narrow, _ce_loss(narrow, supervision), optimizer, batch_stream(train_set, cfg.batch_size, cfg.seed), steps,
                  log, f"subnet-{k}", cfg.progress)
        subnets.append(narrow.eval())
    history = {"method": "individual", "config": cfg.to_dict(), "batch_size": cfg.batch_size,
               "multipliers": multipliers, "channels": counts, **log.as_dict()}
    return SubnetList(subnets, shape, reference, list(budgets), history).eval()


def slice_subnets(model: nn.Sequential, budgets: Sequence[float], input_shape: Sequence[int],
                  reference_macs: int) -> tuple[list[nn.Sequential], list[list[int]], list[float]]:
    """Brute-force slicing: subnet k = the first c_k channels of every layer of a trained model,
    with the model's weights and BatchNorm statistics (copies; nothing is retrained)."""
    tagged, counts, multipliers = build(model, budgets, input_shape, reference_macs, switchable_bn=False)
    subnets = [tagged.dense(k, fold_bn=False) for k in range(1, tagged.num_subnets + 1)]
    return subnets, counts, multipliers


def train_sliced(model: nn.Sequential, train_set: ImageSet, budgets: Sequence[float], config: SliceConfig | None = None,
                 *, reference_macs: int | None = None, teacher: nn.Module | None = None) -> SubnetList:
    """Train ``model`` in full (distilling from ``teacher`` when one is given), slice it to ``budgets``; with ``finetune_fraction > 0`` each
    slice then fine-tunes its own classifier copy while its BatchNorm statistics follow the
    slice's features (trunk weights and BN affine parameters frozen)."""
    cfg = config or SliceConfig()
    supervision = Supervision(teacher)
    shape = input_shape_of(model, train_set)
    reference = reference_of(model, reference_macs, shape)
    n = len(budgets)
    finetune = max(n, round(cfg.steps * cfg.finetune_fraction)) if cfg.finetune_fraction > 0 else 0
    if finetune >= cfg.steps:
        raise ValueError(f"fine-tuning {n} slices (at least one step each) and training the full model needs "
                         f"more than {cfg.steps} steps")
    log = StepLog()
    torch.manual_seed(cfg.seed)
    model.train()
    optimizer = sgd(model.parameters(), cfg)
    run_steps(model, _ce_loss(model, supervision), optimizer, batch_stream(train_set, cfg.batch_size, cfg.seed),
              cfg.steps - finetune, log, "full", cfg.progress)
    model.eval()
    subnets, counts, multipliers = slice_subnets(model, budgets, shape, reference)
    if finetune:
        for k, steps in enumerate(split_steps(finetune, n), start=1):
            subnet = subnets[k - 1]
            classifier = list(subnet.children())[-1]
            for p in subnet.parameters():
                p.requires_grad_(p is classifier.weight or p is classifier.bias)
            subnet.train()  # BN statistics follow the slice; its affine parameters are frozen
            optimizer = sgd(classifier.parameters(), cfg, cfg.finetune_lr)
            run_steps(subnet, _ce_loss(subnet, supervision), optimizer,
                      batch_stream(train_set, cfg.batch_size, cfg.seed + k), steps, log, f"finetune-{k}",
                      cfg.progress)
            for p in subnet.parameters():
                p.requires_grad_(True)
    for subnet in subnets:
        subnet.eval()
    method = "slice-ft" if finetune else "slice"
    history = {"method": method, "config": cfg.to_dict(), "batch_size": cfg.batch_size,
               "multipliers": multipliers, "channels": counts, **log.as_dict()}
    return SubnetList(subnets, shape, reference, list(budgets), history).eval()



@register_method("individual", "individually trained narrow copies (budget split)", order=50, config=IndividualConfig)
def build_individual_for_comparison(s: Setup) -> SubnetList:
    model = s.create(float(s.options.get("expansion", 1.0)))
    return train_individual(model, s.train, s.budgets, s.config(IndividualConfig), reference_macs=s.reference_macs,
                            teacher=s.teacher)


@register_method("slice", "brute-force slicing of one full model", order=60, config=SliceConfig)
def build_slice_for_comparison(s: Setup) -> SubnetList:
    model = s.create(float(s.options.get("expansion", 1.0)))
    return train_sliced(model, s.train, s.budgets, s.config(SliceConfig, finetune_fraction=0.0),
                        reference_macs=s.reference_macs, teacher=s.teacher)


@register_method("slice-ft", "slicing + classifier fine-tuning (20 % of steps)", order=70, config=SliceConfig)
def build_slice_ft_for_comparison(s: Setup) -> SubnetList:
    model = s.create(float(s.options.get("expansion", 1.0)))
    return train_sliced(model, s.train, s.budgets, s.config(SliceConfig, finetune_fraction=0.2),
                        reference_macs=s.reference_macs, teacher=s.teacher)


__all__ = ["IndividualConfig", "SliceConfig", "reinitialise", "slice_subnets", "train_individual", "train_sliced"]
