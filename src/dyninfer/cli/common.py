"""What every ``dyninfer`` command shares: the user-error type and reading data and runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from dyninfer import checkpoint, data, models, runs


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------- helpers


def read_run(run: Path) -> dict:
    return runs.read_meta(run)


def load_data(name: str, root: str | None):
    return data.load(name, root=root)


def load_trained(run: Path):
    """(model, run meta) of a run made by `dyninfer train`."""
    meta = read_run(run)
    if meta.get("kind") != "train":
        raise CLIError(f"{run} holds a {meta.get('kind')!r} run; expected one made by `dyninfer train`")
    model = models.create(meta["model"], num_classes=meta["num_classes"], expansion=meta["expansion"],
                          input_shape=tuple(meta["input_shape"]))
    checkpoint.load_model(run / "model", model)
    return model.eval(), meta


# ---------------------------------------------------------------------------- commands


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help=f"data set ({', '.join(data.DATASETS)})")
    p.add_argument("--data-root", default=None, help="directory holding the data set files")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What every training command takes: the seed, the output folder, quiet."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")


__all__ = ["CLIError", "add_data_arguments", "add_run_arguments", "load_data", "load_trained", "read_run"]
