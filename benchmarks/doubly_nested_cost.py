"""Doubly nested network (issue 14): what the joint loss over every (depth, width) cell costs per
training step next to plain training of the same ResNet, and whether sampling a few cells per
batch reaches the same accuracy sooner.

    python benchmarks/doubly_nested_cost.py                        # Fashion-MNIST, ResNet-32, CPU preset
    python benchmarks/doubly_nested_cost.py --data digits --depth 20 --steps 20 --stem dnn_cost_smoke

Part 1 times one optimizer step (forward, backward, update; batch 128) of: the plain ResNet (one
classifier), the doubly nested grid with every cell in the loss, and with ``--sample`` random cells
plus the full network; interleaved, median and spread. Part 2 trains the grid both ways for the same
steps and reports wall time and test accuracy (full cell, and the mean over all cells).
Writes benchmarks/results/<stem>.{md,json}, saving after each part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _bench import begin, finish, grid_arguments, output_arguments
from dyninfer import data, models, report
from dyninfer.methods import doubly_nested as dn
from dyninfer.runtime.timing import interleaved, summarize



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid_arguments(parser, data="fashion-mnist", steps=600)  # steps: of each grid in part 2
    parser.add_argument("--sample", type=int, default=4, help="random cells per batch (plus the full net)")
    parser.add_argument("--repeats", type=int, default=10)
    output_arguments(parser, stem="doubly_nested_cost_fashion-mnist")
    args = parser.parse_args(argv)
    for name in ("steps", "sample", "batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    out, command = begin(args, "doubly_nested_cost.py", argv)
    record: dict = {"command": command, "machine": report.machine(), "args": vars(args)}
    started = time.perf_counter()
    full_train, test = data.load(args.data)
    shape, classes = full_train.input_shape, full_train.num_classes

    # 1. one optimizer step of each, interleaved
    x, y = next(data.BatchStream(full_train, args.batch_size, seed=0))
    torch.manual_seed(0)
    plain = models.create(f"resnet-{args.depth}", num_classes=classes, input_shape=shape).train()
    grids = {name: dn.build(num_classes=classes, groups=args.groups, depth=args.depth, input_shape=shape, seed=0)
             for name in ("all cells", "sampled")}
    generator = torch.Generator().manual_seed(1)

    def stepper(module, loss):
        opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()
        return step

    for grid in grids.values():
        grid.net.train()
    configs = {
        "plain ResNet": stepper(plain, lambda: F.cross_entropy(plain(x), y)),
        "all cells": stepper(grids["all cells"], lambda: dn.joint_loss(grids["all cells"], x, y)),
        f"{args.sample} cells + full": stepper(grids["sampled"],
                                               lambda: dn.joint_loss(grids["sampled"], x, y, args.sample, generator)),
    }
    samples = interleaved(configs, repeats=args.repeats, warmup=2, grad=True)
    base = summarize(samples["plain ResNet"])["median_ms"]
    cells = grids["all cells"].num_depths * grids["all cells"].num_widths
    record["step_cost"] = {"cells": cells, "rows": {name: {**summarize(s), "ratio": summarize(s)["median_ms"] / base}
                                                     for name, s in samples.items()}}
    _save(out, args.stem, record)

    # 2. the grid trained both ways for the same steps
    train, _ = data.split(full_train, 0.1, seed=0)
    record["training"] = {}
    for name, sample in (("all cells", 0), (f"{args.sample} cells + full", args.sample)):
        net = dn.build(num_classes=classes, groups=args.groups, depth=args.depth, input_shape=shape, seed=0)
        t0 = time.perf_counter()
        dn.train(net, train, dn.DoublyNestedConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                                   sample=sample))
        seconds = time.perf_counter() - t0
        grid = net.evaluate_grid(test)
        flat = [a for row in grid for a in row]
        record["training"][name] = {"seconds": seconds, "full_cell": grid[-1][-1], "mean_cell": sum(flat) / len(flat),
                                    "min_cell": min(flat), "grid": grid}
        _save(out, args.stem, record)
    return finish(out, args.stem, record, _save, started)


def _save(out: Path, stem: str, record: dict) -> None:
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str))
    a = record["args"]
    lines = [f"# Doubly nested ResNet-{a['depth']} ({a['groups']} groups) on {a['data']}: the joint loss's cost", "",
             f"Command: `{record['command']}`", "",
             f"Machine: {record['machine'].get('cpu')}, {record['machine'].get('cores')} cores, torch "
             f"{record['machine'].get('torch')}, {a['threads']} threads.", ""]
    if "step_cost" in record:
        c = record["step_cost"]
        lines += [f"## One optimizer step, batch {a['batch_size']} (median of {a['repeats']} interleaved runs)", "",
                  "| training step | ms (median) | min-max | / plain |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['ratio']:.2f} |"
                  for name, r in c["rows"].items()]
        lines += ["", f"The grid has {c['cells']} cells; every one of them comes out of the same pass "
                  "(the exit heads and partial-sum classifiers are the extra work). Sampling cells drops only "
                  "their losses' backward through the heads: the pass still computes every cell.", ""]
    if record.get("training"):
        lines += [f"## The grid trained for {a['steps']} steps x {a['batch_size']} each way (lr {a['lr']}, cosine)", "",
                  "| loss | wall time (s) | full cell (%) | mean over cells (%) | worst cell (%) |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {r['seconds']:.0f} | {100 * r['full_cell']:.2f} | {100 * r['mean_cell']:.2f} | "
                  f"{100 * r['min_cell']:.2f} |" for name, r in record["training"].items()]
        lines.append("")
    if "total_seconds" in record:
        lines.append(f"Total wall time: {record['total_seconds']:.0f} s.")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
