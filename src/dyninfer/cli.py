"""The ``dyninfer`` command: train, construct, eval, info, demo, plus the commands that methods and
the runtime register through ``add_commands`` (lcnet, bench, simulate, compare).

Flags map onto the library's frozen config dataclasses; every run directory gets a ``run.json``
saying what it is, so ``dyninfer eval runs/x`` needs nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from dyninfer import argtypes, runs
from dyninfer.data import canonical_name
from dyninfer.launch import Ranks
from dyninfer.methods.registry import DEFAULT_EXPANSION

COMMAND_MODULES = ("dyninfer.methods.lcnet_commands", "dyninfer.methods.nonuniform_commands",
                   "dyninfer.methods.doubly_nested_commands", "dyninfer.runtime.commands", "dyninfer.compare_commands")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------- helpers


def _read_run(run: Path) -> dict:
    return runs.read_meta(run)


def _load_data(name: str, root: str | None):
    from dyninfer import data

    return data.load(name, root=root)


def _load_trained(run: Path):
    """(model, run meta) of a run made by `dyninfer train`."""
    from dyninfer import checkpoint, models

    meta = _read_run(run)
    if meta.get("kind") != "train":
        raise CLIError(f"{run} holds a {meta.get('kind')!r} run; expected one made by `dyninfer train`")
    model = models.create(meta["model"], num_classes=meta["num_classes"], expansion=meta["expansion"],
                          input_shape=tuple(meta["input_shape"]))
    checkpoint.load_model(run / "model", model)
    return model.eval(), meta


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from dyninfer import models, train

    train_set, test_set = _load_data(args.data, args.data_root)
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


def cmd_construct(args: argparse.Namespace) -> int:
    from dyninfer import models, report
    from dyninfer.methods import stepping

    train_set, test_set = _load_data(args.data, args.data_root)
    expansion = args.expansion or DEFAULT_EXPANSION.get(args.model, 1.8)
    teacher, original = None, None
    if args.teacher:
        teacher, tmeta = _load_trained(Path(args.teacher))
        if tmeta["model"] != args.model or canonical_name(tmeta["data"]) != args.data:
            raise CLIError(f"teacher {args.teacher} is {tmeta['model']} on {tmeta['data']}; "
                           f"expected {args.model} on {args.data}")
        original = tmeta["test"]["top1"]
    config = stepping.SteppingConfig(
        iterations=args.iterations, batches_per_iteration=args.batches_per_iteration, batch_size=args.batch_size,
        lr=args.lr, retrain_epochs=args.retrain_epochs, retrain_lr=args.retrain_lr, schedule=args.schedule,
        suppression=not args.no_suppression, distillation=not args.no_distillation, seed=args.seed,
        progress=not args.quiet)
    torch.manual_seed(args.seed)
    model = models.create(args.model, num_classes=train_set.num_classes, expansion=expansion,
                          input_shape=train_set.input_shape)
    out = Path(args.out)
    net = build_stepping(model, train_set, test_set, args.budgets, config, teacher, quiet=args.quiet,
                         checkpoints=out, resume=not args.no_resume)
    net.save(out / "stepping", extra={"original_accuracy": original})
    accuracies = net.evaluate(test_set)
    table, data = report.subnet_table(accuracies, net.mac_fractions(), original, net.budgets,
                                      net.mac_fractions(path="scratch"))
    runs.write_meta(out, {
        "kind": "stepping", "model": args.model, "data": args.data, "data_root": args.data_root,
        "expansion": expansion, "teacher": args.teacher, "original_accuracy": original,
        "command": " ".join(["dyninfer"] + sys.argv[1:]), "history": net.history,
    })
    report.write(out, "table", table, {**data, "machine": report.machine()})
    print(table)
    return 0


def build_stepping(model, train_set, test_set, budgets, config, teacher=None, quiet=False, checkpoints=None,
                   resume=True):
    """Construct + retrain: the whole SteppingNet pipeline, shared by `construct` and `demo`.

    With ``checkpoints`` (a folder) both phases save a checkpoint there as they go
    (``construction``, ``retraining``) and, with ``resume``, continue from it.
    """
    from dyninfer.methods import stepping

    stem = (lambda name: Path(checkpoints) / name) if checkpoints is not None else (lambda name: None)
    start = time.perf_counter()
    net = stepping.construct(model, train_set, budgets, config, checkpoint=stem("construction"), resume=resume)
    built = time.perf_counter() - start
    if not quiet:
        print(f"constructed {net.num_subnets} subnets in {built:.0f} s "
              f"({len(net.history['iterations'])} iterations); MACs/original: "
              + ", ".join(f"{f:.3f}" for f in net.mac_fractions()))
    start = time.perf_counter()
    log = net.retrain(train_set, teacher=teacher, checkpoint=stem("retraining"), resume=resume)
    net.history["construction_wall_seconds"] = built
    net.history["retrain_wall_seconds"] = time.perf_counter() - start
    if not quiet and log:
        print(f"retrained all subnets for {len(log)} epochs in {net.history['retrain_wall_seconds']:.0f} s; "
              "last epoch's losses: " + ", ".join(f"{v:.3f}" for v in log[-1]["loss"]))
    return net


def cmd_eval(args: argparse.Namespace) -> int:
    from dyninfer import report, train
    from dyninfer.methods.stepping import SteppingNet

    run = Path(args.run)
    meta = _read_run(run)
    if meta["kind"] in ("lcnet", "nonuniform"):
        raise CLIError(f"{run} is a {meta['kind']} run; evaluate it with `dyninfer {meta['kind']} eval {run}`")
    if meta["kind"] == "doubly-nested":
        raise CLIError(f"{run} is a doubly nested run; see `dyninfer dnn table {run}` and `dyninfer dnn select {run}`")
    _, test_set = _load_data(meta["data"], args.data_root or meta.get("data_root"))
    if meta["kind"] == "train":
        model, _ = _load_trained(run)
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
    from dyninfer import cost, models, report

    shape = args.input_shape
    model = models.create(args.model, num_classes=args.num_classes, expansion=args.expansion, input_shape=shape)
    rows = [(r["name"], r["type"], "x".join(map(str, r["output_shape"])), r["macs"], r["params"])
            for r in cost.layer_table(model, shape)]
    print(report.markdown_table(["layer", "type", "output", "MACs", "params"], rows))
    print(f"\n{args.model} (expansion {args.expansion}) on {'x'.join(map(str, shape))}: "
          f"{cost.macs(model, shape):,} MACs, {cost.params(model):,} parameters, "
          f"peak activations {cost.peak_activation_bytes(model, shape) / 1024:.1f} KiB at batch 1")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: a 4-subnet SteppingNet on the embedded digits set, in minutes."""
    from dyninfer import models, report, train
    from dyninfer.methods import stepping

    start = time.perf_counter()
    out = Path(args.out)
    torch.manual_seed(0)
    train_set, test_set = _load_data("digits", None)
    print(f"digits: {len(train_set)} training and {len(test_set)} test images of {train_set.input_shape}")
    teacher = models.create("lenet-3c1l", num_classes=10, expansion=1.0, input_shape=train_set.input_shape)
    cfg = train.TrainConfig(epochs=args.teacher_epochs, batch_size=64, lr=0.05, progress=not args.quiet)
    if not args.quiet:
        print(f"training the original network (lenet-3c1l, 1.0x) for {args.teacher_epochs} epochs, the teacher")
    train.fit(teacher, train_set, cfg, out=out / "teacher", resume=False)
    original = train.evaluate(teacher, test_set)["top1"]
    print(f"original network (lenet-3c1l, 1.0x): test accuracy {100 * original:.2f} %")

    model = models.create("lenet-3c1l", num_classes=10, expansion=1.8, input_shape=train_set.input_shape)
    config = stepping.SteppingConfig(iterations=args.iterations, batches_per_iteration=8, batch_size=64,
                                     lr=0.02, retrain_epochs=args.retrain_epochs, retrain_lr=0.02,
                                     progress=not args.quiet)
    budgets = [0.10, 0.30, 0.50, 0.85]
    net = build_stepping(model, train_set, test_set, budgets, config, teacher.eval())
    net.save(out / "stepping", extra={"original_accuracy": original})
    runs.write_meta(out, {"kind": "stepping", "model": "lenet-3c1l", "data": "digits", "data_root": None,
                                    "expansion": 1.8, "original_accuracy": original, "command": "dyninfer demo"})
    accuracies = net.evaluate(test_set)
    table, data = report.subnet_table(accuracies, net.mac_fractions(), original, budgets,
                                      net.mac_fractions(path="scratch"))
    report.write(out, "table", table, {**data, "machine": report.machine()})
    print("\nSteppingNet on digits (Table I layout; MACs relative to the original network):\n" + table)

    print("\n" + check_reuse(net, next(test_set.batches(len(test_set)))[0]))
    model = print_latency(net, batch=128)
    plot = report.subnet_plot(out / "demo.png", accuracies, net.mac_fractions(), original, model.scratch_ms,
                              model.step_ms)
    print(f"wrote {plot} (accuracy vs MACs, latency per subnet and per step)")
    print(f"done in {time.perf_counter() - start:.0f} s; run saved to {out} (try `dyninfer eval {out}`)")
    return 0


