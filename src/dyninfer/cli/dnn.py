"""``dyninfer dnn train|table|select``: the doubly nested network from the command line.

``train`` holds out a validation split of the training data (what selection and the frontier use),
trains every (depth, width) jointly, and writes the checkpoint, ``run.json`` and the table;
``table`` writes ``grid.csv``/``grid.json`` and heat maps of accuracy and each resource over
(depth, width) (Fig. 3 / 5), with ``--latency`` measured latency too; ``select`` picks the most
accurate cell within the given limits (units: 24M MACs, 1MB memory, 5ms).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dyninfer import argtypes, report, runs  # noqa: E402
from dyninfer import data as data_module  # noqa: E402
from dyninfer.cli.common import add_run_arguments  # noqa: E402
from dyninfer.methods import doubly_nested as dn  # noqa: E402
from dyninfer.runtime.timing import interleaved, summarize  # noqa: E402

__all__ = ["add_commands", "cmd_train", "cmd_table", "cmd_select", "write_table"]

HEATMAPS = {"test_accuracy": "test accuracy (%)", "val_accuracy": "validation accuracy (%)", "macs": "MACs (M)",
            "params": "parameters (k)", "memory_bytes": "peak activation memory (KiB)", "latency_ms": "latency (ms)"}
SCALE = {"test_accuracy": 100, "val_accuracy": 100, "macs": 1e-6, "params": 1e-3, "memory_bytes": 1 / 1024,
         "latency_ms": 1}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("dnn", help="doubly nested network: width x depth anytime grid (Kim et al.)")
    sub = group.add_subparsers(dest="dnn_command", required=True, metavar="ACTION")

    p = sub.add_parser("train", help="train every (depth, width) jointly; validate on a held-out split")
    p.add_argument("--depth", type=int, choices=(20, 32, 56), default=32, help="CIFAR ResNet depth")
    p.add_argument("--groups", type=argtypes.positive_int, default=4, help="channel groups (width locations)")
    p.add_argument("--expansion", type=float, default=1.0)
    p.add_argument("--data", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--steps", type=argtypes.positive_int, default=1000)
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--combine", choices=dn.COMBINE, default="sum")
    p.add_argument("--sample", type=int, default=0, help="cells per batch in the loss (0: all)")
    add_run_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("table", help="grid.csv and heat maps of accuracy and resources over (depth, width)")
    p.add_argument("run")
    p.add_argument("--latency", action="store_true", help="also time every cell's dense module")
    p.add_argument("--batch", type=argtypes.positive_int, default=1, help="batch size for --latency")
    p.add_argument("--repeats", type=argtypes.positive_int, default=10)
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("select", help="the most accurate (depth, width) within limits")
    p.add_argument("run")
    p.add_argument("--max-macs", default=None, help="e.g. 24M")
    p.add_argument("--max-params", default=None, help="e.g. 200k")
    p.add_argument("--max-memory", default=None, help="peak activation memory at batch 1, e.g. 1MB")
    p.add_argument("--max-ms", default=None, help="latency (needs `dyninfer dnn table --latency` first)")
    p.set_defaults(func=cmd_select)


def cmd_train(args: argparse.Namespace) -> int:
    out = runs.prepare_out(args.out)
    config = dn.DoublyNestedConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                   combine=args.combine, sample=args.sample, progress=not args.quiet)
    full_train, test_set = data_module.load(args.data, root=args.data_root)
    train_set, val_set = data_module.split(full_train, args.val_fraction, seed=args.seed)
    net = dn.build(num_classes=full_train.num_classes, groups=args.groups, depth=args.depth,
                   input_shape=full_train.input_shape, expansion=args.expansion, combine=args.combine, seed=args.seed)
    dn.train(net, train_set, config)
    net.validate(val_set)
    net.history["test_accuracy"] = net.evaluate_grid(test_set)
    net.save(out / "dnn")
    runs.write_meta(out, {"kind": "doubly-nested", "data": args.data, "data_root": args.data_root,
                          "val_fraction": args.val_fraction, "command": shlex.join(["dyninfer"] + sys.argv[1:])})
    rows = write_table(net, out)
    best = max(rows, key=lambda r: r["val_accuracy"])
    print(f"trained a {net.num_depths} x {net.num_widths} grid; best cell by validation: depth {best['depth']}, "
          f"width {best['width']} ({100 * best['test_accuracy']:.2f} % test, {best['macs'] / 1e6:.2f} M MACs); "
          f"wrote {out / 'grid.csv'} and heat maps")
    return 0


def write_table(net: dn.DoublyNestedNet, out: Path, latency: dict | None = None) -> list[dict]:
    """grid.csv / grid.json and one heat map per quantity over (depth, width)."""
    rows = net.resources()
    test = net.history.get("test_accuracy")
    for row in rows:
        if test is not None:
            row["test_accuracy"] = test[row["depth"] - 1][row["width"] - 1]
        if latency is not None:
            row["latency_ms"] = latency[(row["depth"], row["width"])]
    with open(out / "grid.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "grid.json").write_text(json.dumps({"rows": rows, "machine": report.machine()}, indent=1))
    for key, title in HEATMAPS.items():
        if key not in rows[0]:
            continue
        grid = [[0.0] * net.num_widths for _ in range(net.num_depths)]
        for row in rows:
            grid[row["depth"] - 1][row["width"] - 1] = row[key] * SCALE[key]
        fig, ax = plt.subplots(figsize=(2.0 + 0.6 * net.num_widths, 1.5 + 0.3 * net.num_depths))
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        for d in range(net.num_depths):
            for c in range(net.num_widths):
                ax.text(c, d, f"{grid[d][c]:.1f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(net.num_widths), [f"W{c}" for c in range(1, net.num_widths + 1)])
        ax.set_yticks(range(net.num_depths), [f"D{d}" for d in range(1, net.num_depths + 1)])
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"grid_{key}.png", dpi=110)
        plt.close(fig)
    return rows


def _load(run: str) -> dn.DoublyNestedNet:
    runs.read_meta(run, "doubly-nested")
    return dn.DoublyNestedNet.load(Path(run) / "dnn")


def cmd_table(args: argparse.Namespace) -> int:
    net = _load(args.run)
    latency = None
    if args.latency:
        x = torch.randn(args.batch, *net.input_shape)
        cells = {(d, c): net.dense(d, c) for d in range(1, net.num_depths + 1) for c in range(1, net.num_widths + 1)}
        samples = interleaved({f"{d},{c}": (lambda m=m: m(x)) for (d, c), m in cells.items()}, repeats=args.repeats)
        latency = {cell: summarize(samples[f"{cell[0]},{cell[1]}"])["median_ms"] for cell in cells}
    write_table(net, Path(args.run), latency)
    print(f"wrote {Path(args.run) / 'grid.csv'} and heat maps ({', '.join(sorted(HEATMAPS))})")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    net = _load(args.run)
    table_path = Path(args.run) / "grid.json"
    table = json.loads(table_path.read_text())["rows"] if table_path.exists() else None
    if args.max_ms is not None and (table is None or "latency_ms" not in table[0]):
        raise ValueError(f"--max-ms needs measured latencies: run `dyninfer dnn table {args.run} --latency` first")
    depth, width = net.select(max_macs=args.max_macs, max_params=args.max_params, max_memory=args.max_memory,
                              max_ms=args.max_ms, table=table)
    row = next(r for r in (table or net.resources()) if (r["depth"], r["width"]) == (depth, width))
    print(f"depth {depth}, width {width}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in row.items() if k not in ("depth", "width")))
    return 0
