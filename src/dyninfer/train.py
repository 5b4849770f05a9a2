"""Training: one short loop (:func:`fit`) that methods extend through callbacks and ``loss_fn``.

``fit`` handles what every method needs and none should copy: optimizer and LR schedule,
seeded data order, progress, per-epoch metrics, atomic checkpoints with exact resume, and
DistributedDataParallel under ``torchrun``. Methods plug in a ``loss_fn`` (e.g. Eq. 4 of
SteppingNet via :func:`kd_loss`) and callbacks (e.g. scaling gradients after backward).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dyninfer import checkpoint as ckpt
from dyninfer import progress
from dyninfer.data import BatchStream, ImageSet
from dyninfer.nn.tagged import fold_module

__all__ = ["TrainConfig", "TrainerState", "FrozenTeacher", "kd_loss", "evaluate", "fit", "lr_factor", "warmup_factor", "make_optimizer"]

log = logging.getLogger(__name__)

Forward = Callable[[nn.Module, Tensor], Tensor]
LossFn = Callable[[nn.Module, Tensor, Tensor], "Tensor | dict[str, Tensor]"]

# Fields that may change between a run and its resumption without breaking it.
_RESUMABLE_CHANGES = frozenset({"epochs", "progress", "log_every", "eval_batch_size"})
SCHEDULES = ("cosine", "step", "none")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``lr=None`` picks 0.05 for SGD and 1e-3 for Adam.

    ``warmup_steps`` ramps the LR linearly from lr/warmup_steps to the scheduled LR over the first
    optimizer steps.

    ``schedule``: "cosine" anneals to 0 over the run; "step" multiplies the LR by ``step_gamma``
    at each of ``step_milestones`` (fractions of the run); "none" keeps it constant. It is
    evaluated per epoch, or per optimizer step with ``schedule_by="step"``.

    ``steps`` switches to the step-budget mode: exactly ``steps`` optimizer steps of full batches
    drawn pass after pass from one seeded :class:`~dyninfer.data.BatchStream` (``epochs`` is then
    unused), the schedule per step, and with an output folder a checkpoint every
    ``checkpoint_every`` steps (default: a tenth of the run). ``log_every`` is how many steps pass between reads of the loss for the
    progress bar (each read syncs with the GPU). ``find_unused_parameters`` is passed to
    DistributedDataParallel; set it when a step leaves some parameters unused (one subnet).
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_milestones: tuple[float, ...] = (0.5, 0.75)
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    warmup_steps: int = 0
    augment: bool = True
    drop_last: bool = False
    seed: int = 0
    eval_batch_size: int = 512
    log_every: int = 50
    progress: bool = True
    find_unused_parameters: bool = False
    steps: int | None = None
    checkpoint_every: int | None = None
    schedule_by: str = "epoch"

    def __post_init__(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {accepted}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise bad("warmup_steps", "an int >= 0")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an int >= 1")
        if not is_int(self.seed):
            raise bad("seed", "an int")
        for name in ("steps", "checkpoint_every"):
            if getattr(self, name) is not None and (not is_int(getattr(self, name)) or getattr(self, name) < 1):
                raise bad(name, "an int >= 1 or None")
        if self.schedule_by not in ("epoch", "step"):
            raise bad("schedule_by", "'epoch' or 'step'")
        for name in ("nesterov", "augment", "drop_last", "progress", "find_unused_parameters"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.optimizer not in ("sgd", "adam"):
            raise bad("optimizer", "'sgd' or 'adam'")
        if self.lr is None:
            object.__setattr__(self, "lr", 0.05 if self.optimizer == "sgd" else 1e-3)
        if not is_num(self.lr) or self.lr <= 0:
            raise bad("lr", "a number > 0 (or None for the optimizer's default)")
        if not is_num(self.momentum) or not 0 <= self.momentum < 1:
            raise bad("momentum", "a number in [0, 1)")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("TrainConfig.nesterov=True needs momentum > 0 with SGD; got momentum=0 "
                             "(set nesterov=False or momentum in (0, 1))")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a number >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", "'cosine', 'step' or 'none'")
        try:
            milestones = tuple(float(m) for m in self.step_milestones)
        except (TypeError, ValueError):
            raise bad("step_milestones", "a sequence of fractions of epochs in (0, 1]") from None
        if (any(not (0 < m <= 1) for m in milestones)
                or any(b <= a for a, b in zip(milestones, milestones[1:]))):
            raise bad("step_milestones", "strictly increasing fractions of epochs in (0, 1]")
        object.__setattr__(self, "step_milestones", milestones)
        if not is_num(self.step_gamma) or not 0 < self.step_gamma <= 1:
            raise bad("step_gamma", "a number in (0, 1]")
        if not is_num(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "a number in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; accepted: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainerState:
    """What callbacks see. ``model`` is the bare module (also under DDP); ``wrapped`` is what
    the forward pass goes through (the DDP wrapper, or ``model``). ``epoch`` is the 0-based
    epoch in progress and ``batch_index`` the batch within it; ``step`` counts optimizer steps
    over the whole run; in the step-budget mode a callback may set ``stop`` to end the run after
    the current step; ``metrics`` is the epoch's record (callbacks may add to it in
    ``on_epoch_end``, before it is written); ``loss`` is the last
    batch's loss, detached (a tensor: reading it with ``.item()`` syncs the GPU)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    wrapped: nn.Module
    epoch: int = 0
    step: int = 0
    batch_index: int = 0
    loss: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    stop: bool = False
    postfix: str | None = None  # a callback's status line for the progress bar (step mode)

    def sync_buffers(self) -> None:
        """Make every rank's buffers (BN statistics, tags, masks) rank 0's; a no-op in one process."""
        if self.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Knowledge distillation: KL(teacher || student) on softened outputs, x T^2, batch mean.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    The teacher is detached: gradients flow into the student only.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ValueError("student and teacher logits must have the same shape (N, classes, ...); got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


class FrozenTeacher(nn.Module):
    """An inference-only copy of a distillation teacher: BatchNorm folded, channels_last.

    Distillation runs the teacher on every training batch, and in SteppingNet's retraining that
    forward was the largest overhead over training the student alone (benchmarks/results/
    stepping_cost.md). Folding BN and using channels_last made LeNet-5's and LeNet-3C1L's
    forward 1.8-2.1x faster on CPU. Every model the tagged core reads (the zoo, residual nets
    included) is folded; others run as they are, in eval mode. The copy never trains and never changes the caller's model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()

        net = fold_module(model).to(memory_format=torch.channels_last)
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":  # always in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).contiguous()


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 512, forward: Forward | None = None) -> dict[str, Any]:
    """Top-1/top-5 accuracy (fractions) and mean cross-entropy of ``model`` on ``data``.

    Runs in eval mode without gradients and restores the previous mode. ``forward(model, x)``
    picks what to run (e.g. ``lambda m, x: m(x, subnet=2)``). Top-5 uses k = min(5, classes).
    """
    n = len(data)
    if n == 0:
        raise ValueError(f"cannot evaluate on an empty data set ({data.name!r})")
    device = _device_of(model)
    k = min(5, data.num_classes)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    topk = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for x, y in data.batches(batch_size):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = forward(model, x) if forward is not None else model(x)
                if not isinstance(logits, Tensor) or logits.shape != (x.shape[0], data.num_classes):
                    got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                    raise ValueError(f"the model must return logits of shape ({x.shape[0]}, {data.num_classes}) "
                                     f"for data set {data.name!r}; got {got}")
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
                pred = logits.topk(k, dim=1).indices
                top1 += (pred[:, 0] == y).sum()
                topk += (pred == y[:, None]).any(dim=1).sum()
    finally:
        model.train(was_training)
    return {"top1": top1.item() / n, "top5": topk.item() / n, "loss": loss_sum.item() / n, "n": n}


def lr_factor(config: TrainConfig, epoch: int, total: int | None = None) -> float:
    """Multiplier of the base LR at 0-based ``epoch`` (or step) of ``total`` (default
    ``config.epochs``) under ``config.schedule``."""
    total = config.epochs if total is None else total
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / total))
    if config.schedule == "step":
        # A milestone f decays the LR from epoch floor(f * total) on; 1e-9 absorbs float error.
        passed = sum(epoch >= math.floor(f * total + 1e-9) for f in config.step_milestones)
        return config.step_gamma ** passed
    return 1.0


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over the parameters that require gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters that require gradients; nothing to train")
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts``, the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --- distributed --------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # None: keep the model where it is
    owns_group: bool = False


def _setup_distributed(distributed: bool | None) -> _Dist:
    """Join (or start, from torchrun's env vars) a process group unless told not to."""
    if distributed is False or not dist.is_available():
        if distributed:
            raise RuntimeError("distributed=True but torch.distributed is not available in this build")
        return _Dist()
    owns = False
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            if distributed:
                raise RuntimeError("distributed=True needs a process group or torchrun's environment "
                                   f"(WORLD_SIZE > 1); WORLD_SIZE is {os.environ.get('WORLD_SIZE')!r}")
            return _Dist()
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if world <= 1:
        return _Dist(owns_group=owns)
    device = None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    return _Dist(rank, world, device, owns)


def _all_reduce_sum(t: Tensor, ctx: _Dist) -> Tensor:
    if ctx.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# --- checkpoints --------------------------------------------------------------------------------

def _callbacks_with_state(callbacks: Sequence[Any]) -> list[tuple[str, Any]]:
    """Callbacks that have state, keyed by class name (``#n`` for repeats) so that adding or
    removing stateless callbacks between a run and its resumption changes nothing."""
    keyed, counts = [], {}
    for cb in callbacks:
        if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None)):
            name = type(cb).__qualname__
            n = counts[name] = counts.get(name, -1) + 1
            keyed.append((f"{name}#{n}" if n else name, cb))
    return keyed


