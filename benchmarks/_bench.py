"""What the benchmark scripts share: the doubly nested grid's and the output's arguments, the
start of a run (output folder, threads, the exact command) and its end."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def grid_arguments(parser: argparse.ArgumentParser, data: str, steps: int) -> None:
    """The doubly nested grid and its training schedule."""
    parser.add_argument("--data", default=data)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)


def output_arguments(parser: argparse.ArgumentParser, stem: str) -> None:
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--stem", default=stem)


def begin(args: argparse.Namespace, script: str, argv: list[str] | None) -> tuple[Path, str]:
    """Create the output folder, set the threads, print and return the exact command."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    command = " ".join(["python", f"benchmarks/{script}"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    print(f"command: {command}", flush=True)
    return out, command


def finish(out: Path, stem: str, record: dict, save: Callable[[Path, str, dict], None], started: float) -> int:
    """Record the wall time, save, print the markdown."""
    record["total_seconds"] = time.perf_counter() - started
    save(out, stem, record)
    print((out / f"{stem}.md").read_text())
    return 0