def check_reuse(net, x: torch.Tensor) -> str:
    """Check, not claim, that stepping reuses earlier work: count the MACs each step executes
    (torch's FlopCounterMode) against the step's own increment, and compare its logits with a
    from-scratch pass. Raises if a step recomputed anything or disagrees."""
    from torch.utils.flop_counter import FlopCounterMode

    def executed(fn):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            result = fn()
        return result, counter.get_total_flops() // (2 * len(x))

    compact = net.compact()
    blocks = compact.executed_step_macs()  # the step's dense blocks; pruned weights ride along as zeros
    run, done = executed(lambda: net.start(x))
    counted, worst = [done], 0.0
    for k in range(1, net.num_subnets + 1):
        with torch.no_grad():
            worst = max(worst, float((run.logits - net(x, subnet=k)).abs().max()))
        if run.can_step():
            counted.append(executed(run.step)[1])
    if counted != blocks or worst > 1e-3:
        raise RuntimeError(f"stepping did not reuse earlier work: executed MACs per step {counted} vs its blocks "
                           f"{blocks}, largest logit gap to from scratch {worst:.1e}")
    live = sum(compact.step_macs())
    return (f"incremental check: each step 1->{net.num_subnets} executed exactly its own new blocks "
            f"({' + '.join(f'{m:,}' for m in counted)} = {sum(counted):,} MACs per image, counted by "
            f"FlopCounterMode; nothing recomputed; {sum(counted) - live:,} of them multiply pruned weights "
            f"kept as zeros) and matches from-scratch logits to {worst:.1e}")


