"""Anytime inference against a trace of available compute: incremental vs select-then-restart.

A trace is a CSV with columns ``time_ms, macs_per_ms``: from each row's time on, the device can
do that many MACs per millisecond, until the next row (the last rate holds forever).  Inputs
arrive one after another, each with a deadline; every MAC a subnet needs is taken from the
trace, so time follows from compute (exact per-sample MACs of :meth:`CompactNet.macs`).

* incremental: subnet 1 at once, then step k -> k+1 whenever the next step's MACs fit before
  the deadline at the rate seen when deciding (re-deciding at each rate change); a step the
  deadline cuts off is wasted.
* restart (select-then-restart, no reuse): pick the largest subnet that fits at the rate seen
  at arrival; whenever the rate changes, pick again and start over from scratch if that gives a
  larger subnet or the current one can no longer finish (the work so far is wasted).

Both decide with the same knowledge (the current rate), so the difference is reuse.
"""

from __future__ import annotations

import bisect
import csv
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dyninfer.report import markdown_table
from dyninfer.runtime.compaction import as_compact


@dataclass
class Trace:
    """Piecewise-constant compute: rate ``rates[i]`` MACs/ms from ``times[i]`` ms on."""

    times: list[float]
    rates: list[float]

    def __post_init__(self) -> None:
        if not self.times or len(self.times) != len(self.rates):
            raise ValueError("a trace needs at least one (time_ms, macs_per_ms) row, with one rate per time")
        if self.times[0] != 0:
            raise ValueError(f"a trace must start at time_ms 0, got {self.times[0]}")
        if any(b <= a for a, b in zip(self.times, self.times[1:])):
            raise ValueError("trace times must be strictly increasing")
        bad = [r for r in self.rates if not (r >= 0 and math.isfinite(r))]
        if bad:
            raise ValueError(f"macs_per_ms must be finite and >= 0, got {bad[:3]}")

    @property
    def span_ms(self) -> float:
        """Time of the last change (the last rate holds after it)."""
        return self.times[-1]

    def mean_rate(self) -> float:
        if len(self.times) == 1:
            return self.rates[0]
        total = sum(r * (b - a) for r, a, b in zip(self.rates, self.times, self.times[1:]))
        return total / self.span_ms

    def _segment(self, t: float) -> int:
        return max(0, bisect.bisect_right(self.times, t) - 1)

    def rate_at(self, t: float) -> float:
        return self.rates[self._segment(t)]

    def next_change(self, t: float) -> float:
        i = self._segment(t) + 1
        return self.times[i] if i < len(self.times) else math.inf

    def work(self, t0: float, t1: float) -> float:
        """MACs available between ``t0`` and ``t1``."""
        total, t = 0.0, t0
        while t < t1:
            end = min(self.next_change(t), t1)
            total += self.rate_at(t) * (end - t)
            t = end
        return total

    def finish(self, t0: float, macs: float) -> float:
        """When ``macs`` MACs started at ``t0`` are done (inf if the compute never suffices)."""
        t, left = t0, float(macs)
        while True:
            rate, end = self.rate_at(t), self.next_change(t)
            if rate > 0 and t + left / rate <= end:
                return t + left / rate
            if math.isinf(end):
                return math.inf
            left -= rate * (end - t)
            t = end


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a ``time_ms,macs_per_ms`` CSV (header required)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist; write one with columns time_ms,macs_per_ms "
                                f"or create an example with --make-trace")
    times, rates = [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [h.strip() for h in (reader.fieldnames or [])]
        if "time_ms" not in fields or "macs_per_ms" not in fields:
            raise ValueError(f"trace {path} must have the columns time_ms,macs_per_ms; got {fields}")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): v for k, v in row.items() if k is not None}
            try:
                times.append(float(row["time_ms"]))
                rates.append(float(row["macs_per_ms"]))
            except (TypeError, ValueError):
                raise ValueError(f"trace {path}, line {line}: expected numbers, got {row}") from None
    return Trace(times, rates)


