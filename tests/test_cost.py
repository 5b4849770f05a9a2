"""dyninfer.cost: hand-derived MAC table (torchprofile style), torch's counter, protocols, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dyninfer import cost, models

# (id, module factory, input_shape, MACs derived by hand)
HAND_MACS = [
    ("conv3x3-pad1", lambda: nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8), 8 * 8 * 8 * 3 * 9),
    ("conv3x3-valid", lambda: nn.Conv2d(3, 8, 3), (3, 8, 8), 6 * 6 * 8 * 3 * 9),
    ("conv-no-bias", lambda: nn.Conv2d(3, 8, 3, padding=1, bias=False), (3, 8, 8), 8 * 8 * 8 * 3 * 9),
    ("conv-stride2", lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1), (4, 8, 8), 4 * 4 * 8 * 4 * 9),
    ("conv-grouped", lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2), (4, 8, 8), 8 * 8 * 8 * 2 * 9),
    ("conv-depthwise", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 8, 8), 8 * 8 * 4 * 1 * 9),
    ("conv-rect-kernel", lambda: nn.Conv2d(2, 3, (1, 3), padding=(0, 1)), (2, 5, 7), 5 * 7 * 3 * 2 * 3),
    ("linear", lambda: nn.Sequential(nn.Flatten(), nn.Linear(10, 5)), (10, 1, 1), 10 * 5),
    # Linear over 3 rows of 16 features (tokens): every row pays out * in.
    ("linear-rows", lambda: nn.Sequential(nn.Flatten(2), nn.Linear(16, 5)), (3, 4, 4), 3 * 5 * 16),
    (
        "free-layers",  # BN, ReLU, pooling, flatten cost nothing
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(2, 3),
        ),
        (1, 4, 4),
        4 * 4 * 2 * 1 + 2 * 3,
    ),
    (
        # 28 -> conv(6) -> pool 14 -> conv(16) -> pool 7 -> 784 -> 120 -> 84 -> 10
        "lenet-5-mnist",
        lambda: models.create("lenet-5", input_shape=(1, 28, 28)),
        (1, 28, 28),
        28 * 28 * 6 * 1 * 25 + 14 * 14 * 16 * 6 * 25 + 784 * 120 + 120 * 84 + 84 * 10,
    ),
]


@pytest.mark.parametrize("make, shape, expected", [h[1:] for h in HAND_MACS], ids=[h[0] for h in HAND_MACS])
def test_macs_match_hand_count_and_torch_counter(make, shape, expected):
    torch.manual_seed(0)
    module = make()
    assert cost.macs(module, shape) == expected
    assert cost.flop_counter_macs(module, shape) == expected


def test_lenet5_mnist_layer_table_by_hand():
    table = cost.layer_table(models.create("lenet-5", input_shape=(1, 28, 28)), (1, 28, 28))
    counted = [(r["type"], r["output_shape"], r["macs"]) for r in table if r["macs"]]
    assert counted == [
        ("Conv2d", (6, 28, 28), 117_600),
        ("Conv2d", (16, 14, 14), 470_400),
        ("Linear", (120,), 94_080),
        ("Linear", (84,), 10_080),
        ("Linear", (10,), 840),
    ]
    assert sum(r["macs"] for r in table) == 693_000


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    groups=st.sampled_from([1, 2]),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    size=st.integers(4, 9),
)
def test_conv_macs_equal_torch_counter_property(groups, in_per_group, out_per_group, kernel, stride, padding, size):
    conv = nn.Conv2d(groups * in_per_group, groups * out_per_group, kernel, stride, padding, groups=groups)
    shape = (groups * in_per_group, size, size)
    assert cost.macs(conv, shape) == cost.flop_counter_macs(conv, shape)


# --------------------------------------------------------------------------- extension protocols


class _Tagged(nn.Module):
    """Stands in for a tagged network: counts itself per subnet, must never be run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls = []

    def subnet_macs(self, input_shape, subnet):
        self.calls.append((input_shape, subnet))
        return 1000 * (subnet or 9)

    def forward(self, x):
        raise AssertionError("subnet_macs must be used instead of a dry run")


def test_subnet_macs_protocol_is_used_and_subnet_passed_through():
    net = _Tagged()
    assert cost.macs(net, [3, 8, 8], subnet=2) == 2000
    assert cost.macs(net, (3, 8, 8)) == 9000
    assert net.calls == [((3, 8, 8), 2), ((3, 8, 8), None)]


def test_subnet_on_plain_module_is_an_error():
    with pytest.raises(ValueError, match=r"subnet=2.*no sub-networks"):
        cost.macs(nn.Conv2d(3, 4, 3), (3, 8, 8), subnet=2)


class _Doubler(nn.Module):
    """A leaf the built-in rules do not know; it declares its own cost."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        return x * 2

    def macs_of(self, inputs, output):
        self.seen.append((tuple(inputs[0].shape), tuple(output.shape)))
        return 7


class _HalfConv(nn.Conv2d):
    """A conv that claims to compute half its weights (as a pruned layer might)."""

    def macs_of(self, inputs, output):
        return output[0].numel() * self.in_channels * 9 // 2


class _Wrapper(nn.Module):
    """Non-leaf with macs_of: its children are not visited."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.inner(x)

    def macs_of(self, inputs, output):
        return 5


