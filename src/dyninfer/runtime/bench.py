"""Measured speed of a stepping network: every subnet from scratch, every step, the whole path.

For each (batch, threads) setting, all configurations are timed interleaved (timing.py):

* ``compact``: subnet k from scratch through :class:`CompactNet`, NCHW and channels_last;
* ``plain``: the fair baseline, a plain ``nn.Sequential`` with exactly subnet k's layer shapes
  (:func:`dyninfer.export.subnet`), NCHW and channels_last;
* ``path``: a session from subnet 1 stepping to N, each step timed, in both layouts.

Each is reported in its faster layout (by median), beside the MAC ratios, with three ratios:
subnet k / largest subnet (vs its MAC ratio), compacted / plain module, and the stepping path /
the fastest from-scratch largest subnet; and, per subnet, which from-scratch execution was faster
here: one pass of dense rectangles, or the chain of step blocks 1..k (the triangle; what
:meth:`SteppingNet.choose_scratch` keeps).
"""

from __future__ import annotations

from typing import Sequence

import torch

from dyninfer import cost, export
from dyninfer.report import machine, markdown_table
from dyninfer.runtime.compaction import as_compact
from dyninfer.runtime.timing import interleaved, session_path, summarize

LAYOUTS = {"nchw": False, "channels_last": True}


def _check_list(name: str, values: Sequence[int]) -> list[int]:
    out = list(values)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"{name} must be a non-empty list of ints >= 1, got {values!r}")
    return out


def _best(per_layout: dict[str, dict]) -> dict:
    layout = min(per_layout, key=lambda name: per_layout[name]["median_ms"])
    return {**per_layout[layout], "layout": layout}


def bench_setting(net, batch: int, threads: int, *, repeats: int = 20, warmup: int = 5,
                  layouts: Sequence[str] = tuple(LAYOUTS)) -> dict:
    """One (batch, threads) setting: scratch (compact and plain), steps and path, interleaved."""
    cnet = as_compact(net)
    n = cnet.num_subnets
    bad = [name for name in layouts if name not in LAYOUTS]
    if bad or not layouts:
        raise ValueError(f"layouts must be a non-empty subset of {tuple(LAYOUTS)}, got {list(layouts)}")
    x = torch.randn(batch, *cnet.input_shape, generator=torch.Generator().manual_seed(0))
    configs = {}
    for layout in layouts:
        cl = LAYOUTS[layout]
        variant = cnet.with_options(channels_last=cl)
        xin = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()
        for k in range(1, n + 1):
            plain = export.subnet(cnet, k)
            if cl:
                plain = plain.to(memory_format=torch.channels_last)
            configs[f"compact/{layout}/{k}"] = lambda v=variant, k=k, xin=xin: v(xin, subnet=k)
            configs[f"plain/{layout}/{k}"] = lambda m=plain, xin=xin: m(xin)
        configs[f"path/{layout}"] = session_path(variant, xin)
    samples = interleaved(configs, repeats=repeats, warmup=warmup, threads=threads)

    scratch = []
    for k in range(1, n + 1):
        row = {}
        for kind in ("compact", "plain"):
            per = {layout: summarize(samples[f"{kind}/{layout}/{k}"]) for layout in layouts}
            row[kind] = {**per, "best": _best(per)}
        scratch.append(row)
    paths = {}
    for layout in layouts:
        runs = samples[f"path/{layout}"]
        paths[layout] = {"total": summarize([sum(r) for r in runs]),
                         "steps": [summarize(list(col)) for col in zip(*runs)]}
    best_layout = min(paths, key=lambda name: paths[name]["total"]["median_ms"])
    path = {**paths[best_layout], "layout": best_layout, "per_layout": paths}

    macs = cnet.macs()
    full = scratch[-1]["compact"]["best"]["median_ms"]
    fastest_full = min(scratch[-1]["compact"]["best"]["median_ms"], scratch[-1]["plain"]["best"]["median_ms"])
    ratios = {
        "subnet_over_largest": [row["compact"]["best"]["median_ms"] / full for row in scratch],
        "mac_ratio": [m / macs[-1] for m in macs],
        "compact_over_plain": [row["compact"]["best"]["median_ms"] / row["plain"]["best"]["median_ms"]
                               for row in scratch],
        "path_over_fastest_largest": path["total"]["median_ms"] / fastest_full,
        "steps_to_k_over_scratch_k": [
            sum(s["median_ms"] for s in path["steps"][:k]) / scratch[k - 1]["compact"]["best"]["median_ms"]
            for k in range(1, n + 1)],
    }
    # what SteppingNet.choose_scratch keeps: the chain of steps where it beat the rectangles (k >= 2)
    ratios["faster_from_scratch"] = ["chain" if k > 0 and r < 1 else "rectangle"
                                     for k, r in enumerate(ratios["steps_to_k_over_scratch_k"])]
    return {"batch": batch, "threads": threads, "repeats": repeats, "warmup": warmup,
            "scratch": scratch, "path": path, "ratios": ratios}


