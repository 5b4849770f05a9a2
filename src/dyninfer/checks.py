"""The one subnet and input check every method, runtime and export uses (explicit, 1-based ``subnet``)."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["MAC_PATHS", "check_path", "check_subnet", "check_input"]


MAC_PATHS = ("incremental", "scratch")


def check_path(path) -> str:
    """``path`` of a MAC figure: "incremental" (the live weights of subnet k's own blocks: what
    stepping 1 -> k needs; its dense step blocks also multiply pruned weights, as zeros) or
    "scratch" (what one from-scratch execution of subnet k multiplies)."""
    if path not in MAC_PATHS:
        raise ValueError(f"path must be one of {MAC_PATHS}, got {path!r}")
    return path


def check_subnet(subnet, num_subnets: int) -> int:
    """``subnet`` (None: the largest) as an int in 1..num_subnets, or a ValueError naming it."""
    k = num_subnets if subnet is None else subnet
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_subnets:
        raise ValueError(f"subnet must be an int in 1..{num_subnets}, got {subnet!r}")
    return k


def check_input(x, input_shape: Sequence[int]) -> None:
    """A ValueError unless ``x`` is a (batch, C, H, W) tensor of ``input_shape``.

    Values are not scanned (that would cost a pass over every input on the hot path): a NaN or
    inf passes through, and since inference (eval mode) computes every row on its own, it makes
    only its own row's logits non-finite; the other rows are exactly what they would be alone.
    Validate inputs that can be non-finite yourself; the CLI reads uint8 image files, which cannot be.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected input of shape (batch, {', '.join(map(str, input_shape))}), got {got}")