def make_trace(path: str | os.PathLike | None = None, *, high: float, low: float | None = None,
               duration_ms: float = 1000.0, segment_ms: float = 25.0, seed: int = 0) -> Trace:
    """Example trace: random levels between ``low`` and ``high`` MACs/ms held for ~``segment_ms``,
    with occasional drops to ``low`` (a background job taking the device); written to ``path``."""
    if not high > 0:
        raise ValueError(f"high must be > 0 MACs/ms, got {high!r}")
    low = high / 10 if low is None else low
    if not 0 <= low <= high:
        raise ValueError(f"low must be in [0, high], got {low!r}")
    rng = random.Random(seed)
    times, rates, t = [], [], 0.0
    while t < duration_ms:
        times.append(round(t, 3))
        rates.append(round(low if rng.random() < 0.3 else rng.uniform(low, high), 3))
        t += max(1.0, rng.expovariate(1.0 / segment_ms))
    trace = Trace(times, rates)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["time_ms", "macs_per_ms"])
            w.writerows(zip(trace.times, trace.rates))
        os.replace(tmp, path)
    return trace


# ---------------------------------------------------------------------------- the two policies
def run_incremental(trace: Trace, macs: Sequence[int], t0: float, deadline: float) -> tuple[int, float, float]:
    """(subnet delivered or 0, MACs used by it, MACs wasted) for one input arriving at ``t0``."""
    end, t, k, wasted = t0 + deadline, t0, 0, 0.0
    n = len(macs)
    while k < n:
        cost = macs[k] - (macs[k - 1] if k else 0)
        if k > 0:  # subnet 1 starts at once; later steps only if they fit at the current rate,
            rate = trace.rate_at(t)  # else wait for the rate to change and decide again
            if rate <= 0 or t + cost / rate > end:
                t = trace.next_change(t)
                if t >= end:
                    break
                continue
        done = trace.finish(t, cost)
        if done > end:
            wasted += trace.work(t, end)
            break
        t, k = done, k + 1
    return k, float(macs[k - 1]) if k else 0.0, wasted


def run_restart(trace: Trace, macs: Sequence[int], t0: float, deadline: float) -> tuple[int, float, float]:
    """(subnet delivered or 0, MACs used by it, MACs wasted): select, restart on a rate change."""
    end, t, wasted = t0 + deadline, t0, 0.0

    def pick(now: float) -> int:
        rate = trace.rate_at(now)
        fits = [k for k in range(1, len(macs) + 1) if rate > 0 and now + macs[k - 1] / rate <= end]
        return fits[-1] if fits else 0

    k = pick(t) or 1  # nothing fits: try the smallest anyway
    left = float(macs[k - 1])
    while True:
        rate, change = trace.rate_at(t), min(trace.next_change(t), end)
        if rate > 0 and t + left / rate <= change:
            return k, float(macs[k - 1]), wasted
        left -= rate * (change - t)
        t = change
        if t >= end:
            return 0, 0.0, wasted + (macs[k - 1] - left)
        best = pick(t)
        rate = trace.rate_at(t)
        can_finish = rate > 0 and t + left / rate <= end
        if best > k or (best and not can_finish):
            wasted += macs[k - 1] - left
            k, left = best, float(macs[best - 1])


def simulate(trace: Trace, macs: Sequence[int], correct: torch.Tensor, deadlines: Sequence[float],
             inputs: int | None = None) -> dict:
    """Play ``inputs`` inputs (cycling over the rows of ``correct``, (samples, subnets) bool)
    through both policies for each deadline; inputs are spaced ``max(deadline, span / inputs)``."""
    correct = torch.as_tensor(correct, dtype=torch.bool)
    if correct.dim() != 2 or correct.shape[1] != len(macs):
        raise ValueError(f"correct must be (samples, {len(macs)}) booleans, got {tuple(correct.shape)}")
    if not deadlines or any(not d > 0 for d in deadlines):
        raise ValueError(f"deadlines must be positive milliseconds, got {list(deadlines)}")
    inputs = correct.shape[0] if inputs is None else int(inputs)
    if inputs < 1:
        raise ValueError(f"inputs must be >= 1, got {inputs}")
    table = correct.tolist()
    results = []
    for d in deadlines:
        spacing = max(d, trace.span_ms / inputs)
        row = {"deadline_ms": d, "inputs": inputs, "spacing_ms": spacing}
        for name, policy in (("incremental", run_incremental), ("restart", run_restart)):
            right = delivered = 0
            used = wasted = subnet_sum = 0.0
            histogram = [0] * (len(macs) + 1)
            for i in range(inputs):
                k, u, w = policy(trace, macs, i * spacing, d)
                histogram[k] += 1
                used += u
                wasted += w
                if k:
                    delivered += 1
                    subnet_sum += k
                    right += table[i % len(table)][k - 1]
            row[name] = {"accuracy": right / inputs, "answered": delivered / inputs,
                         "mean_subnet": subnet_sum / max(delivered, 1), "subnet_histogram": histogram,
                         "used_macs_per_input": used / inputs, "wasted_macs_per_input": wasted / inputs,
                         "wasted_fraction": wasted / max(used + wasted, 1e-12)}
        results.append(row)
    return {"deadlines": results, "macs": list(macs), "trace": {"rows": len(trace.times), "span_ms": trace.span_ms,
                                                                 "mean_macs_per_ms": trace.mean_rate()}}


