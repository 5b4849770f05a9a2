"""The tagged core over programs of stages: the zoo and a user's own model convert with torch.fx,
residual adds tie tag groups, and on residual networks stepping equals computing from scratch,
exports equal the library, and reported MACs equal what torch's counter sees executed."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import dyninfer as dy
from helpers import random_tags
from dyninfer.nn.tagged import TaggedNet, TaggedSequential, fold_module, positions
from dyninfer.runtime.compaction import compact

SHAPE = (3, 16, 16)


def zoo_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    expansion = 0.25 if name in ("resnet-18", "resnet-50", "vgg-16") else 0.5
    return dy.models.create(name, num_classes=10, expansion=expansion, input_shape=SHAPE)


def warm(net: TaggedNet, seed: int = 0) -> None:
    """BatchNorm statistics that are not the identity, so folding is exercised."""
    net.train()
    with torch.no_grad():
        for k in range(1, net.num_subnets + 1):
            net(torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(seed + k)), subnet=k)
    net.eval()


def executed_macs(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", dy.models.list_models())
def test_every_zoo_model_converts_and_computes_the_model(name):
    model = zoo_model(name).eval()
    net = TaggedNet(model, 1, SHAPE).eval()
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=1e-5)
    assert net.subnet_macs() == dy.cost.macs(model, SHAPE) == dy.cost.flop_counter_macs(model, SHAPE)


def test_residual_adds_tie_the_groups_they_join():
    net = TaggedNet(zoo_model("resnet-20"), 2, SHAPE)
    model = zoo_model("resnet-20")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    group = dict(zip(names, net.layer_group))
    # stage 1: the stem and every block's second conv write one residual stream (identity shortcuts)
    assert {group["stem.0"], group["stages.0.0.conv2"], group["stages.0.1.conv2"], group["stages.0.2.conv2"]} \
        == {group["stem.0"]}
    # stage 2 starts with a projection shortcut: it writes the new stream with the stage's conv2s
    assert group["stages.1.0.shortcut.0"] == group["stages.1.0.conv2"] == group["stages.1.2.conv2"]
    assert group["stages.1.0.shortcut.0"] != group["stem.0"]
    # a block's first conv has a group of its own
    assert len({group[f"stages.0.{b}.conv1"] for b in range(3)} | {group["stem.0"]}) == 4
    assert net.num_groups == 3 + 9  # 3 residual streams + 9 inner convs; the classifier is not tagged


class UserNet(nn.Module):
    """A hand-written model: functional ReLU, a residual add, torch.flatten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.inner = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = x + torch.relu(self.inner(x))
        return self.head(torch.flatten(self.pool(x), 1))


def test_a_users_own_model_converts_and_steps():
    torch.manual_seed(0)
    model = UserNet().eval()
    net = TaggedNet(model, 3, SHAPE)
    assert net.num_groups == 1  # conv and inner are tied by the add
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(TaggedNet(model, 1, SHAPE).eval()(x), model(x), atol=1e-5, rtol=1e-5)
    random_tags(net, 3)
    warm(net)
    run = compact(net).start(x)
    for k in range(1, 4):
        torch.testing.assert_close(run.logits, net(x, subnet=k), atol=1e-5, rtol=1e-5)
        if run.can_step():
            run.step()


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 14 * 14, 2)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).flatten(1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8 * 16 * 16, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).flatten(1))


@pytest.mark.parametrize("model, op", [(Gated(), "sigmoid"), (Concat(), "cat")])
def test_unsupported_ops_name_the_op_and_node(model, op):
    with pytest.raises(ValueError, match=rf"{op}.*fx node '{op}'.*supported: Conv2d"):
        TaggedNet(model, 2, SHAPE)


def test_tagged_sequential_still_demands_a_sequential():
    with pytest.raises(TypeError, match="TaggedNet"):
        TaggedSequential(UserNet(), 2, SHAPE)


RESNETS = ["resnet-20", "resnet-50"]


