"""Per-layer latency table: milliseconds of every layer of a tagged network at a grid of channel
counts, measured on this device at one batch size and thread count.

``predict(counts)`` (channels per tag group) sums each layer's time, interpolated bilinearly in
(input channels, output channels), plus a constant for everything the table does not time (post
ops, adds, pooling, call overhead): the measured full network minus the table's full-width sum.
Tables are cached on disk, keyed by the network's layer shapes, batch, threads, CPU and torch
version, so choosing widths by latency costs one measurement per device.
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dyninfer.nn.tagged import TaggedNet
from dyninfer.report import machine
from dyninfer.runtime.timing import interleaved, num_threads, summarize

__all__ = ["LatencyTable", "build_table", "chunk", "full_dense", "grid", "measured_fractions"]


def chunk(width: int, multiple: int) -> int:
    """A group's rounding step: ``multiple``, but never more than 1/8 of the group's width (LeNet's
    6-channel layer moves by 1, a 16-channel one by 2, anything of 64 or more by 8 when multiple=8)."""
    return max(1, min(multiple, width // 8))


def grid(width: int, multiple: int) -> list[int]:
    """Channel counts the table measures: multiples of the group's step up to ``width``, and ``width``."""
    step = chunk(width, multiple)
    points = list(range(step, width, step)) + [width]
    return sorted(set(p for p in points if p >= 1))


def _interp(points: list[int], values: list[list[float]], cin: float, cout: float) -> float:
    """Bilinear interpolation on the (in, out) grid ``points`` x ``points`` (clamped at the ends)."""
    def bracket(v: float, axis: list[int]) -> tuple[int, int, float]:
        if v <= axis[0]:
            return 0, 0, 0.0
        if v >= axis[-1]:
            last = len(axis) - 1
            return last, last, 0.0
        hi = next(i for i, p in enumerate(axis) if p >= v)
        lo = hi - 1
        return lo, hi, (v - axis[lo]) / (axis[hi] - axis[lo])
    return 0.0 if not values else _bilinear(values, *bracket(cin, points[0]), *bracket(cout, points[1]))


def _bilinear(values, i0, i1, ti, o0, o1, to) -> float:
    top = values[i0][o0] * (1 - to) + values[i0][o1] * to
    bottom = values[i1][o0] * (1 - to) + values[i1][o1] * to
    return top * (1 - ti) + bottom * ti


@dataclass
class LatencyTable:
    """Per-layer grids of milliseconds; ``points[i] = (input counts, output counts)``."""

    points: list[list[list[int]]]
    ms: list[list[list[float]]]
    overhead_ms: float
    batch: int
    threads: int
    key: str
    machine: dict

    def layer_ms(self, net: TaggedNet, counts: Sequence[int]) -> list[float]:
        out = []
        for i in range(net.num_hidden + 1):
            src = net.layer_source[i]
            cin = net.input_shape[0] if src < 0 else counts[src]
            cout = net.classifier.weight.shape[0] if i == net.num_hidden else counts[net.layer_group[i]]
            out.append(_interp(self.points[i], self.ms[i], cin, cout))
        return out

    def predict(self, net: TaggedNet, counts: Sequence[int]) -> float:
        """Predicted milliseconds of the full-rule subnet with ``counts`` channels per tag group."""
        return sum(self.layer_ms(net, counts)) + self.overhead_ms

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)


def _layer_shapes(net: TaggedNet) -> list[dict]:
    shapes = []
    for i in range(net.num_hidden + 1):
        layer = net.classifier if i == net.num_hidden else net.layers[i]
        entry = {"kind": type(layer).__name__, "weight": list(layer.weight.shape), "repeat": net.in_repeat[i]}
        if isinstance(layer, nn.Conv2d):
            entry.update(stride=list(layer.stride), padding=list(layer.padding), dilation=list(layer.dilation))
        shapes.append(entry)
    return shapes


