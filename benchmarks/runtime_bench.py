"""Real speed of the inference runtime: compacted subnets vs plain modules, steps, stepping path.

Times stepping run directories (made by `dyninfer construct` / `dyninfer demo`) and, so that
speed can be judged apart from training, zoo models with uniform-width tags: subnet k owns the
first k/N of every layer's channels (25/50/75/100 % for N=4, the setting of DESIGN.md's speed
facts; weights untrained, which does not change latency).  Each net is timed with
:func:`dyninfer.runtime.bench.run_bench` (interleaved configurations, median/min/max, both
layouts, batch 1 and 128, 1 and 2 threads) and the results go to
benchmarks/results/runtime_bench.{md,json}.

    python benchmarks/runtime_bench.py                       # default synthetic nets (+ runs/demo if present)
    python benchmarks/runtime_bench.py runs/demo --synthetic lenet-3c1l:3,32,32:4 --repeats 30

Run it alone on the machine: anything else running skews every number.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from dyninfer import models, report
from dyninfer.nn.tagged import TaggedNet
from dyninfer.runtime import bench
from dyninfer.cli.runtime import load_run
from dyninfer.runtime.compaction import as_compact
from dyninfer.runtime.session import Session
from dyninfer.runtime.timing import num_threads

ROOT = Path(__file__).resolve().parent
DEFAULT_SYNTHETIC = ["lenet-5:1,28,28:4", "lenet-3c1l:3,32,32:4", "vgg-16:3,32,32:4", "resnet-20:3,32,32:4"]
# issue targets: compacted subnet <= 1.05 x a plain module of its shapes; stepping path 1..N <= 1.0 x
# (batch 128) / 1.3 x (batch 1) one from-scratch pass of subnet N
TARGETS = {"compact_over_plain": 1.05, "path": {1: 1.3, 128: 1.0}}


def uniform_net(name: str, shape: tuple[int, int, int], subnets: int) -> TaggedNet:
    """Zoo model whose subnet k holds the first ceil(k C / N) channels of every tag group (a
    residual stream is one group)."""
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, expansion=1.0, input_shape=shape)
    net = TaggedNet(model, subnets, shape)
    for g in range(net.num_groups):
        c = net.group_widths[g]
        position = torch.arange(c)
        net.tags(g).copy_(torch.clamp((position * subnets) // c + 1, max=subnets))
    return net.eval()


def profile(net, batch: int, runs: int = 20, top: int = 6) -> str:
    """Where the time goes: torch.profiler over the stepping path 1..N and over one from-scratch
    pass of subnet N (single thread), the ops taking the most self CPU time per run."""
    cnet = as_compact(net)
    x = torch.randn(batch, *cnet.input_shape, generator=torch.Generator().manual_seed(0))

    def path():
        session = Session(cnet, x, 1)
        for _ in range(cnet.num_subnets - 1):
            session.step()

    def scratch():
        cnet(x, subnet=cnet.num_subnets)

    lines = []
    with torch.inference_mode():
        for name, fn in (("path 1..N", path), ("from scratch N", scratch)):
            for _ in range(3):
                fn()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    fn()
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events) / runs / 1e3
            rows = [(e.key, f"{e.count / runs:.0f}", f"{e.self_cpu_time_total / runs / 1e3:.3f}",
                     f"{100 * e.self_cpu_time_total / max(1e-9, sum(v.self_cpu_time_total for v in events)):.0f}")
                    for e in events[:top]]
            lines += [f"{name}, batch {batch}: {total:.3f} ms of op self time per run "
                      f"({sum(e.count for e in events) / runs:.0f} ops)", "",
                      report.markdown_table(["op", "calls per run", "self ms per run", "% of self time"], rows), ""]
    return "\n".join(lines)


def parse_synthetic(spec: str) -> tuple[str, tuple[int, int, int], int]:
    try:
        name, shape, n = spec.split(":")
        dims = tuple(int(v) for v in shape.split(","))
        if len(dims) != 3:
            raise ValueError
        return name, dims, int(n)  # type: ignore[return-value]
    except ValueError:
        raise SystemExit(f"--synthetic takes MODEL:C,H,W:N like lenet-3c1l:3,32,32:4, got {spec!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="stepping run directories (default: runs/demo when it exists)")
    parser.add_argument("--synthetic", action="append", default=None,
                        help=f"MODEL:C,H,W:N uniform-width nets (default: {' '.join(DEFAULT_SYNTHETIC)})")
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--profile", action="store_true",
                        help="also profile the stepping path and subnet N from scratch (1 thread, each batch)")
    args = parser.parse_args(argv)
    batches = [int(v) for v in args.batches.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    command = shlex.join(["python", "benchmarks/runtime_bench.py"] + (sys.argv[1:] if argv is None else argv))
    machine = report.machine()
    print(f"{command}\nmachine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}", flush=True)

    jobs = []
    runs = args.runs or ([str(ROOT.parent / "runs" / "demo")] if (ROOT.parent / "runs" / "demo" / "run.json").exists()
                         else [])
    for run in runs:
        jobs.append((f"run {run}", lambda run=run: load_run(run)[0]))
    specs = args.synthetic if args.synthetic is not None else DEFAULT_SYNTHETIC
    for spec in ([] if specs == ["none"] else specs):  # `--synthetic none`: stepping runs only
        name, shape, n = parse_synthetic(spec)
        jobs.append((f"{name} {'x'.join(map(str, shape))}, {n} uniform-width subnets",
                     lambda name=name, shape=shape, n=n: uniform_net(name, shape, n)))

    results, sections = [], []
    for title, build in jobs:
        start = time.perf_counter()
        print(f"{title}:", flush=True)
        result = bench.run_bench(build(), batches=batches, threads=threads, repeats=args.repeats,
                                 warmup=args.warmup, progress=True)
        result["title"] = title
        result["seconds"] = time.perf_counter() - start
        results.append(result)
        sections.append(bench.markdown(result, title=title, level=2, machine=False))
        if args.profile:
            with num_threads(1):
                sections += ["### Where the time goes (torch.profiler, 1 thread)", ""] + [
                    profile(build(), b) for b in batches]
        for s in result["settings"]:
            r = s["ratios"]
            print(f"  batch {s['batch']}, {s['threads']} thr: latency/largest "
                  + " ".join(f"{v:.2f}" for v in r["subnet_over_largest"]) + " vs MACs "
                  + " ".join(f"{v:.2f}" for v in r["mac_ratio"])
                  + f"; compact/plain {min(r['compact_over_plain']):.2f}-{max(r['compact_over_plain']):.2f}"
                  + f"; path/largest {r['path_over_fastest_largest']:.2f}", flush=True)

    target_rows = []
    for result in results:
        for s in result["settings"]:
            r, limit = s["ratios"], TARGETS["path"].get(s["batch"])
            worst = max(r["compact_over_plain"])
            path = r["path_over_fastest_largest"]
            target_rows.append((result["title"], s["batch"], s["threads"], f"{worst:.2f}",
                                "yes" if worst <= TARGETS["compact_over_plain"] else "no", f"{path:.2f}",
                                "-" if limit is None else f"{limit:.1f}",
                                "-" if limit is None else ("yes" if path <= limit else "no")))
    targets = report.markdown_table(["net", "batch", "threads", "worst compacted/plain", "<= 1.05",
                                     "path 1..N / from-scratch N", "target", "met"], target_rows)
    text = "\n".join(["# Runtime benchmark", "", f"Command: `{command}`", "",
                      f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
                      f"python {machine['python']}", "",
                      "Latencies in ms, median of the runs (min-max), each configuration in its faster layout; "
                      "configurations interleaved round-robin. Pruned (zero) weights inside dense blocks cost "
                      "like live ones.", "", "## Speed targets", "", targets, ""] + sections)
    md, js = report.write(args.out, "runtime_bench", text, {"command": command, "machine": machine,
                                                            "results": results})
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
