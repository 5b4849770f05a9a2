"""Saliency gates for per-input skipping (LC-Net, Xia et al.): ReLU-1 and the gating nets.

A gate's output is a saliency in [0, 1] that multiplies a block's residual branch (L-Net) or
a layer's output channels (C-Net); a saliency of exactly 0 means the work is skipped, which
ReLU-1 produces for every pre-activation <= 0. Training uses leaky ReLU-1 so that gates which
have fallen outside [0, 1] still receive gradient; inference uses the exact ReLU-1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["relu1", "leaky_relu1", "SaliencyActivation", "BlockGate", "DEFAULT_SLOPE"]

DEFAULT_SLOPE = 0.01


def relu1(x: Tensor) -> Tensor:
    """ReLU-1 (Eq. 5): min(max(x, 0), 1). Gradient 1 inside (0, 1), 0 outside."""
    return x.clamp(0.0, 1.0)


def _check_slope(slope: float) -> float:
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope) \
            or not 0 <= slope < 1:
        raise ValueError(f"slope must be a number in [0, 1), got {slope!r}")
    return float(slope)


def leaky_relu1(x: Tensor, slope: float = DEFAULT_SLOPE) -> Tensor:
    """Leaky ReLU-1: x on [0, 1], ``slope * x`` below 0 and ``1 + slope * (x - 1)`` above 1.

    Continuous, so it equals :func:`relu1` on [0, 1]; ``slope=0`` is ReLU-1 itself.
    """
    slope = _check_slope(slope)
    return torch.where(x < 0, x * slope, torch.where(x > 1, 1 + (x - 1) * slope, x))


class SaliencyActivation(nn.Module):
    """Leaky ReLU-1 in training mode, exact ReLU-1 in eval mode."""

    def __init__(self, slope: float = DEFAULT_SLOPE) -> None:
        super().__init__()
        self.slope = _check_slope(slope)

    def forward(self, x: Tensor) -> Tensor:
        return leaky_relu1(x, self.slope) if self.training else relu1(x)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


class BlockGate(nn.Module):
    """The control nets of one residual block, reading one shared pooled vector.

    ``lnet``: FC ``in_features -> 1``, the block saliency S_L. ``cnet``: FC
    ``in_features -> channels``, one saliency S_C per output channel of the block's first
    layer. Both start at weight ~N(0, ``init_std``) and bias ``init_bias``: bias 1 starts every
    block and channel (nearly) fully on, so a wrapped pre-trained backbone starts out close to
    what it computed; the weights' spread lets decisions depend on the input from the start
    (with 0.01 the gates of short digits runs mostly ended input-independent, all on or off).
    """

    def __init__(self, in_features: int, channels: int, slope: float = DEFAULT_SLOPE,
                 init_bias: float = 1.0, init_std: float = 0.1) -> None:
        super().__init__()
        self.lnet = nn.Linear(in_features, 1)
        self.cnet = nn.Linear(in_features, channels)
        self.act = SaliencyActivation(slope)
        for fc in (self.lnet, self.cnet):
            nn.init.normal_(fc.weight, 0.0, init_std)
            nn.init.constant_(fc.bias, init_bias)

    @property
    def in_features(self) -> int:
        return self.lnet.in_features

    @property
    def channels(self) -> int:
        return self.cnet.out_features

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """``pooled`` (N, in_features) -> (S_L of shape (N,), S_C of shape (N, channels))."""
        return self.act(self.lnet(pooled)).squeeze(1), self.act(self.cnet(pooled))
