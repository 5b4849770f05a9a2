"""SteppingNet: the causal rule, incremental stepping, importance, moves, suppression, construction."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import random_tags
from dyninfer import export
from dyninfer.methods.stepping import (
    SteppingConfig, SubnetTraining, check_budgets, construct, importance, move_neurons, suppression_factors, train_step,
)
from dyninfer.nn.tagged import TaggedSequential
from dyninfer.runtime.compaction import compact

SHAPE = (1, 8, 8)


def toy_model(seed: int = 0, bn: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), norm(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), norm(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 10))


def warm_bn(net: TaggedSequential, x: torch.Tensor) -> None:
    net.train()
    with torch.no_grad():
        for k in range(1, net.num_subnets + 1):
            net(x, subnet=k)
    net.eval()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), num_subnets=st.integers(1, 4), batch=st.integers(1, 5))
def test_step_equals_scratch_for_random_tags(seed, num_subnets, batch):
    net = TaggedSequential(toy_model(seed % 7), num_subnets, SHAPE)
    random_tags(net, seed)
    x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))
    warm_bn(net, torch.randn(8, *SHAPE))
    run = compact(net).start(x)
    joint = net.forward_all(x).logits
    for k in range(1, num_subnets + 1):
        scratch = net(x, subnet=k)
        torch.testing.assert_close(run.logits, scratch, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joint[k - 1], scratch, atol=1e-5, rtol=1e-5)
        if run.can_step():
            run.step()


def test_larger_subnet_never_changes_smaller_one():
    net = TaggedSequential(toy_model(), 3, SHAPE)
    random_tags(net, 3)
    net.eval()
    x = torch.randn(4, *SHAPE)
    before = [net(x, subnet=k) for k in (1, 2, 3)]
    with torch.no_grad():  # perturb every weight owned by subnet 3 (rows with tag 3)
        for i in range(net.num_hidden):
            net.layers[i].weight[net.tags(i) == 3] += 5.0
    after = [net(x, subnet=k) for k in (1, 2, 3)]
    torch.testing.assert_close(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])
    assert not torch.allclose(before[2], after[2])


def test_step_down_returns_earlier_logits_exactly():
    net = TaggedSequential(toy_model(), 3, SHAPE)
    random_tags(net, 5)
    net.eval()
    run = compact(net).start(torch.randn(2, *SHAPE))
    first = run.logits.clone()
    run.step()
    second = run.logits.clone()
    run.step()
    assert torch.equal(run.step_down(), second)
    assert torch.equal(run.step_down(), first)
    assert run.subnet == 1
    assert torch.equal(run.step(), second)  # reuses the cache, no recomputation
    with pytest.raises(RuntimeError):
        run.step_down(), run.step_down()


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("of", ["weighted_sum", "output"])
def test_dl_dr_matches_finite_difference(bn, of):
    """Eq. 2: r_j multiplies neuron j's weighted sum (bias and BatchNorm shift excluded), or with
    importance_of="output" its whole output, bias included."""
    torch.manual_seed(1)
    net = TaggedSequential(toy_model(bn=bn), 1, SHAPE).double()
    with torch.no_grad():  # a bias large enough that counting it would change the score
        net.layers[1].bias = nn.Parameter(torch.full((8,), 0.7, dtype=torch.float64))
    warm_bn(net, torch.randn(16, *SHAPE, dtype=torch.float64))
    x, y = torch.randn(6, *SHAPE, dtype=torch.float64), torch.randint(0, 10, (6,))
    cfg = SteppingConfig(alpha_growth=1.5, normalize_importance=False, importance_of=of)
    scores = importance(net, [(x, y)], cfg)
    layer, channel, eps = 1, 3, 1e-6
    weight = net.layers[layer].weight
    scaled = [weight] if of == "weighted_sum" else (
        [net.norms[layer].weight, net.norms[layer].bias] if bn else [weight, net.layers[layer].bias])

    def loss_at(r):  # r scales the incoming weights (weighted sum), or the output: BN's affine / weights + bias
        with torch.no_grad():
            saved = [p[channel].clone() for p in scaled]
            for p in scaled:
                p[channel] *= r
            loss = F.cross_entropy(net(x), y).item()
            for p, v in zip(scaled, saved):
                p[channel] = v
        return loss

    fd = (loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
    assert abs(fd) > 1e-6
    assert scores[layer][channel].item() == pytest.approx(abs(fd), rel=1e-4)


def test_importance_weights_larger_subnets_by_alpha():
    net = TaggedSequential(toy_model(), 2, SHAPE)
    net.eval()
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    a = importance(net, [(x, y)], SteppingConfig(alpha_growth=1.0, normalize_importance=False))
    b = importance(net, [(x, y)], SteppingConfig(alpha_growth=3.0, normalize_importance=False))
    # All neurons have tag 1, so M = |g1| + alpha_2 |g2|, and g2 = g1 here (subnet 2 == subnet 1).
    torch.testing.assert_close(b[0], a[0] * 2.0, rtol=1e-4, atol=1e-7)


def test_normalized_importance_has_unit_mean_per_layer():
    net = TaggedSequential(toy_model(), 2, SHAPE)
    net.eval()
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    raw = importance(net, [(x, y)], SteppingConfig(normalize_importance=False))
    scaled = importance(net, [(x, y)], SteppingConfig())
    for r, s in zip(raw, scaled):  # unit mean over the measured channels, order within a layer kept
        assert s[r > 0].mean().item() == pytest.approx(1.0, rel=1e-5)
        assert torch.equal(torch.argsort(s), torch.argsort(r))


def test_moving_a_neuron_removes_forbidden_synapses_and_revives_pruned_ones():
    net = TaggedSequential(toy_model(), 2, SHAPE)
    with torch.no_grad():
        net.layers[0].weight[2, 0, 0, 0] = 0.0  # a pruned weight of neuron 2 in layer 0
    net.prune(1e-5)
    assert not net.alive(0)[2, 0, 0, 0]
    before = net.weight_mask(1).clone()
    scores = [torch.arange(len(net.tags(i)), dtype=torch.float) + 1 for i in range(net.num_hidden)]
    scores[0][2] = 0.0  # least important neuron overall
    # What subnet 1 saves without neuron 2, counted by hand: its 8 live 3x3 weights (one pruned)
    # at 8x8 positions, plus its column in layer 1 (8 neurons x 3x3) at 4x4 positions.
    expected_saving = 8 * 64 + 8 * 9 * 16
    moved, saved = move_neurons(net, scores, subnet=1, amount=expected_saving)
    assert moved == 1 and net.tags(0)[2] == 2 and saved == expected_saving
    after = net.weight_mask(1)
    # layer 1's tag-1 neurons lost exactly their synapses from neuron 2; nothing else changed
    changed = (before != after).nonzero()
    assert set(changed[:, 1].tolist()) == {2}
    assert (after[:, 2] == (net.tags(1) >= 2).view(-1, 1, 1)).all()
    assert net.alive(0)[2].all()  # revived


def test_the_last_unit_of_a_round_overshoots_least():
    net = TaggedSequential(toy_model(), 2, SHAPE)
    scores = [torch.arange(len(net.tags(i)), dtype=torch.float) + 1 for i in range(net.num_hidden)]
    # least important: fc1 neuron 0 (saves 32 + 10 = 42 MACs), then conv2 neuron 0 (6 x 9 x 16 + 12 x 4 = 912)
    scores[2][0], scores[1][0] = 0.0, 0.5
    moved, saved = move_neurons(net, scores, subnet=1, amount=80)
    # after fc1 neuron 0, taking conv2 neuron 0 would overshoot 80 by 874: fc1 neuron 1, which
    # reaches it with the least overshoot (42 + 42 = 84), is taken instead
    assert net.tags(1)[0] == 1 and moved == 2 and saved == 84
    assert net.tags(2)[:2].tolist() == [2, 2] and (net.tags(2)[2:] == 1).all()


def test_moves_keep_units_of_granularity():
    net = TaggedSequential(toy_model(), 2, SHAPE)
    scores = [torch.rand(len(net.tags(i)), generator=torch.Generator().manual_seed(i)) for i in range(net.num_hidden)]
    move_neurons(net, scores, subnet=1, amount=float("inf"), granularity=4)
    # widths 6, 8, 12 over 2 subnets: units of min(4, width // 2) = 3, 4, 4 channels; each layer keeps
    # at least one channel, so it moves all the whole units it can
    assert [int((net.tags(i) == 2).sum()) for i in range(net.num_hidden)] == [3, 4, 8]


def test_unmeasured_channels_wait_while_measured_ones_remain():
    net = TaggedSequential(toy_model(), 3, SHAPE)
    net.set_tags(0, torch.tensor([0, 1]), 2)  # conv1 channels 0, 1 in subnet 2; every conv2 channel has tag 1
    net.set_tags(2, torch.tensor([11]), 2)    # a measured peer: fc1 neuron 11 (the classifier reads it)
    measured = net.reachable()
    assert measured[0].tolist() == [False, False, True, True, True, True] and measured[2].all()
    scores = [torch.ones(len(net.tags(i))) for i in range(net.num_hidden)]
    scores[0][:2] = 0.0  # what Eq. 3 gives a channel nobody reads
    move_neurons(net, scores, subnet=2, amount=40, measured=measured, exact=False)  # fc1 neuron 11 saves 42
    assert net.tags(0)[:2].tolist() == [2, 2] and net.tags(2)[11] == 3  # the measured one moved on
    move_neurons(net, scores, subnet=2, amount=40, measured=net.reachable(), exact=False)
    assert net.tags(0)[:2].tolist() == [2, 2]  # only unmeasured ones left: they wait ...
    move_neurons(net, scores, subnet=2, amount=1, measured=net.reachable(), exact=True)
    assert sorted(net.tags(0)[:2].tolist()) == [2, 3]  # ... unless the round must close the gap


def test_move_keeps_min_channels():
    net = TaggedSequential(toy_model(), 2, SHAPE)
    scores = [torch.zeros(len(net.tags(i))) for i in range(net.num_hidden)]
    move_neurons(net, scores, subnet=1, amount=float("inf"), min_channels=2)
    assert [int((net.tags(i) == 1).sum()) for i in range(net.num_hidden)] == [2, 2, 2]


def test_increments_keep_their_floor_of_fully_connected_neurons():
    """With floors (fc_floor), neither the moves nor the fill-back empty an increment's fully
    connected layer, even where those neurons are the least important; without, they do."""
    from dyninfer.methods.stepping import fill_back, increment_floors

    net = TaggedSequential(toy_model(), 3, SHAPE)
    floors = increment_floors(net, 0.5)
    assert floors == [0, 0, 2]  # conv groups: none; fc1 (12 neurons, 3 subnets): ceil(0.5 x 12 / 3)
    for g in range(net.num_groups):  # tag 2 holds every channel
        net.set_tags(g, torch.arange(net.group_widths[g]), 2)
    scores = [torch.rand(net.group_widths[g]) + (0 if g == 2 else 10) for g in range(net.num_groups)]
    unfloored = copy.deepcopy(net)
    move_neurons(net, scores, subnet=2, amount=float("inf"), floors=floors)
    move_neurons(unfloored, scores, subnet=2, amount=float("inf"))
    assert int((net.tags(2) == 2).sum()) == floors[2]  # every other fc neuron moved on, the floor stayed
    assert int((unfloored.tags(2) == 2).sum()) == 1  # min_channels only: the fc layer is nearly empty

    # fill-back into subnet 1 under an unlimited budget: it may not take tag 2's last fc neurons
    for g in range(net.num_groups):
        net.set_tags(g, torch.arange(net.group_widths[g]), 2)
    net.set_tags(0, torch.tensor([0]), 1)  # subnet 1 must have a channel in every group to run
    net.set_tags(1, torch.tensor([0]), 1)
    net.set_tags(2, torch.tensor([0]), 1)
    refilled = copy.deepcopy(net)
    fill_back(net, scores, [float("inf")] * 3, floors=floors)
    fill_back(refilled, scores, [float("inf")] * 3)
    assert int((net.tags(2) == 2).sum()) == floors[2]
    assert int((refilled.tags(2) == 2).sum()) < floors[2]


def per_subnet_gradients(net, x, y, cfg):
    """Reference: the suppression-weighted sum of separately computed per-subnet gradients."""
    beta = cfg.beta if cfg.suppression else 1.0
    total = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
    owner = {id(p): (tags, dim) for p, tags, dim in net.param_tags()}
    for j in range(1, net.num_subnets + 1):
        net.zero_grad()
        F.cross_entropy(net(x, subnet=j), y).backward()
        for name, p in net.named_parameters():
            tags, dim = owner[id(p)]
            shape = [1] * p.dim()
            shape[dim] = -1
            f = beta ** (j - tags.double()).clamp(min=0)
            total[name] += p.grad * (f.view(shape) if tags.numel() > 1 else f)
    return total


@pytest.mark.parametrize("suppression", [True, False])
def test_joint_gradient_equals_weighted_sum_of_subnet_gradients(suppression):
    net = TaggedSequential(toy_model(), 3, SHAPE).double()
    random_tags(net, 11)
    net.train()
    x, y = torch.randn(8, *SHAPE, dtype=torch.float64), torch.randint(0, 10, (8,))
    cfg = SteppingConfig(suppression=suppression, weight_decay=0.0)
    expected = per_subnet_gradients(net, x, y, cfg)
    weights, factor, decay = suppression_factors(cfg, net.num_subnets)
    net.zero_grad()
    out = net.forward_all(x)
    sum(w * F.cross_entropy(lg, y) for w, lg in zip(weights, out.logits)).backward()
    net.shape_gradients(factor)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("schedule", ["joint", "sequential"])
def test_mean_tag_update_divides_each_tag_by_the_weight_of_its_subnets(schedule):
    """retrain_tag_update="mean": a tag-i weight's update is sum_{j>=i} beta^(j-i) dL_j divided by
    sum_{j>=i} beta^(j-i); here both sums run as explicit loops over the subnets."""
    net = TaggedSequential(toy_model(bn=False), 3, SHAPE).double()
    random_tags(net, 5)
    net.train()
    x, y = torch.randn(8, *SHAPE, dtype=torch.float64), torch.randint(0, 10, (8,))
    cfg = SteppingConfig(beta=0.8, weight_decay=0.0, schedule=schedule)
    summed = per_subnet_gradients(net, x, y, cfg)
    owner = {id(p): (tags, dim) for p, tags, dim in net.param_tags()}
    expected = {}
    for name, p in net.named_parameters():
        tags, dim = owner[id(p)]
        weight = torch.tensor([sum(0.8 ** (j - int(t)) for j in range(int(t), 4)) or 1.0 for t in tags.reshape(-1)],
                              dtype=torch.float64)
        shape = [1] * p.dim()
        shape[dim] = -1
        expected[name] = summed[name] / (weight.view(shape) if tags.numel() > 1 else weight)
    lr = 1e-7  # sequential: later turns see weights moved by lr * grad, so compare to first order
    stepped = copy.deepcopy(net)
    training = SubnetTraining(stepped, cfg, mean=True)
    optimizer = torch.optim.SGD(stepped.parameters(), lr=lr)
    for _ in range(training.steps_per_batch):
        optimizer.zero_grad()
        training.loss(stepped, x, y).backward()
        training.on_after_backward()
        optimizer.step()
        training.on_batch_end()
    for (name, p), (_, q) in zip(net.named_parameters(), stepped.named_parameters()):
        torch.testing.assert_close((p - q).detach() / lr, expected[name], rtol=1e-4, atol=1e-9, msg=name)
    assert not torch.allclose(expected["layers.0.weight"], summed["layers.0.weight"])  # the division mattered


@pytest.mark.parametrize("schedule", ["joint", "sequential"])
def test_every_live_weight_decays_once_per_batch(schedule):
    """The weight decay every method shares: w -= lr * wd * w once per batch, whatever its tag."""
    torch.manual_seed(0)
    base = TaggedSequential(toy_model(bn=False), 3, SHAPE).double()
    random_tags(base, 7)
    net = {}
    x, y = torch.randn(16, *SHAPE, dtype=torch.float64), torch.randint(0, 10, (16,))
    lr, wd = 1e-6, 0.1
    for decay in (0.0, wd):
        net[decay] = copy.deepcopy(base).train()
        cfg = SteppingConfig(schedule=schedule, weight_decay=decay)
        train_step(net[decay], x, y, torch.optim.SGD(net[decay].parameters(), lr=lr), cfg)
    for i in range(base.num_hidden):
        w0 = base.layers[i].weight.detach()
        change = net[wd].layers[i].weight.detach() - net[0.0].layers[i].weight.detach()
        live = (base.tags(i) <= 3).view(-1, *([1] * (w0.dim() - 1)))
        expected = torch.where(live, -lr * wd * w0, torch.zeros_like(w0))
        # joint: exact; sequential: to first order in lr (later turns see decayed weights)
        torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-14)


def test_sequential_and_joint_schedules_both_train():
    x, y = torch.randn(32, *SHAPE), torch.randint(0, 10, (32,))
    for schedule in ("joint", "sequential"):
        net = TaggedSequential(toy_model(), 2, SHAPE)
        net.train()
        cfg = SteppingConfig(schedule=schedule, lr=0.05)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        first = train_step(net, x, y, opt, cfg)
        for _ in range(15):
            last = train_step(net, x, y, opt, cfg)
        assert len(first) == 2 and all(b < a for a, b in zip(first, last)), schedule


@pytest.mark.parametrize("schedule", ["joint", "sequential"])
def test_train_step_counts_each_subnets_correct_predictions(schedule):
    torch.manual_seed(0)
    net = TaggedSequential(toy_model(), 3, SHAPE)
    random_tags(net, 1)
    net.train()
    x, y = torch.randn(64, *SHAPE), torch.randint(0, 10, (64,))
    with torch.no_grad():  # predictions before the update, as the step sees them (BN in batch mode)
        before = [int((lg.argmax(1) == y).sum()) for lg in copy.deepcopy(net).forward_all(x).logits]
    correct = [0, 0, 0]
    cfg = SteppingConfig(schedule=schedule)
    train_step(net, x, y, torch.optim.SGD(net.parameters(), lr=0.0), cfg, correct=correct)
    assert correct == before  # lr 0: sequential updates change nothing between subnets either


class RecordingSGD(torch.optim.SGD):
    """SGD that snapshots a watched weight whenever a subnet's turn starts (zero_grad)."""

    def __init__(self, params, watched, **kw):
        super().__init__(params, **kw)
        self.watched, self.snapshots = watched, []

    def zero_grad(self, set_to_none=True):
        self.snapshots.append(self.watched.detach().clone())
        super().zero_grad(set_to_none)