def _time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@torch.no_grad()
def build_table(net: TaggedNet, *, batch: int = 1, threads: int | None = None, multiple: int = 8,
                repeats: int = 5, cache_dir: str | Path | None = None, progress: bool = False) -> LatencyTable:
    """Measure (or load from ``cache_dir``) the latency table of ``net``'s layers."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    threads = torch.get_num_threads() if threads is None else threads
    here = machine()
    ident = {"shapes": _layer_shapes(net), "input": list(net.input_shape), "batch": batch, "threads": threads,
             "multiple": multiple, "cpu": here.get("cpu"), "torch": here.get("torch")}
    key = hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=12).hexdigest()
    path = Path(cache_dir) / f"latency-table-{key}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            return LatencyTable(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            pass  # a damaged cache entry is measured again
    # Each layer's input spatial size, from one dry pass of the full network
    sizes: dict[int, tuple[int, ...]] = {}
    vals: list[torch.Tensor] = []
    for node in net.program:
        src = node.args[0] if node.args else None
        if node.op == "input":
            v = torch.zeros(1, *net.input_shape)
        elif node.op == "layer":
            sizes[node.index] = tuple(vals[src].shape[2:])
            v = net.layers[node.index](vals[src])  # BatchNorm keeps the shape
        elif node.op in ("map", "flatten"):
            v = net.maps[node.index](vals[src])
        elif node.op == "add":
            v = vals[node.args[0]] + vals[node.args[1]]
        else:
            break
        vals.append(v)
    points, ms = [], []
    with num_threads(threads):
        for i in range(net.num_hidden + 1):
            layer = net.classifier if i == net.num_hidden else net.layers[i]
            src = net.layer_source[i]
            ins = [net.input_shape[0]] if src < 0 else grid(net.widths()[src], multiple)
            outs = [layer.weight.shape[0]] if i == net.num_hidden else grid(net.widths()[net.layer_group[i]], multiple)
            table = []
            for cin in ins:
                row = []
                for cout in outs:
                    if isinstance(layer, nn.Conv2d):
                        x = torch.randn(batch, cin, *sizes[i]).contiguous(memory_format=torch.channels_last)
                        w = torch.randn(cout, cin, *layer.kernel_size).contiguous(memory_format=torch.channels_last)
                        b = torch.randn(cout)
                        row.append(_time(lambda: F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation),
                                         repeats))
                    else:
                        x = torch.randn(batch, cin * net.in_repeat[i])
                        w, b = torch.randn(cout, cin * net.in_repeat[i]), torch.randn(cout)
                        row.append(_time(lambda: F.linear(x, w, b), repeats))
                table.append(row)
            points.append([ins, outs])
            ms.append(table)
            if progress:
                print(f"  latency table: layer {i + 1}/{net.num_hidden + 1}", flush=True)
        full = net.widths()
        x = torch.randn(batch, *net.input_shape).contiguous(memory_format=torch.channels_last)
        module = full_dense(net).to(memory_format=torch.channels_last)
        measured = _time(lambda: module(x), repeats * 2)
    table = LatencyTable(points, ms, 0.0, batch, threads, key, here)
    table.overhead_ms = max(0.0, measured - sum(table.layer_ms(net, full)))
    if path is not None:
        table.save(path)
    return table


@torch.no_grad()
def measured_fractions(net: TaggedNet, *, batch: int, threads: int | None = None, repeats: int = 20) -> list[float]:
    """Each subnet's measured latency as a fraction of the full network's: its dense module (what
    ``export`` gives) and the full one timed round-robin on this device, medians."""
    x = torch.randn(batch, *net.input_shape, generator=torch.Generator().manual_seed(0))  # not the global RNG
    x = x.contiguous(memory_format=torch.channels_last)
    modules = {k: net.dense(k).to(memory_format=torch.channels_last) for k in range(1, net.num_subnets + 1)}
    modules["full"] = full_dense(net).to(memory_format=torch.channels_last)
    samples = interleaved({k: (lambda m=m: m(x)) for k, m in modules.items()}, repeats=repeats, warmup=3,
                          threads=threads)
    full = summarize(samples["full"])["median_ms"]
    return [summarize(samples[k])["median_ms"] / full for k in range(1, net.num_subnets + 1)]


def full_dense(net: TaggedNet) -> nn.Module:
    """The whole network as a plain module: every channel in subnet 1 of a copy, BatchNorm folded."""
    view = copy.deepcopy(net)
    for g in range(view.num_groups):
        view.tags(g).fill_(1)
    return view.dense(1)
