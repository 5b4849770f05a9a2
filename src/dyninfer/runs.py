"""The run directory, read and written in one place.

Every command that trains writes ``run.json`` (its kind, what made it, its settings) beside its
checkpoints and reports; every command that reads a run goes through :func:`read_meta`, and
``dy.load(run)`` returns the right object for any kind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

from dyninfer import checkpoint, models
from dyninfer.methods import doubly_nested, lcnet, nonuniform, stepping

__all__ = ["KINDS", "MIN_FREE_BYTES", "prepare_out", "lock", "write_meta", "read_meta", "load"]

# A run writes checkpoints, metrics and reports as it goes; below this much free space it would
# fail part-way, so it is refused before it starts.
MIN_FREE_BYTES = 64 * 2**20
LOCK_NAME = ".dyninfer.lock"

# kind -> the command that makes it (for error messages)
KINDS = {"train": ("dyninfer train",), "stepping": ("dyninfer construct", "dyninfer demo"),
         "lcnet": ("dyninfer lcnet train",), "nonuniform": ("dyninfer nonuniform train",),
         "doubly-nested": ("dyninfer dnn train",)}


def _made_by(kinds: Sequence[str]) -> str:
    return " or ".join(f"`{command}`" for k in kinds for command in KINDS.get(k, (k,)))


def prepare_out(out: str | Path, flag: str = "--out") -> Path:
    """The output folder, created if needed and checked writable before any work starts."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} exists and is not a directory")
    probe = path / ".write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{flag} {path} cannot be created or written ({err.strerror})") from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise ValueError(f"{flag} {path} has {free / 2**20:.0f} MiB free; a run needs at least "
                         f"{MIN_FREE_BYTES / 2**20:.0f} MiB for its checkpoints and reports")
    return path


@contextlib.contextmanager
def lock(out: str | Path, command: str = "run") -> Iterator[Path]:
    """Hold ``out``'s lock while a command writes there: a second run on the same folder is
    refused with the holder's pid (two runs would interleave metrics.jsonl and checkpoints).

    An advisory ``flock`` on ``out/.dyninfer.lock``: the kernel releases it when its process
    ends, however it ends, so a lock file left by a killed run is simply taken over.
    """
    import fcntl

    path = Path(out) / LOCK_NAME
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").split()
        os.close(fd)
        raise ValueError(f"{out} is in use by another dyninfer run (pid {holder[0] if holder else '?'}); wait for "
                         f"it to finish or choose another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would race a waiting run)


def write_meta(out: str | Path, meta: dict) -> Path:
    """``out/run.json``, written atomically (temp file + rename)."""
    path = Path(out) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def read_meta(run: str | Path, kind: str | Sequence[str] | None = None) -> dict:
    """The run's ``run.json``; a clear error when there is none, it is damaged, or (with ``kind``)
    it holds another kind of run."""
    path = Path(run) / "run.json"
    if not path.is_file():
        wanted = [kind] if isinstance(kind, str) else list(kind or ("train", "stepping"))
        raise FileNotFoundError(f"{run} is not a dyninfer run directory (no run.json); make one with "
                                f"{_made_by(wanted)}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged (not valid JSON: {err}); rerun the command that made it") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ValueError(f"{path} has no 'kind'; it was not written by dyninfer")
    wanted = [kind] if isinstance(kind, str) else list(kind or [])
    if wanted and meta["kind"] not in wanted:
        raise ValueError(f"{run} holds a {meta['kind']!r} run; expected one made by {_made_by(wanted)} "
                         f"(a {' or '.join(wanted)} run)")
    return meta


def load(run: str | Path) -> Any:
    """The trained object of any run directory: a model (train), a SteppingNet, an LC-Net, a
    non-uniform net or a doubly nested net, in eval mode."""
    run = Path(run)
    meta = read_meta(run, tuple(KINDS))
    kind = meta["kind"]
    if kind == "stepping":
        return stepping.SteppingNet.load(run / "stepping")
    if kind == "nonuniform":
        return nonuniform.NonUniformNet.load(run / "nonuniform")
    if kind == "lcnet":
        return lcnet.load(run / "model")
    if kind == "doubly-nested":
        return doubly_nested.DoublyNestedNet.load(run / "dnn")
    model = models.create(meta["model"], num_classes=meta["num_classes"], expansion=meta["expansion"],
                          input_shape=tuple(meta["input_shape"]))
    checkpoint.load_model(run / "model", model)
    return model.eval()
