"""VGG-16 with BatchNorm, CIFAR variant, as one flat ``nn.Sequential`` (see lenet.py's contract)."""

from __future__ import annotations

from torch import nn

from dyninfer.models._common import conv_stage, fc_head, init_weights, scaled
from dyninfer.models.registry import register

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


@register("vgg-16")
def vgg16(
    num_classes: int, expansion: float, input_shape: tuple[int, int, int], width_multiple: int = 1
) -> nn.Sequential:
    """13 conv3x3 (pad 1) -> BN -> ReLU with 5 max-pools, then Linear(512*s*s, num_classes).

    Pools that would shrink a side below 1 are skipped, so s = 1 for 32x32 and 28x28 inputs
    (28 -> 14 -> 7 -> 3 -> 1, last pool skipped) and for 8x8. No dropout, no hidden fc.
    """
    c, h, w = input_shape
    layers: list[nn.Module] = []
    hw, in_ch = (h, w), c
    for i, v in enumerate(VGG16_CFG):
        if v == "M":
            continue
        width = scaled(v, expansion, width_multiple)
        pool = i + 1 < len(VGG16_CFG) and VGG16_CFG[i + 1] == "M"
        hw = conv_stage(layers, in_ch, width, 3, hw, pool=pool)
        in_ch = width
    fc_head(layers, in_ch * hw[0] * hw[1], [], num_classes)
    model = nn.Sequential(*layers)
    init_weights(model)
    return model
