"""Model registry (timm style): ``register`` a factory under a name, ``create`` it by name.

A factory is called as ``factory(num_classes=..., expansion=..., input_shape=..., **kwargs)``
with already-validated arguments and returns an ``nn.Module``; ``create`` then records
``model.dyninfer_config`` so a checkpoint can check it belongs to the same model.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

from torch import nn

from dyninfer.cost import check_input_shape, macs

__all__ = ["register", "create", "list_models", "original_macs"]

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory`` under ``name``; a name can be registered once."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def wrap(factory: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def create(
    name: str,
    num_classes: int = 10,
    expansion: float = 1.0,
    input_shape: Sequence[int] = (3, 32, 32),
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name`` for ``input_shape`` (C, H, W) and ``num_classes``.

    ``expansion`` multiplies every hidden width (rounded to the nearest int, at least 1);
    input channels and ``num_classes`` are never scaled. Extra ``kwargs`` go to the factory
    (all zoo models accept ``width_multiple``) and are recorded in ``dyninfer_config``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if (
        isinstance(expansion, bool)
        or not isinstance(expansion, numbers.Real)
        or not math.isfinite(expansion)
        or expansion <= 0
    ):
        raise ValueError(f"expansion must be a finite number > 0, got {expansion!r}")
    shape = check_input_shape(input_shape)
    model = _REGISTRY[name](
        num_classes=int(num_classes), expansion=float(expansion), input_shape=shape, **kwargs
    )
    model.dyninfer_config = {
        "name": name,
        "num_classes": int(num_classes),
        "expansion": float(expansion),
        "input_shape": shape,
        **kwargs,
    }
    return model


def original_macs(model: nn.Module) -> int:
    """MACs of the original network of a zoo model: the same model at expansion 1.0."""
    spec = getattr(model, "dyninfer_config", None)
    if not spec:
        raise ValueError("cannot tell the original network of a model without dyninfer_config; "
                         "pass reference_macs= (MACs of the unexpanded network)")
    original = create(spec["name"], num_classes=spec["num_classes"], expansion=1.0,
                      input_shape=tuple(spec["input_shape"]))
    return macs(original, tuple(spec["input_shape"]))