def correctness(net, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(samples, subnets) bool: whether each subnet classifies each input correctly."""

    cnet = as_compact(net)
    out = []
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start:start + batch_size]
            y = labels[start:start + batch_size]
            run = cnet.start(x)
            cols = [run.logits.argmax(1) == y]
            while run.can_step():
                cols.append(run.step().argmax(1) == y)
            out.append(torch.stack(cols, dim=1))
    return torch.cat(out)


def default_deadlines(trace: Trace, macs: Sequence[int]) -> list[float]:
    """Deadlines around the time the largest subnet takes at the trace's mean rate."""
    base = macs[-1] / max(trace.mean_rate(), 1e-12)
    return [float(f"{base * f:.2g}") for f in (0.25, 0.5, 1.0, 2.0, 4.0)]


def markdown(result: dict) -> str:

    rows = []
    for r in result["deadlines"]:
        a, b = r["incremental"], r["restart"]
        rows.append([f"{r['deadline_ms']:g}", f"{100 * a['accuracy']:.2f}", f"{100 * b['accuracy']:.2f}",
                     f"{a['mean_subnet']:.2f}", f"{b['mean_subnet']:.2f}",
                     f"{100 * a['answered']:.1f}", f"{100 * b['answered']:.1f}",
                     f"{a['wasted_macs_per_input']:,.0f}", f"{b['wasted_macs_per_input']:,.0f}"])
    table = markdown_table(["deadline ms", "acc. incremental %", "acc. restart %", "subnet incr.", "subnet restart",
                            "answered incr. %", "answered restart %", "wasted MACs/input incr.",
                            "wasted MACs/input restart"], rows)
    lines = ["# Anytime inference on a compute trace", ""]
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    t = result["trace"]
    lines += [f"Trace: {t['rows']} rows over {t['span_ms']:g} ms, mean {t['mean_macs_per_ms']:,.0f} MACs/ms. "
              f"Subnet MACs: " + ", ".join(f"{m:,}" for m in result["macs"]) + ".",
              f"Labels: {result.get('labels', 'test set')}.", "", table, ""]
    return "\n".join(lines)


def plot(result: dict, trace: Trace, path: str | os.PathLike) -> Path:
    """Accuracy and wasted MACs per deadline for both policies, and the trace (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [r["deadline_ms"] for r in result["deadlines"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, style in (("incremental", "o-"), ("restart", "s--")):
        axes[0].plot(d, [100 * r[name]["accuracy"] for r in result["deadlines"]], style, label=name)
        axes[1].plot(d, [r[name]["wasted_macs_per_input"] for r in result["deadlines"]], style, label=name)
    axes[0].set(xscale="log", xlabel="deadline (ms)", ylabel="accuracy delivered (%)", title="accuracy")
    axes[1].set(xscale="log", xlabel="deadline (ms)", ylabel="wasted MACs per input", title="wasted work")
    times = trace.times + [trace.span_ms * 1.05 + 1]
    axes[2].step(times, trace.rates + trace.rates[-1:], where="post")
    axes[2].set(xlabel="time (ms)", ylabel="MACs per ms", title="available compute")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
