"""Training under a counted budget: the config every method shares, a seeded batch stream, and a
loop that records each optimizer step.

Training budgets are counted in optimizer steps x batch size: every loop here draws full
batches from one seeded stream (the same pipeline as SteppingNet's construction) and records
each optimizer step in a :class:`StepLog`, which ends up in ``net.history``. No method is
imported here, so every method module (SteppingNet's included) can use it.
"""

from __future__ import annotations

import contextvars
import json
import math
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from dyninfer.data import BatchStream, ImageSet
from dyninfer.train import FrozenTeacher, TrainConfig, TrainerState, fit, kd_loss


@dataclass(frozen=True)
class BaselineConfig:
    """The training budget and optimizer every baseline shares (SGD + Nesterov, cosine LR)."""

    steps: int = 1000                # optimizer steps; the budget is steps x batch_size samples
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{type(self).__name__}.lr must be a number > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"{type(self).__name__}.momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"{type(self).__name__}.weight_decay must be >= 0, got {self.weight_decay!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class StepLog:
    """Counts optimizer steps and samples, per phase (e.g. "train", "finetune-2")."""

    def __init__(self) -> None:
        self.steps = 0
        self.samples = 0
        self.phases: dict[str, int] = {}
        self.losses: dict[str, list[float]] = {}

    def record(self, batch: int, phase: str, loss: float | None = None) -> None:
        self.steps += 1
        self.samples += int(batch)
        self.phases[phase] = self.phases.get(phase, 0) + 1
        if loss is not None:
            self.losses.setdefault(phase, []).append(loss)

    def add(self, steps: int, batch: int, phase: str) -> None:
        """Record ``steps`` optimizer steps of ``batch`` samples made by a loop that is not ours."""
        self.steps += int(steps)
        self.samples += int(steps) * int(batch)
        if steps:
            self.phases[phase] = self.phases.get(phase, 0) + int(steps)

    def as_dict(self) -> dict:
        """``optimizer_steps``, ``samples``, ``phases`` and each phase's mean loss over its last 10 %."""
        tail = {}
        for phase, values in self.losses.items():
            last = values[-max(1, len(values) // 10):]
            tail[phase] = sum(last) / len(last)
        return {"optimizer_steps": self.steps, "samples": self.samples, "phases": dict(self.phases),
                "final_loss": tail}


class Supervision:
    """The loss a method trains each subnet with: cross-entropy, or, given a teacher, the mix
    SteppingNet's Eq. 4 uses, gamma CE + (1 - gamma) KD(teacher || subnet), so every method of a
    comparison learns from the same teacher in the same way. ``targets(x)`` runs the (frozen,
    BN-folded) teacher once per batch; ``loss(logits, y, targets)`` is the per-subnet loss."""

    def __init__(self, teacher: torch.nn.Module | None = None, gamma: float = 0.4, temperature: float = 1.0):
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        self.teacher = None if teacher is None else (
            teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher))
        self.gamma, self.temperature = float(gamma), float(temperature)

    def targets(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.teacher(x) if self.teacher is not None else None

    def loss(self, logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        return distilled_loss(logits, y, targets, self.gamma, self.temperature)


def distilled_loss(logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None, gamma: float,
                   temperature: float) -> torch.Tensor:
    """CE, or with teacher ``targets`` Eq. 4's gamma CE + (1 - gamma) KL(teacher || student)."""
    ce = F.cross_entropy(logits, y)
    if targets is None:
        return ce
    return gamma * ce + (1 - gamma) * kd_loss(logits, targets, temperature)


def batch_stream(data: ImageSet, batch_size: int, seed: int) -> BatchStream:
    """Endless full batches: shuffled, augmented, seeded; the pipeline every method trains on."""
    if len(data) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(data)} training samples of {data.name!r}; "
                         f"use a batch size <= {len(data)}")
    return BatchStream(data, batch_size, seed)


def sgd(params, config: BaselineConfig, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires gradients")
    return torch.optim.SGD(params, lr=config.lr if lr is None else lr, momentum=config.momentum,
                           nesterov=config.momentum > 0, weight_decay=config.weight_decay)


class _Record:
    """Records each optimizer step of :func:`dyninfer.train.fit` in a :class:`StepLog`. Its state,
    checkpointed, is this phase's losses so far and the ``optimizer.step()`` calls counted while
    it ran (an optimizer hook, independent of the log): a resumed phase logs the steps it skips
    and hands the budget check the count, not the log's own figure."""

    def __init__(self, log: StepLog, phase: str, batch: int):
        self.log, self.phase, self.batch = log, phase, batch
        self.losses: list[float] = []
        self.counted = 0

    def on_batch_end(self, state: TrainerState) -> None:
        self.losses.append(float(state.loss))
        self.log.record(self.batch, self.phase, self.losses[-1])

    def count(self, *_: Any) -> None:
        self.counted += 1

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "counted": self.counted}

    def load_state_dict(self, state: dict) -> None:
        self.losses = [float(v) for v in state["losses"]]
        self.counted = int(state["counted"])
        for value in self.losses:
            self.log.record(self.batch, self.phase, value)
        note_resumed(self.counted)


class _Generators:
    """Checkpoints the state of the generators a method draws its own choices from (US widths,
    the sandwich's middle subnets, sampled (depth, width) cells), so a resumed run draws on."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    def state_dict(self) -> dict:
        return {"states": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        for g, saved in zip(self.generators, state["states"], strict=True):
            g.set_state(saved)


_work: contextvars.ContextVar[list | None] = contextvars.ContextVar("dyninfer_budget_work", default=None)
_resumed_steps: contextvars.ContextVar[int] = contextvars.ContextVar("dyninfer_resumed_steps", default=0)


@contextmanager
def checkpointed(folder: str | Path, key: dict) -> Iterator[Callable[[], int]]:
    """Every :func:`run_steps` inside the block checkpoints into ``folder`` (one subfolder per
    call, numbered in call order) and resumes from what an interrupted run with the same ``key``
    left there; a different key starts the folder afresh. Yields a function giving the optimizer
    steps taken from checkpoints instead of run (a budget check counts them as done)."""
    folder = Path(folder)
    stamp = folder / "key.json"
    wanted = json.loads(json.dumps(key, sort_keys=True, default=str))
    if folder.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != wanted):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(wanted, sort_keys=True))
    token, resumed = _work.set([folder, 0]), _resumed_steps.set(0)
    try:
        yield _resumed_steps.get
    finally:
        _work.reset(token)
        _resumed_steps.reset(resumed)


def work_path(name: str) -> Path | None:
    """Where a method that keeps its own checkpoints (SteppingNet's construction) puts ``name``
    inside the active :func:`checkpointed` block; None outside one."""
    work = _work.get()
    return None if work is None else work[0] / name


def note_resumed(steps: int) -> None:
    """Count ``steps`` optimizer steps as taken from a checkpoint (inside :func:`checkpointed`)."""
    if _work.get() is not None:
        _resumed_steps.set(_resumed_steps.get() + int(steps))


def run_steps(model: torch.nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              optimizer: torch.optim.Optimizer, stream: BatchStream, steps: int, log: StepLog, phase: str,
              progress: bool = False, callbacks: Sequence[Any] = (),
              generators: Sequence[torch.Generator] = ()) -> None:
    """``steps`` optimizer steps of ``loss(x, y)`` on ``model`` under a cosine LR schedule, through
    the one training loop (:func:`dyninfer.train.fit`'s step-budget mode: progress, and data
    parallelism under torchrun), each recorded in ``log`` under ``phase``.

    Inside :func:`checkpointed`, the phase checkpoints (model, optimizer, stream, RNG, the
    ``generators`` the loss draws from, its log) and resumes exactly where it was interrupted."""
    if steps <= 0:
        return
    config = TrainConfig(steps=steps, batch_size=stream.batch_size, schedule="cosine", progress=progress)
    work = _work.get()
    out = None
    if work is not None:
        work[1] += 1
        out = work[0] / f"{work[1]:02d}-{phase}"
    extra = [_Generators(generators)] if generators else []
    record = _Record(log, phase, stream.batch_size)
    hook = register_optimizer_step_post_hook(record.count)
    try:
        fit(model, stream.data, config, loss_fn=lambda _model, x, y: loss(x, y), optimizer=optimizer, batches=stream,
            callbacks=[*callbacks, *extra, record], desc=phase, out=out, resume=out is not None)
    finally:
        hook.remove()


def split_steps(total: int, parts: int) -> list[int]:
    """``total`` steps over ``parts`` runs as evenly as possible; the larger runs get the rest."""
    base, rest = divmod(total, parts)
    return [base + (1 if i >= parts - rest else 0) for i in range(parts)]
