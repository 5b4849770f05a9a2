"""``dyninfer train``, ``eval`` and ``info``: zoo models, run directories, cost tables."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dyninfer import argtypes, cost, models, report, runs, train
from dyninfer.cli.common import CLIError, add_data_arguments, add_run_arguments, load_data, load_trained, read_run
from dyninfer.methods.stepping import SteppingNet


def cmd_train(args: argparse.Namespace) -> int:

    train_set, test_set = load_data(args.data, args.data_root)
    torch.manual_seed(args.seed)  # before the model is built: its initial weights follow the seed
    model = models.create(args.model, num_classes=train_set.num_classes, expansion=args.expansion,
                          input_shape=train_set.input_shape)
    config = train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                               lr=args.lr, schedule=args.schedule, seed=args.seed,
                               label_smoothing=args.label_smoothing, warmup_steps=args.warmup_steps,
                               progress=not args.quiet)
    out = Path(args.out)
    start = time.perf_counter()
    history = train.fit(model, train_set, config, test=test_set, out=out)
    seconds = time.perf_counter() - start
    result = train.evaluate(model, test_set)
    runs.write_meta(out, {
        "kind": "train", "model": args.model, "data": args.data, "data_root": args.data_root,
        "num_classes": train_set.num_classes, "expansion": args.expansion,
        "input_shape": list(train_set.input_shape), "train_config": config.to_dict(),
        "test": result, "seconds": seconds, "epochs_run": len(history),
        "command": " ".join(["dyninfer"] + sys.argv[1:]),
    })
    print(f"{args.model} on {args.data}: test top-1 {100 * result['top1']:.2f} %, "
          f"top-5 {100 * result['top5']:.2f} % after {config.epochs} epochs ({seconds:.0f} s) -> {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:

    run = Path(args.run)
    meta = read_run(run)
    if meta["kind"] in ("lcnet", "nonuniform"):
        raise CLIError(f"{run} is a {meta['kind']} run; evaluate it with `dyninfer {meta['kind']} eval {run}`")
    if meta["kind"] == "doubly-nested":
        raise CLIError(f"{run} is a doubly nested run; see `dyninfer dnn table {run}` and `dyninfer dnn select {run}`")
    _, test_set = load_data(meta["data"], args.data_root or meta.get("data_root"))
    if meta["kind"] == "train":
        model, _ = load_trained(run)
        result = train.evaluate(model, test_set)
        print(f"{meta['model']} on {meta['data']}: top-1 {100 * result['top1']:.2f} %, top-5 {100 * result['top5']:.2f} %")
        return 0
    if meta["kind"] == "stepping":
        net = SteppingNet.load(run / "stepping")
        accuracies = net.evaluate(test_set)
        table, data = report.subnet_table(accuracies, net.mac_fractions(), meta.get("original_accuracy"), net.budgets,
                                          net.mac_fractions(path="scratch"))
        report.write(run, "table", table, {**data, "machine": report.machine()})
        print(table)
        if args.json:
            print(json.dumps(data, indent=2))
        return 0
    raise CLIError(f"don't know how to evaluate a {meta['kind']!r} run")


def cmd_info(args: argparse.Namespace) -> int:

    shape = args.input_shape
    model = models.create(args.model, num_classes=args.num_classes, expansion=args.expansion, input_shape=shape)
    rows = [(r["name"], r["type"], "x".join(map(str, r["output_shape"])), r["macs"], r["params"])
            for r in cost.layer_table(model, shape)]
    print(report.markdown_table(["layer", "type", "output", "MACs", "params"], rows))
    print(f"\n{args.model} (expansion {args.expansion}) on {'x'.join(map(str, shape))}: "
          f"{cost.macs(model, shape):,} MACs, {cost.params(model):,} parameters, "
          f"peak activations {cost.peak_activation_bytes(model, shape) / 1024:.1f} KiB at batch 1")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a zoo model (teachers, original networks)")
    p.add_argument("--model", required=True)
    add_data_arguments(p)
    p.add_argument("--epochs", type=argtypes.positive_int, default=10)
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", choices=("cosine", "step", "none"), default="cosine")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up over this many steps")
    p.add_argument("--expansion", type=float, default=1.0)
    add_run_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory")
    p.add_argument("run")
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", action="store_true", help="also print the JSON record")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="layers, MACs and parameters of a zoo model")
    p.add_argument("model")
    p.add_argument("--input-shape", type=argtypes.shape, default=(3, 32, 32))
    p.add_argument("--num-classes", type=argtypes.positive_int, default=10)
    p.add_argument("--expansion", type=float, default=1.0)
    p.set_defaults(func=cmd_info)



__all__ = ["add_commands", "cmd_eval", "cmd_info", "cmd_train"]