def test_sequential_training_of_subnet_j_leaves_larger_subnets_alone():
    net = TaggedSequential(toy_model(), 2, SHAPE)
    random_tags(net, 4)
    net.train()
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    cfg = SteppingConfig(schedule="sequential", weight_decay=0.1)
    weight = net.layers[1].weight
    opt = RecordingSGD(net.parameters(), weight, lr=0.1, momentum=0.9)
    train_step(net, x, y, opt, cfg)  # momentum now holds velocity for every row
    train_step(net, x, y, opt, cfg)
    larger = net.tags(1) > 1
    assert larger.any() and (~larger).any()
    # turns: (batch 1: subnet 1, subnet 2), (batch 2: subnet 1, subnet 2)
    before_subnet_1, after_subnet_1, after_subnet_2 = opt.snapshots[2], opt.snapshots[3], weight.detach()
    assert torch.equal(after_subnet_1[larger], before_subnet_1[larger])  # frozen while subnet 1 trains
    assert not torch.equal(after_subnet_1[~larger], before_subnet_1[~larger])
    assert not torch.equal(after_subnet_2[larger], after_subnet_1[larger])  # trained by subnet 2


def test_construct_leaves_the_callers_model_untouched():
    model = toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SteppingConfig(iterations=2, batches_per_iteration=2, batch_size=32, importance_batches=1, progress=False)
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    construct(model, synthetic_set(), [0.5, 0.9], cfg, reference_macs=full)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("budgets, message", [
    ([0.5, 0.3], "strictly increasing"),
    ([0.0, 0.5], "(0, 1]"),
    ([0.5, 1.2], "(0, 1]"),
    ([], "at least one"),
    (["a"], "numbers"),
])
def test_bad_budgets_give_clear_errors(budgets, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_budgets(budgets)


def test_budget_count_must_match_subnets():
    with pytest.raises(ValueError, match="3 budgets for 2 subnets"):
        check_budgets([0.1, 0.2, 0.3], num_subnets=2)


def test_bad_subnet_and_input_shape():
    net = TaggedSequential(toy_model(), 2, SHAPE)
    with pytest.raises(ValueError, match="subnet must be an int in 1..2"):
        net(torch.randn(1, *SHAPE), subnet=3)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 1, 8, 8\)"):
        net(torch.randn(1, 3, 8, 8))


