"""Widths by measured latency (issue 15): does a subnet chosen for a latency budget run within it?

For each batch size, the widths are chosen twice from one per-layer latency table: trusting the
table's prediction (``latency_checks=0``) and with the measured correction (the default: time the
chosen subnets, re-choose those over budget under a tighter target). Then both choices are timed
again, together and independently of the choice, interleaved with the full network.

    python benchmarks/nonuniform_latency.py                       # ResNet-20, CIFAR-10 shape
    python benchmarks/nonuniform_latency.py --data fashion-mnist --stem nonuniform_latency_fashion-mnist

The weights are the model's initial ones (latency does not depend on their values; which channels
a subnet keeps does, and is not what this measures). Writes benchmarks/results/<stem>.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from _bench import begin, finish, output_arguments
from dyninfer import data, models, report
from dyninfer.methods import nonuniform
from dyninfer.runtime.latency_table import full_dense
from dyninfer.runtime.timing import interleaved, summarize

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet-20")
    parser.add_argument("--data", default="cifar10", help="only its input shape and classes are used")
    parser.add_argument("--budgets", default="0.4,0.7,1.0")
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--checks", type=int, default=2, help="latency_checks of the corrected choice")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved runs of the final timing")
    output_arguments(parser, stem="nonuniform_latency_resnet20_cifar10")
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    out, command = begin(args, "nonuniform_latency.py", argv)  # the output folder before any work
    train_set, _ = data.load(args.data)
    shape, classes = train_set.input_shape, train_set.num_classes
    record: dict = {"command": command, "machine": report.machine(), "model": args.model, "data": args.data,
                    "threads": args.threads, "budgets": budgets, "batches": {}}
    started = time.perf_counter()
    for batch in batches:
        torch.manual_seed(0)
        model = models.create(args.model, num_classes=classes, input_shape=shape)
        cache = str(out / ".latency-cache")
        row: dict = {}
        chosen = {}
        for name, checks in (("table", 0), ("measured", args.checks)):
            t0 = time.perf_counter()
            try:
                chosen[name] = nonuniform.sample(model, budgets, by="latency", latency_batch=batch, cache_dir=cache,
                                                 latency_checks=checks)
            except ValueError as err:  # a budget this device cannot reach is a result, not a crash
                row[name] = {"error": str(err)}
                continue
            h = chosen[name].history
            row[name] = {"widths": [chosen[name].widths(k) for k in range(1, len(budgets) + 1)],
                         "predicted": h["predicted_cost"], "mac_fractions": chosen[name].mac_fractions(),
                         "checks": h.get("latency_checks", []), "seconds": time.perf_counter() - t0}
        if chosen:
            x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
            modules = {(name, k): nu.export(k).to(memory_format=torch.channels_last)
                       for name, nu in chosen.items() for k in range(1, nu.num_subnets + 1)}
            modules[("full",)] = full_dense(next(iter(chosen.values())).net).to(memory_format=torch.channels_last)
            samples = interleaved({key: (lambda m=m: m(x)) for key, m in modules.items()}, repeats=args.repeats)
            full = summarize(samples[("full",)])["median_ms"]  # the reference the budgets are fractions of
            row["full_ms"] = summarize(samples[("full",)])
            for name, nu in chosen.items():
                stats = [summarize(samples[(name, k)]) for k in range(1, nu.num_subnets + 1)]
                row[name]["retimed"] = [s["median_ms"] / full for s in stats]
                row[name]["retimed_ms"] = stats
        record["batches"][str(batch)] = row
        _save(out, args.stem, record)
    return finish(out, args.stem, record, _save, started)


def _save(out: Path, stem: str, record: dict) -> None:
    """Markdown + JSON of what has been measured so far (a late failure loses nothing)."""
    lines = [f"# Widths by measured latency, {record['model']} ({record['data']} input)", "",
             f"Command: `{record['command']}`", "",
             f"Machine: {record['machine'].get('cpu')}, {record['machine'].get('cores')} cores, "
             f"{record['threads']} threads, torch {record['machine'].get('torch')}.", ""]
    for batch, row in record["batches"].items():
        lines += [f"## Batch {batch}", "",
                  "| choice | subnet | budget | predicted by the table | measured when chosen (last round) | "
                  "measured again (median, interleaved) | within budget | MACs (%) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in row.items():
            if name == "full_ms":
                continue
            if "error" in r:
                lines.append(f"| {name} | - | - | not reachable: {r['error']} | | | | |")
                continue
            last = r["checks"][-1]["measured"] if r["checks"] else [float("nan")] * len(record["budgets"])
            retimed = r.get("retimed", [float("nan")] * len(record["budgets"]))
            for k, (b, p, m, t, f) in enumerate(zip(record["budgets"], r["predicted"], last, retimed,
                                                     r["mac_fractions"]), start=1):
                lines.append(f"| {name} | {k} | {b:.2f} | {p:.3f} | {m:.3f} | {t:.3f} | "
                             f"{'yes' if t <= b else f'no (+{100 * (t / b - 1):.1f} %)'} | {100 * f:.1f} |")
            if r["checks"]:
                stopped = r["checks"][-1].get("stopped")
                lines.append(f"| | rounds: {len(r['checks'])} | | | | | | |" if not stopped else
                             f"| | rounds: {len(r['checks'])}, stopped: {stopped} | | | | | | |")
        lines.append("")
    if "total_seconds" in record:
        lines.append(f"Wall time: {record['total_seconds']:.0f} s.")
    report.write(out, stem, "\n".join(lines) + "\n", record)


if __name__ == "__main__":
    sys.exit(main())
