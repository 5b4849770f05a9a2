"""Non-uniform subnets (Yang, He, Cao, Fan, DAC 2020 "Non-uniform DNN Structured Subnets Sampling
for Dynamic Inference"; extended as arXiv 2009.05681): one set of weights, several nested subnets
whose channel counts differ layer by layer, chosen by channel importance for each MAC or latency
budget, trained jointly, each with its own BatchNorm.

The pipeline, and the choices the sources leave open:

1. **Warm-up** (``warmup_fraction`` of the steps): the full network trains alone, optionally with
   a group-lasso penalty (the sparsity phase), so importance means something.
2. **Importance and widths**: channels are scored (``filter-norm``: L2 norm of a channel's filters,
   group lasso; ``bn-scale``: |gamma|, network slimming) and each subnet keeps the most important
   ones of every tag group (a residual add ties its channels into one group, so they keep one
   count). Counts per group come from :mod:`dyninfer.methods.allocate` (``global`` rule over
   normalised importance, or ``greedy`` AutoSlim-style search on a held-out batch), rounded to
   multiples of ``multiple`` (default 8), under budgets by MACs or by latency measured on this
   device (:mod:`dyninfer.runtime.latency_table`).
3. **Joint training** on shared weights, sandwich rule: every step trains the largest subnet
   (cross-entropy), the smallest and ``num_random`` others drawn from the rest, those by in-place
   distillation from the largest's logits (US-Nets). One optimizer step per batch.
4. **BatchNorm recalibration** per subnet on training batches in train mode (each subnet's own
   copy; the known slimmable pitfall of evaluating with another width's statistics).

Stepping up recomputes (full rule): this method trades reuse for freedom in every layer's width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from dyninfer.data import ImageSet
from dyninfer.methods.allocate import (
    allocate, by_importance, by_loss, check_reachable, dense_macs, latency_cost, macs_cost, orders_of, within_measured,
)
from dyninfer.methods.baselines._common import SubnetList, input_shape_of, recalibrate_bn, reference_of
from dyninfer.methods.baselines.individual import reinitialise
from dyninfer.methods.baselines.slimmable import SlimmableNet
from dyninfer.methods.budget import (
    BaselineConfig, StepLog, Supervision, batch_stream, run_steps, sgd, split_steps, work_path,
)
from dyninfer.methods.face import load_tagged
from dyninfer.methods.importance import IMPORTANCES, group_lasso
from dyninfer.methods.registry import Setup, register_method
from dyninfer.methods.stepping import check_budgets
from dyninfer.nn.tagged import TaggedNet
from dyninfer.runtime.latency_table import LatencyTable, build_table, measured_fractions
from dyninfer.train import kd_loss

__all__ = ["BY", "IMPORTANCES", "SEARCHES", "NonUniformConfig", "NonUniformNet", "sample", "train"]

SEARCHES = ("global", "greedy")
BY = ("macs", "latency")


@dataclass(frozen=True)
class NonUniformConfig(BaselineConfig):
    """Everything the method needs; ``steps`` counts warm-up and joint training together."""

    warmup_fraction: float = 0.3        # of the steps: full network alone, before widths are chosen
    group_lasso: float = 0.0            # penalty weight during warm-up (0: no sparsity phase)
    importance: str = "filter-norm"     # or "bn-scale"
    search: str = "global"              # or "greedy" (AutoSlim-style, on a held-out training batch)
    by: str = "macs"                    # or "latency" (a per-layer table measured on this device)
    multiple: int = 8                   # channel counts are multiples of this (or the full width)
    latency_batch: int = 1              # batch size the latency table is measured at
    latency_checks: int = 2             # by latency: rounds of timing the chosen subnets and tightening
                                        # the budgets of those over (0: trust the table's prediction)
    num_random: int = 1                 # sandwich rule: subnets sampled per step besides both ends
    temperature: float = 1.0            # in-place distillation
    calibration_samples: int = 2048     # training images per subnet for BatchNorm recalibration
    individual: bool = False            # ablation: train each subnet alone on its share of the steps

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"NonUniformConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"NonUniformConfig.importance must be one of {sorted(IMPORTANCES)}, got {self.importance!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"NonUniformConfig.search must be one of {SEARCHES}, got {self.search!r}")
        if self.by not in BY:
            raise ValueError(f"NonUniformConfig.by must be one of {BY}, got {self.by!r}")
        if isinstance(self.latency_checks, bool) or not isinstance(self.latency_checks, int) or self.latency_checks < 0:
            raise ValueError(f"NonUniformConfig.latency_checks must be an int >= 0, got {self.latency_checks!r}")
        for name in ("multiple", "latency_batch", "calibration_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NonUniformConfig.{name} must be an int >= 1, got {value!r}")
        if self.num_random < 0 or self.group_lasso < 0:
            raise ValueError("NonUniformConfig.num_random and group_lasso must be >= 0")


class NonUniformNet(SlimmableNet):
    """Nested full-rule subnets with per-group channel counts and one BatchNorm per subnet."""

    def widths(self, subnet: int) -> list[int]:
        """Channels of every tag group in subnet ``subnet`` (a residual stream counts once)."""
        k = self.net._check_subnet(subnet)
        return [sum(c[:k]) for c in self.net.counts()]

    def layer_widths(self, subnet: int) -> list[int]:
        """Output channels of every hidden layer in subnet ``subnet``."""
        per_group = self.widths(subnet)
        return [per_group[g] for g in self.net.layer_group]

    def uniform_multipliers(self) -> list[float]:
        """Per subnet, the one global width multiplier a slimmable net needs for the same MACs."""
        full = self.net.widths()
        out = []
        for k in range(1, self.num_subnets + 1):
            target = dense_macs(self.net, self.widths(k))
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                counts = [max(1, round(mid * w)) for w in full]
                lo, hi = (mid, hi) if dense_macs(self.net, counts) <= target else (lo, mid)
            out.append(lo)
        return out

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """safetensors (weights, tags, every subnet's BatchNorm) + JSON (model, budgets, history)."""
        self._save_tagged(path, "nonuniform", {"history": self.history, **(extra or {})})

    @classmethod
    def load(cls, path: str | Path) -> "NonUniformNet":
        net, meta = load_tagged(path, "nonuniform", rule="full", switchable_bn=True)
        return cls(net, meta["budgets"], meta["reference_macs"], [float("nan")] * meta["num_subnets"],
                   meta.get("history"))


def sample(model: nn.Module, budgets: Sequence[float], *, by: str = "macs", importance: str = "filter-norm",
           search: str = "global", multiple: int = 8, reference_macs: int | None = None,
           input_shape: Sequence[int] | None = None, held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
           latency_batch: int = 1, cache_dir: str | None = None,
           latency_table: LatencyTable | None = None, latency_checks: int = 2,
           measure: Callable[[TaggedNet], list[float]] | None = None) -> NonUniformNet:
    """Subnets of ``model`` (its weights as they are) at ``budgets``: per-group counts chosen by
    importance under MAC or latency fractions. ``held_out`` is the batch the greedy search scores on.

    Budgets by MACs are fractions of ``reference_macs`` (default: the zoo model at expansion 1);
    by latency, of the full network's latency: measured on this device (cached in ``cache_dir``),
    or predicted by ``latency_table`` (e.g. measured on the target device).

    A latency table sums layers timed alone, which misses how they run together (the committed
    ResNet-20 run predicted 0.39 / 0.70 and measured 0.44 / 0.78). So by latency on this device,
    the chosen subnets are then timed (``measure``: default, each dense subnet against the full
    network, interleaved medians) and any over budget is re-chosen under a proportionally tighter
    target, up to ``latency_checks`` times (:func:`~dyninfer.methods.allocate.within_measured`);
    ``history["latency_checks"]`` keeps every round. With a given ``latency_table`` (another
    device's) nothing here can be measured, so its prediction is used as it is, unless ``measure``
    (which times a tagged net's subnets on that device) is given too.
    """
    budgets = check_budgets(budgets)
    if by not in BY or search not in SEARCHES or importance not in IMPORTANCES:
        raise ValueError(f"by must be one of {BY}, search one of {SEARCHES}, importance one of "
                         f"{sorted(IMPORTANCES)}; got {by!r}, {search!r}, {importance!r}")
    shape = tuple(input_shape or (getattr(model, "dyninfer_config", None) or {}).get("input_shape") or ())
    if len(shape) != 3:
        raise ValueError("sample needs input_shape= (C, H, W) for a model not made by dyninfer.models.create")
    reference = reference_of(model, reference_macs, shape)
    net = TaggedNet(model, len(budgets), shape, rule="full", switchable_bn=True)
    scores = IMPORTANCES[importance](net)
    orders = orders_of(scores)
    history: dict = {"by": by, "search": search, "importance": importance, "multiple": multiple}
    cost, table = _cost(net, by, reference, latency_batch, multiple, cache_dir, latency_table)
    if table is not None:
        history["latency_table"] = {"key": table.key, "batch": table.batch, "threads": table.threads,
                                    "overhead_ms": table.overhead_ms,
                                    "full_ms": table.predict(net, net.widths())}
    if search == "greedy":
        if held_out is None:
            raise ValueError("the greedy search needs held_out=(x, y), a batch of training images to score candidate "
                             "widths on")
        choose = by_loss(model, shape, orders, held_out)
    else:
        choose = by_importance(scores)
    if by == "latency" and latency_checks and (latency_table is None or measure is not None):
        full = net.widths()

        def timed(counts: list[list[int]]) -> list[float]:
            net.set_prefix_tags(counts, order=orders)
            measured = (measure or timer_here(latency_batch))(net.eval())
            # the full widths are the reference itself: 1 by definition, whatever the timing noise
            return [1.0 if c == full else m for c, m in zip(counts, measured)]

        counts, trail = within_measured(lambda b: allocate(net, b, cost, choose, multiple), budgets, cost, timed,
                                        latency_checks)
        history["latency_checks"] = trail
        history["measured_cost"] = trail[-1]["measured"]
    else:
        counts = allocate(net, budgets, cost, choose, multiple)
    net.set_prefix_tags(counts, order=orders)
    net.eval()
    history["counts"] = counts
    history["predicted_cost"] = [cost(c) for c in counts]
    return NonUniformNet(net, budgets, reference, [float("nan")] * len(budgets), history)


def timer_here(batch: int) -> Callable[[TaggedNet], list[float]]:
    """``sample``'s default ``measure``: each subnet timed on this device against the full net."""
    return lambda net: measured_fractions(net, batch=batch)


def _cost(net: TaggedNet, by: str, reference: int, latency_batch: int, multiple: int, cache_dir: str | None,
          latency_table: LatencyTable | None) -> tuple[Callable[[list[int]], float], LatencyTable | None]:
    """The cost budgets are fractions of: MACs of ``reference``, or the full net's predicted latency
    (``latency_table``, or one measured on this device and cached in ``cache_dir``)."""
    if by != "latency":
        return macs_cost(net, reference), None
    table = latency_table or build_table(net, batch=latency_batch, multiple=multiple, cache_dir=cache_dir)
    return latency_cost(net, table), table


def train(model: nn.Module, train_set: ImageSet, budgets: Sequence[float], config: NonUniformConfig | None = None,
          *, reference_macs: int | None = None, cache_dir: str | None = None,
          teacher: nn.Module | None = None) -> NonUniformNet | SubnetList:
    """The whole method (module docstring): warm-up, widths, joint sandwich training, BN recalibration.
    With ``teacher``, the warm-up and the largest subnet distil from it (the others keep the
    in-place KD from the largest)."""
    cfg = config or NonUniformConfig()
    supervision = Supervision(teacher)
    budgets = check_budgets(budgets)
    shape = input_shape_of(model, train_set)
    reference = reference_of(model, reference_macs, shape)
    probe = TaggedNet(model, 1, shape, rule="full")  # shares the model's layers; only shapes are read
    probe_cost, table = _cost(probe, cfg.by, reference, cfg.latency_batch, cfg.multiple, cache_dir, None)
    check_reachable(probe, budgets, probe_cost, cfg.multiple)  # before any training
    torch.manual_seed(cfg.seed)
    log = StepLog()
    warmup = round(cfg.steps * cfg.warmup_fraction)
    stream = batch_stream(train_set, cfg.batch_size, cfg.seed)
    if warmup:
        view = TaggedNet(model, 1, shape)  # shares the model's layers: the penalty sees its groups

        def warm_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = supervision.loss(model(x), y, supervision.targets(x))
            return loss + cfg.group_lasso * group_lasso(view) if cfg.group_lasso else loss

        model.train()
        optimizer = sgd(model.parameters(), cfg)
        run_steps(model, warm_loss, optimizer, stream, warmup, log, "warmup", cfg.progress)
    model.eval()
    held_out = next(batch_stream(train_set, min(256, len(train_set)), cfg.seed + 99))
    chosen = work_path("widths")  # inside compare: the widths an interrupted run trained, if any
    if chosen is not None and (chosen / "widths.json").exists():
        nu = _restore_widths(model, budgets, reference, shape, chosen)
    else:  # the table measured for the check above, timed subnets on this device (measure=)
        nu = sample(model, budgets, by=cfg.by, importance=cfg.importance, search=cfg.search, multiple=cfg.multiple,
                    reference_macs=reference, input_shape=shape, held_out=held_out, latency_batch=cfg.latency_batch,
                    latency_table=table, latency_checks=cfg.latency_checks,
                    measure=timer_here(cfg.latency_batch) if table is not None else None)
        if chosen is not None:
            _save_widths(nu, chosen)
    net, n = nu.net, nu.num_subnets
    joint = cfg.steps - warmup
    if cfg.individual:
        return _train_individually(nu, train_set, joint, log, cfg, supervision)
    generator = torch.Generator().manual_seed(cfg.seed + 7)
    net.train()
    if joint:
        optimizer = sgd(net.parameters(), cfg)

        def sandwich(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            largest = net(x, n)
            loss = supervision.loss(largest, y, supervision.targets(x))
            inplace = largest.detach()
            middle = list(range(2, n))
            drawn = [middle[i] for i in torch.randperm(len(middle), generator=generator)[:cfg.num_random]]
            for k in sorted({1, *drawn} - {n}):
                loss = loss + kd_loss(net(x, k), inplace, cfg.temperature)
            return loss

        run_steps(net, sandwich, optimizer, stream, joint, log, "sandwich", cfg.progress, generators=[generator])
    batches = -(-cfg.calibration_samples // cfg.batch_size)
    for k in range(1, n + 1):
        recalibrate_bn(net, k, batch_stream(train_set, cfg.batch_size, cfg.seed + 1000 + k), batches)
    net.eval()
    nu.history.update({"method": "nonuniform", "config": cfg.to_dict(), "batch_size": cfg.batch_size,
                       "channels": [nu.widths(k) for k in range(1, n + 1)], **log.as_dict()})
    return nu


def _save_widths(nu: NonUniformNet, folder: Path) -> None:
    """The chosen tags and the choice's record, so a resumed run trains the same subnets (a choice
    by measured latency can differ from one timing to the next)."""
    folder.mkdir(parents=True, exist_ok=True)
    tags = {str(g): nu.net.tags(g).tolist() for g in range(nu.net.num_groups)}
    tmp = folder / "widths.json.tmp"
    tmp.write_text(json.dumps({"tags": tags, "history": nu.history}, default=str))
    tmp.replace(folder / "widths.json")


def _restore_widths(model: nn.Module, budgets: list[float], reference: int, shape: tuple, folder: Path) -> NonUniformNet:
    saved = json.loads((folder / "widths.json").read_text())
    net = TaggedNet(model, len(budgets), shape, rule="full", switchable_bn=True)
    with torch.no_grad():
        for g, tags in saved["tags"].items():
            net.tags(int(g)).copy_(torch.tensor(tags))
    return NonUniformNet(net.eval(), budgets, reference, [float("nan")] * len(budgets), saved["history"])


def _train_individually(nu: NonUniformNet, train_set: ImageSet, steps: int, log: StepLog,
                        cfg: NonUniformConfig, supervision: Supervision) -> SubnetList:
    """Ablation: the same widths as independent dense copies, each from scratch on its share of
    ``steps`` (the individually trained baseline, with non-uniform widths)."""
    copies = []
    for k, share in enumerate(split_steps(steps, nu.num_subnets), start=1):
        torch.manual_seed(cfg.seed + k)
        narrow = reinitialise(nu.net.dense(k, fold_bn=False)).train()
        optimizer = sgd(narrow.parameters(), cfg)
        run_steps(narrow, lambda x, y, m=narrow: supervision.loss(m(x), y, supervision.targets(x)), optimizer,
                  batch_stream(train_set, cfg.batch_size, cfg.seed), share, log, f"subnet-{k}", cfg.progress)
        copies.append(narrow.eval())
    history = {**nu.history, "method": "nonuniform-individual", "config": cfg.to_dict(), "batch_size": cfg.batch_size,
               "channels": [nu.widths(k) for k in range(1, nu.num_subnets + 1)], **log.as_dict()}
    return SubnetList(copies, nu.input_shape, nu.reference_macs, nu.budgets, history).eval()


@register_method("nonuniform", "non-uniform subnets (importance-chosen per-layer widths, sandwich + KD)", order=15,
                 config=NonUniformConfig)
def build_for_comparison(s: Setup) -> NonUniformNet:
    model = s.create(float(s.options.get("expansion", 1.0)))
    return train(model, s.train, s.budgets, s.config(NonUniformConfig), reference_macs=s.reference_macs,
                 teacher=s.teacher)


@register_method("nonuniform-individual", "the non-uniform widths, each subnet trained alone (budget split)",
                 order=16, config=NonUniformConfig)
def build_individual_for_comparison(s: Setup) -> SubnetList:
    model = s.create(float(s.options.get("expansion", 1.0)))
    return train(model, s.train, s.budgets, s.config(NonUniformConfig, individual=True),
                 reference_macs=s.reference_macs, teacher=s.teacher)
