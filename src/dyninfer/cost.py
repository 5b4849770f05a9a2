"""The one cost model every method uses: MACs, parameters and activation memory.

Convention (same as ``torch.utils.flop_counter.FlopCounterMode``, where FLOPs = 2 * MACs):
convolutions and linear layers cost multiply-accumulates, bias additions, BatchNorm, ReLU,
pooling and residual adds cost nothing. Counts are for one sample (batch 1).

Two extension points let sub-network code count what it actually computes:

* a module with ``subnet_macs(input_shape, subnet) -> int`` counts itself (tagged networks
  know which masked/pruned weights each subnet uses); ``macs(m, shape, subnet=k)`` delegates;
* a module with ``macs_of(inputs, output) -> int`` replaces the built-in rule for itself and
  everything inside it (a custom layer that calls ``F.conv2d`` itself must define it, since
  only leaf modules are observed).
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "check_input_shape",
    "macs",
    "params",
    "layer_table",
    "peak_activation_bytes",
    "flop_counter_macs",
]


def check_input_shape(input_shape: Any, what: str = "input_shape") -> tuple[int, int, int]:
    """Return ``input_shape`` as a (C, H, W) tuple of positive ints, or raise ValueError.

    Lists and ``torch.Size`` are accepted too (shapes read back from JSON are lists).
    """
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, (tuple, list, torch.Size)):
        raise ValueError(f"{what} must be a tuple (C, H, W) of 3 positive ints, got {input_shape!r}")
    if len(input_shape) != 3:
        raise ValueError(
            f"{what} must be a tuple (C, H, W) of 3 positive ints (no batch dimension), "
            f"got {input_shape!r} with {len(input_shape)} entries"
        )
    out = []
    for v in input_shape:
        if isinstance(v, bool):
            raise ValueError(f"{what} must hold positive ints, got {input_shape!r}")
        try:
            v = operator.index(v)
        except TypeError:
            raise ValueError(f"{what} must hold positive ints, got {input_shape!r}") from None
        if v < 1:
            raise ValueError(f"{what} must hold positive ints, got {input_shape!r}")
        out.append(v)
    return tuple(out)  # type: ignore[return-value]


# --------------------------------------------------------------------------- built-in rules


def _conv_macs(m: nn.modules.conv._ConvNd, inputs: tuple, output: torch.Tensor) -> int:
    # out_elements * (in_channels / groups) * prod(kernel); per sample, so divide the batch out.
    per_sample = output.numel() // output.shape[0]
    return per_sample * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _linear_macs(m: nn.Linear, inputs: tuple, output: torch.Tensor) -> int:
    # out_features * in_features for every row; extra leading dims (tokens) multiply it.
    batch = output.shape[0] if output.dim() > 1 else 1
    return (output.numel() // batch) * m.in_features


def _leaf_rule(m: nn.Module) -> Callable[[tuple, torch.Tensor], int] | None:
    """The function counting MACs for one call of ``m``, or None if it costs nothing."""
    custom = getattr(m, "macs_of", None)
    if callable(custom):
        return lambda inputs, output: int(custom(inputs, output))
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        return lambda inputs, output: _conv_macs(m, inputs, output)
    if isinstance(m, nn.modules.conv._ConvNd):
        raise NotImplementedError(
            f"transposed convolution {type(m).__name__} is not counted by dyninfer.cost; "
            "give it a macs_of(inputs, output) method"
        )
    if isinstance(m, nn.Linear):
        return lambda inputs, output: _linear_macs(m, inputs, output)
    return None


def _counted_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Leaves, plus modules defining ``macs_of`` (whose insides are then not visited)."""

    def walk(prefix: str, m: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        children = list(m.named_children())
        if callable(getattr(m, "macs_of", None)) or not children:
            yield prefix, m
            return
        for name, child in children:
            yield from walk(f"{prefix}.{name}" if prefix else name, child)

    seen: set[int] = set()
    for name, m in walk("", module):
        if id(m) not in seen:  # a module registered twice is hooked once
            seen.add(id(m))
            yield name, m


# --------------------------------------------------------------------------- dry run


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the dry run, restoring each submodule's own training flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _zeros_for(module: nn.Module, input_shape: tuple[int, int, int], batch: int = 1) -> torch.Tensor:
    ref = next(module.parameters(), None)
    if ref is None:
        ref = next(module.buffers(), None)
    if ref is not None and ref.is_floating_point():
        return torch.zeros(batch, *input_shape, dtype=ref.dtype, device=ref.device)
    device = ref.device if ref is not None else None
    return torch.zeros(batch, *input_shape, device=device)


def _expected_shape_hint(module: nn.Module) -> str:
    config = getattr(module, "dyninfer_config", None)
    if isinstance(config, dict) and "input_shape" in config:
        return f"it was built for input_shape={tuple(config['input_shape'])}"
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return f"its first convolution takes {m.in_channels} input channels"
        if isinstance(m, nn.Linear):
            return f"its first linear layer takes {m.in_features} input features"
    return "see the model's definition"


def _dry_run(module: nn.Module, input_shape: tuple[int, int, int], batch: int = 1) -> torch.Tensor:
    """One forward pass on zeros, eval mode, no grad; torch shape errors become ValueError."""
    x = _zeros_for(module, input_shape, batch)
    with _eval_mode(module), torch.no_grad():
        try:
            return module(x)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"{type(module).__name__} expects a different input shape than "
                f"input_shape={input_shape} ({_expected_shape_hint(module)}); torch said: {first}"
            ) from err


