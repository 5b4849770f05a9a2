"""Deadline control: how often does `dyninfer.runtime.predict` finish after its deadline?

For a stepped network, calibrate the per-step latency model at batch 1, then answer a stream of
single test images with `predict(net, x, deadline_ms=d)` for several deadlines d (fractions of
the measured full stepping path), once on an otherwise idle machine and once while a second
process keeps one core busy (the calibration is NOT redone under load: that is the point).
Reports miss rate, overshoot p50/p99 (ms past the deadline, over the misses) and subnets reached.

    python benchmarks/deadline.py runs/stepping/lenet-5-cifar10-joint
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dyninfer import report
from dyninfer.runtime import predict
from dyninfer.cli.runtime import load_run
from dyninfer.runtime.latency import calibrate

ROOT = Path(__file__).resolve().parent
LOAD = "import time\nt = time.time()\nwhile time.time() - t < {seconds}:\n    sum(i * i for i in range(10000))\n"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def play(net, images: torch.Tensor, deadline_ms: float, model, tail: bool = False) -> dict:
    misses, overshoot, subnets, used = 0, [], [], []
    for x in images:
        result = predict(net, x.unsqueeze(0), deadline_ms=deadline_ms, model=model, tail=tail)
        subnets.append(result.subnet)
        used.append(result.time_ms)
        if result.time_ms > deadline_ms:
            misses += 1
            overshoot.append(result.time_ms - deadline_ms)
    return {"deadline_ms": deadline_ms, "policy": "tail" if tail else "median", "n": len(images),
            "miss_rate": misses / len(images),
            "overshoot_p50_ms": percentile(overshoot, 0.5), "overshoot_p99_ms": percentile(overshoot, 0.99),
            "mean_subnet": statistics.mean(subnets), "time_p50_ms": percentile(used, 0.5),
            "time_p99_ms": percentile(used, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--inputs", type=int, default=400)
    parser.add_argument("--fractions", default="0.5,1.0,1.25,1.5,2.0", help="deadlines as fractions of the full path")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: no OpenMP barrier to stall when another process holds a core)")
    parser.add_argument("--stem", default="deadline")
    args = parser.parse_args()
    command = "python " + shlex.join(sys.argv)
    print(command, flush=True)
    torch.set_num_threads(args.threads)
    net, meta = load_run(Path(args.run))
    torch.manual_seed(0)
    images = torch.randn(args.inputs, *net.input_shape)
    model = calibrate(net, batch=1, repeats=51)
    path_ms = sum(model.step_ms)
    fractions = [float(f) for f in args.fractions.split(",")]
    deadlines = [round(f * path_ms, 4) for f in fractions]
    play(net, images[:50], path_ms, model)  # warm-up: first calls pay one-off costs
    rows = []
    for condition in ("idle", "one core loaded"):
        load = None
        if condition != "idle":
            load = subprocess.Popen([sys.executable, "-c", LOAD.format(seconds=600)])
            time.sleep(1.0)
        try:
            for f, d in zip(fractions, deadlines):
                for tail in (False, True):  # both policies on the same inputs, one after the other
                    rows.append({"condition": condition, "fraction": f, **play(net, images, d, model, tail)})
                    print(rows[-1], flush=True)
        finally:
            if load is not None:
                load.kill()
    def target(r):  # idle, deadlines from 1x to 2x the path: <= 1 % late, p99 overshoot <= 10 % of the deadline
        if r["condition"] != "idle" or not 1.0 <= r["fraction"] <= 2.0:
            return "-"
        return "yes" if r["miss_rate"] <= 0.01 and r["overshoot_p99_ms"] <= 0.1 * r["deadline_ms"] else "no"

    table = report.markdown_table(
        ["condition", "policy", "deadline (ms)", "x path", "miss rate", "overshoot p50 / p99 (ms)", "mean subnet",
         "time p50 / p99 (ms)", "target met"],
        [(r["condition"], r["policy"], f"{r['deadline_ms']:.3f}", f"{r['fraction']:.2f}", f"{100 * r['miss_rate']:.1f} %",
          f"{r['overshoot_p50_ms']:.3f} / {r['overshoot_p99_ms']:.3f}", f"{r['mean_subnet']:.2f}",
          f"{r['time_p50_ms']:.3f} / {r['time_p99_ms']:.3f}", target(r)) for r in rows])
    machine = report.machine()
    md = (f"# Deadline control at batch 1\n\nCommand: `{command}`\n\nMachine: {machine}\n\n"
          f"Threads: {args.threads}. Net: {args.run} ({meta.get('model')} on {meta.get('data')}), calibrated step latencies (ms): "
          + ", ".join(f"{v:.3f}" for v in model.step_ms) + f"; full path {path_ms:.3f} ms.\n\n{table}\n\n"
          "A miss is an answer returned after its deadline; overshoot statistics are over the misses. "
          "Subnet 1 always answers, so a deadline shorter than subnet 1's latency "
          f"({model.step_ms[0]:.3f} ms calibrated) is missed by design. "
          "The latency model was calibrated once on the idle machine and not updated under load. Policy "
          "\"median\" predicts each step at its calibrated median (scaled by the slowdown seen in the call); "
          "\"tail\" (`predict(..., tail=True)`) at no less than its calibrated 95th percentile. Target: on the "
          "idle machine, at most 1 % late answers and a p99 overshoot within 10 % of the deadline, at every "
          "deadline from 1x to 2x the full path.\n")
    report.write(ROOT / "results", args.stem, md, {"command": command, "machine": machine, "run": args.run,
                                                   "step_ms": model.step_ms, "rows": rows})
    print(md)


if __name__ == "__main__":
    main()
