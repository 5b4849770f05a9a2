"""Doubly nested network (Kim, Hong, Choi, Kim, "Doubly Nested Network for Resource-Efficient
Inference", arXiv 1806.07568): one anytime network sliced along width *and* depth.

On the tagged core this is the causal rule with fixed, regular tags (channel-causal convolution:
group g of a layer reads only groups 1..g of the layer before) plus depth exits. Choices the paper
leaves open, made here:

* **Base network**: the zoo's CIFAR ResNet (``depth`` 20/32/56; ResNet-32 as in the paper: one
  convolution and 15 residual blocks). Its width-changing shortcuts are 1x1 projections, which the
  causal rule makes causal; identity shortcuts are tied by the core, so group g of a residual
  stream is group g on both sides of every add. BatchNorm is shared (a channel's statistics are
  the same at every width that contains it).
* **Groups**: every layer's channels split into ``groups`` equal groups, so each stage's width
  must be a multiple of ``groups`` (16/32/64 with the default 4: 4/8/16 channels per group). The
  paper's 22 groups do not divide 16/32/64; it does not say how it mapped them.
* **Depths**: exits after the first convolution and after every residual block but the last,
  whose output the classifier reads: 16 depth locations for ResNet-32.
* **Output stage**: at each depth a global average pool and one FC per group, reading only that
  group's pooled features; (l, c) combines the first c groups' FC outputs. ``combine="sum"`` is
  the paper's formula (Z = sum_{k<=c} W_k f_k, plus bias); ``"mean"`` divides the sum by c (its
  text says "averaging"). Widths at one depth share the FC weights by construction.
* **Joint loss** (Eq. 2): the mean of every (l, c)'s cross-entropy (uniform lambda), all L x G
  logits from one forward pass of the full network.
* **Frontier** (the common ``subnet=k`` face): the (l, c) cells that are best by validation accuracy
  for their MACs once :meth:`DoublyNestedNet.validate` ran; before that, the full-depth widths.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dyninfer import checkpoint as ckpt
from dyninfer import cost, models
from dyninfer.checks import check_path
from dyninfer.data import ImageSet
from dyninfer.methods.budget import BaselineConfig, StepLog, batch_stream, run_steps, sgd
from dyninfer.nn.tagged import TaggedNet
from dyninfer.runtime.compaction import cached_compact
from dyninfer.runtime.graph import GridSession

__all__ = ["DoublyNestedConfig", "DoublyNestedNet", "build", "joint_loss", "train", "parse_limit"]

COMBINE = ("sum", "mean")
UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3, "ms": 1}


@dataclass(frozen=True)
class DoublyNestedConfig(BaselineConfig):
    """Joint training of every (depth, width) sub-network."""

    combine: str = "sum"
    sample: int = 0        # 0: every (l, c) in the loss; n > 0: n random cells per batch (plus the full net)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.combine not in COMBINE:
            raise ValueError(f"DoublyNestedConfig.combine must be one of {COMBINE}, got {self.combine!r}")
        if self.sample < 0:
            raise ValueError(f"DoublyNestedConfig.sample must be >= 0, got {self.sample}")


class DoublyNestedNet(nn.Module):
    """An anytime grid: ``net(x, depth=l, width=c)``; ``forward_grid(x)`` gives every (l, c) at once."""

    def __init__(self, net: TaggedNet, reference_macs: int, combine: str = "sum", spec: dict | None = None):
        super().__init__()
        if not net.incremental or not net.exits or net.chain:
            raise ValueError("a doubly nested network needs a causal residual tagged net with depth exits "
                             "(use build())")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        self.net = net
        self.reference_macs = int(reference_macs)
        self.combine = combine
        self.val_accuracy: list[list[float]] | None = None
        self.history: dict = {}
        self._dense_macs: dict[tuple[int, int], int] = {}  # fixed tags: the structure never changes
        self.spec = dict(spec or {})  # build() arguments, so load() can rebuild the structure

    # ------------------------------------------------------------------ the grid
    @property
    def num_depths(self) -> int:
        return self.net.num_depths

    @property
    def num_widths(self) -> int:
        return self.net.num_subnets

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.net.input_shape

    def _combined(self, logits: torch.Tensor, width: int, bias: torch.Tensor | None) -> torch.Tensor:
        if self.combine == "sum" or bias is None:
            return logits if self.combine == "sum" else logits / width
        return (logits - bias) / width + bias

    def _bias(self, depth: int) -> torch.Tensor | None:
        return self.net.exits[depth - 1].bias if depth < self.num_depths else self.net.classifier.bias

    def forward(self, x: torch.Tensor, subnet: int | None = None, *, depth: int | None = None,
                width: int | None = None) -> torch.Tensor:
        """(depth, width) from scratch, computing only its stages and channels; or ``subnet=k``, the
        k-th cell of the frontier."""
        if subnet is not None:
            if depth is not None or width is not None:
                raise ValueError("give either subnet= (a frontier cell) or depth=/width=, not both")
            depth, width = self.frontier()[self._check_subnet(subnet) - 1]
        d = self.net._check_depth(depth)
        c = self.net._check_subnet(width)
        return self._combined(self.net(x, c, depth=d), c, self._bias(d))

    def forward_grid(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """``logits[l-1][c-1]`` for every depth l and width c, from one pass of the full network."""
        grid = self.net.forward_grid(x)
        return [[self._combined(z, c, self._bias(d)) for c, z in enumerate(row, start=1)]
                for d, row in enumerate(grid, start=1)]

    def macs(self, depth: int, width: int) -> int:
        """MACs that (depth, width) executes from scratch: its dense module's rectangles (the zero
        upper blocks of channel-causal weights are multiplied too), as torch's counter sees them."""
        key = (depth, width)
        if key not in self._dense_macs:
            self._dense_macs[key] = cost.macs(self.dense(depth, width), self.input_shape)
        return self._dense_macs[key]

    def causal_macs(self, depth: int, width: int) -> int:
        """MACs of the channel-causal triangle of (depth, width): what an execution that skips the
        zero blocks (block by block, or stepping wider from (depth, width - 1)) needs."""
        return self.net.subnet_macs(subnet=width, depth=depth)

    def grid_macs(self) -> list[list[int]]:
        return [[self.macs(d, c) for c in range(1, self.num_widths + 1)] for d in range(1, self.num_depths + 1)]

    def dense(self, depth: int, width: int) -> nn.Module:
        """The (depth, width) sub-network as a plain torch module (BN folded, its exit head sliced)."""
        module = self.net.dense(width, depth=depth)
        if self.combine == "mean":
            head = module.classifier
            with torch.no_grad():
                head.weight.div_(width)
        return module

    def compact(self):
        """The inference form (channels by group, BN folded, step blocks, exit heads), cached."""
        return cached_compact(self)

    def start(self, x: torch.Tensor, depth: int = 1, width: int = 1) -> GridSession:
        """An anytime session at (depth, width): ``deeper()`` / ``wider()`` compute only new cells."""
        if self.combine != "sum":
            raise ValueError("grid sessions add partial sums: they need combine='sum'")
        return self.compact().start_grid(x, depth, width)

    # ------------------------------------------------------------------ resources and selection
    @torch.no_grad()
    def resources(self, *, memory: bool = True) -> list[dict]:
        """Per (l, c): MACs its dense module executes (and the causal triangle's), parameters and peak
        activation memory (batch 1) of that module, and its validation accuracy when
        :meth:`validate` ran (Fig. 3)."""
        rows = []
        for d in range(1, self.num_depths + 1):
            for c in range(1, self.num_widths + 1):
                module = self.dense(d, c)
                row = {"depth": d, "width": c, "macs": self.macs(d, c), "causal_macs": self.causal_macs(d, c),
                       "params": cost.params(module)}
                if memory:
                    row["memory_bytes"] = cost.peak_activation_bytes(module, self.input_shape)
                if self.val_accuracy is not None:
                    row["val_accuracy"] = self.val_accuracy[d - 1][c - 1]
                rows.append(row)
        return rows

    @torch.no_grad()
    def validate(self, data: ImageSet, batch_size: int = 512) -> list[list[float]]:
        """Accuracy of every (l, c) on ``data`` (a held-out split of the training data, never the test
        set): what :meth:`select` and the frontier choose by."""
        self.val_accuracy = self.evaluate_grid(data, batch_size)
        return self.val_accuracy

    @torch.no_grad()
    def evaluate_grid(self, data: ImageSet, batch_size: int = 512) -> list[list[float]]:
        was_training = self.net.training
        self.net.eval()
        correct = [[0] * self.num_widths for _ in range(self.num_depths)]
        try:
            for x, y in data.batches(batch_size):
                for d, row in enumerate(self.forward_grid(x)):
                    for c, logits in enumerate(row):
                        correct[d][c] += int((logits.argmax(1) == y).sum())
        finally:
            self.net.train(was_training)
        return [[v / len(data) for v in row] for row in correct]

    def select(self, *, max_macs: float | str | None = None, max_params: float | str | None = None,
               max_memory: float | str | None = None, max_ms: float | str | None = None,
               table: Sequence[dict] | None = None) -> tuple[int, int]:
        """The most accurate (depth, width) within every given limit (Fig. 5), by validation accuracy.

        Limits are numbers or strings with a unit ("24M" MACs, "1MB" memory, "5ms"); ``max_ms`` needs
        a ``latency_ms`` in each row of ``table`` (default: :meth:`resources`).
        """
        limits = {"macs": parse_limit(max_macs, "max_macs"), "params": parse_limit(max_params, "max_params"),
                  "memory_bytes": parse_limit(max_memory, "max_memory"), "latency_ms": parse_limit(max_ms, "max_ms")}
        rows = list(table) if table is not None else self.resources(memory=limits["memory_bytes"] is not None)
        if any("val_accuracy" not in r for r in rows):
            raise ValueError("select needs validation accuracies: call net.validate(held_out) first")
        if limits["latency_ms"] is not None and any("latency_ms" not in r for r in rows):
            raise ValueError("max_ms needs measured latencies: give table= rows with 'latency_ms'")
        feasible = [r for r in rows if all(v is None or r[k] <= v for k, v in limits.items())]
        if not feasible:
            raise ValueError(f"no (depth, width) fits {({k: v for k, v in limits.items() if v is not None})}; "
                             f"the smallest needs {min(r['macs'] for r in rows):,} MACs")
        best = max(feasible, key=lambda r: (r["val_accuracy"], -r["macs"]))
        return best["depth"], best["width"]

    # ------------------------------------------------------------------ per-input anytime stopping
    def path(self, val_accuracy: list[list[float]] | None = None, rule: str = "area") -> list[tuple[int, int]]:
        """A staircase from (1, 1) to the full net through the grid, one deeper() or wider() at a
        time. ``rule="area"`` (default): the staircase with the least validation error integrated
        over MACs, sum of (1 - acc(cell)) x (MACs of the next cell - its MACs), found exactly by
        dynamic programming over the grid; it can go deep at a narrow width first. ``"greedy"``:
        each move the one with the larger validation accuracy gain per causal MAC added (one-move
        look-ahead). Measured on one Fashion-MNIST grid (benchmarks/results/
        doubly_nested_paths_fashion-mnist.md), per-input stopping along the area path reached
        69.23 / 73.20 % at 8.1 / 16.7 M average MACs, along the greedy path 56.50 / 66.87 %."""
        acc = val_accuracy or self.val_accuracy
        if acc is None:
            raise ValueError("path needs validation accuracies: call net.validate(held_out) first")
        if rule not in ("greedy", "area"):
            raise ValueError(f"rule must be 'greedy' or 'area', got {rule!r}")
        if rule == "area":
            return self._area_path(acc)
        d, c, cells = 1, 1, [(1, 1)]
        while (d, c) != (self.num_depths, self.num_widths):
            moves = [(d + 1, c)] if d < self.num_depths else []
            moves += [(d, c + 1)] if c < self.num_widths else []

            def gain(cell):
                extra = max(1, self.causal_macs(*cell) - self.causal_macs(d, c))
                return (acc[cell[0] - 1][cell[1] - 1] - acc[d - 1][c - 1]) / extra

            d, c = max(moves, key=gain)
            cells.append((d, c))
        return cells

    def _area_path(self, acc: list[list[float]]) -> list[tuple[int, int]]:
        L, G = self.num_depths, self.num_widths
        cost = {(d, c): self.causal_macs(d, c) for d in range(1, L + 1) for c in range(1, G + 1)}
        best: dict[tuple[int, int], tuple[float, tuple[int, int] | None]] = {(1, 1): (0.0, None)}
        for d in range(1, L + 1):
            for c in range(1, G + 1):
                if (d, c) == (1, 1):
                    continue
                options = [(best[p][0] + (1 - acc[p[0] - 1][p[1] - 1]) * (cost[(d, c)] - cost[p]), p)
                           for p in ((d - 1, c), (d, c - 1)) if p in best]
                best[(d, c)] = min(options)
        cells, cell = [], (L, G)
        while cell is not None:
            cells.append(cell)
            cell = best[cell][1]
        return cells[::-1]

    @torch.no_grad()
    def predict_anytime(self, x: torch.Tensor, threshold: float, path: Sequence[tuple[int, int]], *,
                        batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per input, walk ``path`` with one real session, stopping at the first cell whose softmax
        confidence reaches ``threshold``; inputs that stop leave the batch, so only the rest pay for
        later cells. Returns (predictions, the cell index each stopped at, executed MACs per input).

        Inputs go through in chunks of ``batch_size`` (a session caches every cell's activations:
        10,000 CIFAR images at once would hold tens of GB)."""
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self._check_path(path)
        if x.shape[0] > batch_size:
            parts = [self.predict_anytime(chunk, threshold, path, batch_size=batch_size)
                     for chunk in x.split(batch_size)]
            return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]
        cost = self.path_costs(path)
        n = x.shape[0]
        pred = torch.empty(n, dtype=torch.long)
        stop = torch.full((n,), len(path) - 1, dtype=torch.long)
        alive = torch.arange(n)
        run = self.start(x, *path[0])
        for step, cell in enumerate(path):
            if step:
                run.deeper() if cell[0] > path[step - 1][0] else run.wider()
            confidence, label = torch.softmax(run.logits, dim=1).max(dim=1)
            done = confidence >= threshold if step < len(path) - 1 else torch.ones_like(confidence, dtype=torch.bool)
            pred[alive[done]] = label[done]
            stop[alive[done]] = step
            if bool(done.all()):
                break
            keep = torch.nonzero(~done).squeeze(1)
            run.keep(keep)
            alive = alive[keep]
        return pred, stop, torch.tensor(cost)[stop]

    def path_costs(self, path: Sequence[tuple[int, int]]) -> list[int]:
        """MACs an input has executed when it stops at each cell of ``path`` (every cell computed
        once; each depth's exit head paid when that depth is visited)."""
        self._check_path(path)
        costs, total = [], 0
        for step, cell in enumerate(path):
            if step == 0:
                total = self.causal_macs(*cell)
            else:
                prev = path[step - 1]
                total += self.causal_macs(*cell) - self.causal_macs(*prev)
                if cell[0] > prev[0] and prev[0] < self.num_depths:  # the abandoned head stays paid
                    total += self._head_macs(*prev)
            costs.append(total)
        return costs

    def _head_macs(self, depth: int, width: int) -> int:
        if depth == self.num_depths:
            return 0
        return int((self.net._exit_tags(depth) <= width).sum()) * self.net.exits[depth - 1].weight.shape[0]

    def _check_path(self, path: Sequence[tuple[int, int]]) -> None:
        cells = [tuple(cell) for cell in path]
        if not cells or any(not (1 <= d <= self.num_depths and 1 <= c <= self.num_widths) for d, c in cells):
            raise ValueError(f"a path is a non-empty list of (depth, width) cells of the {self.num_depths} x "
                             f"{self.num_widths} grid")
        for (d0, c0), (d1, c1) in zip(cells, cells[1:]):
            if (d1 - d0, c1 - c0) not in ((1, 0), (0, 1)):
                raise ValueError(f"a path moves one deeper() or one wider() at a time; ({d0}, {c0}) -> ({d1}, {c1})")

    @torch.no_grad()
    def path_confidences(self, x: torch.Tensor, path: Sequence[tuple[int, int]], *,
                         batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax confidence and predicted label of every input at every cell of ``path``, shape
        (inputs, cells): one session per chunk walks the whole path, nobody stops.

        In eval mode an input's logits at a cell do not depend on which other inputs are still in
        the batch, so this one pass tells where :meth:`predict_anytime` would stop every input
        under any threshold, and what that costs (:meth:`stops`)."""
        self._check_path(path)
        confidences, labels = [], []
        for chunk in x.split(batch_size):
            run = self.start(chunk, *path[0])
            conf, label = [], []
            for step, cell in enumerate(path):
                if step:
                    run.deeper() if cell[0] > path[step - 1][0] else run.wider()
                c, lab = torch.softmax(run.logits, dim=1).max(dim=1)
                conf.append(c)
                label.append(lab)
            confidences.append(torch.stack(conf, dim=1))
            labels.append(torch.stack(label, dim=1))
        return torch.cat(confidences), torch.cat(labels)

    @staticmethod
    def stops(confidences: torch.Tensor, threshold: float) -> torch.Tensor:
        """The cell index each input stops at under ``threshold``: the first whose confidence
        reaches it, else the last (the rule of :meth:`predict_anytime`)."""
        reached = confidences >= threshold
        reached[:, -1] = True
        return reached.to(torch.int8).argmax(dim=1)

    @torch.no_grad()
    def calibrate(self, val: ImageSet, budget_macs: float, path: Sequence[tuple[int, int]],
                  batch_size: int = 512) -> float:
        """The highest confidence threshold whose average executed MACs on ``val`` fit ``budget_macs``
        (bisection; a lower threshold stops earlier and costs less). One recorded pass over ``val``
        (:meth:`path_confidences`) serves every bisection step: each step's average is the exact
        mean of :meth:`path_costs` at the stops that threshold gives."""
        if budget_macs < self.path_costs(path)[0]:
            raise ValueError(f"budget {budget_macs:,.0f} MACs is below the path's first cell "
                             f"({self.path_costs(path)[0]:,} MACs)")
        was_training = self.training
        self.eval()
        try:
            x = torch.cat([xb for xb, _ in val.batches(batch_size)])
            confidences, _ = self.path_confidences(x, path)
        finally:
            self.train(was_training)
        costs = torch.tensor(self.path_costs(path), dtype=torch.float64)

        def average(threshold: float) -> float:
            return float(costs[self.stops(confidences, threshold)].mean())

        lo, hi = 0.0, 1.0
        if average(hi) <= budget_macs:
            return hi
        for _ in range(30):  # each step is a tensor lookup now, so bisect finely
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if average(mid) <= budget_macs else (lo, mid)
        return lo

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        meta = {"kind": "doubly-nested", "spec": self.spec, "combine": self.combine,
                "reference_macs": self.reference_macs, "val_accuracy": self.val_accuracy,
                "history": self.history, **(extra or {})}
        tensors = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ckpt.save(path, tensors, json.loads(json.dumps(meta, default=str)))

    @classmethod
    def load(cls, path: str | Path) -> "DoublyNestedNet":
        tensors, meta = ckpt.load(path)
        if meta.get("kind") != "doubly-nested":
            raise ValueError(f"{path} is not a doubly nested checkpoint (kind={meta.get('kind')!r})")
        net = build(**meta["spec"], combine=meta["combine"])
        net.net.load_state_dict(tensors)
        net.net.eval()
        net.val_accuracy = meta.get("val_accuracy")
        net.history = meta.get("history") or {}
        return net

    # ------------------------------------------------------------------ the common face
    def frontier(self) -> list[tuple[int, int]]:
        """(depth, width) cells in rising MACs, each more accurate (by validation) than every cheaper
        one; before validation, the widths at full depth."""
        if self.val_accuracy is None:
            return [(self.num_depths, c) for c in range(1, self.num_widths + 1)]
        cells = sorted(((self.macs(d, c), -self.val_accuracy[d - 1][c - 1], d, c)
                        for d in range(1, self.num_depths + 1) for c in range(1, self.num_widths + 1)))
        out, best = [], -math.inf
        for macs, neg_acc, d, c in cells:
            if -neg_acc > best and (not out or macs > self.macs(*out[-1])):
                out.append((d, c))
                best = -neg_acc
        return out

    @property
    def num_subnets(self) -> int:
        return len(self.frontier())

    def _check_subnet(self, subnet: int) -> int:
        n = self.num_subnets
        if isinstance(subnet, bool) or not isinstance(subnet, int) or not 1 <= subnet <= n:
            raise ValueError(f"subnet must be an int in 1..{n} (the frontier), got {subnet!r}")
        return subnet

    def mac_fractions(self, path: str = "incremental") -> list[float]:
        """Per frontier cell: the causal triangle (``"incremental"``: what skipping the zero blocks,
        or stepping wider, needs) or the rectangles one dense execution multiplies (``"scratch"``)."""
        macs = self.causal_macs if check_path(path) == "incremental" else self.macs
        return [macs(d, c) / self.reference_macs for d, c in self.frontier()]

    def export(self, subnet: int) -> nn.Module:
        return self.dense(*self.frontier()[self._check_subnet(subnet) - 1])

    def evaluate(self, data: ImageSet, batch_size: int = 512) -> list[float]:
        grid = self.evaluate_grid(data, batch_size)
        return [grid[d - 1][c - 1] for d, c in self.frontier()]


def _block_outputs(net: TaggedNet) -> list[int]:
    """Program nodes after which a depth location sits: the stem's ReLU and every block's output."""
    nodes = net.program
    stem = next(j for j, node in enumerate(nodes) if node.op == "map" and nodes[node.args[0]].op == "layer")
    blocks = [j for j, node in enumerate(nodes) if node.op == "map" and nodes[node.args[0]].op == "add"]
    return [stem] + blocks[:-1]  # the last block's output is read by the classifier


def build(num_classes: int = 10, groups: int = 4, depth: int = 32, input_shape: Sequence[int] = (3, 32, 32),
          expansion: float = 1.0, combine: str = "sum", seed: int | None = None) -> DoublyNestedNet:
    """A doubly nested ResNet-``depth`` with ``groups`` channel groups and an exit at every block."""
    name = f"resnet-{depth}"
    if name not in ("resnet-20", "resnet-32", "resnet-56"):
        raise ValueError(f"depth must be 20, 32 or 56 (the zoo's CIFAR ResNets), got {depth!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if seed is not None:
        torch.manual_seed(seed)
    model = models.create(name, num_classes=num_classes, expansion=expansion, input_shape=tuple(input_shape))
    reference = models.original_macs(model)
    net = TaggedNet(model, groups, tuple(input_shape))
    widths = net.widths()
    bad = sorted({w for w in widths if w % groups})
    if bad:
        raise ValueError(f"every stage width must be a multiple of groups={groups}; widths {sorted(set(widths))} "
                         f"include {bad} (choose groups dividing them, or an expansion that makes them divisible)")
    net.set_prefix_tags([[w * k // groups for w in widths] for k in range(1, groups + 1)])
    for node in _block_outputs(net):
        net.add_exit(node)
    spec = {"num_classes": num_classes, "groups": groups, "depth": depth, "input_shape": list(input_shape),
            "expansion": expansion}
    return DoublyNestedNet(net, reference, combine, spec)


def joint_loss(net: DoublyNestedNet, x: torch.Tensor, y: torch.Tensor, sample: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 2 with uniform lambda: the mean cross-entropy of every (l, c) cell, all from one pass
    (``forward_grid``); with ``sample`` > 0, of that many random cells plus the full network
    (the pass still computes every cell: sampling saves only the losses' backward)."""
    grid = net.forward_grid(x)
    cells = [(d, c) for d in range(net.num_depths) for c in range(net.num_widths)]
    if sample:
        picks = torch.randperm(len(cells) - 1, generator=generator)[:sample].tolist()
        cells = [cells[i] for i in picks] + [cells[-1]]
    return sum(F.cross_entropy(grid[d][c], y) for d, c in cells) / len(cells)


def train(net: DoublyNestedNet, train_set: ImageSet, config: DoublyNestedConfig | None = None) -> DoublyNestedNet:
    """Eq. 2: every step, the mean cross-entropy over all (l, c) (or ``sample`` random cells plus the
    full network), from one forward pass."""
    cfg = config or DoublyNestedConfig()
    net.combine = cfg.combine
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed + 3)
    optimizer = sgd(net.parameters(), cfg)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return joint_loss(net, x, y, cfg.sample, generator)

    log = StepLog()
    net.net.train()
    run_steps(net.net, loss_fn, optimizer, batch_stream(train_set, cfg.batch_size, cfg.seed), cfg.steps,
              log, "joint", cfg.progress, generators=[generator])
    net.net.eval()
    net.history.update({"method": "doubly-nested", "config": cfg.to_dict(), **log.as_dict()})
    return net


def parse_limit(value: float | str | None, name: str) -> float | None:
    """A limit as a number: ints/floats as they are, strings with a unit (24M, 1.5MB, 5ms)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number or a string like '24M', got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in UNITS:
            raise ValueError(f"{name}={value!r} is not a number with a known unit ({', '.join(u for u in UNITS if u)})")
        number = float(match.group(1)) * UNITS[unit]
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number