def synthetic_set(n=192, seed=0):
    from dyninfer.data import ImageSet

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    base = torch.zeros(4, 1, 8, 8)
    for c in range(4):
        base[c, 0, (c // 2) * 4:(c // 2) * 4 + 4, (c % 2) * 4:(c % 2) * 4 + 4] = 200
    images = (base[labels] + torch.rand(n, 1, 8, 8, generator=g) * 55).to(torch.uint8)
    return ImageSet(images, labels, 10, "toy")


def test_construct_meets_budgets_and_obeys_causal_rule():
    model = toy_model()
    data = synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    cfg = SteppingConfig(iterations=8, batches_per_iteration=2, batch_size=32, importance_batches=1, progress=False)
    budgets = [0.3, 0.6, 0.9]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = construct(model, data, budgets, cfg, reference_macs=full)
    fractions = net.mac_fractions()
    assert all(f <= b for f, b in zip(fractions, budgets)), fractions
    assert all(a <= b for a, b in zip(fractions, fractions[1:])), fractions
    # 8 iterations on random data leave dead ReLUs: an increment may end with no live channel, and
    # construction then says so rather than charging MACs for channels that change no answer
    empty = [k + 1 for k in range(1, len(fractions)) if fractions[k] == fractions[k - 1]]
    assert bool(empty) == any("add no channel" in str(w.message) for w in caught), (empty, caught)
    t = net.net
    for i in range(t.num_hidden):  # no neuron reads a neuron of a larger subnet
        w = (t.layers[i].weight * t.weight_mask(i)).abs()
        w = w.flatten(2).sum(2) if w.dim() > 2 else w
        reads_larger = t.input_tags(i).unsqueeze(0) > t.tags(i).unsqueeze(1)
        assert (w[reads_larger] == 0).all()
    assert net.history["iterations"], "construction ran no iteration"


def test_interrupted_construction_resumes_exactly(tmp_path, monkeypatch):
    from dyninfer.methods import stepping

    model, data = toy_model(), synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    cfg = SteppingConfig(iterations=5, batches_per_iteration=2, batch_size=32, importance_batches=1, progress=False)
    budgets = [0.3, 0.6, 0.9]
    straight = construct(model, data, budgets, cfg, reference_macs=full)

    real_move, calls = stepping._move_round, []

    def crash_on_third(*args, **kwargs):  # the process dies during iteration 3
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_move(*args, **kwargs)

    monkeypatch.setattr(stepping, "_move_round", crash_on_third)
    stem = tmp_path / "construct"
    with pytest.raises(KeyboardInterrupt):
        construct(model, data, budgets, cfg, reference_macs=full, checkpoint=stem)
    monkeypatch.setattr(stepping, "_move_round", real_move)
    real_loss, steps = stepping.SubnetTraining.loss, []  # one call per batch (joint schedule)
    monkeypatch.setattr(stepping.SubnetTraining, "loss", lambda *a, **k: steps.append(1) or real_loss(*a, **k))
    resumed = construct(model, data, budgets, cfg, reference_macs=full, checkpoint=stem)

    done = len(straight.history["iterations"])
    assert done > 2 and len(steps) == (done - 2) * cfg.batches_per_iteration  # the 2 saved iterations not redone
    expected, got = straight.net.state_dict(), resumed.net.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed construction differs"
    assert resumed.history["iterations"] == straight.history["iterations"]
    # a finished checkpoint returns the same net again without training
    again = construct(model, data, budgets, cfg, reference_macs=full, checkpoint=stem)
    assert all(torch.equal(again.net.state_dict()[k], got[k]) for k in got)


def test_interrupted_retraining_resumes_exactly(tmp_path, monkeypatch):
    from dyninfer.methods import stepping

    model, data = toy_model(), synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    cfg = SteppingConfig(iterations=3, batches_per_iteration=2, batch_size=64, importance_batches=1,
                         retrain_epochs=3, progress=False)
    built = construct(model, data, [0.5, 0.9], cfg, reference_macs=full)
    straight, interrupted = copy.deepcopy(built), copy.deepcopy(built)
    straight.retrain(data, teacher=model)

    real_loss, steps = stepping.SubnetTraining.loss, []  # one call per batch (joint schedule)

    def crash_in_epoch_two(*args, **kwargs):
        steps.append(1)
        if len(steps) == 5:  # 3 batches per epoch: dies in the middle of epoch 2
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(stepping.SubnetTraining, "loss", crash_in_epoch_two)
    stem = tmp_path / "retrain"
    with pytest.raises(KeyboardInterrupt):
        interrupted.retrain(data, teacher=model, checkpoint=stem)
    monkeypatch.setattr(stepping.SubnetTraining, "loss", real_loss)
    resumed = copy.deepcopy(built)  # a fresh process: the constructed net, then the checkpoint
    log = resumed.retrain(data, teacher=model, checkpoint=stem)
    assert [e["epoch"] for e in log] == [1, 2, 3]
    expected, got = straight.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed retraining differs"
    with pytest.raises(Exception, match="epochs"):
        copy.deepcopy(built).retrain(data, teacher=model, epochs=4, checkpoint=stem)


@pytest.mark.parametrize("warmup", [0.0, 1.0])
def test_retraining_warms_up_then_anneals(monkeypatch, warmup):
    """The rate each retraining step really runs at (read off the optimizer): with a warm-up it rises
    over the first ``retrain_warmup_epochs`` epochs to near ``retrain_lr``, then falls to ~0."""
    model, data = toy_model(), synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    cfg = SteppingConfig(iterations=2, batches_per_iteration=2, batch_size=64, importance_batches=1,
                         retrain_epochs=6, retrain_lr=0.1, retrain_warmup_epochs=warmup, progress=False)
    built = construct(model, data, [0.5, 0.9], cfg, reference_macs=full)
    rates, real_step = [], torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step",
                        lambda self, *a, **k: rates.append(self.param_groups[0]["lr"]) or real_step(self, *a, **k))
    built.retrain(data)
    per_epoch = -(-len(data) // 64)
    assert len(rates) == 6 * per_epoch
    ramp = round(warmup * per_epoch)
    if ramp:
        assert all(a < b for a, b in zip(rates[:ramp], rates[1:ramp]))  # rising through the warm-up
        assert rates[0] <= 0.1 / ramp + 1e-12
    assert max(rates) == pytest.approx(0.1, rel=0.15) and max(rates) <= 0.1
    assert all(a >= b for a, b in zip(rates[ramp:], rates[ramp + 1:]))  # then only falling
    assert rates[-1] < 0.01


def test_retrain_warmup_is_validated():
    with pytest.raises(ValueError, match="retrain_warmup_epochs"):
        SteppingConfig(retrain_warmup_epochs=-1)
    with pytest.raises(ValueError, match="retrain_tag_update must be one of"):
        SteppingConfig(retrain_tag_update="average")


@pytest.mark.filterwarnings("ignore:construction reached N_t")
def test_retraining_checkpoint_belongs_to_one_net_data_and_teacher(tmp_path):
    from dyninfer.checkpoint import CheckpointMismatchError

    model, data = toy_model(), synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    cfg = SteppingConfig(iterations=2, batches_per_iteration=1, batch_size=64, importance_batches=1,
                         retrain_epochs=1, progress=False)
    built = construct(model, data, [0.5, 0.9], cfg, reference_macs=full)
    stem = tmp_path / "retrain"
    copy.deepcopy(built).retrain(data, teacher=model, checkpoint=stem)
    other = construct(model, data, [0.5, 0.9], SteppingConfig(**{**cfg.__dict__, "lr": 0.2}), reference_macs=full)
    with pytest.raises(CheckpointMismatchError, match="start"):  # another constructed net
        other.retrain(data, teacher=model, checkpoint=stem)
    with pytest.raises(CheckpointMismatchError, match="data"):
        copy.deepcopy(built).retrain(synthetic_set(n=128), teacher=model, checkpoint=stem)
    with pytest.raises(CheckpointMismatchError, match="teacher"):
        copy.deepcopy(built).retrain(data, teacher=toy_model(seed=1), checkpoint=stem)
    done = copy.deepcopy(built)
    before = {k: v.clone() for k, v in done.net.state_dict().items()}
    with pytest.warns(UserWarning, match="complete"):
        log = done.retrain(data, teacher=model, checkpoint=stem)
    assert len(log) == 1 and "retrain" not in done.history  # nothing trained, nothing logged twice
    assert not all(torch.equal(before[k], v) for k, v in done.net.state_dict().items())  # the retrained state


@pytest.mark.filterwarnings("ignore:construction reached N_t")
def test_resume_refuses_a_checkpoint_of_another_construction(tmp_path):
    from dyninfer.checkpoint import CheckpointMismatchError

    model, data = toy_model(), synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    cfg = SteppingConfig(iterations=1, batches_per_iteration=1, batch_size=32, importance_batches=1, progress=False)
    stem = tmp_path / "construct"
    construct(model, data, [0.3, 0.9], cfg, reference_macs=full, checkpoint=stem)
    changed = SteppingConfig(**{**cfg.__dict__, "lr": 0.1})
    with pytest.raises(CheckpointMismatchError, match=r"lr \(checkpoint 0.01, now 0.1\)"):
        construct(model, data, [0.3, 0.9], changed, reference_macs=full, checkpoint=stem)
    with pytest.raises(CheckpointMismatchError, match="budgets"):
        construct(model, data, [0.4, 0.9], cfg, reference_macs=full, checkpoint=stem)
    # resume=False starts over and overwrites
    construct(model, data, [0.4, 0.9], cfg, reference_macs=full, checkpoint=stem, resume=False)
    construct(model, data, [0.4, 0.9], cfg, reference_macs=full, checkpoint=stem)


def test_export_matches_library_and_loads_without_dyninfer(tmp_path):
    net = TaggedSequential(toy_model(), 3, SHAPE)
    random_tags(net, 2)
    warm_bn(net, torch.randn(8, *SHAPE))
    x = torch.randn(3, *SHAPE)
    for k in (1, 2, 3):
        dense = export.subnet(net, k)
        assert all(type(m).__module__.startswith("torch.nn") for m in dense.modules())
        torch.testing.assert_close(dense(x), net(x, subnet=k), atol=1e-5, rtol=1e-5)
    path = tmp_path / "sub2.pt"
    export.torchscript(net, 2, path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(net(x, subnet=2).detach(), tmp_path / "y.pt")
    code = (
        "import sys, torch\n"
        f"m = torch.jit.load(r'{path}')\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}'); y = torch.load(r'{tmp_path / 'y.pt'}')\n"
        "assert 'dyninfer' not in sys.modules\n"
        "assert torch.allclose(m(x), y, atol=1e-5), (m(x) - y).abs().max()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_construction_uses_its_budgets_and_moves_no_unmeasured_neuron():
    """LeNet-5 x2 on digits: every subnet ends within [0.97 P_i, P_i] and no neuron was dropped
    while no reader could see it; the paper's rules, on the same run, do both (the test can fail)."""
    from dyninfer import data, models
    from dyninfer.models.registry import original_macs

    train, _ = data.load("digits")
    budgets = [0.15, 0.3, 0.6, 0.85]
    paper = dict(unmeasured="paper", quota="paper", fill_back=False, lr_schedule="constant")
    results = {}
    for name, rules in (("ours", {}), ("paper", paper)):
        torch.manual_seed(0)
        reference = original_macs(models.create("lenet-5", num_classes=10, input_shape=train.input_shape))
        model = models.create("lenet-5", num_classes=10, expansion=2.0, input_shape=train.input_shape)
        cfg = SteppingConfig(iterations=30, batches_per_iteration=4, batch_size=64, importance_batches=2, lr=0.05,
                             progress=False, **rules)
        net = construct(model, train, budgets, cfg, reference_macs=reference)
        rounds = net.history["iterations"] + net.history.get("trims", [])
        results[name] = ([f / b for f, b in zip(net.mac_fractions(), budgets)],
                         sum(r.get("dropped_unmeasured", 0) for r in rounds))
    ratios, unmeasured = results["ours"]
    assert all(0.97 <= r <= 1.0 for r in ratios), ratios
    assert unmeasured == 0
    paper_ratios, paper_unmeasured = results["paper"]
    assert paper_unmeasured > 0 and min(paper_ratios) < 0.97, results["paper"]


def test_the_demos_reuse_check_counts_what_steps_execute(monkeypatch):
    """check_reuse passes a session that reuses its cache and refuses one that recomputes."""
    from dyninfer.cli.stepping import check_reuse
    from dyninfer.methods.stepping import SteppingNet
    from dyninfer.runtime.session import Session

    net = TaggedSequential(toy_model(), 3, SHAPE)
    random_tags(net, 6)
    warm_bn(net, torch.randn(8, *SHAPE))
    with torch.no_grad():  # some pruned weights: the dense blocks multiply them as zeros
        net.layers[1].weight[:, :, 0, 0] = 0.0
    net.prune(1e-5)
    stepped = SteppingNet(net, [0.3, 0.6, 0.9], net.subnet_macs(subnet=3))
    x = torch.randn(4, *SHAPE)
    message = check_reuse(stepped, x)
    live, blocks = sum(stepped.compact().step_macs()), sum(stepped.compact().executed_step_macs())
    assert blocks > live and f"{blocks - live:,} of them multiply pruned weights" in message

    real_step = Session.step

    def recompute(self):  # also does the work of a from-scratch pass, as a non-incremental step would
        self.net(x, subnet=self.subnet + 1)
        return real_step(self)

    monkeypatch.setattr(Session, "step", recompute)
    with pytest.raises(RuntimeError, match="did not reuse"):
        check_reuse(stepped, x)


@pytest.mark.parametrize("field, value", [("granularity", 2.5), ("iterations", 3.0), ("fill_back", "false"),
                                          ("min_channels", True)])
def test_config_refuses_values_of_the_wrong_type(field, value):
    with pytest.raises(ValueError, match=field):
        SteppingConfig(**{field: value})


def test_a_net_saved_before_the_construction_fields_loads_as_it_was_built(tmp_path):
    import json

    from dyninfer import models
    from dyninfer.methods.stepping import SteppingNet

    net = TaggedSequential(models.create("lenet-5", num_classes=10, input_shape=SHAPE), 2, SHAPE)
    SteppingNet(net, [0.5, 0.9], net.subnet_macs(subnet=2)).save(tmp_path / "old")
    meta_file = next(tmp_path.glob("old*.json"))
    meta = json.loads(meta_file.read_text())
    holder = meta["meta"] if "meta" in meta and "config" in meta["meta"] else meta
    for field in ("unmeasured", "quota", "fill_back", "decay_per_subnet", "importance_of"):
        holder["config"].pop(field)
    meta_file.write_text(json.dumps(meta))
    config = SteppingNet.load(tmp_path / "old").config
    assert (config.unmeasured, config.quota, config.fill_back, config.decay_per_subnet) == ("paper", "paper", False, True)


def test_dropping_idle_channels_changes_no_logits_and_frees_their_macs():
    """A dead fc neuron (output 0 on every input) and whatever only it read are dropped; every
    subnet's logits stay exactly what they were, and the MACs they cost are freed."""
    from dyninfer.methods.stepping import drop_idle

    torch.manual_seed(0)
    net = TaggedSequential(toy_model(bn=False), 3, SHAPE)
    random_tags(net, seed=3)
    fc = net.num_hidden - 1  # the layer the classifier reads
    dead = int(torch.nonzero(net.layer_tags(fc) == 2)[0])
    with torch.no_grad():
        net.layers[fc].weight[dead] = 0.0
        net.layers[fc].bias[dead] = -1.0  # ReLU(-1) = 0 for every input
    x = synthetic_set().batches(64).__next__()[0]
    y = torch.randint(0, 10, (64,))
    net.eval()
    before = [net(x, subnet=k) for k in range(1, 4)]
    macs = net.macs_per_subnet()
    raw = importance(net, [(x, y)], SteppingConfig(progress=False))
    dropped = drop_idle(net, raw)
    assert int(net.layer_tags(fc)[dead]) == net.num_subnets + 1
    assert dropped["silent"] >= 1
    for k, logits in enumerate(before, start=1):
        torch.testing.assert_close(net(x, subnet=k), logits, rtol=0, atol=1e-6)
    after = net.macs_per_subnet()
    assert after[1] < macs[1] and all(a <= b for a, b in zip(after, macs))
    assert all(bool(r[net.tags(g) <= 3].all()) for g, r in enumerate(net.reachable()))


def test_every_increment_of_a_constructed_net_changes_its_answers():
    """LeNet-5 x2 on digits: subnet k+1 answers differently from subnet k on some input (an
    increment whose classifier inputs are all dead or absent would repeat subnet k's logits)."""
    from dyninfer import data, models
    from dyninfer.models.registry import original_macs

    train, _ = data.load("digits")
    torch.manual_seed(0)
    reference = original_macs(models.create("lenet-5", num_classes=10, input_shape=train.input_shape))
    model = models.create("lenet-5", num_classes=10, expansion=2.0, input_shape=train.input_shape)
    cfg = SteppingConfig(iterations=30, batches_per_iteration=4, batch_size=64, importance_batches=2, lr=0.05,
                         progress=False)
    net = construct(model, train, [0.15, 0.3, 0.6, 0.85], cfg, reference_macs=reference)
    x = train.batches(256).__next__()[0]
    with torch.no_grad():
        logits = [net(x, subnet=k) for k in range(1, net.num_subnets + 1)]
    for k in range(1, net.num_subnets):
        assert (logits[k] - logits[k - 1]).abs().max() > 1e-4, k


def test_eval_forward_runs_the_compacted_form_and_follows_weight_changes():
    """In eval mode net(x, subnet=k) executes what mac_fractions(path="scratch") reports (counted by
    FlopCounterMode), agrees with the masked training form, and sees an in-place weight change."""
    from torch.utils.flop_counter import FlopCounterMode

    model, data = toy_model(), synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    cfg = SteppingConfig(iterations=6, batches_per_iteration=2, batch_size=32, importance_batches=1, progress=False)
    net = construct(model, data, [0.3, 0.6, 0.9], cfg, reference_macs=full)
    net.net.eval()
    x = data.batches(16).__next__()[0]
    scratch = net.macs(path="scratch")
    assert all(s >= m for s, m in zip(scratch, net.macs()))  # rectangles hold the triangles
    net(x[:1])  # builds (and caches) the compacted form; its shape probe is not per-inference work
    for k in range(1, net.num_subnets + 1):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fast = net(x[:1], subnet=k)
        assert counter.get_total_flops() // 2 == scratch[k - 1], k
        with torch.no_grad():
            torch.testing.assert_close(fast, net.net(x[:1], subnet=k), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        before = net(x, subnet=1)
        net.net.classifier.bias += 1.0
        torch.testing.assert_close(net(x, subnet=1), before + 1.0, atol=1e-5, rtol=1e-5)
    net.net.train()
    assert net(x, subnet=1).requires_grad  # training mode: the masked form, gradients reach the weights


def test_scratch_execution_by_the_chain_of_steps_is_counted_and_chosen_by_measurement(tmp_path, monkeypatch):
    """A subnet run from scratch as its chain of step blocks executes (FlopCounterMode) exactly
    what macs(path="scratch") then reports, answers like the masked form, survives save/load; and
    choose_scratch keeps, per subnet, the execution its measurements found faster."""
    from torch.utils.flop_counter import FlopCounterMode

    from dyninfer.methods import stepping

    model, data = toy_model(), synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    cfg = SteppingConfig(iterations=6, batches_per_iteration=2, batch_size=32, importance_batches=1, progress=False)
    net = construct(model, data, [0.3, 0.6, 0.9], cfg, reference_macs=full)
    x = data.batches(8).__next__()[0]
    rectangles = net.macs(path="scratch")
    net.scratch_execution = ["rectangle", "chain", "chain"]
    scratch = net.macs(path="scratch")
    steps = net.compact().executed_step_macs()
    assert scratch == [rectangles[0], sum(steps[:2]), sum(steps[:3])]  # the chain costs its step blocks
    assert scratch[2] < rectangles[2]  # the triangle skips the zero upper blocks
    net(x[:1])  # build the compacted form outside the count
    for k in range(1, 4):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            out = net(x[:1], subnet=k)
        assert counter.get_total_flops() // 2 == scratch[k - 1], k
        torch.testing.assert_close(out, net.net(x[:1], subnet=k), atol=1e-5, rtol=1e-5)
    from dyninfer import models
    from dyninfer.nn.tagged import TaggedNet

    zoo = TaggedNet(models.create("lenet-5", num_classes=10, input_shape=(1, 8, 8)), 3, (1, 8, 8))
    stepping.SteppingNet(zoo, [0.3, 0.6, 0.9], 1000, scratch_execution=["chain", "rectangle", "chain"]).save(
        tmp_path / "net")
    assert stepping.SteppingNet.load(tmp_path / "net").scratch_execution == ["chain", "rectangle", "chain"]
    with pytest.raises(ValueError, match="scratch_execution must name one of"):
        stepping.SteppingNet(net.net, net.budgets, net.reference_macs, scratch_execution=["dense", "chain", "chain"])

    def fake_setting(cnet, batch, threads, repeats):  # rectangles 1.0 ms each; steps 0.2, 0.5, 0.9 ms
        compact = [{"compact": {"best": {"median_ms": 1.0}}} for _ in range(3)]
        return {"scratch": compact, "path": {"steps": [{"median_ms": t} for t in (0.2, 0.5, 0.9)]}}

    monkeypatch.setattr(stepping, "bench_setting", fake_setting)
    rows = net.choose_scratch(batch=4)
    assert [r["chain_ms"] for r in rows] == pytest.approx([0.2, 0.7, 1.6])
    assert net.scratch_execution == ["rectangle", "chain", "rectangle"]


def test_dropping_idle_channels_keeps_min_channels_in_subnet_1():
    """A group whose subnet-1 channels are all dead keeps min_channels of them: subnet 1 must run."""
    from dyninfer.methods.stepping import drop_idle

    torch.manual_seed(0)
    net = TaggedSequential(toy_model(bn=False), 3, SHAPE)
    random_tags(net, seed=3)
    fc = net.num_hidden - 1
    group = net.layer_group[fc]
    raw = [torch.ones(w) for w in net.group_widths]
    raw[group] = torch.where(net.tags(group) == 1, 0.0, 1.0)  # every tag-1 channel of the group silent
    drop_idle(net, raw, min_channels=2)
    assert int((net.tags(group) == 1).sum()) == 2


def test_promoting_channels_to_the_subnet_they_serve_changes_no_logits():
    """Random tags and pruning leave channels that reach only larger subnets' logits: promoted,
    every subnet answers exactly as before and no subnet costs more (several nets, some moves)."""
    from dyninfer.methods.stepping import promote_to_serving

    total = 0
    for seed in range(8):
        torch.manual_seed(seed)
        n = 2 + seed % 3
        net = TaggedSequential(toy_model(seed, bn=True), n, SHAPE)
        random_tags(net, seed=seed)
        x = synthetic_set().batches(32).__next__()[0]
        warm_bn(net, x)
        with torch.no_grad():  # prune inputs so some channels lose their own subnet's readers
            for i in range(net.num_hidden):
                net.alive(i)[torch.rand(net.alive(i).shape) < 0.5] = False
            before = [net(x, subnet=k) for k in range(1, n + 1)]
        macs = net.macs_per_subnet()
        moved = promote_to_serving(net)
        total += moved
        with torch.no_grad():
            for k, logits in enumerate(before, start=1):
                torch.testing.assert_close(net(x, subnet=k), logits, atol=1e-5, rtol=1e-5)
        after = net.macs_per_subnet()
        assert all(a <= b for a, b in zip(after, macs)), seed
        for g, level in enumerate(net.serving()):  # every channel above subnet 1 now serves its own subnet
            tags = net.tags(g)
            kept = (tags >= 2) & (tags <= n) & (level <= n)
            assert torch.equal(level[kept], tags[kept]), seed
    assert total > 0  # the nets above do hold channels to promote



def shifted_channels_left_unseen(t: TaggedSequential, x: torch.Tensor) -> list[int]:
    """Per hidden layer, the channels of subnets 2..N that reach some logits but whose output,
    shifted by +-50, leaves their own subnet's logits unchanged: found by forward passes, not by
    TaggedNet.serving (the channels that reach no logits are excluded by reachable()). The probe
    runs a copy without ReLUs, so a dead unit downstream cannot hide a live connection."""
    t = copy.deepcopy(t)
    for j, m in enumerate(t.maps):
        if isinstance(m, nn.ReLU):
            t.maps[j] = nn.Identity()
    t.eval()
    n = t.num_subnets
    unseen = []
    with torch.no_grad():
        base = [t(x, subnet=k) for k in range(1, n + 1)]
        for i, reach in zip(range(t.num_hidden), t.reachable()):
            norm = t.norm_of(i, 1)
            shift = norm.bias if getattr(norm, "bias", None) is not None else t.layers[i].bias
            count = 0
            for c in torch.nonzero((t.layer_tags(i) >= 2) & (t.layer_tags(i) <= n) & reach).squeeze(1).tolist():
                k = int(t.layer_tags(i)[c])
                seen = False
                for delta in (50.0, -50.0):
                    shift[c] += delta
                    seen = seen or (t(x, subnet=k) - base[k - 1]).abs().max().item() > 1e-6
                    shift[c] -= delta
                count += not seen
            unseen.append(count)
    return unseen


def test_fill_back_that_serves_its_own_subnet_leaves_no_channel_served_late():
    """Random tags, then promotion and fill-back. Plain fill-back takes readers out of an increment
    and leaves channels that only larger subnets read (a shift of their output moves no logits of
    their own subnet); with serve_own none is left, no limit is broken, and channels are admitted."""
    from dyninfer.methods.stepping import fill_back, promote_to_serving, served_late

    x = synthetic_set().batches(32).__next__()[0]
    late = {False: 0, True: 0}
    admitted = 0
    for seed in range(12):
        net = TaggedSequential(toy_model(seed), 3, SHAPE)
        random_tags(net, seed=seed)
        warm_bn(net, x)
        g = torch.Generator().manual_seed(seed)
        scores = [torch.rand(w, generator=g) + 0.1 for w in net.group_widths]
        full = TaggedSequential(toy_model(seed), 1, SHAPE).subnet_macs(subnet=1)
        limits = [min(m + 0.15 * full, full) for m in net.macs_per_subnet()]
        for serve_own in (False, True):
            t = copy.deepcopy(net)
            promote_to_serving(t)
            added = fill_back(t, scores, limits, 1, None, serve_own=serve_own)
            assert all(m <= lim for m, lim in zip(t.macs_per_subnet(), limits)), (seed, serve_own)
            probed = shifted_channels_left_unseen(t, x)
            assert probed == served_late(t), (seed, serve_own, probed)
            late[serve_own] += sum(probed)
            admitted += sum(added) if serve_own else 0
    assert late[True] == 0 and late[False] > 0 and admitted > 0, (late, admitted)


def test_a_min_channels_floor_above_the_first_budget_is_refused_before_training():
    """min_channels channels per layer cost more than subnet 1's budget: construction says so
    before its first iteration instead of failing after the last one."""
    model, data = toy_model(), synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    cfg = SteppingConfig(iterations=8, batches_per_iteration=2, batch_size=32, importance_batches=1, progress=False,
                         min_channels=5)
    with pytest.raises(ValueError, match="min_channels=5 keeps subnet 1 at"):
        construct(model, data, [0.3, 0.6, 0.9], cfg, reference_macs=full)
    cfg = SteppingConfig(iterations=8, batches_per_iteration=2, batch_size=32, importance_batches=1, progress=False,
                         min_channels=2)
    assert construct(model, data, [0.3, 0.6, 0.9], cfg, reference_macs=full).mac_fractions()[0] <= 0.3


def test_min_width_keeps_a_share_of_every_layer_in_subnet_1():
    """min_width: subnet 1 ends with at least ceil(min_width x width) channels of every layer and
    within its budget, where the count floor alone lets a layer shrink below that; a share whose
    floor alone breaks the first budget is refused before training."""
    model, data = toy_model(), synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    widths = (6, 8, 12)  # toy_model's conv1, conv2, fc1
    wanted = [-(-w // 2) for w in widths]  # ceil(0.5 x width), counted here, not by subnet_floors

    def subnet_1_channels(min_width, budgets=(0.35, 0.6, 0.9)):
        cfg = SteppingConfig(iterations=8, batches_per_iteration=2, batch_size=32, importance_batches=1,
                             progress=False, min_width=min_width)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stepped = construct(model, data, list(budgets), cfg, reference_macs=full)
        assert all(m <= b for m, b in zip(stepped.mac_fractions(), budgets))
        return [int((stepped.net.tags(g) == 1).sum()) for g in range(stepped.net.num_groups)]

    floored, unfloored = subnet_1_channels(0.5), subnet_1_channels(0.0)
    assert all(k >= w for k, w in zip(floored, wanted)), (floored, wanted)
    assert any(k < w for k, w in zip(unfloored, wanted)), unfloored  # without it a layer goes below
    with pytest.raises(ValueError, match=r"min_width=0.5 keep subnet 1 at 0\.3\d+ .*\[3, 4, 6\]"):
        subnet_1_channels(0.5, budgets=(0.3, 0.6, 0.9))
    with pytest.raises(ValueError, match="min_width must be a number in"):
        SteppingConfig(min_width=1.0)


def test_increment_width_floors_every_layer_of_every_increment_and_is_checked_up_front():
    """increment_width: a subnet's own channels of any layer, convolutions too, do not move on below
    ceil(increment_width x width); floors that alone break a budget are refused before training."""
    from dyninfer.methods.stepping import increment_floors

    net = TaggedSequential(toy_model(), 3, SHAPE)
    floors = increment_floors(net, 0.0, 0.2)
    assert floors == [2, 2, 3]  # ceil(0.2 x 6, 0.2 x 8, 0.2 x 12): convolutions included
    assert increment_floors(net, 0.5, 0.2) == [2, 2, 3] and increment_floors(net, 1.0, 0.0) == [0, 0, 4]
    for g in range(net.num_groups):  # tag 2 holds every channel
        net.set_tags(g, torch.arange(net.group_widths[g]), 2)
    scores = [torch.rand(net.group_widths[g]) for g in range(net.num_groups)]
    unfloored = copy.deepcopy(net)
    move_neurons(net, scores, subnet=2, amount=float("inf"), floors=floors)
    move_neurons(unfloored, scores, subnet=2, amount=float("inf"))
    assert [int((net.tags(g) == 2).sum()) for g in range(3)] == [2, 2, 3]
    assert [int((unfloored.tags(g) == 2).sum()) for g in range(3)] == [1, 1, 1]

    model, data = toy_model(), synthetic_set()
    full = TaggedSequential(copy.deepcopy(model), 1, SHAPE).subnet_macs(subnet=1)
    cfg = SteppingConfig(iterations=8, batches_per_iteration=2, batch_size=32, importance_batches=1, progress=False,
                         increment_width=0.2)
    # subnets 1 and 2 need [2, 2, 3] and [4, 4, 6] channels: 0.164 and 0.383 of the MACs at least
    with pytest.raises(ValueError, match=r"increment_width=0.2: \[2, 2, 3\] .* keep subnet\(s\) \[2\] at \[0\.38"):
        construct(model, data, [0.35, 0.37, 0.9], cfg, reference_macs=full)