def _save_checkpoint(path: Path, state: TrainerState, callbacks: Sequence[Any], epochs_done: int | None,
                     rng: Mapping[str, Tensor] | None = None) -> None:
    """``epochs_done`` in the epoch mode; in the step mode None, with the global ``rng`` states
    (the step mode draws from the caller's RNG instead of reseeding it, so it checkpoints it)."""
    tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    opt_tensors, opt_skeleton = ckpt.pack_state(state.optimizer.state_dict(), "optimizer")
    tensors.update(opt_tensors)
    cb_skeletons = {}
    for key, cb in _callbacks_with_state(callbacks):
        cb_tensors, cb_skeletons[key] = ckpt.pack_state(cb.state_dict(), f"callbacks.{key}")
        tensors.update(cb_tensors)
    rng_tensors, rng_skeleton = ckpt.pack_state(dict(rng or {}), "rng")
    tensors.update(rng_tensors)
    meta = {
        "epochs_done": epochs_done,
        "stopped": state.stop,
        "rng": rng_skeleton,
        "step": state.step,
        "config": state.config.to_dict(),
        "model": ckpt.model_config(state.model),
        "optimizer": opt_skeleton,
        "callbacks": cb_skeletons,
        "history": state.history,
        "world_size": state.world_size,
        "torch": torch.__version__,
    }
    ckpt.save(path, tensors, meta)


