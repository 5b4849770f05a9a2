"""Every dynamic-width method and baseline on one model and data set, at matched MACs and one
training budget (optimizer steps x batch size): SteppingNet Fig. 6 style.

Writes benchmarks/results/compare_<model>_<data>.{md,json,png} (``--out`` to change the folder)
and prints the exact command and the machine. Presets (a flag given explicitly wins):

    python benchmarks/compare.py --preset tiny        # smoke test: digits, seconds
    python benchmarks/compare.py --preset fashion     # lenet-5 on Fashion-MNIST, ~20 min on 2 cores
    python benchmarks/compare.py --preset cifar10     # lenet-5 on CIFAR-10, ~20 min on 2 cores
    python benchmarks/compare.py --preset fashion-3c1l  # lenet-3c1l on Fashion-MNIST, ~50 min
    python benchmarks/compare.py --preset cifar10-3c1l  # lenet-3c1l on CIFAR-10, ~60 min
    python benchmarks/compare.py --preset cifar10-resnet20 --methods stepping,slimmable,anywidth

The step counts of the ~20 minute presets were sized from per-step timings at 1 thread on a
2-core CPU shared with other work (all eight methods together: ~0.7 s per step on
Fashion-MNIST, ~0.85 s on CIFAR-10; two threads on a busy 2-core machine were 5-15x slower
for these small layers). LeNet-3C1L is 24-33x LeNet-5's MACs (~5.8 s per step for all eight
methods at one thread on Fashion-MNIST) and diverges at lr 0.05 (a single classifier over 4,096
features; see benchmarks/results/train_original.md), so its presets train fewer steps at lr 0.005.
The run's JSON records the seconds each method actually took.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
PRESETS = {
    "tiny": dict(model="lenet-5", data="digits", steps=20, batch_size=32, latency_batch=32, latency_repeats=3,
                 threads=1),
    "fashion": dict(model="lenet-5", data="fashion-mnist", steps=1500, batch_size=128, latency_batch=128,
                    latency_repeats=15, threads=1),
    "cifar10": dict(model="lenet-5", data="cifar10", steps=1200, batch_size=128, latency_batch=128,
                    latency_repeats=15, threads=1),
    "fashion-3c1l": dict(model="lenet-3c1l", data="fashion-mnist", steps=500, batch_size=128, lr=0.005,
                         latency_batch=128, latency_repeats=9, threads=1),
    "cifar10-3c1l": dict(model="lenet-3c1l", data="cifar10", steps=500, batch_size=128, lr=0.005,
                         latency_batch=128, latency_repeats=9, threads=1),
    # ResNet-20 on the tagged core: run with --methods stepping,slimmable,anywidth (early exit needs a flat stack)
    "cifar10-resnet20": dict(model="resnet-20", data="cifar10", steps=300, batch_size=128, lr=0.02,
                             latency_batch=128, latency_repeats=9, threads=2),
}
ALL = "stepping,slimmable,us,anywidth,earlyexit,individual,slice,slice-ft"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--methods", default=ALL)
    parser.add_argument("--budgets", default="0.15,0.3,0.6,0.85")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: preset's, else 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-batch", type=int, default=None)
    parser.add_argument("--latency-repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (presets: 1, steady on a shared 2-core machine; "
                             "2 on an idle one; default without preset: torch's)")
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--stem", default=None, help="result file name (default compare_<model>_<data>)")
    parser.add_argument("--options", default=None,
                        help='per-method settings as JSON, e.g. \'{"stepping": {"granularity": 4}}\'')
    parser.add_argument("--teacher", default=None, metavar="RUN",
                        help="a `dyninfer train` run every method distils from (default: none)")
    parser.add_argument("--progress", action="store_true", help="progress bars inside each method")
    args = parser.parse_args(argv)

    settings = dict(PRESETS[args.preset]) if args.preset else {}
    for key in ("model", "data", "steps", "batch_size", "lr", "latency_batch", "latency_repeats", "threads"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings.setdefault("batch_size", 128)
    settings.setdefault("lr", 0.05)
    settings.setdefault("latency_batch", 128)
    settings.setdefault("latency_repeats", 15)
    missing = [k for k in ("model", "data", "steps") if k not in settings]
    if missing:
        parser.error(f"give --preset or all of --model, --data, --steps (missing: {', '.join(missing)})")
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])

    from dyninfer import compare, report
    from dyninfer.cli.compare import parse_options

    try:
        options = parse_options(args.options)
    except ValueError as err:
        parser.error(str(err))
    teacher = None
    if args.teacher:
        from dyninfer.cli.common import load_trained

        teacher, _ = load_trained(Path(args.teacher))

    command = " ".join(["python", "benchmarks/compare.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    machine = report.machine()
    print(f"command: {command}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads, "
          f"torch {machine['torch']}, python {machine['python']}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stem = args.stem or f"compare_{settings['model']}_{settings['data']}"
    start = time.perf_counter()
    try:  # a bad setting is a ValueError raised before any training: say it as the CLI does
        record = compare.run(settings["model"], settings["data"], methods=args.methods.split(","),
                             budgets=[float(b) for b in args.budgets.split(",")], steps=settings["steps"],
                             batch_size=settings["batch_size"], seed=args.seed, out=args.out, lr=settings["lr"],
                             latency_batch=settings["latency_batch"], latency_repeats=settings["latency_repeats"],
                             data_root=args.data_root, stem=stem, progress=args.progress, command=command,
                             options=options, teacher=teacher, teacher_name=args.teacher)
    except ValueError as err:
        print(f"compare.py: error: {err}", file=sys.stderr)
        return 2
    text = compare.markdown(record)
    print("\n" + text.split("## Every subnet", 1)[0].rstrip())
    print(f"\ntotal {time.perf_counter() - start:.0f} s; wrote {', '.join(record['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
