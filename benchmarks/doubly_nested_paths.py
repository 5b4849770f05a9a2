"""Doubly nested network (issue 14): per-input anytime stopping along the greedy staircase against
the least-error-area staircase (``DoublyNestedNet.path(rule=...)``), each next to the best fixed
cell at the same average MACs, on one trained grid.

    python benchmarks/doubly_nested_paths.py                       # Fashion-MNIST, ResNet-32, 4 groups
    python benchmarks/doubly_nested_paths.py --data digits --depth 20 --steps 20 --stem dnn_paths_smoke

Writes benchmarks/results/<stem>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


from _bench import begin, grid_arguments, output_arguments
from doubly_nested import anytime_rows
from dyninfer import data, report
from dyninfer.methods import doubly_nested as dn



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid_arguments(parser, data="fashion-mnist", steps=600)
    output_arguments(parser, stem="doubly_nested_paths_fashion-mnist")
    args = parser.parse_args(argv)
    out, command = begin(args, "doubly_nested_paths.py", argv)
    started = time.perf_counter()
    full_train, test = data.load(args.data)
    train, val = data.split(full_train, 0.1, seed=0)
    grid = dn.build(num_classes=full_train.num_classes, groups=args.groups, depth=args.depth,
                    input_shape=full_train.input_shape, seed=0)
    dn.train(grid, train, dn.DoublyNestedConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr))
    grid.validate(val)
    grid.history["test_accuracy"] = grid.evaluate_grid(test)
    record = {"command": command, "machine": report.machine(), "args": vars(args), "rules": {}}
    for rule in ("greedy", "area"):
        path = grid.path(rule=rule)
        record["rules"][rule] = {"path": path, "rows": anytime_rows(grid, val, test, path)}
    record["total_seconds"] = time.perf_counter() - started
    (out / f"{args.stem}.json").write_text(json.dumps(record, indent=1, default=str))
    lines = [f"# Doubly nested ResNet-{args.depth} ({args.groups} groups) on {args.data}: which staircase to stop along",
             "", f"Command: `{command}`", "",
             f"One grid, {args.steps} steps x {args.batch_size}; thresholds calibrated on a held-out 10 % of the "
             f"training set; accuracies on the test set. {record['total_seconds']:.0f} s.", "",
             "| path rule | target MACs | average executed MACs | anytime accuracy (%) | best fixed cell | its MACs | "
             "its accuracy (%) |", "|---|---|---|---|---|---|---|"]
    for rule, r in record["rules"].items():
        lines += [f"| {rule} | {row['budget_macs'] / 1e6:.2f} M | {row['average_macs'] / 1e6:.2f} M | "
                  f"{100 * row['anytime_accuracy']:.2f} | D{row['fixed_cell'][0]} & W{row['fixed_cell'][1]} | "
                  f"{row['fixed_macs'] / 1e6:.2f} M | {100 * row['fixed_accuracy']:.2f} |" for row in r["rows"]]
    lines.append("")
    for rule, r in record["rules"].items():
        lines.append(f"{rule} path: {' -> '.join(f'D{d}W{c}' for d, c in r['path'])}")
        lines.append("")
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print((out / f"{args.stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
