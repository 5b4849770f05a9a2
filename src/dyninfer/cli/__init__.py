"""The ``dyninfer`` command, a package with one module per family of subcommands:

  train.py ........ train, eval, info          stepping.py ... construct, demo
  lcnet.py ........ lcnet train|eval            nonuniform.py . nonuniform train|eval|bench
  dnn.py .......... dnn train|table|select      runtime.py .... export, bench, simulate
  compare.py ...... compare                     common.py ..... errors, reading data and runs

Each module's ``add_commands`` registers its subcommands; flags map onto the library's frozen config
dataclasses; every run directory gets a ``run.json`` saying what it is, so ``dyninfer eval runs/x``
needs nothing else. Under torchrun a command runs on every rank (:mod:`dyninfer.launch`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from dyninfer import runs
from dyninfer.cli import compare, dnn, lcnet, nonuniform, runtime, stepping, train
from dyninfer.cli.common import CLIError
from dyninfer.data import canonical_name
from dyninfer.launch import Ranks

# in the order ``dyninfer --help`` lists them
COMMAND_MODULES = (train, stepping, lcnet, nonuniform, dnn, runtime, compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyninfer", description="Networks whose compute is dialed at run time.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(sub)
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
    ranks, ok = None, False
    try:
        ranks = Ranks()  # under torchrun: one process group for the command; rank 0 owns --out
        if isinstance(getattr(args, "data", None), str):  # one spelling from here on: DIGITS -> digits
            args.data = canonical_name(args.data)
        if out is None:  # nothing to train data-parallel: rank 0 alone
            code = args.func(args) if ranks.lead else 0
        elif not ranks.lead:  # works in a private copy of --out; only rank 0 writes there and prints
            args.out = str(ranks.private_copy(out))
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank 0 tells the user
                code = args.func(args)
        else:
            # every command with --out writes there: check it before any work, and hold its lock
            runs.prepare_out(out)
            with runs.lock(out, args.command):
                ranks.release(True)
                code = args.func(args)
        ok = True
        return code
    except (CLIError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"dyninfer {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if ranks is not None:
            if ranks.lead and out is not None:
                ranks.release(False)  # a no-op once released; else the others stop instead of waiting
            ranks.close(ok)
        lead = ranks is None or ranks.lead
        left = list(Path(out).iterdir()) if lead and created and Path(out).is_dir() else None
        if left is not None and all(f.name == runs.LOCK_NAME for f in left):
            with contextlib.suppress(OSError):  # a run refused before its work leaves no folder behind
                for f in left:
                    f.unlink()
                Path(out).rmdir()


__all__ = ["CLIError", "build_parser", "main"]
