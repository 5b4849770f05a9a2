"""Helpers shared by the zoo: width scaling, pool skipping, init and flat-Sequential pieces."""

from __future__ import annotations

import math
import numbers

from torch import nn


def scaled(width: int, expansion: float, width_multiple: int = 1) -> int:
    """``width * expansion`` rounded half-up to the nearest multiple of ``width_multiple`` (>= it).

    ``width_multiple=1`` is plain rounding to the nearest int; 8 or 16 trades exactness for
    speed (channel counts that are multiples of 16 run 25-35 % faster on CPU, see DESIGN.md).
    """
    if isinstance(width_multiple, bool) or not isinstance(width_multiple, numbers.Integral) or width_multiple < 1:
        raise ValueError(f"width_multiple must be a positive int, got {width_multiple!r}")
    units = math.floor(width * expansion / width_multiple + 0.5)
    return max(1, units) * width_multiple


def pool_fits(height: int, width: int) -> bool:
    """Whether a 2x2/stride-2 max-pool keeps both sides >= 1; zoo models skip it otherwise."""
    return height >= 2 and width >= 2


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs with zero bias, BN weight 1 / bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_stage(
    layers: list[nn.Module], in_ch: int, out_ch: int, kernel: int, hw: tuple[int, int], pool: bool
) -> tuple[int, int]:
    """Append conv ("same" padding, no bias) -> BN -> ReLU [-> maxpool2]; return the new (H, W)."""
    layers += [
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    ]
    if pool and pool_fits(*hw):
        layers.append(nn.MaxPool2d(2))
        return hw[0] // 2, hw[1] // 2
    return hw


def fc_head(layers: list[nn.Module], in_features: int, hidden: list[int], num_classes: int) -> None:
    """Append Flatten -> (Linear -> ReLU) per hidden width -> Linear(num_classes)."""
    layers.append(nn.Flatten())
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
