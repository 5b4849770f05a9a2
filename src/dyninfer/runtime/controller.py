"""Anytime prediction under a deadline or a MAC budget: answer with subnet 1, step while it fits.

``predict(net, x, deadline_ms=5)`` starts subnet 1 at once (an answer is always produced) and
takes step k -> k+1 only while the latency model predicts it ends before the deadline, measured
from the call; ``budget_macs`` does the same with exact per-step MACs.  No step is ever started
that its prediction says will not fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dyninfer.runtime.compaction import as_compact
from dyninfer.runtime.latency import calibrate


@dataclass
class StepRecord:
    """One step the controller took: the subnet it reached, predicted and measured ms, its MACs,
    and the time left before the deadline when it decided to take it."""

    subnet: int
    predicted_ms: float | None
    actual_ms: float
    macs: int
    remaining_ms: float | None = None


@dataclass
class PredictResult:
    logits: torch.Tensor
    subnet: int              # the subnet whose logits are returned
    time_ms: float           # wall time of the whole call
    steps: int               # steps taken after subnet 1 (subnet - 1)
    macs: int                # MACs computed (exact, per sample)
    deadline_ms: float | None = None
    budget_macs: int | None = None
    records: list[StepRecord] = field(default_factory=list)
    stopped_by: str = "largest"  # "largest", "deadline" or "budget": why no further step was taken

    @property
    def met_deadline(self) -> bool | None:
        return None if self.deadline_ms is None else self.time_ms <= self.deadline_ms


def _macs_of(net, cnet) -> list[int]:
    for source in (cnet, net):  # the compacted net stores its MACs; counting them again costs time
        counter = getattr(source, "macs", None)
        if callable(counter):
            try:
                return [int(m) for m in counter()]
            except ValueError:
                continue
    if hasattr(net, "macs_per_subnet"):
        return [int(m) for m in net.macs_per_subnet()]
    raise ValueError(f"cannot tell the MACs of each subnet of a {type(net).__name__}")


def predict(net, x: torch.Tensor, *, deadline_ms: float | None = None, budget_macs: int | None = None,
            model=None, tail: bool = True, clock: Callable[[], float] = time.perf_counter) -> PredictResult:
    """Anytime answer: subnet 1, then each next step whose predicted time / MACs still fit.

    Predictions are the model's step times scaled by the largest slowdown (measured / calibrated)
    seen so far in this call, so a machine that got busier since calibration stops earlier.
    ``tail=True`` (default) predicts no less than the step's calibrated 95th percentile (a
    model's ``next_step_tail_ms``): measured on a stepped LeNet-5 / CIFAR-10 at batch 1 it was
    late 0.0 % at every deadline from 1x to 2x the full path, against 16.7 % (1x) to 0.7 % (1.5x)
    at the median (benchmarks/results/deadline.md), at the cost of a smaller subnet near 1x.
    ``tail=False`` predicts at the median.

    ``model`` is anything with ``next_step_ms(subnet) -> ms`` (a :class:`LatencyModel`); with a
    deadline and no model, one is calibrated for this batch size (cached).  ``clock`` returns
    seconds (inject one for deterministic tests).
    """
    cnet = as_compact(net)
    cnet._check_input(x)
    if deadline_ms is not None and not deadline_ms > 0:
        raise ValueError(f"deadline_ms must be > 0, got {deadline_ms!r}")
    if budget_macs is not None and (isinstance(budget_macs, bool) or not budget_macs > 0):
        raise ValueError(f"budget_macs must be > 0, got {budget_macs!r}")
    macs = _macs_of(net, cnet)
    step_macs = [macs[0]] + [b - a for a, b in zip(macs, macs[1:])]
    if deadline_ms is not None and model is None:

        model = calibrate(cnet, batch=int(x.shape[0]))

    start = clock()
    session = cnet.start(x)
    first = clock()
    records = [StepRecord(1, model.next_step_ms(0) if model is not None else None, 1e3 * (first - start), macs[0])]
    used, stopped_by = macs[0], "largest"
    # Load awareness: if this call's steps run slower than calibrated (another process holds a
    # core, caches are cold), scale every later prediction by the slowest ratio seen so far.
    slowdown = 1.0
    if records[0].predicted_ms:
        slowdown = max(1.0, records[0].actual_ms / records[0].predicted_ms)
    while session.can_step():
        k = session.subnet
        if budget_macs is not None and used + step_macs[k] > budget_macs:
            stopped_by = "budget"
            break
        predicted = remaining = median = None
        if deadline_ms is not None:
            median = float(model.next_step_ms(k))
            base = median
            if tail and callable(getattr(model, "next_step_tail_ms", None)):
                base = max(median, float(model.next_step_tail_ms(k)))
            predicted = base * slowdown
            remaining = deadline_ms - 1e3 * (clock() - start)
            if predicted > remaining:
                stopped_by = "deadline"
                break
        t0 = clock()
        session.step()
        records.append(StepRecord(k + 1, predicted, 1e3 * (clock() - t0), step_macs[k], remaining))
        used += step_macs[k]
        if median:
            slowdown = max(slowdown, records[-1].actual_ms / median)
    elapsed = 1e3 * (clock() - start)
    return PredictResult(session.logits, session.subnet, elapsed, session.subnet - 1, used, deadline_ms,
                         budget_macs, records, stopped_by)