@pytest.mark.parametrize("name", RESNETS)
def test_causal_residual_subnet_ignores_larger_channels(name):
    """Perturbing every weight that writes a channel with tag > k leaves subnet k's logits as they were."""
    net = TaggedNet(zoo_model(name), 3, SHAPE)
    random_tags(net, 11)
    warm(net)
    x = torch.randn(2, *SHAPE)
    before = [net(x, subnet=k) for k in (1, 2, 3)]
    with torch.no_grad():
        for i, layer in enumerate(net.layers):
            big = net.layer_tags(i) > 1
            layer.weight[big] += torch.randn_like(layer.weight[big])
        net.classifier.weight[:, net.input_tags(net.num_hidden) > 1] += 1.0
    torch.testing.assert_close(net(x, subnet=1), before[0], atol=1e-5, rtol=1e-5)
    assert (net(x, subnet=3) - before[2]).abs().max() > 1e-3


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), num_subnets=st.integers(1, 4), batch=st.integers(1, 3))
def test_resnet_steps_equal_scratch_for_random_tags(seed, num_subnets, batch):
    net = TaggedNet(zoo_model("resnet-20", seed % 5), num_subnets, SHAPE)
    random_tags(net, seed)
    warm(net, seed)
    x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))
    cnet = compact(net)
    run = cnet.start(x)
    joint = net.forward_all(x).logits
    for k in range(1, num_subnets + 1):
        scratch = net(x, subnet=k)
        assert scratch.abs().max() > 1e-3  # a real answer, not zeros equal to zeros
        torch.testing.assert_close(run.logits, scratch, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(joint[k - 1], scratch, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cnet(x, subnet=k), scratch, atol=1e-5, rtol=1e-4)
        if run.can_step():
            run.step()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("name", RESNETS)
@pytest.mark.parametrize("rule", ["causal", "full"])
def test_dense_export_of_a_residual_subnet_is_plain_torch_and_equal(name, rule):
    net = TaggedNet(zoo_model(name), 3, SHAPE, rule=rule, switchable_bn=rule == "full")
    random_tags(net, 5)
    warm(net)
    x = torch.randn(2, *SHAPE)
    for k in (1, 2, 3):
        dense = net.dense(k)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in dense.modules())  # folded
        torch.testing.assert_close(dense(x), net(x, subnet=k), atol=1e-5, rtol=1e-4)
        scripted = torch.jit.script(dense)
        torch.testing.assert_close(scripted(x), net(x, subnet=k), atol=1e-5, rtol=1e-4)
    if rule == "full":  # every executed MAC is a reported MAC (no masked blocks under the full rule)
        assert [executed_macs(lambda k=k: net.dense(k)(x[:1])) for k in (1, 2, 3)] == net.macs_per_subnet()


@pytest.mark.parametrize("name", RESNETS)
def test_incremental_path_executes_exactly_the_reported_macs(name):
    """Under FlopCounterMode each step of a session runs its reported increment, no more."""
    net = TaggedNet(zoo_model(name), 3, SHAPE)
    random_tags(net, 2)
    warm(net)
    cnet = compact(net)
    x = torch.randn(1, *SHAPE)
    state = {}
    executed = [executed_macs(lambda: state.setdefault("run", cnet.start(x)))]
    for _ in range(2):
        executed.append(executed_macs(lambda: state["run"].step()))
    assert executed == cnet.step_macs()
    assert sum(executed) == net.subnet_macs(subnet=3)


