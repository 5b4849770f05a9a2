"""LeNet family as flat ``nn.Sequential`` networks (the SteppingNet converter walks them).

Contract: children are only Conv2d, BatchNorm2d, ReLU, MaxPool2d, Flatten and Linear, in
order, with the final ``nn.Linear`` classifier last. Convolutions keep the spatial size
("same" padding) and every 2x2 max-pool is skipped when a side is already < 2, so the same
definition serves 8x8 digits, 28x28 MNIST-likes and 32x32 CIFAR.
"""

from __future__ import annotations

from torch import nn

from dyninfer.models._common import conv_stage, fc_head, init_weights, scaled
from dyninfer.models.registry import register


@register("lenet-5")
def lenet5(
    num_classes: int, expansion: float, input_shape: tuple[int, int, int], width_multiple: int = 1
) -> nn.Sequential:
    """LeNet-5 with BN: conv5x5(6)-pool-conv5x5(16)-pool-fc120-fc84-fc(num_classes).

    Both convolutions use padding 2 (deviation from the original's valid second conv) so an
    8x8 input still fits; on 28x28 the flatten size is 16*7*7 = 784, on 32x32 16*8*8 = 1024.
    """
    c, h, w = input_shape
    widths = [scaled(v, expansion, width_multiple) for v in (6, 16, 120, 84)]
    layers: list[nn.Module] = []
    hw = conv_stage(layers, c, widths[0], 5, (h, w), pool=True)
    hw = conv_stage(layers, widths[0], widths[1], 5, hw, pool=True)
    fc_head(layers, widths[1] * hw[0] * hw[1], widths[2:], num_classes)
    model = nn.Sequential(*layers)
    init_weights(model)
    return model


@register("lenet-3c1l")
def lenet_3c1l(
    num_classes: int, expansion: float, input_shape: tuple[int, int, int], width_multiple: int = 1
) -> nn.Sequential:
    """LeNet-3C1L (SteppingNet): 3x (conv3x3 pad 1 -> BN -> ReLU -> pool), then one fc.

    The paper gives no widths; 64/128/256 are our choice, sized so the unexpanded net can
    reach about the paper's 83.36 % on CIFAR-10 (not yet measured).
    """
    c, h, w = input_shape
    widths = [scaled(v, expansion, width_multiple) for v in (64, 128, 256)]
    layers: list[nn.Module] = []
    hw, in_ch = (h, w), c
    for width in widths:
        hw = conv_stage(layers, in_ch, width, 3, hw, pool=True)
        in_ch = width
    fc_head(layers, in_ch * hw[0] * hw[1], [], num_classes)
    model = nn.Sequential(*layers)
    init_weights(model)
    return model
