"""Non-uniform subnets on ResNet-20 (issue 15): side by side with the same widths trained
individually, uniform slimmable and universally slimmable at matched MACs and one step budget
(the compare harness), then the DAC paper's nine-subnet curve, then widths chosen by measured
latency checked against their budgets by timing (batch 1 and 128, interleaved medians).

    python benchmarks/nonuniform.py                    # CIFAR-10, CPU preset (~60 min on 2 cores)
    python benchmarks/nonuniform.py --steps 20 --data digits --stem nonuniform_smoke   # seconds

Writes benchmarks/results/<stem>.{md,json} and <stem>_compare.{md,json,png}, <stem>_widths.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from dyninfer import compare, data, models, report
from dyninfer.methods import nonuniform
from dyninfer.cli.nonuniform import plot_widths
from dyninfer.runtime.timing import interleaved, summarize

ROOT = Path(__file__).resolve().parent
NINE = [round(0.2 + 0.1 * i, 2) for i in range(9)]  # 20 % .. 100 % of the MACs, nine subnets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet-20")
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--budgets", default="0.25,0.5,0.75,1.0")
    parser.add_argument("--methods", default="nonuniform,nonuniform-individual,slimmable,us")
    parser.add_argument("--latency-budgets", default="0.4,0.7,1.0")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--stem", default="nonuniform_resnet20_cifar10")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    command = " ".join(["python", "benchmarks/nonuniform.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    print(f"command: {command}", flush=True)
    budgets = [float(b) for b in args.budgets.split(",")]
    record: dict = {"command": command, "machine": report.machine(), "model": args.model, "data": args.data,
                    "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
    started = time.perf_counter()

    # 1. side by side, one budget (the compare harness counts every optimizer step); timed at batch 1,
    # then again at batch 128 from the same trained nets (the harness resumes what it trained)
    runs = {}
    for latency_batch in (1, 128):
        runs[latency_batch] = compare.run(
            args.model, args.data, methods=args.methods.split(","), budgets=budgets, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, out=out, stem=f"{args.stem}_compare",
            latency_batch=latency_batch, latency_repeats=args.repeats, progress=False, command=command)
    cmp = runs[128]
    record["compare"] = {name: {k: r[k] for k in ("mac_fractions", "accuracy", "latency_vs_original", "train_seconds")
                                if k in r} for name, r in cmp["methods"].items()}
    for name, r in runs[1]["methods"].items():
        record["compare"][name]["latency_vs_original_b1"] = r.get("latency_vs_original")
    record["compare_seconds"] = time.perf_counter() - started
    _save(out, args.stem, record)

    # 2. the nine-subnet curve (DAC Fig.: nine dynamic subnets of ResNet-20)
    train_set, test_set = data.load(args.data)
    torch.manual_seed(0)
    model = models.create(args.model, num_classes=train_set.num_classes, input_shape=train_set.input_shape)
    t0 = time.perf_counter()
    cfg = nonuniform.NonUniformConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, num_random=2)
    nine = nonuniform.train(model, train_set, NINE, cfg)
    record["nine"] = {"budgets": NINE, "mac_fractions": nine.mac_fractions(), "accuracy": nine.evaluate(test_set),
                      "widths": [nine.widths(k) for k in range(1, 10)], "uniform_multipliers": nine.uniform_multipliers(),
                      "seconds": time.perf_counter() - t0}
    plot_widths(nine, out / f"{args.stem}_widths.png")
    _save(out, args.stem, record)

    # 3. widths by measured latency on this machine, checked by timing the exported subnets
    lat_budgets = [float(b) for b in args.latency_budgets.split(",")]
    record["latency"] = {}
    for batch in (1, 128):
        t0 = time.perf_counter()
        try:
            chosen = nonuniform.sample(model, lat_budgets, by="latency", latency_batch=batch,
                                       cache_dir=str(out / ".latency-cache"))
        except ValueError as err:  # a budget this device cannot reach is a result, not a crash
            record["latency"][str(batch)] = {"budgets": lat_budgets, "error": str(err),
                                             "seconds": time.perf_counter() - t0}
            _save(out, args.stem, record)
            continue
        x = torch.randn(batch, *train_set.input_shape).contiguous(memory_format=torch.channels_last)
        dense = {k: chosen.export(k).to(memory_format=torch.channels_last) for k in range(1, chosen.num_subnets + 1)}
        samples = interleaved({k: (lambda m=m: m(x)) for k, m in dense.items()}, repeats=args.repeats, warmup=3)
        full = summarize(samples[chosen.num_subnets])["median_ms"]
        record["latency"][str(batch)] = {
            "budgets": lat_budgets, "predicted": chosen.history["predicted_cost"],
            "measured": [summarize(samples[k])["median_ms"] / full for k in dense],
            "measured_ms": [summarize(samples[k]) for k in dense], "mac_fractions": chosen.mac_fractions(),
            "widths": [chosen.widths(k) for k in dense], "table": chosen.history["latency_table"],
            "seconds": time.perf_counter() - t0}
        _save(out, args.stem, record)
    record["total_seconds"] = time.perf_counter() - started
    _save(out, args.stem, record)
    print((out / f"{args.stem}.md").read_text())
    return 0


def _save(out: Path, stem: str, record: dict) -> None:
    """Markdown + JSON of what has been measured so far (a late failure loses nothing)."""
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str))
    lines = [f"# Non-uniform subnets, {record['model']} on {record['data']}", "",
             f"Command: `{record['command']}`", "",
             f"Machine: {record['machine'].get('cpu')}, {record['machine'].get('cores')} cores, torch "
             f"{record['machine'].get('torch')}. {record['steps']} optimizer steps x {record['batch_size']} per method.", ""]
    if "compare" in record:
        lines += ["## Side by side (matched MACs, same steps)", "",
                  "| method | MACs (%) | top-1 (%) | latency / original, batch 1 | latency / original, batch 128 |",
                  "|---|---|---|---|---|"]
        for name, r in record["compare"].items():
            nan = [float("nan")] * len(r["accuracy"])
            lat1, lat = r.get("latency_vs_original_b1") or nan, r.get("latency_vs_original") or nan
            lines.append(f"| {name} | " + " / ".join(f"{100 * f:.1f}" for f in r["mac_fractions"]) + " | "
                         + " / ".join(f"{100 * a:.2f}" for a in r["accuracy"]) + " | "
                         + " / ".join(f"{v:.2f}" for v in lat1) + " | " + " / ".join(f"{v:.2f}" for v in lat) + " |")
        lines += ["", "Paper (ResNet-18, ImageNet, latency / full at batch 128): GPU 0.22 / 0.40 / 0.67 / 1, "
                  "CPU 0.47 / 0.59 / 0.78 / 1."]
        lines += ["", f"Wall time of the comparison: {record['compare_seconds']:.0f} s.", ""]
    if "nine" in record:
        n = record["nine"]
        lines += ["## Nine subnets (the DAC paper's curve)", "", "| subnet | MACs (%) | top-1 (%) | uniform multiplier, same MACs |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {100 * f:.1f} | {100 * a:.2f} | {m:.3f} |" for k, (f, a, m) in
                  enumerate(zip(n["mac_fractions"], n["accuracy"], n["uniform_multipliers"]), start=1)]
        lines += ["", f"{n['seconds']:.0f} s. Widths per layer: `{Path(stem).name}_widths.png`.", ""]
    for batch, r in record.get("latency", {}).items():
        if "error" in r:
            lines += [f"## Widths by measured latency, batch {batch}", "", f"Not reachable here: {r['error']}", ""]
            continue
        lines += [f"## Widths by measured latency, batch {batch}", "",
                  "| subnet | latency budget | predicted | measured (median, interleaved) | MACs (%) |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {b:.2f} | {p:.3f} | {m:.3f} | {100 * f:.1f} |" for k, (b, p, m, f) in
                  enumerate(zip(r["budgets"], r["predicted"], r["measured"], r["mac_fractions"]), start=1)]
        lines += ["", f"Table + choice + timing: {r['seconds']:.0f} s.", ""]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
