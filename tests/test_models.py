"""dyninfer.models: every registered model is tested for free (timm style), plus structure."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dyninfer import cost, models
from dyninfer.models import registry

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32)}
SLOW = {"resnet-50", "vgg-16"}  # built for the CIFAR shape only in the cross-shape test
FLAT = ["lenet-5", "lenet-3c1l", "vgg-16"]
FLAT_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear, nn.Dropout)


def _cases():
    for name in models.list_models():
        for data, shape in SHAPES.items():
            if name in SLOW and data != "cifar":
                continue
            yield pytest.param(name, shape, id=f"{name}-{data}")


@pytest.mark.parametrize("name, shape", list(_cases()))
def test_every_model_runs_on_every_data_shape(name, shape):
    torch.manual_seed(0)
    model = models.create(name, num_classes=7, input_shape=shape).eval()
    with torch.no_grad():
        y = model(torch.randn(2, *shape))
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    assert model.dyninfer_config == {"name": name, "num_classes": 7, "expansion": 1.0, "input_shape": shape}


@pytest.mark.parametrize("name", models.list_models())
def test_macs_equal_torch_flop_counter(name):
    model = models.create(name)
    assert cost.macs(model, (3, 32, 32)) == cost.flop_counter_macs(model, (3, 32, 32)) > 0


def test_registry_lists_the_zoo():
    assert set(models.list_models()) >= {
        "lenet-5", "lenet-3c1l", "vgg-16", "resnet-20", "resnet-32", "resnet-56", "resnet-18", "resnet-50",
    }
    assert models.list_models() == sorted(models.list_models())


def test_register_adds_a_model_and_rejects_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @models.register("tiny-test")
    def tiny(num_classes, expansion, input_shape, depth=1):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))

    assert "tiny-test" in models.list_models()
    model = models.create("tiny-test", num_classes=3, input_shape=(1, 2, 2), depth=2)
    assert model.dyninfer_config["depth"] == 2 and model[1].out_features == 3
    with pytest.raises(ValueError, match="already registered"):
        models.register("tiny-test")(lambda **kw: nn.Identity())


# --------------------------------------------------------------------------- flat Sequentials


@pytest.mark.parametrize("name", FLAT)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_flat_sequential_contract(name, shape):
    model = models.create(name, num_classes=5, input_shape=shape)
    assert type(model) is nn.Sequential
    kids = list(model.children())
    assert all(type(k) in FLAT_TYPES for k in kids), [type(k).__name__ for k in kids]
    assert isinstance(kids[-1], nn.Linear) and kids[-1].out_features == 5
    assert isinstance(kids[0], nn.Conv2d) and kids[0].in_channels == shape[0]
    flat = [i for i, k in enumerate(kids) if isinstance(k, nn.Flatten)]
    assert len(flat) == 1
    assert all(not isinstance(k, nn.Linear) for k in kids[: flat[0]])
    assert all(not isinstance(k, (nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d)) for k in kids[flat[0]:])
    for i, k in enumerate(kids):  # conv -> BN -> ReLU, linear (but the last) -> ReLU
        if isinstance(k, nn.Conv2d):
            assert isinstance(kids[i + 1], nn.BatchNorm2d) and isinstance(kids[i + 2], nn.ReLU)
        if isinstance(k, nn.Linear) and i < len(kids) - 1:
            assert isinstance(kids[i + 1], nn.ReLU)
    if name.startswith("lenet"):
        assert not any(isinstance(k, nn.Dropout) for k in kids)


def _widths(model):
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("shape, flat", [((1, 8, 8), 16 * 2 * 2), ((1, 28, 28), 16 * 7 * 7), ((3, 32, 32), 16 * 8 * 8)])
def test_lenet5_widths_and_flatten_size(shape, flat):
    model = models.create("lenet-5", input_shape=shape)
    assert _widths(model) == [6, 16, 120, 84, 10]
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert all(c.kernel_size == (5, 5) and c.padding == (2, 2) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 2
    assert [m for m in model if isinstance(m, nn.Linear)][0].in_features == flat


@pytest.mark.parametrize(
    "shape, pools, flat", [((1, 8, 8), 3, 256), ((1, 28, 28), 3, 256 * 9), ((3, 32, 32), 3, 256 * 16)]
)
def test_lenet_3c1l_structure(shape, pools, flat):
    model = models.create("lenet-3c1l", input_shape=shape)
    assert _widths(model) == [64, 128, 256, 10]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == pools
    assert model[-1].in_features == flat


@pytest.mark.parametrize("shape, pools", [((1, 8, 8), 3), ((1, 28, 28), 4), ((3, 32, 32), 5)])
def test_vgg16_skips_pools_that_would_empty_the_map(shape, pools):
    model = models.create("vgg-16", input_shape=shape)
    assert _widths(model) == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512, 10]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == pools
    assert model[-1].in_features == 512


def test_vgg16_keeps_spatial_remainder_for_large_inputs():
    model = models.create("vgg-16", input_shape=(3, 64, 64))
    assert model[-1].in_features == 512 * 2 * 2


# --------------------------------------------------------------------------- expansion


def test_expansion_doubles_lenet_3c1l_widths_and_quadruples_inner_conv_macs():
    shape = (3, 32, 32)
    base, wide = models.create("lenet-3c1l"), models.create("lenet-3c1l", expansion=2.0)
    assert _widths(wide) == [128, 256, 512, 10]
    conv_macs = [
        [r["macs"] for r in cost.layer_table(m, shape) if r["type"] == "Conv2d"] for m in (base, wide)
    ]
    # the first conv keeps its 3 input channels, so only its output side doubles
    assert [w / b for b, w in zip(*conv_macs)] == [2.0, 4.0, 4.0]
    assert 3.8 < sum(conv_macs[1]) / sum(conv_macs[0]) < 4.0


@pytest.mark.parametrize(
    "expansion, widths", [(0.5, [3, 8, 60, 42]), (1.5, [9, 24, 180, 126]), (0.01, [1, 1, 1, 1]), (0.25, [2, 4, 30, 21])]
)
def test_expansion_rounds_hidden_widths_only(expansion, widths):
    model = models.create("lenet-5", num_classes=10, expansion=expansion, input_shape=(1, 28, 28))
    assert _widths(model) == widths + [10]
    assert model[0].in_channels == 1


def test_width_multiple_rounds_to_fast_channel_counts():
    assert _widths(models.create("lenet-3c1l", expansion=1.8))[:3] == [115, 230, 461]
    model = models.create("lenet-3c1l", expansion=1.8, width_multiple=16)
    assert _widths(model)[:3] == [112, 224, 464]
    assert model.dyninfer_config["width_multiple"] == 16
    with pytest.raises(ValueError, match="width_multiple"):
        models.create("lenet-3c1l", width_multiple=0)


def test_resnet_expansion_scales_every_stage():
    model = models.create("resnet-20", expansion=0.5)
    assert model.stem[0].out_channels == 8
    assert [stage[-1].out_channels for stage in model.stages] == [8, 16, 32]
    assert model.fc.in_features == 32 and model.fc.out_features == 10


# --------------------------------------------------------------------------- ResNets


@pytest.mark.parametrize(
    "name, depths, out_widths",
    [
        ("resnet-20", [3, 3, 3], [16, 32, 64]),
        ("resnet-32", [5, 5, 5], [16, 32, 64]),
        ("resnet-56", [9, 9, 9], [16, 32, 64]),
        ("resnet-18", [2, 2, 2, 2], [64, 128, 256, 512]),
        ("resnet-50", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    ],
)
def test_resnet_layout(name, depths, out_widths):
    model = models.create(name, input_shape=(3, 32, 32))
    assert isinstance(model, models.ResNet)
    stem = list(model.stem)
    assert [type(m) for m in stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert stem[0].kernel_size == (3, 3) and stem[0].stride == (1, 1)
    assert [len(s) for s in model.stages] == depths
    assert [s[-1].out_channels for s in model.stages] == out_widths
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d) and isinstance(model.flatten, nn.Flatten)
    assert model.fc.in_features == out_widths[-1]
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    block_type = models.Bottleneck if name == "resnet-50" else models.BasicBlock
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            assert type(block) is block_type
            changes = j == 0 and (i > 0 or block_type is models.Bottleneck or stem[0].out_channels != out_widths[0])
            assert len(block.shortcut) == (2 if changes else 0)
            if changes:
                assert [type(m) for m in block.shortcut] == [nn.Conv2d, nn.BatchNorm2d]
                assert block.shortcut[0].kernel_size == (1, 1)
                assert block.shortcut[0].stride == ((2, 2) if i > 0 else (1, 1))


def test_resnet_only_plain_torch_layers_inside():
    allowed = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.Sequential,
               models.ResNet, models.BasicBlock, models.Bottleneck)
    for name in ("resnet-20", "resnet-50"):
        assert all(isinstance(m, allowed) for m in models.create(name).modules())


@pytest.mark.parametrize("name", ["resnet-20", "resnet-50"])
def test_block_forward_is_relu_of_residual_plus_shortcut(name):
    torch.manual_seed(0)
    model = models.create(name, expansion=0.5, input_shape=(3, 8, 8)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        x = model.stem(x)
        for stage in model.stages:
            for block in stage:
                expected = torch.relu(block.residual(x) + block.shortcut(x))
                got = block(x)
                torch.testing.assert_close(got, expected)
                if len(block.shortcut) == 0:
                    # LC-Net scales F(x): a zero saliency leaves relu(x) of the identity path
                    torch.testing.assert_close(torch.relu(block.residual(x) * 0 + block.shortcut(x)), torch.relu(x))
                x = got


def test_init_kaiming_convs_and_unit_bn():
    torch.manual_seed(0)
    model = models.create("resnet-18")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    conv = model.stages[3][1].conv2  # 512 x 512 x 3 x 3: fan_out 4608
    assert abs(conv.weight.std().item() / math.sqrt(2 / 4608) - 1) < 0.02


# --------------------------------------------------------------------------- errors


def test_unknown_model_lists_available_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet-19'.*lenet-5.*vgg-16"):
        models.create("resnet-19")


@pytest.mark.parametrize("expansion", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_bad_expansion_names_the_value(expansion):
    with pytest.raises(ValueError, match=rf"expansion.*{expansion!r}"):
        models.create("lenet-5", expansion=expansion)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True, "10"])
def test_bad_num_classes_names_the_value(num_classes):
    with pytest.raises(ValueError, match=rf"num_classes.*{num_classes!r}"):
        models.create("lenet-5", num_classes=num_classes)


@pytest.mark.parametrize("shape", [(32, 32), (0, 32, 32), (3, 32, -32), (3.0, 32, 32), "cifar", (1, 2, 3, 4)])
def test_bad_input_shape_names_the_value(shape):
    with pytest.raises(ValueError, match="input_shape") as info:
        models.create("lenet-5", input_shape=shape)
    assert repr(shape) in str(info.value)


def test_input_shape_from_json_list_is_accepted_and_stored_as_tuple():
    model = models.create("lenet-5", input_shape=[1, 28, 28])
    assert model.dyninfer_config["input_shape"] == (1, 28, 28)


def test_wrong_channel_count_is_reported_by_cost():
    model = models.create("resnet-20", input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match=r"expects a different input shape.*\(1, 28, 28\)"):
        cost.macs(model, (3, 28, 28))
