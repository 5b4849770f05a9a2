"""The method registry (timm's ``register_model``, for training methods): a method is one module
that registers a builder; ``compare``, the CLI and the parametrized tests enumerate the registry,
so adding a method edits no table anywhere else.

A builder gets a :class:`Setup` (the same model, data, budget and seed for every method) and
returns a trained net with the common face (``num_subnets``, ``mac_fractions()``,
``forward(x, subnet=k)``, ``evaluate(data)``, ``history["optimizer_steps"]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from dyninfer import models
from dyninfer.data import ImageSet

__all__ = ["DEFAULT_EXPANSION", "Method", "Setup", "register_method", "list_methods", "get_method"]

# Width expansion of the causal methods' base network (SteppingNet paper, Sec. IV); any-width
# needs it too, since its triangle reaches only ~half the MACs of the network it starts from.
# ResNets: 1.5 (2.25x the MACs), since a 2x-expanded ResNet-20 costs ~10 s per construction step on this CPU.
DEFAULT_EXPANSION = {"lenet-3c1l": 1.8, "lenet-5": 2.0, "vgg-16": 1.8, "resnet-20": 1.5, "resnet-32": 1.5,
                     "resnet-56": 1.5}


@dataclass
class Setup:
    """What every method builder gets: the same model, data, budget and seed."""

    model_name: str
    train: ImageSet
    budgets: list[float]
    steps: int
    batch_size: int
    seed: int
    lr: float
    reference_macs: int
    progress: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, list[float]] = field(default_factory=dict)  # MAC fractions of methods run so far
    teacher: nn.Module | None = None  # the same distillation teacher for every method (None: plain CE)

    def create(self, expansion: float) -> nn.Module:
        torch.manual_seed(self.seed)
        return models.create(self.model_name, num_classes=self.train.num_classes, expansion=expansion,
                             input_shape=self.train.input_shape)

    def config(self, cls, **defaults):
        """``cls`` (a baseline config) with the shared budget and the method's options."""
        options = {k: v for k, v in self.options.items() if k not in BUILDER_OPTIONS}
        kwargs = {**defaults, **options, "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                  "seed": self.seed, "progress": self.progress}
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"bad option for {cls.__name__}: {err}") from None


@dataclass(frozen=True)
class Method:
    """A registered method: its builder, a one-line description, and whether it needs a flat stack."""

    name: str
    build: Callable[[Setup], Any]
    description: str
    flat_only: bool = False
    order: int = 100  # where reports list it (ties: registration order)
    check: Callable[[dict], None] | None = None  # validates a comparison's options for it, before any training

    def check_options(self, options: dict) -> None:
        """A ValueError naming the option if ``options`` would fail this method (run up front)."""
        if self.check is not None:
            self.check(dict(options))


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, description: str, *, flat_only: bool = False, order: int = 100,
                    config: type | None = None, check: Callable[[dict], None] | None = None) -> Callable:
    """Decorator: register ``build(setup) -> net`` as method ``name`` (once per name).

    ``config`` (the method's config dataclass, which ``Setup.config`` fills) or ``check`` (a
    callable) lets a comparison validate the method's options before anything trains.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    checker = check if check is not None else (config_checker(name, config) if config is not None else None)

    def wrap(build: Callable[[Setup], Any]) -> Callable[[Setup], Any]:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            raise ValueError(f"method name {name!r} is already registered")
        _REGISTRY[name] = Method(name, build, description, flat_only, order, checker)
        return build

    return wrap


# Options every builder reads itself rather than passing to its config.
BUILDER_OPTIONS = ("expansion", "at")


def config_checker(name: str, cls: type) -> Callable[[dict], None]:
    """Options check for a builder that passes its options to ``cls`` (via ``Setup.config``)."""

    def check(options: dict) -> None:
        if "expansion" in options:
            check_expansion(name, options["expansion"])
        kwargs = {k: v for k, v in options.items() if k not in BUILDER_OPTIONS}
        try:
            cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"bad {name} option: {err}") from None
        except ValueError as err:
            raise ValueError(f"bad {name} option: {err}") from None

    return check


def check_expansion(name: str, value: Any) -> float:
    try:
        expansion = float(value)
    except (TypeError, ValueError):
        expansion = float("nan")
    if not expansion > 0:
        raise ValueError(f"{name} option expansion must be a number > 0, got {value!r}")
    return expansion


def list_methods() -> list[str]:
    """Registered method names in report order (``order``, then registration)."""
    return sorted(_REGISTRY, key=lambda name: _REGISTRY[name].order)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
