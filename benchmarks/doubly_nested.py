"""Doubly nested network (issue 14): the accuracy grid over (depth, width), the best cell within a
MAC limit against the best depth-only exit, width slicing against the Fig. 4 schemes under the same
step budget, per-input anytime stopping against fixed cells at equal average MACs, and measured
latency of several cells next to their MACs.

    python benchmarks/doubly_nested.py                       # CIFAR-10, ResNet-32, 4 groups, CPU preset
    python benchmarks/doubly_nested.py --data digits --depth 20 --steps 20 --stem dnn_smoke   # seconds

Paper scale (a GPU): --steps 64000 --groups 8 (22 groups do not divide 16/32/64).
Writes benchmarks/results/<stem>.{md,json} and <stem>_*.png, saving after every part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from _bench import begin, finish, grid_arguments, output_arguments
from dyninfer import compare, data, report
from dyninfer.methods import doubly_nested as dn
from dyninfer.cli.dnn import write_table
from dyninfer.runtime.timing import interleaved, summarize



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid_arguments(parser, data="cifar10", steps=200)
    parser.add_argument("--limit", type=float, default=24e6, help="MAC limit of the paper's comparison")
    parser.add_argument("--schemes", default="individual,slice", help="Fig. 4 schemes from the compare registry")
    parser.add_argument("--path", choices=("greedy", "area"), default="greedy",
                        help="the staircase per-input stopping walks (DoublyNestedNet.path's rule; greedy is "
                             "what the committed results ran with, area stops better: doubly_nested_paths.py)")
    output_arguments(parser, stem="doubly_nested_cifar10")
    args = parser.parse_args(argv)
    out, command = begin(args, "doubly_nested.py", argv)
    record: dict = {"command": command, "machine": report.machine(), "args": vars(args)}
    started = time.perf_counter()
    full_train, test = data.load(args.data)
    train, val = data.split(full_train, 0.1, seed=0)
    cfg = dn.DoublyNestedConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr)

    # 1. the grid, and the depth-only anytime network (one group) under the same steps
    nets = {}
    for name, groups in (("doubly-nested", args.groups), ("depth-only", 1)):
        t0 = time.perf_counter()
        net = dn.build(num_classes=full_train.num_classes, groups=groups, depth=args.depth,
                       input_shape=full_train.input_shape, seed=0)
        dn.train(net, train, cfg)
        net.validate(val)
        net.history["test_accuracy"] = net.evaluate_grid(test)
        nets[name] = net
        record[name] = {"seconds": time.perf_counter() - t0, "val": net.val_accuracy,
                        "test": net.history["test_accuracy"], "macs": net.grid_macs(),
                        "causal_macs": [[net.causal_macs(d, c) for c in range(1, net.num_widths + 1)]
                                        for d in range(1, net.num_depths + 1)]}
        _save(out, args.stem, record)
    grid = nets["doubly-nested"]
    grid_dir = out / f"{args.stem}_grid"
    grid_dir.mkdir(exist_ok=True)
    write_table(grid, grid_dir)

    # 2. within the MAC limit: the best cell (by validation) vs the best depth-only exit
    picks = {}
    for name, net in nets.items():
        d, c = net.select(max_macs=args.limit, table=[{**r, "val_accuracy": net.val_accuracy[r["depth"] - 1][
            r["width"] - 1]} for r in ({"depth": d, "width": c, "macs": net.macs(d, c)}
                                        for d in range(1, net.num_depths + 1) for c in range(1, net.num_widths + 1))])
        picks[name] = {"depth": d, "width": c, "macs": net.macs(d, c),
                       "test_accuracy": net.history["test_accuracy"][d - 1][c - 1]}
    record["within_limit"] = picks
    _save(out, args.stem, record)

    # 3. width slicing at full depth vs the Fig. 4 schemes at the same MAC fractions and steps
    fractions = [grid.macs(grid.num_depths, c) / grid.reference_macs for c in range(1, grid.num_widths + 1)]
    budgets = [min(1.0, f * 1.001) for f in fractions]
    model = f"resnet-{args.depth}"
    schemes = compare.run(model, (full_train, test), methods=args.schemes.split(","), budgets=budgets,
                          steps=args.steps, batch_size=args.batch_size, lr=args.lr, latency_repeats=0,
                          out=out, stem=f"{args.stem}_schemes", command=command)
    record["width_slicing"] = {"doubly-nested": {"mac_fractions": fractions,
                                                 "accuracy": [grid.history["test_accuracy"][-1][c] for c in
                                                              range(grid.num_widths)]},
                               **{n: {"mac_fractions": r["mac_fractions"], "accuracy": r["accuracy"]}
                                  for n, r in schemes["methods"].items()}}
    _save(out, args.stem, record)

    # 4. per-input anytime stopping vs fixed cells at the same average MACs (real sessions, batched)
    path = grid.path(rule=args.path)
    rows = anytime_rows(grid, val, test, path)
    record["anytime"] = {"path": path, "rule": args.path, "rows": rows,
                         "note": "MACs along a session are causal (only the new cells run); the fixed cell is "
                                 "counted the same way, as one session straight to it"}
    _save(out, args.stem, record)

    # 5. latency of several cells next to their MACs (dense modules, interleaved medians)
    cells = [(1, 1), (grid.num_depths // 2, grid.num_widths // 2 or 1), (grid.num_depths, 1),
             (grid.num_depths, grid.num_widths)]
    record["latency"] = {}
    for batch in (1, 128):
        x = torch.randn(batch, *full_train.input_shape).contiguous(memory_format=torch.channels_last)
        modules = {cell: grid.dense(*cell).to(memory_format=torch.channels_last) for cell in cells}
        samples = interleaved({f"{d},{c}": (lambda m=m: m(x)) for (d, c), m in modules.items()}, repeats=15)
        full = summarize(samples[f"{cells[-1][0]},{cells[-1][1]}"])["median_ms"]
        record["latency"][str(batch)] = [{"cell": list(cell), "macs": grid.macs(*cell),
                                          "ms": summarize(samples[f"{cell[0]},{cell[1]}"]),
                                          "latency_ratio": summarize(samples[f"{cell[0]},{cell[1]}"])["median_ms"] / full,
                                          "mac_ratio": grid.macs(*cell) / grid.macs(*cells[-1])} for cell in cells]
    return finish(out, args.stem, record, _save, started)


def anytime_rows(grid: dn.DoublyNestedNet, val, test, path, shares=(0.25, 0.5, 0.75)) -> list[dict]:
    """Per-input stopping along ``path``, calibrated on ``val`` to average MAC budgets between the
    path's first and last cell, against the best fixed cell (by validation) within the MACs it used."""
    costs = grid.path_costs(path)
    x_test = torch.cat([x for x, _ in test.batches(1024)])
    y_test = torch.cat([y for _, y in test.batches(1024)])
    rows = []
    for share in shares:
        budget = costs[0] + share * (costs[-1] - costs[0])
        threshold = grid.calibrate(val, budget, path)
        pred, stop, macs = grid.predict_anytime(x_test, threshold, path)
        average = float(macs.float().mean())
        d, c = grid.select(max_macs=average, table=[{"depth": d, "width": c, "macs": grid.causal_macs(d, c),
                                                     "val_accuracy": grid.val_accuracy[d - 1][c - 1]}
                                                    for d in range(1, grid.num_depths + 1)
                                                    for c in range(1, grid.num_widths + 1)])
        rows.append({"budget_macs": budget, "threshold": threshold, "average_macs": average,
                     "anytime_accuracy": float((pred == y_test).float().mean()),
                     "fixed_cell": [d, c], "fixed_macs": grid.causal_macs(d, c),
                     "fixed_accuracy": grid.history["test_accuracy"][d - 1][c - 1]})
    return rows


