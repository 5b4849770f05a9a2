"""Per-group channel counts under budgets: the non-uniform widths of nested full-rule subnets.

Every rule here shrinks one network from full width, one chunk (down to the previous multiple of
the group's step, :func:`chunk`) of one tag group at a time, until the cost fits the budget; budgets are
served from the largest to the smallest, each continuing from the last, so subnets are nested
by construction. What differs is which group gives up its chunk:

* :func:`by_importance` -- the global rule: the chunk whose channels have the lowest importance,
  normalised by its group's mean (so layers of different scale compete on equal footing);
* :func:`by_loss` -- greedy, AutoSlim-style: the chunk whose removal raises the loss on a
  held-out batch least (one forward per candidate group per chunk).

Costs are fractions of a reference: :func:`macs_cost` (the MACs the dense subnet executes) or a
measured :class:`~dyninfer.runtime.latency_table.LatencyTable` (:func:`latency_cost`).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dyninfer.nn.tagged import TaggedNet
from dyninfer.runtime.latency_table import LatencyTable, chunk

Counts = list[int]
Chooser = Callable[[Counts, dict[int, int]], int]

__all__ = ["dense_macs", "macs_cost", "latency_cost", "orders_of", "by_importance", "by_loss", "allocate",
           "check_reachable", "within_measured"]


def dense_macs(net: TaggedNet, counts: Sequence[int]) -> int:
    """MACs of the full-rule subnet with ``counts[g]`` channels in tag group g, every weight dense:
    exactly what its exported module executes (the core's ``subnet_macs`` once tags are set)."""
    total = 0
    for i in range(net.num_hidden + 1):
        weight = net.classifier.weight if i == net.num_hidden else net.layers[i].weight
        src = net.layer_source[i]
        cin = (net.input_shape[0] if src < 0 else counts[src]) * net.in_repeat[i]
        kernel = weight[0, 0].numel()
        if i == net.num_hidden:
            total += weight.shape[0] * cin
        else:
            total += counts[net.layer_group[i]] * cin * kernel * net.out_positions[i]
    return total


def macs_cost(net: TaggedNet, reference_macs: int) -> Callable[[Counts], float]:
    return lambda counts: dense_macs(net, counts) / reference_macs


def latency_cost(net: TaggedNet, table: LatencyTable, reference_ms: float | None = None) -> Callable[[Counts], float]:
    """Predicted latency as a fraction of ``reference_ms`` (default: the full network's prediction)."""
    full = table.predict(net, net.widths()) if reference_ms is None else reference_ms
    return lambda counts: table.predict(net, counts) / full


def orders_of(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per group, channel indices from the most to the least important (stable on ties)."""
    return [torch.sort(s, descending=True, stable=True).indices for s in scores]


def _next_count(count: int, width: int, multiple: int) -> int | None:
    """The count after giving up one chunk: the previous multiple of the group's step (>= one step)."""
    step = chunk(width, multiple)
    if count <= step:
        return None
    return max(step, ((count - 1) // step) * step)


def by_importance(scores: Sequence[torch.Tensor]) -> Chooser:
    """The global rule over normalised importance (see the module docstring)."""
    ranked = [torch.sort(s / s.mean().clamp(min=1e-12), descending=True, stable=True).values for s in scores]

    def choose(counts: Counts, candidates: dict[int, int]) -> int:
        return min(candidates, key=lambda g: (float(ranked[g][candidates[g]:counts[g]].mean()), g))

    return choose


def by_loss(model: torch.nn.Module, input_shape: Sequence[int], orders: Sequence[torch.Tensor],
            batch: tuple[torch.Tensor, torch.Tensor]) -> Chooser:
    """Greedy AutoSlim-style choice on a held-out ``batch``; BatchNorm uses the batch's statistics
    (a copy of ``model`` is used, so its running statistics are not touched)."""
    view = TaggedNet(copy.deepcopy(model), 1, tuple(input_shape), rule="full").train()
    x, y = batch

    @torch.no_grad()
    def loss_at(counts: Counts) -> float:
        view.set_prefix_tags([counts], order=orders)
        return float(F.cross_entropy(view(x, 1), y))

    def choose(counts: Counts, candidates: dict[int, int]) -> int:
        trial = {}
        for g, nxt in candidates.items():
            trial[g] = loss_at([nxt if h == g else c for h, c in enumerate(counts)])
        return min(candidates, key=lambda g: (trial[g], g))

    return choose


def check_reachable(net: TaggedNet, budgets: Sequence[float], cost: Callable[[Counts], float],
                    multiple: int = 8) -> None:
    """Refuse a budget below the cheapest subnet the rounding allows (one step of every group),
    before any training. (:func:`allocate` can still fail later on budgets so close together that
    two subnets would need the same widths.)"""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    smallest = [chunk(w, multiple) for w in net.widths()]
    if cost(smallest) > min(budgets) * (1 + 1e-12):
        raise ValueError(f"budget {min(budgets)} is below the smallest subnet these widths allow "
                         f"(cost {cost(smallest):.4f} at {smallest} channels, multiple {multiple}); "
                         f"use a larger budget or a smaller multiple")


def allocate(net: TaggedNet, budgets: Sequence[float], cost: Callable[[Counts], float], choose: Chooser,
             multiple: int = 8) -> list[Counts]:
    """Counts per tag group for each budget (ascending budgets -> nested, strictly growing subnets)."""
    check_reachable(net, budgets, cost, multiple)
    widths = net.widths()
    counts = list(widths)
    out: list[Counts] = []
    for budget in sorted(budgets, reverse=True):
        while cost(counts) > budget * (1 + 1e-12) or (out and counts == out[-1]):
            candidates = {g: n for g, c in enumerate(counts) if (n := _next_count(c, widths[g], multiple)) is not None}
            if not candidates:
                raise ValueError(f"budget {budget} is below the smallest subnet these widths allow "
                                 f"(cost {cost(counts):.4f} at {counts} channels, multiple {multiple}); "
                                 f"use a larger budget or a smaller multiple")
            g = choose(counts, candidates)
            counts[g] = candidates[g]
        out.append(list(counts))
    return out[::-1]


def within_measured(allocate_at: Callable[[list[float]], list[Counts]], budgets: Sequence[float],
                    predict: Callable[[Counts], float], measure: Callable[[list[Counts]], list[float]],
                    rounds: int = 2) -> tuple[list[Counts], list[dict]]:
    """Counts whose *measured* cost fits each budget, where the predicted cost (a latency table)
    can be wrong: allocate at ``budgets``, measure every subnet, and while one runs over its
    budget, allocate again with that subnet's target set to its predicted cost x budget / measured
    (below what it predicts now, so its counts must shrink; targets kept ascending, so subnets stay
    nested), at most ``rounds`` times.

    Returns the last counts and the trail of every round (targets, counts, predicted and measured
    fractions). A tightened target no allocation can meet ends the loop with the counts measured
    last, which the trail shows still over budget.
    """
    budgets = list(budgets)
    targets = list(budgets)
    counts = allocate_at(targets)
    trail: list[dict] = []
    for r in range(rounds + 1):
        measured = [float(m) for m in measure(counts)]
        predicted = [float(predict(c)) for c in counts]
        trail.append({"targets": list(targets), "counts": [list(c) for c in counts], "predicted": predicted,
                      "measured": measured})
        if all(m <= b for m, b in zip(measured, budgets)) or r == rounds:
            break
        targets = [p * b / m if m > b else t for t, p, b, m in zip(targets, predicted, budgets, measured)]
        for i in range(len(targets) - 2, -1, -1):
            targets[i] = min(targets[i], targets[i + 1] * (1 - 1e-9))
        try:
            tighter = allocate_at(targets)
        except ValueError as err:
            trail[-1]["stopped"] = str(err)
            break
        counts = tighter
    return counts, trail
