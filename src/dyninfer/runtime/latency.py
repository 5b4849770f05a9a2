"""Per-step latency model, calibrated on this machine at one batch size and thread count.

``model = calibrate(net, batch=1)`` times the session start (subnet 1) and every step k -> k+1,
plus every subnet from scratch, and keeps medians (and each step's 95th percentile, for a
controller that must rarely be late).  Models are cached in memory and, with
``cache_dir``, on disk, keyed by (net fingerprint, batch, threads); a disk entry measured on
another CPU or torch version is ignored and measured again.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyninfer.report import machine
from dyninfer.runtime.compaction import as_compact
from dyninfer.runtime.timing import interleaved, session_path

_MEMORY: dict[tuple, "LatencyModel"] = {}


@dataclass
class LatencyModel:
    """Predicted milliseconds: ``step_ms[0]`` starts subnet 1, ``step_ms[k]`` steps k -> k+1
    (medians); ``step_tail_ms`` the same steps' 95th percentiles (None: not measured)."""

    step_ms: list[float]
    scratch_ms: list[float]
    batch: int = 1
    threads: int = 1
    key: str = ""
    machine: dict = field(default_factory=dict)
    repeats: int = 0
    step_tail_ms: list[float] | None = None

    @property
    def num_subnets(self) -> int:
        return len(self.step_ms)

    def next_step_ms(self, subnet: int) -> float:
        """Predicted time to go from ``subnet`` to ``subnet + 1`` (``subnet=0``: start subnet 1)."""
        if not 0 <= subnet < self.num_subnets:
            raise ValueError(f"subnet must be in 0..{self.num_subnets - 1} to have a next step, got {subnet!r}")
        return self.step_ms[subnet]

    def next_step_tail_ms(self, subnet: int) -> float:
        """The 95th percentile of that step's calibrated times (the median if it was not kept)."""
        median = self.next_step_ms(subnet)
        return median if self.step_tail_ms is None else self.step_tail_ms[subnet]

    def path_ms(self, subnet: int) -> float:
        """Predicted time to reach ``subnet`` by stepping from the start."""
        if not 1 <= subnet <= self.num_subnets:
            raise ValueError(f"subnet must be in 1..{self.num_subnets}, got {subnet!r}")
        return float(sum(self.step_ms[:subnet]))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyModel":
        return cls(**{k: data[k] for k in ("step_ms", "scratch_ms", "batch", "threads", "key", "machine", "repeats")},
                   step_tail_ms=data.get("step_tail_ms"))


def _machine() -> dict:

    m = machine()
    return {"cpu": m.get("cpu"), "cores": m.get("cores"), "torch": m.get("torch")}


def calibrate(net, batch: int = 1, *, threads: int | None = None, repeats: int = 21, warmup: int = 3,
              cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> LatencyModel:
    """Measure (or fetch from cache) the latency model of ``net`` at ``batch`` and ``threads``.

    ``threads=None`` uses torch's current setting.  ``refresh=True`` measures again.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    cnet = as_compact(net)
    threads = torch.get_num_threads() if threads is None else threads
    key = (cnet.fingerprint(), batch, threads)
    path = Path(cache_dir) / f"latency-{key[0]}-b{batch}-t{threads}.json" if cache_dir is not None else None
    if not refresh:
        if key in _MEMORY:
            return _MEMORY[key]
        if path is not None and path.exists():
            try:
                model = LatencyModel.from_dict(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError):
                model = None  # unreadable cache entry: measure again
            if model is not None and model.machine == _machine() and model.key == key[0]:
                _MEMORY[key] = model
                return model
    x = torch.randn(batch, *cnet.input_shape, generator=torch.Generator().manual_seed(0))
    configs = {f"scratch{k}": (lambda k=k: cnet(x, subnet=k)) for k in range(1, cnet.num_subnets + 1)}
    configs["path"] = session_path(cnet, x)
    samples = interleaved(configs, repeats=repeats, warmup=warmup, threads=threads)
    steps = [statistics.median(col) for col in zip(*samples["path"])]
    tails = [sorted(col)[min(len(col) - 1, math.ceil(0.95 * len(col)) - 1)] for col in zip(*samples["path"])]
    scratch = [statistics.median(samples[f"scratch{k}"]) for k in range(1, cnet.num_subnets + 1)]
    model = LatencyModel(steps, scratch, batch, threads, key[0], _machine(), repeats, tails)
    _MEMORY[key] = model
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(model.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
    return model


def clear_cache() -> None:
    """Forget every model calibrated in this process (disk caches are kept)."""
    _MEMORY.clear()
