"""CIFAR-style ResNets: resnet-20/32/56 (16/32/64 wide) and resnet-18/50 (64..512, 3x3 stem).

Layout that gating and tagging methods rely on: ``ResNet.stem`` (conv-BN-ReLU),
``ResNet.stages`` (a Sequential of stages, each a Sequential of blocks), ``pool``,
``flatten``, ``fc``. A block exposes ``residual(x)`` (the branch F(x)) and ``shortcut``
(empty Sequential = identity, else 1x1 conv + BN projection, option B), and computes
``relu(residual(x) + shortcut(x))``, so LC-Net can scale F(x) before the add.
"""

from __future__ import annotations

import torch
from torch import nn

from dyninfer.models._common import init_weights, scaled
from dyninfer.models.registry import register


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_ch == out_ch:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs: F(x) = bn2(conv2(relu1(bn1(conv1(x))))); out = relu(F(x) + shortcut(x))."""

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.out_channels = width
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(in_ch, width, stride)
        self.relu = nn.ReLU()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand to ``width * 4``; same add as BasicBlock."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.out_channels = out_ch
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.relu = nn.ReLU()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    """stem -> stages -> global average pool -> flatten -> fc."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: list[int],
        widths: list[int],
        stem_width: int,
        in_channels: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(),
        )
        stages, in_ch = [], stem_width
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_ch, width, stride))
                in_ch = blocks[-1].out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


def _cifar_resnet(depth: int, num_classes: int, expansion: float, input_shape, width_multiple: int) -> ResNet:
    n = (depth - 2) // 6  # 6n + 2 layers: stem, 3 stages of n two-conv blocks, fc
    widths = [scaled(v, expansion, width_multiple) for v in (16, 32, 64)]
    return ResNet(BasicBlock, [n] * 3, widths, widths[0], input_shape[0], num_classes)


def _imagenet_style(block, depths, num_classes, expansion, input_shape, width_multiple) -> ResNet:
    widths = [scaled(v, expansion, width_multiple) for v in (64, 128, 256, 512)]
    # CIFAR stem: 3x3 stride-1 conv and no max-pool, as is usual for 32x32 inputs.
    return ResNet(block, depths, widths, widths[0], input_shape[0], num_classes)


@register("resnet-20")
def resnet20(num_classes: int, expansion: float, input_shape, width_multiple: int = 1) -> ResNet:
    """ResNet-20 (He et al. 2016, CIFAR): 3 stages x 3 basic blocks, 16/32/64 channels."""
    return _cifar_resnet(20, num_classes, expansion, input_shape, width_multiple)


@register("resnet-32")
def resnet32(num_classes: int, expansion: float, input_shape, width_multiple: int = 1) -> ResNet:
    """ResNet-32: 3 stages x 5 basic blocks, 16/32/64 channels."""
    return _cifar_resnet(32, num_classes, expansion, input_shape, width_multiple)


@register("resnet-56")
def resnet56(num_classes: int, expansion: float, input_shape, width_multiple: int = 1) -> ResNet:
    """ResNet-56: 3 stages x 9 basic blocks, 16/32/64 channels."""
    return _cifar_resnet(56, num_classes, expansion, input_shape, width_multiple)


@register("resnet-18")
def resnet18(num_classes: int, expansion: float, input_shape, width_multiple: int = 1) -> ResNet:
    """ResNet-18 with a CIFAR stem: basic blocks [2, 2, 2, 2], 64/128/256/512 channels."""
    return _imagenet_style(BasicBlock, [2, 2, 2, 2], num_classes, expansion, input_shape, width_multiple)


@register("resnet-50")
def resnet50(num_classes: int, expansion: float, input_shape, width_multiple: int = 1) -> ResNet:
    """ResNet-50 with a CIFAR stem: bottlenecks [3, 4, 6, 3], widths 64..512 (outputs x4)."""
    return _imagenet_style(Bottleneck, [3, 4, 6, 3], num_classes, expansion, input_shape, width_multiple)