def test_macs_of_overrides_leaf_rule():
    doubler = _Doubler()
    net = nn.Sequential(doubler, _HalfConv(3, 4, 3, padding=1))
    assert cost.macs(net, (3, 8, 8)) == 7 + 4 * 8 * 8 * 3 * 9 // 2
    assert doubler.seen == [((1, 3, 8, 8), (1, 3, 8, 8))]


def test_macs_of_on_container_replaces_its_children():
    net = nn.Sequential(_Wrapper(), nn.Conv2d(3, 2, 1))
    assert cost.macs(net, (3, 4, 4)) == 5 + 4 * 4 * 2 * 3
    names = [r["name"] for r in cost.layer_table(net, (3, 4, 4))]
    assert names == ["0", "1"]


# --------------------------------------------------------------------------- dry-run hygiene


def test_dry_run_restores_training_flags_and_leaves_bn_stats_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    net.train()
    net[2].eval()
    before = net[1].num_batches_tracked.item()
    cost.macs(net, (3, 6, 6))
    cost.layer_table(net, (3, 6, 6))
    cost.peak_activation_bytes(net, (3, 6, 6))
    assert [m.training for m in net] == [True, True, False, True, True]
    assert net[1].num_batches_tracked.item() == before


def test_hooks_are_removed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    cost.macs(net, (3, 6, 6))
    assert all(not m._forward_hooks for m in net.modules())


# --------------------------------------------------------------------------- params, table


def test_params_counts_shared_tensors_once():
    lin = nn.Linear(10, 10)
    assert cost.params(nn.Linear(10, 5)) == 55
    assert cost.params(nn.Sequential(lin, nn.ReLU(), lin)) == 110


@pytest.mark.parametrize("name", models.list_models())
def test_layer_table_sums_to_macs_and_params(name):
    shape = (3, 32, 32) if name in ("resnet-50", "vgg-16") else (1, 8, 8)
    model = models.create(name, input_shape=shape)
    table = cost.layer_table(model, shape)
    assert sum(r["macs"] for r in table) == cost.macs(model, shape)
    assert sum(r["params"] for r in table) == cost.params(model) == sum(p.numel() for p in model.parameters())
    assert table[-1]["type"] == "Linear" and table[-1]["output_shape"] == (10,)


def test_layer_table_lists_each_call_and_params_once():
    lin = nn.Linear(4, 4)
    table = cost.layer_table(nn.Sequential(nn.Flatten(), lin, lin), (4, 1, 1))
    assert [(r["type"], r["macs"], r["params"]) for r in table] == [
        ("Flatten", 0, 0), ("Linear", 16, 20), ("Linear", 16, 0),
    ]


# --------------------------------------------------------------------------- activation memory


def test_peak_activation_sequential_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x, a, out = 3 * 64 * 4, 8 * 64 * 4, 4 * 64 * 4
    # during the ReLU: the input (held by the caller), the conv output and the ReLU output
    assert cost.peak_activation_bytes(net, (3, 8, 8)) == x + a + a
    assert cost.peak_activation_bytes(net, (3, 8, 8), batch_size=4) == 4 * (x + a + a)
    # in-place ReLU writes into the conv output; the peak is then conv2's input + output
    net[1].inplace = True
    assert cost.peak_activation_bytes(net, (3, 8, 8)) == x + a + out


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x)) + x


def test_peak_activation_sees_functional_residual_add():
    t = 2 * 16 * 4  # every tensor is 2x4x4 float32
    # relu: x, conv out, relu out live; add: x, relu out, sum live (conv out is dead by then)
    assert cost.peak_activation_bytes(_Residual(), (2, 4, 4)) == 3 * t


def test_peak_activation_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        cost.peak_activation_bytes(nn.ReLU(), (1, 2, 2), batch_size=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "shape", [(3, 32), (3, 32, 32, 1), (0, 32, 32), (3, -1, 32), (3.0, 32, 32), (True, 8, 8), "3x32x32", None]
)
def test_bad_input_shape_names_the_value(shape):
    with pytest.raises(ValueError, match="input_shape") as info:
        cost.macs(nn.Conv2d(3, 4, 3), shape)
    assert repr(shape) in str(info.value)


@pytest.mark.parametrize("fn", [cost.macs, cost.layer_table, cost.peak_activation_bytes])
def test_wrong_channel_count_is_a_clear_error(fn):
    model = models.create("lenet-5", input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"expects a different input shape.*\(3, 32, 32\)") as info:
        fn(model, (1, 32, 32))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_wrong_channel_count_on_plain_module_mentions_channels():
    with pytest.raises(ValueError, match="takes 3 input channels"):
        cost.macs(nn.Sequential(nn.Conv2d(3, 4, 3)), (1, 8, 8))