def _restore_checkpoint(path: Path, state: TrainerState, callbacks: Sequence[Any]) -> dict[str, Any]:
    """Load model/optimizer/callback state into ``state``; returns the checkpoint's ``epochs_done``
    and the ``rng`` states it saved."""
    tensors, meta = ckpt.load(path)
    saved = meta.get("config", {})
    changed = sorted(k for k, v in state.config.to_dict().items()
                     if k in saved and saved[k] != v and k not in _RESUMABLE_CHANGES)
    if changed:
        raise ValueError(
            f"cannot resume from {str(ckpt.paths(path)[0])!r}: config differs in "
            + ", ".join(f"{k} (checkpoint {saved[k]!r}, now {getattr(state.config, k)!r})" for k in changed)
            + "; pass resume=False or use another output directory")
    model_tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    ckpt.check_model(state.model, model_tensors, meta, f"checkpoint {str(ckpt.paths(path)[0])!r}")
    state.model.load_state_dict(model_tensors, strict=True)
    try:
        state.optimizer.load_state_dict(ckpt.unpack_state(meta["optimizer"], tensors))
    except (KeyError, ValueError) as err:
        raise ckpt.CheckpointMismatchError(
            f"optimizer state in {str(ckpt.paths(path)[0])!r} does not fit this model's optimizer ({err})") from None
    cb_state = meta.get("callbacks", {})
    for key, cb in _callbacks_with_state(callbacks):
        if key in cb_state:
            cb.load_state_dict(ckpt.unpack_state(cb_state[key], tensors))
        else:
            log.warning("checkpoint has no state for callback %s; it starts fresh", key)
    state.step = int(meta["step"])
    state.history = list(meta.get("history", []))
    rng = ckpt.unpack_state(meta["rng"], tensors) if "rng" in meta else {}
    return {"epochs_done": meta["epochs_done"], "rng": rng, "stopped": meta.get("stopped", False)}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_lines(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def _ranks_agree(done: int, what: str, device: torch.device, ctx: _Dist, out_dir: Path | None) -> None:
    """Every rank resumes from the same point (``done`` epochs or steps), or none starts."""
    seen = torch.tensor([done, -done], device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    if seen[0].item() != -seen[1].item():
        raise RuntimeError(f"ranks disagree on the checkpoint to resume from ({what} {-seen[1].item()}.."
                           f"{seen[0].item()}); is {str(out_dir)!r} on a shared filesystem?")


def _write_run_start(out_dir: Path, config: TrainConfig, model: nn.Module, train: ImageSet, test: ImageSet | None,
                     ctx: _Dist, history: list[dict[str, Any]]) -> None:
    """config.json, and metrics.jsonl cut back to the checkpoint's history (drops a lost segment's lines)."""
    _write_json(out_dir / "config.json", {
        "train": config.to_dict(),
        "model": ckpt.model_config(model),
        "data": {"name": train.name, "n": len(train), "input_shape": list(train.input_shape),
                 "num_classes": train.num_classes, "test_n": len(test) if test is not None else None},
        "world_size": ctx.world_size,
        "torch": torch.__version__,
    })
    _write_lines(out_dir / "metrics.jsonl", history)


# --- the loop -----------------------------------------------------------------------------------

_HOOKS = ("on_batch_start", "on_after_backward", "on_batch_end", "on_epoch_end")


def _call(callbacks: Sequence[Any], hook: str, state: TrainerState) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


def _split_loss(result: Any) -> tuple[Tensor, dict[str, Tensor]]:
    if isinstance(result, Tensor):
        loss, parts = result, {}
    elif isinstance(result, Mapping) and isinstance(result.get("loss"), Tensor):
        loss, parts = result["loss"], {k: v for k, v in result.items() if k != "loss" and isinstance(v, Tensor)}
    else:
        raise TypeError("loss_fn must return a scalar Tensor or a dict with a 'loss' Tensor; got "
                        + (f"dict with keys {sorted(result)}" if isinstance(result, Mapping) else type(result).__name__))
    if loss.dim() != 0 or not loss.requires_grad:
        raise ValueError(f"loss_fn's loss must be a scalar that requires grad; got shape {tuple(loss.shape)}, "
                         f"requires_grad={loss.requires_grad}")
    return loss, parts


def _default_loss(config: TrainConfig, forward: Forward | None) -> LossFn:
    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = forward(model, x) if forward is not None else model(x)
        return {"loss": F.cross_entropy(logits, y, label_smoothing=config.label_smoothing), "logits": logits}
    return loss_fn


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The linear warm-up's factor at 0-based optimizer step ``step`` of ``warmup_steps`` (0: none)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def _step(state: TrainerState, loss_fn: LossFn, x: Tensor, y: Tensor, callbacks: Sequence[Any],
          sums: dict[str, Tensor], sync: Callable[[], None] | None = None) -> int:
    """One optimizer step of either mode on (x, y): loss, backward, ``sync`` (gradient averaging),
    the hooks, the step; the batch's losses and correct predictions are added to ``sums``.
    Returns the batch size."""
    state.optimizer.zero_grad(set_to_none=True)
    loss, parts = _split_loss(loss_fn(state.wrapped, x, y))
    loss.backward()
    if sync is not None:
        sync()
    _call(callbacks, "on_after_backward", state)
    state.optimizer.step()
    state.step += 1
    state.loss = loss.detach()
    state.losses = {"loss": state.loss, **{k: v.detach() for k, v in parts.items()}}
    b = x.shape[0]
    for k, v in state.losses.items():
        if v.dim() == 0:
            sums[k] = sums.get(k, 0) + v.float() * b
    logits = parts.get("logits")
    if isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[0] == b:
        sums["__correct__"] = sums.get("__correct__", 0) + (logits.detach().argmax(dim=1) == y).sum()
    _call(callbacks, "on_batch_end", state)
    return b


def _averages(sums: dict[str, Tensor], seen: int, ctx: _Dist, device: torch.device) -> tuple[float, dict[str, float]]:
    """Samples seen on all ranks and the per-sample mean of every sum (all-reduced)."""
    names = sorted(sums)
    totals = _all_reduce_sum(torch.stack([torch.as_tensor(sums[k], device=device).float() for k in names]
                                         + [torch.tensor(float(seen), device=device)]), ctx).tolist()
    return totals[-1], {k: v / max(totals[-1], 1) for k, v in zip(names, totals)}


def _steps_per_epoch(n: int, config: TrainConfig, world: int) -> int:
    per_rank = -(-n // world)
    return per_rank // config.batch_size if config.drop_last else -(-per_rank // config.batch_size)


def fit(
    model: nn.Module,
    train: ImageSet,
    config: TrainConfig | None = None,
    *,
    test: ImageSet | None = None,
    out: str | os.PathLike | None = None,
    loss_fn: LossFn | None = None,
    forward: Forward | None = None,
    callbacks: Sequence[Any] = (),
    resume: bool = True,
    distributed: bool | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    batches: Iterator[tuple[Tensor, Tensor]] | None = None,
    start_step: int = 0,
    desc: str | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``train``; returns the per-epoch metrics (also in ``out/metrics.jsonl``).

    ``loss_fn(model, x, y)`` returns a scalar loss or a dict with "loss" (other scalars are
    averaged into ``train_<name>``, a "logits" entry gives ``train_acc``); the default is
    cross-entropy with ``config.label_smoothing`` through ``forward(model, x)`` (default
    ``model(x)``), which also drives evaluation on ``test``. Callbacks may define
    ``on_after_backward``, ``on_batch_end`` and ``on_epoch_end`` (see :class:`TrainerState`),
    and ``state_dict``/``load_state_dict`` to be checkpointed (matched by class name on resume).

    With ``out``, each epoch ends with an atomic checkpoint; ``resume=True`` continues from it
    and, because the data order and RNG are seeded from (seed, epoch), ends with the same
    weights as an uninterrupted run. Under torchrun (or an initialised process group) the
    model is wrapped in DistributedDataParallel and each rank trains on its shard; only rank 0
    writes files. ``distributed=False`` forbids that, ``True`` requires it.

    The step-budget mode (``config.steps``) is the loop every method's training runs through
    (SteppingNet's construction, every baseline, the non-uniform and doubly nested methods): it
    takes the method's own ``optimizer`` (whose hyper-parameters then replace the config's; the
    schedule multiplies each group's initial LR), its ``batches`` (an endless iterator, by default
    ``BatchStream(train, batch_size, seed)``; one with ``state_dict`` is checkpointed with the run),
    callbacks with ``on_batch_start`` (e.g. to set the LR or re-seed at a round boundary) and
    ``state.stop``. A loop that keeps its own checkpoints passes ``start_step`` to continue
    counting from there. Under a process group it averages gradients over ranks after each
    backward (one all-reduce, DDP's arithmetic without its wrapper: a method's loss runs several
    subnets through the model before one backward, which DDP's reducer does not allow), each rank
    training on its rows of every batch; rank 0's buffers are broadcast at each checkpoint.
    ``desc`` names the progress bar.
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    for name, data in (("train", train), ("test", test)):
        if data is not None and not isinstance(data, ImageSet):
            raise TypeError(f"{name} must be a dyninfer.data.ImageSet, got {type(data).__name__}")
    if len(train) == 0:
        raise ValueError(f"training set {train.name!r} is empty")
    stateful = {id(cb) for _, cb in _callbacks_with_state(callbacks)}
    for cb in callbacks:  # a callback with only state (a method's generators) is checkpointed, not called
        if not any(callable(getattr(cb, h, None)) for h in _HOOKS) and id(cb) not in stateful:
            raise TypeError(f"callback {cb!r} defines none of {', '.join(_HOOKS)} (nor state_dict and "
                            "load_state_dict)")
    if config.steps is None and (optimizer is not None or batches is not None or start_step):
        raise ValueError("optimizer=, batches= and start_step= belong to the step-budget mode; set TrainConfig.steps")
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step <= (config.steps or 0):
        raise ValueError(f"start_step must be an int in [0, steps], got {start_step!r}")

    ctx = _setup_distributed(distributed)
    try:
        if config.steps is not None:
            history = _fit_steps(model, train, config, test, out, loss_fn, forward, list(callbacks), resume, ctx,
                                 optimizer, batches, start_step, desc)
        else:
            history = _fit(model, train, config, test, out, loss_fn, forward, list(callbacks), resume, ctx)
        if ctx.owns_group and ctx.world_size > 1:
            # every rank finished before the group is torn down: under load a gloo rank whose peer
            # had already left aborted ("terminate called without an active exception") in CI
            dist.barrier()
        return history
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _fit(model: nn.Module, train: ImageSet, config: TrainConfig, test: ImageSet | None,
         out: str | os.PathLike | None, loss_fn: LossFn | None, forward: Forward | None,
         callbacks: list[Any], resume: bool, ctx: _Dist) -> list[dict[str, Any]]:
    if ctx.device is not None:
        model.to(ctx.device)
    device = _device_of(model)
    lead = ctx.rank == 0
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and lead:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint" if out_dir is not None else None

    optimizer = make_optimizer(model, config)
    state = TrainerState(model=model, optimizer=optimizer, config=config, wrapped=model,
                         rank=ctx.rank, world_size=ctx.world_size)
    start = 0
    if resume and ckpt_path is not None and ckpt.exists(ckpt_path):
        done = _restore_checkpoint(ckpt_path, state, callbacks)["epochs_done"]
        if done is None:
            raise ValueError(f"cannot resume from {str(ckpt.paths(ckpt_path)[0])!r}: it is a step-budget run's "
                             "checkpoint (TrainConfig.steps); resume it with the same steps")
        start = int(done)
        log.info("resuming %s after epoch %d", out_dir, start)
    if ctx.world_size > 1:
        _ranks_agree(start, "epochs done", device, ctx, out_dir)
        state.wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters)

    if out_dir is not None and lead:
        _write_run_start(out_dir, config, model, train, test, ctx, state.history)

    loss_fn = loss_fn or _default_loss(config, forward)
    steps = _steps_per_epoch(len(train), config, ctx.world_size)
    show = config.progress and lead

    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):  # seed freely, leave the caller's RNG as it was
        for epoch in range(start, config.epochs):
            state.epoch = epoch
            lr = None
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(config, epoch)
                lr = group["lr"] if lr is None else lr
            torch.manual_seed(derive_seed(config.seed, epoch, "torch", ctx.rank))  # dropout etc.
            order = torch.Generator().manual_seed(derive_seed(config.seed, epoch, "data"))  # same on all ranks
            shard = (ctx.rank, ctx.world_size) if ctx.world_size > 1 else None
            batches = train.batches(config.batch_size, shuffle=True, augment=config.augment, generator=order,
                                    drop_last=config.drop_last, shard=shard)
            model.train()
            state.wrapped.train()
            sums: dict[str, Tensor] = {}
            seen_n = 0
            t0 = time.perf_counter()
            bar = progress.bar(batches, total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", enabled=show)
            for i, (x, y) in enumerate(bar):
                state.batch_index = i
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if config.schedule_by == "step" or (state.step <= config.warmup_steps and config.warmup_steps):
                    factor = (lr_factor(config, state.step, config.epochs * steps) if config.schedule_by == "step"
                              else lr_factor(config, epoch)) * warmup_factor(state.step, config.warmup_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = group["initial_lr"] * factor
                seen_n += _step(state, loss_fn, x, y, callbacks, sums)
                if show and state.step % config.log_every == 0:
                    bar.set_postfix(loss=f"{state.loss.item():.4f}")
            bar.close()
            train_seconds = time.perf_counter() - t0
            if ctx.world_size > 1:  # DDP syncs buffers (BN stats) at each forward; end equal too
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=0)

            total_n, averages = _averages(sums, seen_n, ctx, device)
            train_loss = averages.pop("loss")
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training diverged in epoch {epoch + 1}: mean loss {train_loss}; "
                                         f"try a lower lr (now {config.lr}) — the last checkpoint is kept")
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss,
                                      "train_acc": averages.pop("__correct__", None)}
            record.update({f"train_{k}": v for k, v in averages.items()})
            if test is not None and lead:
                result = evaluate(model, test, config.eval_batch_size, forward)
                record.update(test_top1=result["top1"], test_top5=result["top5"], test_loss=result["loss"])
            record.update(lr=lr, seconds=time.perf_counter() - t0, images_per_s=total_n / max(train_seconds, 1e-9))
            state.metrics = record
            _call(callbacks, "on_epoch_end", state)  # before the checkpoint: callbacks may change the model
            state.history.append(record)
            if lead:
                log.info("epoch %d/%d %s", epoch + 1, config.epochs, json.dumps(record))
                if show:
                    progress.write(f"epoch {epoch + 1}/{config.epochs}: " + ", ".join(
                        f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
            if out_dir is not None and lead:
                with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                _save_checkpoint(ckpt_path, state, callbacks, epoch + 1)

    if out_dir is not None and lead:
        ckpt.save_model(out_dir / "model", model, {"train": config.to_dict(), "epochs_done": config.epochs,
                                                   "metrics": state.history[-1] if state.history else None})
    return state.history


def _average_gradients(params: Sequence[Tensor], ctx: _Dist, share: float) -> None:
    """Every rank's gradients become the batch mean over all ranks: each rank's (a mean over its
    rows) weighted by ``share``, its rows' fraction of the batch, then summed. With equal shards
    that is DDP's mean over ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else ctx.device or torch.device("cpu")
    counts = torch.tensor([len(grads), -len(grads)], device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if counts[0].item() != -counts[1].item():
        raise RuntimeError(f"ranks computed gradients for different parameters ({-counts[1].item()}.."
                           f"{counts[0].item()} of them); every rank must run the same subnets each step")
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) * share
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _fit_steps(model: nn.Module, train: ImageSet, config: TrainConfig, test: ImageSet | None,
               out: str | os.PathLike | None, loss_fn: LossFn | None, forward: Forward | None,
               callbacks: list[Any], resume: bool, ctx: _Dist, optimizer: torch.optim.Optimizer | None,
               batches: Iterator[tuple[Tensor, Tensor]] | None, start_step: int, desc: str | None) -> list[dict[str, Any]]:
    """The step-budget mode of :func:`fit` (see there)."""
    if ctx.device is not None:
        model.to(ctx.device)
    device = _device_of(model)
    lead = ctx.rank == 0
    total = int(config.steps)
    every = config.checkpoint_every or max(1, total // 10)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and lead:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint" if out_dir is not None else None

    optimizer = optimizer if optimizer is not None else make_optimizer(model, config)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stream = batches if batches is not None else BatchStream(train, config.batch_size, config.seed,
                                                             augment=config.augment)
    stream_has_state = (callable(getattr(stream, "state_dict", None))
                        and callable(getattr(stream, "load_state_dict", None)))
    if out_dir is not None and not stream_has_state:
        raise ValueError("with out= the step mode checkpoints its batch stream: batches= must have state_dict() and "
                         "load_state_dict() (e.g. dyninfer.data.BatchStream), or leave it to fit")
    stateful = callbacks + ([stream] if stream_has_state else [])
    state = TrainerState(model=model, optimizer=optimizer, config=config, wrapped=model,
                         rank=ctx.rank, world_size=ctx.world_size, step=start_step)
    if resume and ckpt_path is not None and ckpt.exists(ckpt_path):
        restored = _restore_checkpoint(ckpt_path, state, stateful)
        if restored["epochs_done"] is not None:
            raise ValueError(f"cannot resume from {str(ckpt.paths(ckpt_path)[0])!r}: it is an epoch run's "
                             "checkpoint; resume it without TrainConfig.steps")
        _set_rng_state(restored["rng"], device)
        state.stop = bool(restored["stopped"])  # a run a callback ended stays ended
        log.info("resuming %s after step %d", out_dir, state.step)
    if ctx.world_size > 1:
        _ranks_agree(state.step, "step", device, ctx, out_dir)
        with torch.no_grad():  # start from rank 0's weights and buffers, as DDP does
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor, src=0)

    if out_dir is not None and lead:
        _write_run_start(out_dir, config, model, train, test, ctx, state.history)

    loss_fn = loss_fn or _default_loss(config, forward)
    show = config.progress and lead
    model.train()
    sums: dict[str, Tensor] = {}
    seen_n, t0, shown = 0, time.perf_counter(), None
    bar = progress.bar(total=total, initial=state.step, desc=desc or "train", enabled=show)
    while state.step < total and not state.stop:
        factor = lr_factor(config, state.step, total) * warmup_factor(state.step, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        state.batch_index = state.step
        _call(callbacks, "on_batch_start", state)
        if state.stop:
            break
        x, y = next(stream)
        share = 1.0
        if ctx.world_size > 1:  # every rank draws the same batch and trains on its rows
            whole = x.shape[0]
            if whole >= ctx.world_size:
                x, y = x[ctx.rank::ctx.world_size], y[ctx.rank::ctx.world_size]
                share = x.shape[0] / whole
            else:  # fewer rows than ranks: each rank takes them all, and the mean of equal gradients is theirs
                share = 1.0 / ctx.world_size
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        seen_n += _step(state, loss_fn, x, y, callbacks, sums,
                        (lambda: _average_gradients(params, ctx, share)) if ctx.world_size > 1 else None)
        bar.update()
        if show and state.postfix is not None:
            if state.postfix != shown:
                bar.set_postfix_str(state.postfix)
                shown = state.postfix
        elif show and state.step % config.log_every == 0:
            bar.set_postfix(loss=f"{state.loss.item():.4f}")
        if state.step % every and state.step < total and not state.stop:
            continue
        # a segment ends: record, evaluate, checkpoint
        state.sync_buffers()
        total_n, averages = _averages(sums, seen_n, ctx, device)
        train_loss = averages.pop("loss", float("nan"))
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged before step {state.step}: mean loss {train_loss}; "
                                     f"try a lower lr — the last checkpoint is kept")
        record: dict[str, Any] = {"step": state.step, "train_loss": train_loss,
                                  "train_acc": averages.pop("__correct__", None)}
        record.update({f"train_{k}": v for k, v in averages.items()})
        if test is not None and lead:
            result = evaluate(model, test, config.eval_batch_size, forward)
            record.update(test_top1=result["top1"], test_top5=result["top5"], test_loss=result["loss"])
            model.train()
        seconds = time.perf_counter() - t0
        record.update(lr=optimizer.param_groups[0]["lr"], seconds=seconds, images_per_s=total_n / max(seconds, 1e-9))
        state.metrics = record
        _call(callbacks, "on_epoch_end", state)
        state.history.append(record)
        if out_dir is not None and lead:
            with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            _save_checkpoint(ckpt_path, state, stateful, None, _rng_state(device))
        sums, seen_n, t0 = {}, 0, time.perf_counter()
    bar.close()
    if out_dir is not None and lead:
        ckpt.save_model(out_dir / "model", model, {"train": config.to_dict(), "steps_done": state.step,
                                                   "metrics": state.history[-1] if state.history else None})
    return state.history
