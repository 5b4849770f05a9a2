"""``dyninfer compare``: every method on one model and data set at matched MAC budgets.

Registered on the main parser with :func:`add_commands`; user errors raise ValueError.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dyninfer import compare
from dyninfer.cli.common import CLIError, load_trained
from dyninfer.data import canonical_name

EXAMPLE = ("dyninfer compare --model lenet-5 --data fashion-mnist "
           "--methods stepping,slimmable,us,anywidth,earlyexit,individual --budgets 0.15,0.3,0.6,0.85 "
           "--steps 2000 --out runs/cmp")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers like 0.15,0.3,0.6,0.85; got {text!r}") from None


def parse_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--options must be JSON like '{{\"us\": {{\"num_random\": 2}}}}'; {err}") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError(f"--options must map method names to objects of settings, got {text!r}")
    return options


def cmd_compare(args: argparse.Namespace) -> int:

    budgets = _floats(args.budgets, "--budgets")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("dyninfer.compare").setLevel(logging.INFO)
    teacher = None
    if args.teacher:

        teacher, meta = load_trained(Path(args.teacher))
        if canonical_name(meta["data"]) != canonical_name(args.data):
            raise CLIError(f"the teacher in {args.teacher} was trained on {meta['data']}, not {args.data}")
    record = compare.run(args.model, args.data, methods=methods, budgets=budgets, steps=args.steps,
                         batch_size=args.batch_size, seed=args.seed, out=args.out, lr=args.lr,
                         options=parse_options(args.options), latency_batch=args.latency_batch,
                         latency_repeats=args.latency_repeats, data_root=args.data_root, stem=args.stem,
                         progress=not args.quiet, command=" ".join(["dyninfer"] + sys.argv[1:]),
                         teacher=teacher, teacher_name=args.teacher, resume=not args.no_resume)
    text = compare.markdown(record)
    table = text.split("## Test accuracy (%) at matched MAC budgets", 1)[1].split("## Every subnet", 1)[0]
    print("Test accuracy (%) at matched MAC budgets" + table.rstrip())
    print("\nwrote " + ", ".join(record["files"]))
    return 0


def add_commands(subparsers) -> None:
    """Register ``compare`` on the ``dyninfer`` subparsers object."""
    p = subparsers.add_parser(
        "compare", help="compare dynamic-width methods and baselines at matched MACs and training budget",
        description="Train every method with the same budget (optimizer steps x batch size), data pipeline and "
                    "seed; write a markdown + JSON table (accuracy at matched MACs, latency per subnet, incremental "
                    f"cost) and an accuracy-vs-MACs plot. Example: {EXAMPLE}")
    p.add_argument("--model", required=True, help="flat zoo model: lenet-5, lenet-3c1l, vgg-16")
    p.add_argument("--data", default="digits", help="data set name (digits, fashion-mnist, cifar10, ...)")
    p.add_argument("--data-root", default=None, help="directory holding the data set files")
    p.add_argument("--methods", default=",".join(compare.METHODS),
                   help=f"comma-separated, from {','.join(compare.METHODS)} (default: all)")
    p.add_argument("--budgets", default=",".join(str(b) for b in compare.DEFAULT_BUDGETS),
                   help="MAC budgets as fractions of the original network, increasing")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per method (the training budget)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", default=None,
                   help="JSON of per-method settings, e.g. '{\"stepping\": {\"teacher_fraction\": 0.2}}'")
    p.add_argument("--teacher", default=None, metavar="RUN",
                   help="a `dyninfer train` run every method distils from (default: none, plain cross-entropy)")
    p.add_argument("--latency-batch", type=int, default=128)
    p.add_argument("--latency-repeats", type=int, default=9, help="0 skips timing")
    p.add_argument("--out", required=True, help="directory for <stem>.md, .json and .png")
    p.add_argument("--stem", default="compare")
    p.add_argument("--no-resume", action="store_true",
                   help="train every method anew (default: a rerun with the same settings takes the methods an "
                        "earlier run finished from <out>/<stem>.partial/)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)


__all__ = ["add_commands", "cmd_compare"]