# --------------------------------------------------------------------------- public API


def macs(module: nn.Module, input_shape: Sequence[int], *, subnet: int | None = None) -> int:
    """Exact multiply-accumulates of one forward pass on one input of shape (C, H, W).

    Uses ``module.subnet_macs(input_shape, subnet)`` when the module defines it; otherwise
    counts conv/linear leaves with forward hooks during a dry run on zeros (eval mode and
    no_grad; the training flags are restored afterwards). ``subnet`` on a module without
    ``subnet_macs`` is a ValueError, since a plain module has only one network.
    """
    shape = check_input_shape(input_shape)
    counter = getattr(module, "subnet_macs", None)
    if callable(counter):
        return int(counter(shape, subnet))
    if subnet is not None:
        raise ValueError(
            f"subnet={subnet!r} was given, but {type(module).__name__} has no sub-networks "
            "(no subnet_macs method); call macs(module, input_shape) without subnet"
        )
    return sum(row["macs"] for row in _trace(module, shape))


def params(module: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once), trainable or not."""
    return sum(p.numel() for p in module.parameters())


def layer_table(module: nn.Module, input_shape: Sequence[int]) -> list[dict]:
    """One row per call of a counted (leaf or ``macs_of``) module, in execution order.

    Keys: ``name`` (dotted module path), ``type`` (class name), ``output_shape`` (one sample,
    no batch dimension), ``macs`` and ``params``. A module's parameters are listed on its first
    call only, so ``macs`` sums to :func:`macs` of the dense module and ``params`` sums to
    :func:`params` whenever every parameter lives in a counted module. ``subnet_macs`` is
    not consulted: the table describes the module's own forward pass.
    """
    return _trace(module, check_input_shape(input_shape))


def _trace(module: nn.Module, shape: tuple[int, int, int]) -> list[dict]:
    rows: list[dict] = []
    listed: set[int] = set()
    handles = []

    def make_hook(name: str, m: nn.Module):
        rule = _leaf_rule(m)

        def hook(mod: nn.Module, inputs: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            count = rule(inputs, out) if rule is not None else 0
            first = id(mod) not in listed
            listed.add(id(mod))
            rows.append(
                {
                    "name": name or type(mod).__name__,
                    "type": type(mod).__name__,
                    "output_shape": tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None,
                    "macs": int(count),
                    "params": params(mod) if first else 0,
                }
            )

        return hook

    try:
        for name, m in _counted_modules(module):
            handles.append(m.register_forward_hook(make_hook(name, m)))
        _dry_run(module, shape)
    finally:
        for h in handles:
            h.remove()
    return rows


def peak_activation_bytes(module: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> int:
    """Peak bytes of live activations during one inference forward pass.

    Liveness model: every tensor storage produced by an operator (as seen by torch's
    dispatcher, so functional adds and concatenations count too) lives from the op that
    creates it to the last op that reads it; the input lives for the whole pass (the caller
    holds it) and the output until the end. Views and in-place ops reuse their storage.
    Parameters and buffers are not activations and are excluded. The peak is the largest sum
    over any op, i.e. what an allocator that frees each tensor right after its last use needs.
    Traced at batch 1 and multiplied by ``batch_size`` (every activation carries the batch).
    """
    shape = check_input_shape(input_shape)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    weights = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    # storage key -> [birth op, last-use op, bytes]; tensors are kept alive in `keep` so a
    # freed address cannot be reused by a later tensor and merged with an old record.
    life: dict[int, list[int]] = {}
    keep: list[torch.Tensor] = []
    clock = [0]

    def key_of(t: torch.Tensor) -> int | None:
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in weights:
            return None
        return storage.data_ptr()

    class Liveness(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            step = clock[0]
            clock[0] += 1
            for t in tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.Tensor) and (k := key_of(t)) in life:
                    life[k][1] = step
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and (k := key_of(t)) is not None:
                    if k in life:
                        life[k][1] = step
                    else:
                        life[k] = [step, step, t.untyped_storage().nbytes()]
                        keep.append(t)
            return out

    x = _zeros_for(module, shape)
    life[x.untyped_storage().data_ptr()] = [-1, -1, x.untyped_storage().nbytes()]
    with _eval_mode(module), torch.no_grad():
        try:
            with Liveness():
                y = module(x)
        except RuntimeError as err:
            raise ValueError(
                f"{type(module).__name__} expects a different input shape than "
                f"input_shape={shape} ({_expected_shape_hint(module)})"
            ) from err
    end = clock[0]
    life[x.untyped_storage().data_ptr()][1] = end
    for t in tree_leaves(y):
        if isinstance(t, torch.Tensor) and (k := key_of(t)) in life:
            life[k][1] = end
    # Sweep: +bytes at birth, -bytes after last use.
    delta = [0] * (end + 3)
    for birth, last, nbytes in life.values():
        delta[birth + 1] += nbytes
        delta[last + 2] -= nbytes
    peak = running = 0
    for d in delta:
        running += d
        peak = max(peak, running)
    del keep
    return peak * batch_size


def flop_counter_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs according to torch's own ``FlopCounterMode`` (total FLOPs // 2): the reference."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = check_input_shape(input_shape)
    counter = FlopCounterMode(display=False)
    x = _zeros_for(module, shape)
    with _eval_mode(module), torch.no_grad(), counter:
        module(x)
    return counter.get_total_flops() // 2