def print_latency(net, batch: int):
    """Measured wall-clock latency of each subnet and each step (compacted form, this machine)."""
    from dyninfer import report
    from dyninfer.runtime.latency import calibrate

    model = calibrate(net, batch=batch, repeats=15)
    macs = net.macs()
    rows = [(k, f"{macs[k - 1] / macs[-1]:.3f}", f"{model.scratch_ms[k - 1]:.3f}",
             f"{model.scratch_ms[k - 1] / model.scratch_ms[-1]:.3f}", f"{model.step_ms[k - 1]:.3f}")
            for k in range(1, net.num_subnets + 1)]
    print(f"\nmeasured latency at batch {batch}, {model.threads} threads (median of {model.repeats} interleaved runs):")
    print(report.markdown_table(["subnet", "MACs / largest", "from scratch (ms)", "latency / largest",
                                 "step into it (ms)"], rows))
    path = sum(model.step_ms)
    print(f"stepping 1->{net.num_subnets}: {path:.3f} ms = {path / model.scratch_ms[-1]:.2f}x running the largest "
          f"subnet once from scratch")
    return model


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from dyninfer import data as data_module

    datasets = getattr(data_module, "NAMES", None)
    parser = argparse.ArgumentParser(prog="dyninfer", description="Networks whose compute is dialed at run time.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common_data(p):
        p.add_argument("--data", default="digits", help=f"data set ({', '.join(datasets) if datasets else 'digits, ...'})")
        p.add_argument("--data-root", default=None, help="directory holding the data set files")

    p = sub.add_parser("train", help="train a zoo model (teachers, original networks)")
    p.add_argument("--model", required=True)
    common_data(p)
    p.add_argument("--epochs", type=argtypes.positive_int, default=10)
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", choices=("cosine", "step", "none"), default="cosine")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up over this many steps")
    p.add_argument("--expansion", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("construct", help="build a SteppingNet (construction + retraining)")
    p.add_argument("--model", required=True)
    common_data(p)
    p.add_argument("--budgets", type=argtypes.budgets, required=True, help="MAC budgets as fractions of the original, e.g. 0.1,0.3,0.5,0.85")
    p.add_argument("--teacher", default=None, help="run directory of the original network (`dyninfer train`)")
    p.add_argument("--expansion", type=float, default=None, help="width expansion (default: the paper's per model)")
    p.add_argument("--iterations", type=argtypes.positive_int, default=300, help="N_t")
    p.add_argument("--batches-per-iteration", type=argtypes.positive_int, default=250, help="m")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--retrain-epochs", type=int, default=10)
    p.add_argument("--retrain-lr", type=float, default=0.01)
    p.add_argument("--schedule", choices=("joint", "sequential"), default="joint")
    p.add_argument("--no-suppression", action="store_true")
    p.add_argument("--no-distillation", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--no-resume", action="store_true",
                   help="start over instead of continuing from the checkpoints in OUT (construction: every "
                        "iteration; retraining: every epoch)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_construct)

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

    p = sub.add_parser("demo", help="the main job on the embedded digits data set")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--teacher-epochs", type=argtypes.positive_int, default=15)
    p.add_argument("--iterations", type=argtypes.positive_int, default=45)
    p.add_argument("--retrain-epochs", type=argtypes.positive_int, default=15)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    for module in COMMAND_MODULES:  # methods and tools register their own subcommands
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        # a library warning reaches a CLI user as one line, not as a source location and code line
        warnings.showwarning = lambda message, category, *_, **__: print(
            f"dyninfer {args.command}: notice: {message}", file=sys.stderr)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    out = getattr(args, "out", None)
    created = out is not None and not Path(out).exists()
    ranks = None
    try:
        ranks = Ranks()  # under torchrun: one process group for the command; rank 0 owns --out
        if isinstance(getattr(args, "data", None), str):  # one spelling from here on: DIGITS -> digits
            args.data = canonical_name(args.data)
        if out is None:
            return args.func(args)
        if not ranks.lead:  # works in a private copy of --out; only rank 0 writes there and prints
            args.out = str(ranks.private_copy(out))
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank 0 tells the user
                return args.func(args)
        # every command with --out writes there: check it before any work, and hold its lock
        runs.prepare_out(out)
        with runs.lock(out, args.command):
            ranks.release(True)
            return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"dyninfer {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if ranks is not None:
            if ranks.lead:
                ranks.release(False)  # a no-op once released; else the others stop instead of waiting
            ranks.close()
        lead = ranks is None or ranks.lead
        left = list(Path(out).iterdir()) if lead and created and Path(out).is_dir() else None
        if left is not None and all(f.name == runs.LOCK_NAME for f in left):
            with contextlib.suppress(OSError):  # a run refused before its work leaves no folder behind
                for f in left:
                    f.unlink()
                Path(out).rmdir()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
