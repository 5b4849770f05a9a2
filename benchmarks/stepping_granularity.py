"""Move granularity and the stepping path's latency: SteppingNet built with channels moving one
at a time (the paper) or in units of 4 / 8, then each subnet from scratch and the stepping path
1 -> N timed on this machine, side by side (interleaved medians, ``dyninfer.runtime.latency``).

Latency depends on the tags, not on how well the net is trained, so construction here is short;
accuracy with and without granularity is in stepping_construction_*.md (the ``ours-g4`` row).

    python benchmarks/stepping_granularity.py            # LeNet-5 x2 on CIFAR-10, budgets 0.3..0.85

Writes benchmarks/results/stepping_granularity_<model>_<data>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet-5")
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--expansion", type=float, default=2.0)
    parser.add_argument("--budgets", default="0.3,0.5,0.7,0.85")
    parser.add_argument("--granularities", default="1,4,8")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--batches", default="1,128", help="latency batch sizes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    from dyninfer import cost, data, models, report
    from dyninfer.methods import stepping
    from dyninfer.runtime.latency import calibrate

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, _ = data.load(args.data)
    budgets = [float(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    reference = cost.macs(models.create(args.model, num_classes=train.num_classes, input_shape=train.input_shape),
                          train.input_shape)
    command = " ".join(["python", "benchmarks/stepping_granularity.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    print(f"command: {command}")
    record = {"command": command, "machine": report.machine(), "budgets": budgets, "rows": []}
    stem = out / f"stepping_granularity_{args.model}_{args.data}"
    for g in [int(v) for v in args.granularities.split(",")]:
        torch.manual_seed(0)
        model = models.create(args.model, num_classes=train.num_classes, expansion=args.expansion,
                              input_shape=train.input_shape)
        cfg = stepping.SteppingConfig(iterations=args.iterations, batches_per_iteration=2, importance_batches=2,
                                      lr=0.05, granularity=g, progress=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = stepping.construct(model, train, budgets, cfg, reference_macs=reference)
        except RuntimeError as err:  # budgets this granularity cannot reach: recorded
            record["rows"].append({"granularity": g, "failed": str(err)})
            print(f"granularity {g}: failed: {err}", flush=True)
            continue
        row = {"granularity": g, "mac_fractions": net.mac_fractions(), "counts": net.history["final_counts"]}
        for batch in batches:
            lat = calibrate(net, batch=batch, repeats=args.repeats, threads=args.threads, refresh=True)
            row[f"b{batch}"] = {"scratch_ms": lat.scratch_ms, "step_ms": lat.step_ms,
                                "path_vs_largest": sum(lat.step_ms) / lat.scratch_ms[-1]}
        record["rows"].append(row)
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
        print(f"granularity {g}: MACs {[round(100 * f, 1) for f in row['mac_fractions']]}; path / largest "
              + ", ".join(f"b{b} {row[f'b{b}']['path_vs_largest']:.2f}x" for b in batches), flush=True)
    lines = [f"# Move granularity and stepping latency: {args.model} x{args.expansion} on {args.data}", "",
             f"Command: `{command}`", "",
             f"Machine: {record['machine']['cpu']}, {args.threads} thread(s), torch {record['machine']['torch']}. "
             f"Medians of {args.repeats} interleaved runs. Construction: {args.iterations} iterations x 2 batches "
             f"(latency depends on the tags, not the accuracy).", "",
             "| granularity | MACs % per subnet | batch | from scratch ms per subnet | stepping path 1->N ms | "
             "path / largest from scratch |", "|---|---|---|---|---|---|"]
    for row in record["rows"]:
        if "failed" in row:
            lines.append(f"| {row['granularity']} | failed: {row['failed']} | | | | |")
            continue
        for b in batches:
            cell = row[f"b{b}"]
            lines.append(f"| {row['granularity']} | {' / '.join(f'{100 * f:.1f}' for f in row['mac_fractions'])} | {b} | "
                         f"{' / '.join(f'{t:.3f}' for t in cell['scratch_ms'])} | {sum(cell['step_ms']):.3f} | "
                         f"{cell['path_vs_largest']:.2f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    sys.exit(code)
