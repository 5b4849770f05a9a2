"""LC-Net: ReLU-1 gates, real skipping of blocks and channels, per-input MACs, training, CLI."""

import argparse
import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dyninfer import cost, models
from dyninfer.data import synthetic
from dyninfer.methods import lcnet
from dyninfer.cli.lcnet import add_commands
from dyninfer.nn.gates import BlockGate, SaliencyActivation, leaky_relu1, relu1


def tiny(name="resnet-20", shape=(3, 8, 8), seed=0):
    torch.manual_seed(seed)
    return models.create(name, num_classes=10, expansion=0.25, input_shape=shape)


def randomize(net, seed=0, gate_spread=1.0):
    """Random BN statistics and control nets whose decisions vary from input to input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
        for gate in net.gates:
            for fc in (gate.lnet, gate.cnet):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=g))
                fc.bias.copy_((torch.rand(fc.bias.shape, generator=g) * 2 - 1) * gate_spread)
    return net.eval()


def gates_on(net):
    """Every saliency exactly 1 (zero weights, bias 1): the LCNet computes the backbone."""
    with torch.no_grad():
        for gate in net.gates:
            for fc in (gate.lnet, gate.cnet):
                fc.weight.zero_()
                fc.bias.fill_(1.0)
    return net.eval()


class ConvLog(TorchDispatchMode):
    """Weight shapes of every convolution actually executed (seen by torch's dispatcher)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "conv" in func.__name__:
            self.weights.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- gates


def test_relu1_values_and_gradients():
    x = torch.tensor([-2.0, -0.5, 0.25, 0.75, 1.5, 3.0], requires_grad=True)
    y = relu1(x)
    assert y.tolist() == [0.0, 0.0, 0.25, 0.75, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_leaky_relu1_values_and_gradients():
    x = torch.tensor([-2.0, -0.5, 0.25, 0.75, 1.5, 3.0], requires_grad=True)
    y = leaky_relu1(x, slope=0.1)
    torch.testing.assert_close(y, torch.tensor([-0.2, -0.05, 0.25, 0.75, 1.05, 1.2]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.1, 0.1, 1.0, 1.0, 0.1, 0.1]))
    with pytest.raises(ValueError, match="slope"):
        leaky_relu1(x, slope=1.5)


def test_saliency_activation_is_leaky_in_training_exact_in_eval():
    act = SaliencyActivation(slope=0.2)
    x = torch.tensor([-1.0, 0.5, 2.0])
    assert act.train()(x).tolist() == pytest.approx([-0.2, 0.5, 1.2])
    assert act.eval()(x).tolist() == [0.0, 0.5, 1.0]


def test_block_gate_shapes_and_initial_saliency():
    gate = BlockGate(in_features=6, channels=5).eval()
    s_l, s_c = gate(torch.zeros(3, 6))
    assert s_l.shape == (3,) and s_c.shape == (3, 5)
    assert torch.all(s_l == 1) and torch.all(s_c == 1)  # bias 1: everything on at the start


# ----------------------------------------------------------------------------- wrap


@pytest.mark.parametrize("name, block", [("resnet-20", "BasicBlock"), ("resnet-50", "Bottleneck")])
def test_wrap_adds_a_gate_per_block_and_starts_as_the_backbone(name, block):
    backbone = tiny(name).eval()
    net = gates_on(lcnet.wrap(backbone))
    assert len(net.gates) == len(net.blocks) == (9 if name == "resnet-20" else 16)
    assert all(type(b).__name__ == block for b in net.blocks)
    assert [g.channels for g in net.gates] == [b.conv1.out_channels for b in net.blocks]
    assert [g.in_features for g in net.gates] == [b.conv1.in_channels for b in net.blocks]
    assert net.backbone is not backbone  # wrap works on a copy
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(net(x), backbone(x))
    torch.testing.assert_close(net.compile()(x), backbone(x), atol=1e-4, rtol=1e-4)


def test_wrap_rejects_other_models_and_modes():
    with pytest.raises(ValueError, match="zoo ResNet"):
        lcnet.wrap(models.create("lenet-5", input_shape=(1, 28, 28)))
    with pytest.raises(ValueError, match="mode must be one of"):
        lcnet.wrap(tiny(), mode="diagonal")


@pytest.mark.parametrize("name", ["resnet-20", "resnet-50"])
@pytest.mark.parametrize("mode", lcnet.MODES)
def test_runtime_equals_masked_reference_for_every_strategy(name, mode):
    net = randomize(lcnet.wrap(tiny(name), mode=mode))
    x = torch.randn(12, 3, 8, 8)
    ref = net(x)
    s_l = torch.stack([s for s, _ in net.saliencies(x)])
    assert 0 < (s_l == 0).float().mean() < 1  # some blocks skipped for some inputs, not all
    runtime = net.compile()
    for strategy in lcnet.STRATEGIES:
        torch.testing.assert_close(runtime(x, strategy=strategy), ref, atol=1e-4, rtol=1e-4)
    one_by_one = torch.cat([runtime(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(one_by_one, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(net.compile(channels_last=True)(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="strategy must be one of"):
        runtime(x, strategy="magic")


def test_slice_cache_reuses_weights_without_changing_results():
    net = randomize(lcnet.wrap(tiny()), seed=3)
    x = torch.randn(6, 3, 8, 8)
    cached, uncached = net.compile(), net.compile(slice_cache=0)
    first = [cached(x[i:i + 1]) for i in range(len(x))]
    misses = cached.cache_misses
    again = [cached(x[i:i + 1]) for i in range(len(x))]
    assert misses > 0 and cached.cache_misses == misses and cached.cache_hits >= misses
    for a, b, c in zip(first, again, (uncached(x[i:i + 1]) for i in range(len(x)))):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="slice_cache"):
        net.compile(slice_cache=-1)


# ----------------------------------------------------------------------------- real skipping


@pytest.mark.parametrize("mode", lcnet.MODES)
def test_skipped_block_is_the_shortcut_and_runs_no_convolution(mode):
    """Sequential: a skipped block runs no convolution of its branch. Parallel (the paper's
    configuration): conv1 ran beside the gates before they decided, so only conv2 is saved."""
    backbone = tiny().eval()
    net = gates_on(lcnet.wrap(backbone, mode=mode))
    names = net.block_names
    identity, projection = names.index("stages.0.1"), names.index("stages.1.0")
    with torch.no_grad():
        for i in (identity, projection):
            net.gates[i].lnet.bias.fill_(-3.0)  # S_L = 0 for every input
    x = torch.randn(1, 3, 8, 8)
    runtime = net.compile()
    with ConvLog() as log:
        out = runtime(x)

    # expected: the backbone with those blocks replaced by their shortcut path
    expected_net = tiny().eval()
    expected_net.load_state_dict(backbone.state_dict())
    proj = expected_net.stages[1][0]
    expected_net.stages[0][1] = nn.Identity()
    expected_net.stages[1][0] = nn.Sequential(proj.shortcut, nn.ReLU())
    torch.testing.assert_close(out, expected_net(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net(x), expected_net(x))  # the masked reference agrees

    all_convs = 1 + 2 * len(names) + 2  # stem, two per block, two projection shortcuts
    saved = 4 if mode == "sequential" else 2  # both skipped blocks' conv2 (and, sequential, conv1) never ran
    assert len(log.weights) == all_convs - saved
    assert (8, 4, 1, 1) in log.weights  # the skipped projection block still ran its shortcut


@pytest.mark.parametrize("mode", lcnet.MODES)
def test_zero_channels_are_sliced_out_of_conv1_and_conv2(mode):
    """Sequential slices conv1's outputs and conv2's inputs; parallel computed conv1 in full
    beside the gates and slices conv2's inputs."""
    net = randomize(lcnet.wrap(tiny(), mode=mode))
    gates_on(net)
    first = net.blocks[0]
    c = first.conv1.out_channels
    with torch.no_grad():
        net.gates[0].cnet.bias[[0, 2]] = -3.0  # channels 0 and 2 of block 0 off for every input
    x = torch.randn(1, 3, 8, 8)
    with ConvLog() as log:
        out = net.compile()(x)
    conv1, conv2 = log.weights[1], log.weights[2]  # after the stem
    assert conv1 == (c - 2 if mode == "sequential" else c, first.conv1.in_channels, 3, 3)
    assert conv2 == (first.conv2.out_channels, c - 2, 3, 3)

    # the masked dense computation: channels multiplied by 0 instead of not computed
    mask = torch.ones(c)
    mask[[0, 2]] = 0
    with torch.no_grad():
        h = net.backbone.stem(x)
        t = first.relu1(first.bn1(first.conv1(h))) * mask[None, :, None, None]
        h = first.relu(first.bn2(first.conv2(t)) + first.shortcut(h))
        for b in net.blocks[1:]:
            h = b(h)
        dense = net.backbone.fc(h.mean((2, 3)))
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net(x), dense)


@pytest.mark.parametrize("mode", lcnet.MODES)
def test_block_with_no_active_channel_costs_no_convolution(mode):
    net = gates_on(randomize(lcnet.wrap(tiny("resnet-50"), mode=mode)))
    with torch.no_grad():
        net.gates[2].cnet.bias.fill_(-3.0)  # block kept, but every channel off
    x = torch.randn(1, 3, 8, 8)
    with ConvLog() as log:
        out = net.compile()(x)
    torch.testing.assert_close(out, net(x), atol=1e-4, rtol=1e-4)
    saved = 3 if mode == "sequential" else 2  # block 2's three convs skipped (parallel: conv1 ran)
    assert len(log.weights) == 1 + 3 * len(net.blocks) + 4 - saved


# ----------------------------------------------------------------------------- cost


@pytest.mark.parametrize("name", ["resnet-20", "resnet-50"])
@pytest.mark.parametrize("mode", lcnet.MODES)
def test_instance_macs_equal_cost_of_the_sliced_network(name, mode):
    net = randomize(lcnet.wrap(tiny(name), mode=mode), seed=1)
    x = torch.randn(6, 3, 8, 8)
    per_input = net.instance_macs(x)
    assert len(set(per_input.tolist())) > 1  # decisions differ between inputs
    runtime = net.compile()
    for i in range(len(x)):
        sliced = runtime.sliced(x[i:i + 1])
        assert cost.macs(sliced, (3, 8, 8)) == int(per_input[i])
        torch.testing.assert_close(sliced(x[i:i + 1]), runtime(x[i:i + 1]), atol=1e-5, rtol=1e-5)
    table = net.mac_table((3, 8, 8))
    assert table.backbone == cost.macs(net.backbone, (3, 8, 8))
    assert cost.macs(net, (3, 8, 8)) == table.full_macs("parallel")  # all-on = the dense dry run
    assert int(per_input.max()) <= table.full_macs(mode)


def test_modes_differ_by_the_skipped_channel_nets_and_the_conv1_work_parallel_does_in_full():
    """Parallel - sequential, per input and block: the C-Net of a skipped block (in x C) plus
    conv1's inactive channels (parallel computes conv1 before the gates decide), with conv1's
    cost per channel read from the layer's shapes as it runs (a forward hook), not the table."""
    net = randomize(lcnet.wrap(tiny()), seed=2)
    x = torch.randn(8, 3, 8, 8)
    parallel, sequential = net.instance_macs(x, "parallel"), net.instance_macs(x, "sequential")
    per_channel = {}
    hooks = [b.conv1.register_forward_hook(
        lambda m, _, out, i=i: per_channel.__setitem__(i, m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                                                       * out.shape[2] * out.shape[3]))
        for i, b in enumerate(net.blocks)]
    net.backbone(x[:1])
    for h in hooks:
        h.remove()
    expected = torch.zeros(len(x), dtype=torch.int64)
    for i, (s_l, s_c) in enumerate(net.saliencies(x)):
        block = net.blocks[i]
        c = block.conv1.out_channels
        active = torch.where(s_l > 0, (s_c > 0).sum(1), 0)
        expected += (s_l == 0).long() * block.conv1.in_channels * c + per_channel[i] * (c - active)
    assert (parallel > sequential).all()
    assert torch.equal(parallel - sequential, expected)


@pytest.mark.parametrize("mode", lcnet.MODES)
def test_runtime_executes_exactly_the_reported_macs_at_batch_1_and_in_batches(mode):
    """torch's FlopCounterMode on the runtime itself: one input at a time, and a batch run by
    the 'group' strategy (one pass per distinct decision), execute exactly instance_macs."""
    from torch.utils.flop_counter import FlopCounterMode

    net = randomize(lcnet.wrap(tiny(), mode=mode), seed=4)
    x = torch.randn(10, 3, 8, 8)
    reported = net.instance_macs(x)
    assert len(set(reported.tolist())) > 1
    runtime = net.compile()

    def executed(fn):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops() // 2  # a MAC is two FLOPs

    for i in range(len(x)):
        assert executed(lambda: runtime(x[i:i + 1])) == int(reported[i])
    assert executed(lambda: runtime(x, strategy="group")) == int(reported.sum())
    table, saliencies = net.mac_table((3, 8, 8)), net.saliencies(x)
    for strategy in lcnet.STRATEGIES:
        assert executed(lambda: runtime(x, strategy=strategy)) == table.batch_macs(saliencies, mode, strategy), strategy
    assert table.batch_macs(saliencies, mode, "dense") == len(x) * table.full_macs(mode)


# ----------------------------------------------------------------------------- training


def _mean_saliency(net, data):
    x = data.normalize(data.images)
    sal = net.saliencies(x)
    return float(torch.stack([s.mean() for s, _ in sal]).mean() + torch.stack([c.mean() for _, c in sal]).mean())


def test_l1_training_reduces_saliency():
    data = synthetic(96, (1, 8, 8), seed=0)
    results = {}
    for l1 in (0.0, 4.0):
        net = lcnet.wrap(tiny(shape=(1, 8, 8)))
        before = _mean_saliency(net, data)
        config = lcnet.LCTrainConfig(epochs=3, batch_size=32, lr=0.05, control_lr=0.5, l1_layer=l1,
                                     l1_channel=l1, augment=False, progress=False, schedule="none")
        history = lcnet.train(net, data, config)
        assert {"train_ce", "train_saliency_layer", "train_saliency_channel"} <= set(history[-1])
        results[l1] = before - _mean_saliency(net, data)
    assert results[4.0] > 0.2  # L1 pulls the saliencies down ...
    assert results[4.0] > results[0.0] + 0.1  # ... far more than training without it


def test_control_learning_rate_equals_a_separate_sgd_group():
    torch.manual_seed(0)
    net_a = lcnet.wrap(tiny(shape=(1, 8, 8)))
    net_b = lcnet.wrap(tiny(shape=(1, 8, 8)))
    net_b.load_state_dict(net_a.state_dict())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    lr, ratio, wd = 0.1, 5.0, 5e-4
    loss_fn = lcnet.lcnet_loss(1.0, 1.0)
    opt_a = torch.optim.SGD(net_a.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    gates_b = list(net_b.gates.parameters())
    ids = {id(p) for p in gates_b}
    opt_b = torch.optim.SGD([{"params": [p for p in net_b.parameters() if id(p) not in ids]},
                             {"params": gates_b, "lr": lr * ratio}],
                            lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    callback = lcnet.ControlLearningRate(ratio, wd)
    for _ in range(3):
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            opt.zero_grad()
            loss_fn(net, x, y)["loss"].backward()
            if net is net_a:
                callback.on_after_backward(argparse.Namespace(model=net_a))
            opt.step()
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(net_a.gates[0].cnet.bias, torch.ones_like(net_a.gates[0].cnet.bias))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="l1_layer"):
        lcnet.LCTrainConfig(l1_layer=-1)
    with pytest.raises(ValueError, match="control_lr"):
        lcnet.LCTrainConfig(control_lr=0)
    with pytest.raises(ValueError, match="epochs"):
        lcnet.LCTrainConfig(epochs=0)


# ----------------------------------------------------------------------------- CLI


def parser():
    p = argparse.ArgumentParser(prog="dyninfer")
    add_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_add_commands_parses_train_and_eval():
    args = parser().parse_args(["lcnet", "train", "--model", "resnet-20", "--data", "cifar10", "--l1", "0.5",
                                "--mode", "sequential", "--pretrained", "runs/r20", "--epochs", "3", "--out", "o"])
    assert (args.model, args.data, args.l1, args.mode, args.pretrained, args.epochs, args.out) == \
        ("resnet-20", "cifar10", 0.5, "sequential", "runs/r20", 3, "o")
    assert args.func.__name__ == "cmd_train"
    args = parser().parse_args(["lcnet", "eval", "runs/lc"])
    assert args.func.__name__ == "cmd_eval" and args.run == "runs/lc" and args.mode is None
    for bad in (["lcnet", "train", "--mode", "diagonal", "--out", "o"], ["lcnet", "train", "--l1", "-1", "--out", "o"],
                ["lcnet", "train"]):
        with pytest.raises(SystemExit):
            parser().parse_args(bad)


def test_cli_train_eval_round_trip(tmp_path, capsys):
    out = tmp_path / "lc"
    args = parser().parse_args(["lcnet", "train", "--data", "digits", "--expansion", "0.25", "--epochs", "1",
                                "--l1", "0.5", "--out", str(out), "--quiet"])
    assert args.func(args) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["kind"] == "lcnet" and 0 < meta["test"]["mac_fraction_mean"] < 1.2
    args = parser().parse_args(["lcnet", "eval", str(out), "--mode", "sequential"])
    assert args.func(args) == 0
    for png in ("lcnet_macs_hist.png", "lcnet_lowest_macs.png", "lcnet_highest_macs.png", "lcnet_channel_rate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "lcnet_eval.json").read_text())
    assert report["top1"] == pytest.approx(meta["test"]["top1"])
    assert report["runtime_max_abs_diff"] < 1e-3
    net = lcnet.load(out / "model")
    assert net.mode == "parallel" and len(net.gates) == 9


def test_cli_user_errors(tmp_path):
    args = parser().parse_args(["lcnet", "train", "--pretrained", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="run.json"):
        args.func(args)
    (tmp_path / "run.json").write_text(json.dumps({"kind": "stepping"}))
    args = parser().parse_args(["lcnet", "eval", str(tmp_path)])
    with pytest.raises(ValueError, match="expected one made by `dyninfer lcnet train`"):
        args.func(args)


def test_cli_pretrained_backbone_is_loaded_and_checked(tmp_path, capsys):
    from dyninfer import checkpoint
    from dyninfer.cli import main

    base = tmp_path / "r20"
    assert main(["train", "--model", "resnet-20", "--data", "digits", "--expansion", "0.25", "--epochs", "1",
                 "--out", str(base), "--quiet"]) == 0
    backbone = models.create("resnet-20", num_classes=10, expansion=0.25, input_shape=(1, 8, 8))
    checkpoint.load_model(base / "model", backbone)
    with pytest.raises(ValueError, match="is a 'resnet-20', not --model 'resnet-32'"):
        args = parser().parse_args(["lcnet", "train", "--model", "resnet-32", "--pretrained", str(base),
                                    "--out", str(tmp_path / "x")])
        args.func(args)
    out = tmp_path / "lc"
    args = parser().parse_args(["lcnet", "train", "--pretrained", str(base), "--epochs", "1", "--lr", "1e-9",
                                "--control-lr", "1e-9", "--out", str(out), "--quiet"])
    assert args.func(args) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["pretrained"]["run"] == str(base) and meta["config"]["control_lr"] == 1e-9
    net = lcnet.load(out / "model")
    # with (almost) no learning the backbone is still the pre-trained one: the weights were loaded
    torch.testing.assert_close(net.backbone.stem[0].weight, backbone.stem[0].weight, atol=1e-6, rtol=0)
    assert not torch.allclose(net.backbone.stem[0].weight, tiny(shape=(1, 8, 8)).stem[0].weight)


def test_cli_refuses_a_model_without_blocks_before_reading_data(tmp_path, capsys):
    from dyninfer.cli import main

    assert main(["lcnet", "train", "--model", "lenet-5", "--data", "digits", "--out", str(tmp_path / "o")]) == 2
    assert "--model lenet-5 is not one (choose from resnet-18" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_common_face_where_it_applies_save_load_evaluate(tmp_path):
    net = lcnet.wrap(tiny(), mode="sequential")
    randomize(net, seed=3)
    net.eval()
    net.save(tmp_path / "lc")
    again = lcnet.LCNet.load(tmp_path / "lc").eval()
    assert again.mode == "sequential"
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(again(x), net(x))
    data = synthetic(16, (3, 8, 8), seed=1)
    mine, theirs = net.evaluate(data), lcnet.evaluate(again, data)
    assert torch.equal(mine.macs, theirs.macs) and torch.equal(mine.correct, theirs.correct) and mine.macs.min() > 0
    with pytest.raises(TypeError, match="picks its network per input"):
        __import__("dyninfer").export.dense(net, 1)