def _save(out: Path, stem: str, record: dict) -> None:
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str))
    a = record["args"]
    lines = [f"# Doubly nested ResNet-{a['depth']}, {a['groups']} groups, on {a['data']}", "",
             f"Command: `{record['command']}`", "",
             f"Machine: {record['machine'].get('cpu')}, {record['machine'].get('cores')} cores, torch "
             f"{record['machine'].get('torch')}. Every network: {a['steps']} optimizer steps x {a['batch_size']}, "
             f"SGD lr {a['lr']} (cosine); validation = 10 % of the training set, never the test set.", ""]
    for name in ("doubly-nested", "depth-only"):
        if name in record:
            r = record[name]
            lines += [f"## {name}: test accuracy (%) over (depth, width), {r['seconds']:.0f} s", "",
                      "| depth | " + " | ".join(f"W{c + 1}" for c in range(len(r["test"][0]))) + " |",
                      "|---|" + "---|" * len(r["test"][0])]
            lines += [f"| D{d + 1} | " + " | ".join(f"{100 * v:.2f} ({m / 1e6:.1f}M)" for v, m in zip(row, mrow)) + " |"
                      for d, (row, mrow) in enumerate(zip(r["test"], r["macs"]))]
            lines.append("")
    if "within_limit" in record:
        lines += [f"## Within {a['limit'] / 1e6:.0f} M MACs (chosen by validation accuracy)", "",
                  "| network | cell | MACs | test accuracy (%) |", "|---|---|---|---|"]
        lines += [f"| {n} | D{p['depth']} & W{p['width']} | {p['macs'] / 1e6:.2f} M | {100 * p['test_accuracy']:.2f} |"
                  for n, p in record["within_limit"].items()]
        lines += ["", "Paper (ResNet-32, 22 groups, CIFAR-10): D14 & W12 beats the depth-only D5 by about 9 points.", ""]
    if "width_slicing" in record:
        lines += ["## Width slicing at full depth vs the Fig. 4 schemes (same steps)", "",
                  "| scheme | MACs (%) | test accuracy (%) |", "|---|---|---|"]
        lines += [f"| {n} | " + " / ".join(f"{100 * f:.1f}" for f in r["mac_fractions"]) + " | "
                  + " / ".join(f"{100 * v:.2f}" for v in r["accuracy"]) + " |" for n, r in record["width_slicing"].items()]
        lines.append("")
    if "anytime" in record:
        lines += ["## Per-input anytime stopping vs a fixed cell at the same average MACs", "",
                  "| target MACs | threshold | average executed MACs | anytime accuracy (%) | fixed cell | its MACs | "
                  "its accuracy (%) |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['budget_macs'] / 1e6:.2f} M | {r['threshold']:.3f} | {r['average_macs'] / 1e6:.2f} M | "
                  f"{100 * r['anytime_accuracy']:.2f} | D{r['fixed_cell'][0]} & W{r['fixed_cell'][1]} | "
                  f"{r['fixed_macs'] / 1e6:.2f} M | {100 * r['fixed_accuracy']:.2f} |" for r in record["anytime"]["rows"]]
        lines += ["", f"Path: {' -> '.join(f'D{d}W{c}' for d, c in record['anytime']['path'])}. "
                  + record["anytime"]["note"] + ".", ""]
    for batch, rows in record.get("latency", {}).items():
        lines += [f"## Latency, batch {batch} (dense modules, channels_last, median of 15 interleaved runs)", "",
                  "| cell | MACs | ms | latency / full | MACs / full |", "|---|---|---|---|---|"]
        lines += [f"| D{r['cell'][0]} & W{r['cell'][1]} | {r['macs'] / 1e6:.2f} M | {r['ms']['median_ms']:.3f} | "
                  f"{r['latency_ratio']:.3f} | {r['mac_ratio']:.3f} |" for r in rows]
        lines.append("")
    if "total_seconds" in record:
        lines.append(f"Total wall time: {record['total_seconds']:.0f} s.")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
