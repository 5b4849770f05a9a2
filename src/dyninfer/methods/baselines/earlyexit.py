"""Early exit (depth-only anytime prediction): a classifier head after each stage of the trunk.

Subnet k is the trunk up to exit k plus head k; the last subnet is the whole model. Stepping
up continues the trunk from the cached activation of the previous exit, so the path from the
first exit to the last costs the whole trunk plus the heads passed on the way. All exits
train jointly (equally weighted cross-entropies, one optimizer step per batch).

A stage ends at each pooling layer of the zoo's flat ``nn.Sequential`` (a conv block); an
exit is placed there unless only the classifier follows. The exits' MAC fractions follow
from the architecture, not from budgets.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from dyninfer import cost
from dyninfer.data import ImageSet
from dyninfer.methods.baselines._common import (
    BaselineConfig, StepLog, Supervision, batch_stream, check_input, check_path, check_subnet, evaluate_subnets,
    input_shape_of, reference_of, run_steps, sgd,
)
from dyninfer.methods.registry import Setup, register_method
from dyninfer.nn.tagged import fold_sequential
from dyninfer.runtime.session import AnytimeSession


@dataclass(frozen=True)
class EarlyExitConfig(BaselineConfig):
    """``exits``: child indices of the Sequential after which a head sits (None: every stage
    end); ``head_pool``: a head average-pools conv features to at most this side, then a linear."""

    exits: tuple[int, ...] | None = None
    head_pool: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_pool < 1:
            raise ValueError(f"EarlyExitConfig.head_pool must be >= 1, got {self.head_pool}")
        if self.exits is not None:
            object.__setattr__(self, "exits", tuple(int(e) for e in self.exits))


def stage_ends(model: nn.Sequential) -> list[int]:
    """Child indices that end a stage (a pooling layer) with more than the classifier after it."""
    children = list(model.children())
    ends = []
    for i, child in enumerate(children[:-1]):
        if isinstance(child, (nn.MaxPool2d, nn.AvgPool2d)):
            hidden_after = [c for c in children[i + 1:-1] if isinstance(c, (nn.Conv2d, nn.Linear))]
            if hidden_after:
                ends.append(i)
    return ends


def make_head(feature_shape: Sequence[int], num_classes: int, pool: int) -> nn.Sequential:
    """Average pool (conv features) -> flatten -> linear."""
    if len(feature_shape) == 3:
        c, h, w = feature_shape
        side = (min(pool, h), min(pool, w))
        return nn.Sequential(nn.AdaptiveAvgPool2d(side), nn.Flatten(), nn.Linear(c * side[0] * side[1], num_classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(feature_shape).prod()), num_classes))


class EarlyExitNet(nn.Module):
    """Depth prefixes of one trunk, each with its own classifier head."""

    def __init__(self, segments: Sequence[nn.Sequential], heads: Sequence[nn.Module], input_shape: Sequence[int],
                 reference_macs: int, history: dict | None = None):
        super().__init__()
        if len(heads) != len(segments) - 1:
            raise ValueError(f"need one head per exit before the last: {len(segments)} segments, {len(heads)} heads")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.input_shape = tuple(input_shape)
        self.reference_macs = int(reference_macs)
        self.history = history or {}

    @classmethod
    def from_model(cls, model: nn.Sequential, input_shape: Sequence[int], reference_macs: int,
                   exits: Sequence[int] | None = None, head_pool: int = 2) -> "EarlyExitNet":
        """Split ``model`` (its layers are shared, not copied) after ``exits`` and add heads."""
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"early exit needs a flat nn.Sequential (lenet-5, lenet-3c1l, vgg-16), got {type(model).__name__}")
        children = list(model.children())
        if not children or not isinstance(children[-1], nn.Linear):
            raise ValueError("the model's last child must be the nn.Linear classifier")
        points = sorted(stage_ends(model) if exits is None else set(int(e) for e in exits))
        if any(not 0 <= e < len(children) - 1 for e in points):
            raise ValueError(f"exits must be child indices in 0..{len(children) - 2}, got {list(points)}")
        bounds = [0] + [e + 1 for e in points] + [len(children)]
        segments = [nn.Sequential(*children[a:b]) for a, b in zip(bounds, bounds[1:])]
        heads = []
        with torch.no_grad():
            was_training = model.training
            model.eval()
            h = torch.zeros(1, *input_shape)
            for segment in segments[:-1]:
                h = segment(h)
                heads.append(make_head(tuple(h.shape[1:]), children[-1].out_features, head_pool))
            model.train(was_training)
        return cls(segments, heads, input_shape, reference_macs)

    @property
    def num_subnets(self) -> int:
        return len(self.segments)

    def exit_points(self) -> list[int]:
        """Child indices of the original Sequential after which exits 1..N-1 sit."""
        ends, total = [], 0
        for segment in self.segments[:-1]:
            total += len(segment)
            ends.append(total - 1)
        return ends

    def _prefix(self, subnet: int, head: bool = True) -> nn.Sequential:
        layers = [m for segment in self.segments[:subnet] for m in segment]
        if head and subnet < self.num_subnets:
            layers += list(self.heads[subnet - 1])
        return nn.Sequential(*layers)

    def macs(self, path: str = "incremental") -> list[int]:
        """MACs of the trunk up to exit k plus exit k's head. Both paths execute exactly that for
        exit k's answer (a session stepping 1 -> k also ran heads 1..k-1: ``path_mac_fraction``)."""

        check_path(path)
        return [cost.macs(self._prefix(k), self.input_shape) for k in range(1, self.num_subnets + 1)]

    def mac_fractions(self, path: str = "incremental") -> list[float]:
        return [m / self.reference_macs for m in self.macs(path)]

    def path_mac_fraction(self) -> float:
        """MACs of stepping from exit 1 to the last (whole trunk + every head passed) / original."""

        heads = sum(cost.macs(head, self._feature_shape(k)) for k, head in enumerate(self.heads, start=1))
        return (self.macs()[-1] + heads) / self.reference_macs

    @torch.no_grad()
    def _feature_shape(self, subnet: int) -> tuple[int, ...]:
        was_training = self.training
        self.eval()
        try:
            return tuple(self._prefix(subnet, head=False)(torch.zeros(1, *self.input_shape)).shape[1:])
        finally:
            self.train(was_training)

    def forward(self, x: torch.Tensor, subnet: int | None = None) -> torch.Tensor:
        k = check_subnet(subnet, self.num_subnets)
        check_input(x, self.input_shape)
        for segment in self.segments[:k]:
            x = segment(x)
        return self.heads[k - 1](x) if k < self.num_subnets else x

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits from one pass of the trunk."""
        check_input(x, self.input_shape)
        logits = []
        for k, segment in enumerate(self.segments, start=1):
            x = segment(x)
            logits.append(self.heads[k - 1](x) if k < self.num_subnets else x)
        return logits

    def start(self, x: torch.Tensor, subnet: int = 1) -> "EarlyExitSession":
        """Incremental session at exit ``subnet``; ``.step()`` continues the trunk from the cache."""
        return EarlyExitSession(self, x, subnet)

    def evaluate(self, data: ImageSet, batch_size: int = 512) -> list[float]:
        """Top-1 accuracy of every exit, from one pass of the trunk."""
        was_training = self.training
        self.eval()
        try:
            return evaluate_subnets(self.forward_all, data, self.num_subnets, batch_size)
        finally:
            self.train(was_training)

    def export(self, subnet: int) -> nn.Sequential:
        """Exit k as a dense module (trunk prefix + head) with BatchNorm folded in."""
        return fold_sequential(copy.deepcopy(self._prefix(check_subnet(subnet, self.num_subnets))).eval())


class EarlyExitSession(AnytimeSession):
    """``run = net.start(x)``; ``run.logits``; ``run.step()``: the trunk resumes where it stopped."""

    top_name = "last exit"
    bottom_name = "first exit"

    def __init__(self, net: EarlyExitNet, x: torch.Tensor, subnet: int = 1):
        check_input(x, net.input_shape)
        check_subnet(subnet, net.num_subnets)
        self._features = x
        self._begin(net, subnet)

    @torch.no_grad()
    def _compute_next(self) -> torch.Tensor:
        k = self.subnet + 1
        self._features = self.net.segments[k - 1](self._features)
        return self.net.heads[k - 1](self._features) if k < self.net.num_subnets else self._features


def train(model: nn.Sequential, train_set: ImageSet, config: EarlyExitConfig | None = None,
          *, reference_macs: int | None = None, teacher: nn.Module | None = None) -> EarlyExitNet:
    """Add exits to ``model`` and train trunk and heads jointly (every exit distils from
    ``teacher`` when one is given)."""
    cfg = config or EarlyExitConfig()
    shape = input_shape_of(model, train_set)
    reference = reference_of(model, reference_macs, shape)
    torch.manual_seed(cfg.seed)
    net = EarlyExitNet.from_model(model, shape, reference, cfg.exits, cfg.head_pool)
    optimizer = sgd(net.parameters(), cfg)

    supervision = Supervision(teacher)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        targets = supervision.targets(x)
        return sum(supervision.loss(logits, y, targets) for logits in net.forward_all(x))

    log = StepLog()
    net.train()
    run_steps(net, loss_fn, optimizer, batch_stream(train_set, cfg.batch_size, cfg.seed),
              cfg.steps, log, "joint", cfg.progress)
    net.eval()
    net.history = {"method": "earlyexit", "config": cfg.to_dict(), "batch_size": cfg.batch_size,
                   "exits": net.exit_points(), **log.as_dict()}
    return net



@register_method("earlyexit", "early exit (heads after each stage)", flat_only=True, order=40, config=EarlyExitConfig)
def build_for_comparison(s: Setup):
    model = s.create(float(s.options.get("expansion", 1.0)))
    return train(model, s.train, s.config(EarlyExitConfig), reference_macs=s.reference_macs, teacher=s.teacher)


__all__ = ["EarlyExitConfig", "EarlyExitNet", "EarlyExitSession", "make_head", "stage_ends", "train"]
