"""Wall-clock timing that survives a noisy machine: warm-up, interleaved configurations, medians.

DESIGN.md ("Speed facts"): medians drift up to 16 % between runs minutes apart while ratios hold,
so configurations are timed round-robin (one run of each per round, the order rotated every
round) rather than one after another, and reported as median, min and max.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch

from dyninfer.runtime.session import Session


class SelfTimed:
    """A configuration that times its own parts: ``fn()`` returns per-part durations in seconds."""

    def __init__(self, fn: Callable[[], Sequence[float]]):
        self.fn = fn


def summarize(samples_ms: Sequence[float]) -> dict:
    """median / min / max / mean of a list of milliseconds, plus the number of runs."""
    if not samples_ms:
        raise ValueError("no samples to summarize")
    return {"median_ms": statistics.median(samples_ms), "min_ms": min(samples_ms), "max_ms": max(samples_ms),
            "mean_ms": statistics.fmean(samples_ms), "runs": len(samples_ms)}


@contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (None: leave as is); restores the old value."""
    old = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def interleaved(configs: Mapping[str, Callable[[], object] | SelfTimed], *, repeats: int = 20, warmup: int = 3,
                threads: int | None = None, grad: bool = False) -> dict[str, list]:
    """Time every configuration ``repeats`` times, round-robin, after ``warmup`` untimed calls each,
    in inference mode (``grad=True``: with autograd, to time training steps).

    Returns name -> list of samples in ms; a :class:`SelfTimed` configuration gives, per run, the
    list of its parts' times in ms.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    names = list(configs)
    samples: dict[str, list] = {name: [] for name in names}
    clock = time.perf_counter
    with num_threads(threads), (contextlib.nullcontext() if grad else torch.inference_mode()):
        for _ in range(warmup):
            for name in names:
                f = configs[name]
                f.fn() if isinstance(f, SelfTimed) else f()
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                f = configs[name]
                if isinstance(f, SelfTimed):
                    samples[name].append([1e3 * t for t in f.fn()])
                else:
                    start = clock()
                    f()
                    samples[name].append(1e3 * (clock() - start))
    return samples


def session_path(net, x: torch.Tensor) -> SelfTimed:
    """Self-timed run of the whole stepping path: start (subnet 1), then every step to the largest."""

    clock = time.perf_counter

    def run() -> list[float]:
        start = clock()
        session = Session(net, x, 1)
        times = [clock() - start]
        for _ in range(net.num_subnets - 1):
            start = clock()
            session.step()
            times.append(clock() - start)
        return times

    return SelfTimed(run)
