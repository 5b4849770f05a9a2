"""``dyninfer construct`` and ``demo``: the SteppingNet pipeline (construction + retraining), and
the demo's checks of what stepping executes and how long it takes."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dyninfer import argtypes, models, report, runs, train
from dyninfer.cli.common import CLIError, add_data_arguments, load_data, load_trained
from dyninfer.data import canonical_name
from dyninfer.methods import stepping
from dyninfer.methods.registry import DEFAULT_EXPANSION
from dyninfer.runtime.latency import calibrate


def cmd_construct(args: argparse.Namespace) -> int:

    train_set, test_set = load_data(args.data, args.data_root)
    expansion = args.expansion or DEFAULT_EXPANSION.get(args.model, 1.8)
    teacher, original = None, None
    if args.teacher:
        teacher, tmeta = load_trained(Path(args.teacher))
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


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: a 4-subnet SteppingNet on the embedded digits set, in minutes."""
    start = time.perf_counter()
    out = Path(args.out)
    torch.manual_seed(0)
    train_set, test_set = load_data("digits", None)
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("construct", help="build a SteppingNet (construction + retraining)")
    p.add_argument("--model", required=True)
    add_data_arguments(p)
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

    p = sub.add_parser("demo", help="the main job on the embedded digits data set")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--teacher-epochs", type=argtypes.positive_int, default=15)
    p.add_argument("--iterations", type=argtypes.positive_int, default=45)
    p.add_argument("--retrain-epochs", type=argtypes.positive_int, default=15)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)



__all__ = ["add_commands", "build_stepping", "check_reuse", "cmd_construct", "cmd_demo", "print_latency"]