def test_counts_and_prefix_tags_are_per_tag_group():
    net = TaggedNet(zoo_model("resnet-20"), 2, SHAPE)
    widths = net.widths()
    assert len(widths) == net.num_groups
    net.set_prefix_tags([[max(1, w // 2) for w in widths], widths])
    assert [sum(c[:1]) for c in net.counts()] == [max(1, w // 2) for w in widths]
    with pytest.raises(ValueError, match=f"{net.num_groups} channel counts"):
        net.set_prefix_tags([[1], [1]])


def test_fold_module_folds_residual_batchnorm():
    model = zoo_model("resnet-20").eval()
    TaggedNet(model, 1, SHAPE).train()(torch.randn(8, *SHAPE))  # non-trivial running statistics
    model.eval()
    folded = fold_module(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)


def test_bn_momentum_none_is_a_cumulative_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 14 * 14, 2))
    net = TaggedSequential(model, 1, SHAPE).train()
    xs = [torch.randn(4, *SHAPE) * (i + 1) for i in range(3)]
    for x in xs:
        net(x)
    bn = net.norms[0]
    assert int(bn.num_batches_tracked) == 3
    means = torch.stack([model[0](x).mean(dim=(0, 2, 3)) for x in xs]).detach()
    torch.testing.assert_close(bn.running_mean, means.mean(0), atol=1e-5, rtol=1e-5)


class PoolFlattenNet(nn.Module):
    """A residual block, then pooling, a flatten (4 positions per channel) and two linear layers."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(8)
        self.fc1, self.fc = nn.Linear(8 * 2 * 2, 6), nn.Linear(6, 5)

    def forward(self, x):
        y = torch.relu(self.b0(self.c0(x)))
        y = torch.relu(self.b1(self.c1(y)) + y)
        return self.fc(torch.relu(self.fc1(torch.flatten(self.pool(y), 1))))


class FlatResidual(nn.Module):
    """The image flattened straight into a linear layer (16 positions per input channel), then a residual."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(3 * 16 * 16, 8), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.a(torch.flatten(x, 1)))
        return self.fc(y + torch.relu(self.b(y)))


@pytest.mark.parametrize("model_cls", [PoolFlattenNet, FlatResidual])
def test_flatten_multiplicity_in_sessions_grids_and_macs(model_cls):
    torch.manual_seed(0)
    net = TaggedNet(model_cls(), 2, SHAPE)
    random_tags(net, 9)
    warm(net)
    x = torch.randn(2, *SHAPE)
    cnet = compact(net)
    session, grid = cnet.start(x), cnet.start_grid(x, width=1)
    for k in (1, 2):
        scratch = net(x, subnet=k)
        for got in (cnet(x, subnet=k), session.logits, grid.logits, net.dense(k)(x)):
            torch.testing.assert_close(got, scratch, atol=1e-5, rtol=1e-4)
        if k == 1:
            session.step()
            grid.wider()
    assert session.cache_bytes() > 0
    full = TaggedNet(model_cls(), 2, SHAPE, rule="full", switchable_bn=True)
    random_tags(full, 9)
    assert [executed_macs(lambda k=k: full.dense(k)(x[:1])) for k in (1, 2)] == full.macs_per_subnet()


def test_unsupported_conv_padding_and_unfoldable_bn_are_named():
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        TaggedNet(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                                nn.Linear(4 * 16 * 16, 2)), 1, SHAPE)
    net = TaggedNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(4 * 14 * 14, 2)), 1, SHAPE)
    with pytest.raises(ValueError, match="no running statistics"):
        compact(net)
    with pytest.raises(ValueError, match="not a tagged feature map"):
        TaggedNet(PoolFlattenNet(), 2, SHAPE).add_exit(9)  # relu(fc1): flat features, nothing to pool


def test_reachable_tells_unmeasured_channels_apart_in_a_residual_net():
    net = TaggedNet(zoo_model("resnet-20"), 2, SHAPE)
    model = zoo_model("resnet-20")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    group = dict(zip(names, net.layer_group))
    inner, stream = group["stages.0.0.conv1"], group["stem.0"]
    net.set_tags(inner, torch.tensor([0]), 2)  # its only reader (conv2, writing the stream) is all tag 1
    reach = net.reachable()
    assert not reach[inner][0] and reach[inner][1:].all()
    assert all(r.all() for g, r in enumerate(reach) if g != inner)
    net.set_tags(stream, torch.tensor([5]), 2)  # a tag-2 stream channel reads it, but no later stage reads that
    assert not net.reachable()[inner][0] and not net.reachable()[stream][5]
    for g in range(net.num_groups):  # a tag-2 channel in every later group: a path to the logits
        if g not in (inner, stream):
            net.set_tags(g, torch.tensor([0]), 2)
    reach = net.reachable()
    assert reach[inner][0] and reach[stream][5]
    net.set_tags(stream, torch.tensor([5]), 3)  # dropped: outside every subnet, and so unreachable
    assert not net.reachable()[stream][5] and not net.reachable()[inner][0]


@pytest.mark.parametrize("rule", ["causal", "full"])
def test_macs_per_subnet_at_once_equals_each_subnets_count(rule):
    net = TaggedNet(zoo_model("resnet-20"), 3, SHAPE, rule=rule)
    random_tags(net, 4)
    with torch.no_grad():
        net.layers[2].weight[:, :2] = 0.0
    net.prune(1e-5)
    assert net.macs_per_subnet() == [net.subnet_macs(subnet=k) for k in (1, 2, 3)]
    assert executed_macs(lambda: net.dense(2)(torch.randn(1, *SHAPE))) >= net.macs_per_subnet()[1]


class PadBlock(nn.Module):
    """A CIFAR "option A" block with the new channels padded at the END."""

    def __init__(self, cin, cout, stride, pad=None):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, pad if pad is not None else (0, 0, 0, 0, 0, cout - cin)

    def forward(self, x):
        h = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        s = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        return F.relu(h + (F.pad(s, self.pad) if any(self.pad) else s))


class PadNet(nn.Module):
    def __init__(self, pad=None):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.block1, self.block2 = PadBlock(8, 8, 1), PadBlock(8, 16, 2, pad)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        x = self.block2(self.block1(F.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_zero_padded_shortcut_converts_keeps_old_channels_first_and_counts_what_runs():
    torch.manual_seed(0)
    model = PadNet().eval()
    warm_model = model.train()
    with torch.no_grad():
        warm_model(torch.randn(8, *SHAPE))
    model.eval()
    net = TaggedNet(model, 1, SHAPE).eval()
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=1e-5)
    pad = net.layers[-1]  # read last: the pad comes after block2's convolutions
    assert not pad.weight.requires_grad and pad.weight.shape == (16, 8, 1, 1)
    assert torch.equal(pad.weight[:8, :, 0, 0], torch.eye(8)) and not pad.weight[8:].any()  # old channels first
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert net.layer_group[-1] == net.layer_group[names.index("block2.c2")]  # the add ties pad and branch
    # the pad runs as a 1x1 convolution over the 8x8 output: 8 x 16 x 64 MACs beyond the model's own
    assert net.subnet_macs() == dy.cost.flop_counter_macs(model, SHAPE) + 8 * 16 * 64
    assert net.subnet_macs() == executed_macs(lambda: net.dense(1)(x[:1]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_padded_shortcut_steps_equal_scratch_and_export_is_plain_torch(seed):
    torch.manual_seed(seed)
    net = TaggedNet(PadNet(), 3, SHAPE)
    random_tags(net, seed)
    warm(net, seed)
    x = torch.randn(2, *SHAPE)
    run = compact(net).start(x)
    for k in range(1, 4):
        scratch = net(x, subnet=k)
        torch.testing.assert_close(run.logits, scratch, atol=1e-5, rtol=1e-4)
        dense = net.dense(k)
        assert all(type(m).__module__.startswith("torch") for m in dense.modules())
        torch.testing.assert_close(dense(x), scratch, atol=1e-5, rtol=1e-4)
        if run.can_step():
            run.step()


def test_training_leaves_the_zero_pad_frozen():
    torch.manual_seed(0)
    data = dy.data.synthetic(64, SHAPE, seed=0)
    cfg = dy.stepping.SteppingConfig(iterations=2, batches_per_iteration=2, batch_size=32, importance_batches=1,
                                     retrain_epochs=0, progress=False)
    reference = TaggedNet(PadNet(), 1, SHAPE).subnet_macs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 2-iteration construction finishes its moves untrained: it says so
        stepped = dy.stepping.construct(PadNet(), data, [0.6, 0.95], cfg, reference_macs=reference)
    pad = stepped.net.layers[-1]
    assert torch.equal(pad.weight[:8, :, 0, 0], torch.eye(8)) and not pad.weight[8:].any()


@pytest.mark.parametrize("spec, message", [((0, 0, 0, 0, 4, 4), "END only"), ((0, 0, 0, 0, 8, 0), "END only"),
                                           ((1, 1, 0, 0, 0, 8), "END only")])
def test_a_pad_that_moves_the_old_channels_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        TaggedNet(PadNet(pad=spec), 1, SHAPE)


def test_a_narrow_copy_starts_afresh_but_keeps_its_zero_pad():
    from dyninfer.methods.baselines.individual import reinitialise

    torch.manual_seed(0)
    dense = TaggedNet(PadNet(), 1, SHAPE).dense(1, fold_bn=False)
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    reinitialise(dense)
    frozen = [n for n, p in dense.named_parameters() if not p.requires_grad]
    assert len(frozen) == 1 and torch.equal(dict(dense.named_parameters())[frozen[0]], before[frozen[0]])
    assert all(not torch.equal(p, before[n]) for n, p in dense.named_parameters() if p.requires_grad and p.dim() > 1)


class _IndexCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts gathers (aten.index) and scatters (aten.index_put) that the dispatcher runs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten._index_put_impl_):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, rule", [("lenet-5", "causal"), ("resnet-20", "causal"), ("lenet-5", "full")])
def test_order_by_tag_keeps_every_subnet_and_turns_gathers_into_views(name, rule):
    """Ordered channels compute the same logits, MACs and gradients per subnet as before, with
    every subnet's channels a range (a slice) and far fewer gathers/scatters in a training step."""
    torch.manual_seed(0)
    net = TaggedNet(zoo_model(name), 3, SHAPE, rule=rule, switchable_bn=rule == "full")
    random_tags(net, 4)
    if name == "resnet-20":
        net.add_exit(net.exit_candidates()[2])
    net.prune(0.05)
    warm(net)
    ordered = copy.deepcopy(net)
    perms = ordered.order_by_tag()
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms)  # the random tags were out of order
    for g in range(net.num_groups):
        assert torch.equal(ordered.tags(g), net.tags(g)[perms[g]])
        assert bool((ordered.tags(g)[1:] >= ordered.tags(g)[:-1]).all())
    assert ordered.macs_per_subnet() == net.macs_per_subnet()
    x = torch.randn(4, *SHAPE)
    for k in (1, 2, 3):
        torch.testing.assert_close(ordered(x, subnet=k), net(x, subnet=k), atol=1e-5, rtol=1e-4)
        assert all(isinstance(positions(ordered.layer_tags(i) <= k), slice) for i in range(net.num_hidden))
    if name == "resnet-20":
        for got, want in zip(ordered.forward_grid(x), net.forward_grid(x)):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    def train_step(model):  # one straight-through step of every subnet; returns the index ops it ran
        model.train()
        model.zero_grad(set_to_none=True)
        with _IndexCount() as counter:
            out = model.forward_all(x, straight_through=True).logits if model.incremental else \
                [model(x, subnet=k, straight_through=True) for k in (1, 2, 3)]
            sum(F.cross_entropy(lg, torch.arange(4) % 10) for lg in out).backward()
        return counter.calls

    before, after = train_step(net), train_step(ordered)
    assert after < before / 2, (before, after)
    # the first layer reads the image: its gradient's rows are its group's channels, reordered
    torch.testing.assert_close(ordered.layers[0].weight.grad, net.layers[0].weight.grad[perms[net.layer_group[0]]],
                               atol=1e-5, rtol=1e-4)
    for i in range(net.num_hidden):  # running statistics updated alike, in the new order
        norm_a, norm_b = ordered.norm_of(i, 3), net.norm_of(i, 3)
        if getattr(norm_a, "running_mean", None) is not None:
            perm = perms[net.layer_group[i]]
            torch.testing.assert_close(norm_a.running_mean, norm_b.running_mean[perm])