def scratch_times(setting: dict) -> tuple[list[float], list[float]]:
    """Per subnet, from one :func:`bench_setting`: the median ms of one pass of its dense
    rectangles (best layout), and of its chain of step blocks (the path's steps 1..k)."""
    steps = [s["median_ms"] for s in setting["path"]["steps"]]
    rectangles = [entry["compact"]["best"]["median_ms"] for entry in setting["scratch"]]
    return rectangles, [sum(steps[:k]) for k in range(1, len(rectangles) + 1)]


def run_bench(net, *, batches: Sequence[int] = (1, 128), threads: Sequence[int] = (1, 2), repeats: int = 20,
              warmup: int = 5, layouts: Sequence[str] = tuple(LAYOUTS), progress: bool = False) -> dict:
    """All settings (batch x threads) for ``net``; a JSON-ready dict (see :func:`markdown`)."""
    batches, threads = _check_list("batches", batches), _check_list("threads", threads)
    cnet = as_compact(net)
    fractions = None
    if hasattr(net, "mac_fractions"):
        fractions = [float(f) for f in net.mac_fractions()]
    # what the timed from-scratch pass (the dense rectangles) multiplies, whatever a net's saved
    # scratch_execution says
    scratch = [cost.macs(export.subnet(cnet, k), cnet.input_shape) for k in range(1, cnet.num_subnets + 1)]
    settings = []
    for t in threads:
        for b in batches:
            if progress:
                print(f"  timing batch {b}, {t} thread(s), {repeats} runs each ...", flush=True)
            settings.append(bench_setting(cnet, b, t, repeats=repeats, warmup=warmup, layouts=layouts))
    return {
        "machine": machine(),
        "net": {"num_subnets": cnet.num_subnets, "input_shape": list(cnet.input_shape), "macs": cnet.macs(),
                "scratch_macs": scratch,
                "mac_fraction_of_original": fractions, "block_density": cnet.block_density(),
                "channels_per_step": (cnet.channels_per_step() if hasattr(cnet, "channels_per_step") else
                                      [[b - a for a, b in zip(layer.bounds, layer.bounds[1:])]
                                       for layer in cnet.layers]),
                "note": "pruned (zero) weights inside the dense blocks are computed like live ones"},
        "settings": settings,
    }


def markdown(result: dict, title: str = "Runtime benchmark", level: int = 1, machine: bool = True) -> str:
    """Human-readable tables of a :func:`run_bench` result (``level``: heading depth of the title)."""
    net, m = result["net"], result["machine"]
    lines = [f"{'#' * level} {title}", ""]
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    if machine:
        lines += [f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}, "
                  f"python {m.get('python')}", ""]
    lines += [f"Subnets: {net['num_subnets']}, input {tuple(net['input_shape'])}; MACs per sample on the "
              "incremental path (live weights): " + ", ".join(f"{v:,}" for v in net["macs"])
              + ("" if not net.get("scratch_macs") else "; from scratch as dense rectangles (the pass timed below): "
                 + ", ".join(f"{v:,}" for v in net["scratch_macs"])) + ".",
              f"Block density (non-zero weights in stored blocks, per layer): "
              + ", ".join(f"{d:.3f}" for d in net["block_density"]) + f" ({net['note']}).", ""]
    for s in result["settings"]:
        n = len(s["scratch"])
        r = s["ratios"]
        lines += [f"{'#' * (level + 1)} batch {s['batch']}, {s['threads']} thread(s), "
                  f"median of {s['repeats']} runs (min-max)", ""]
        rows = []
        for k in range(n):
            c, p = s["scratch"][k]["compact"]["best"], s["scratch"][k]["plain"]["best"]
            st = s["path"]["steps"][k]
            rows.append([k + 1, f"{c['median_ms']:.3f} ({c['min_ms']:.3f}-{c['max_ms']:.3f}) {c['layout']}",
                         f"{p['median_ms']:.3f} ({p['min_ms']:.3f}-{p['max_ms']:.3f}) {p['layout']}",
                         f"{r['compact_over_plain'][k]:.2f}", f"{r['subnet_over_largest'][k]:.3f}",
                         f"{r['mac_ratio'][k]:.3f}",
                         f"{st['median_ms']:.3f} ({st['min_ms']:.3f}-{st['max_ms']:.3f})",
                         f"{r['steps_to_k_over_scratch_k'][k]:.2f}", r["faster_from_scratch"][k]])
        lines.append(markdown_table(
            ["subnet", "compacted ms", "plain module ms", "compacted/plain", "latency/largest", "MACs/largest",
             "step ms (k=1: start)", "path to k / scratch k", "faster from scratch"], rows))
        t = s["path"]["total"]
        lines += ["", f"Whole stepping path 1..{n} ({s['path']['layout']}): {t['median_ms']:.3f} ms "
                      f"({t['min_ms']:.3f}-{t['max_ms']:.3f}) = {r['path_over_fastest_largest']:.2f} x the fastest "
                      f"from-scratch largest subnet.", ""]
    return "\n".join(lines)


__all__ = ["run_bench", "bench_setting", "markdown", "LAYOUTS"]
