"""Baselines: the full rule and switchable BN in the tagged layers, and each baseline's defining
property (slimmable BN per width, US sandwich rule and BN recalibration, any-width causality,
early-exit prefixes, individual/slicing budgets and weights)."""


import pytest
import torch
import torch.nn as nn

from dyninfer import cost, data, models
from dyninfer.methods.baselines import anywidth, earlyexit, individual, match_prefix_counts, slimmable, universal
from dyninfer.methods.baselines._common import recalibrate_bn, split_steps
from dyninfer.nn.tagged import TaggedSequential

SHAPE = (1, 8, 8)
COUNTS = [[2, 3, 4], [4, 5, 8], [6, 8, 12]]  # toy model: subnet k's channels per hidden layer


def toy_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 10))


def lenet(expansion: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    return models.create("lenet-5", num_classes=10, expansion=expansion, input_shape=SHAPE)


@pytest.fixture(scope="module")
def train_set():
    return data.synthetic(192, SHAPE, seed=0)


def warm(net: TaggedSequential, x: torch.Tensor) -> None:
    net.train()
    with torch.no_grad():
        for k in range(1, net.num_subnets + 1):
            net(x, subnet=k)
    net.eval()


# ---------------------------------------------------------------------------- tagged: full rule, switchable BN
def test_full_rule_reads_larger_inputs_that_causal_rule_forbids():
    x = torch.randn(4, *SHAPE)
    nets = {}
    for rule in ("causal", "full"):
        net = TaggedSequential(toy_model(), 3, SHAPE, rule=rule)
        net.set_prefix_tags(COUNTS)
        warm(net, torch.randn(16, *SHAPE))
        nets[rule] = net
    for rule, net in nets.items():
        before = [net(x, subnet=k) for k in (1, 2, 3)]
        with torch.no_grad():  # rows of subnet 1 reading the inputs subnet 2 adds (upper block)
            net.layers[1].weight[:2, 2:4] += 3.0
        after = [net(x, subnet=k) for k in (1, 2, 3)]
        torch.testing.assert_close(before[0], after[0])
        if rule == "causal":  # masked out: no subnet uses the upper block
            torch.testing.assert_close(before[1], after[1])
        else:
            assert not torch.allclose(before[1], after[1])
    causal_macs = nets["causal"].macs_per_subnet()
    full_macs = nets["full"].macs_per_subnet()
    assert causal_macs[0] == full_macs[0] and all(c < f for c, f in zip(causal_macs[1:], full_macs[1:]))


@pytest.mark.parametrize("rule,switchable", [("causal", False), ("full", False), ("full", True)])
def test_dense_export_equals_tagged_forward_and_counts_the_same_macs(rule, switchable):
    net = TaggedSequential(toy_model(1), 3, SHAPE, rule=rule, switchable_bn=switchable)
    net.set_prefix_tags(COUNTS)
    warm(net, torch.randn(16, *SHAPE))
    x = torch.randn(5, *SHAPE)
    for k in (1, 2, 3):
        for fold in (True, False):
            torch.testing.assert_close(net.dense(k, fold_bn=fold)(x), net(x, subnet=k), atol=1e-5, rtol=1e-5)
        if rule == "full":
            assert cost.macs(net.dense(k), SHAPE) == net.subnet_macs(subnet=k)


def test_forward_all_without_causal_rule_runs_each_subnet():
    net = TaggedSequential(toy_model(), 3, SHAPE, rule="full", switchable_bn=True)
    net.set_prefix_tags(COUNTS)
    warm(net, torch.randn(16, *SHAPE))
    x = torch.randn(3, *SHAPE)
    for k, logits in enumerate(net.forward_all(x).logits, start=1):
        torch.testing.assert_close(logits, net(x, subnet=k))
    assert not net.incremental
    with pytest.raises(ValueError, match="causal"):
        net.forward_all(x, keep_preacts=True)


def test_set_prefix_tags_rejects_bad_counts():
    net = TaggedSequential(toy_model(), 2, SHAPE)
    with pytest.raises(ValueError, match="non-decreasing"):
        net.set_prefix_tags([[3, 3, 3], [2, 4, 4]])
    with pytest.raises(ValueError, match="2 lists"):
        net.set_prefix_tags([[3, 3, 3]])
    net.set_prefix_tags([[1, 2, 3], [4, 8, 6]])
    assert net.counts() == [[1, 3, 2], [2, 6, 0], [3, 3, 6]]  # tags 1, 2 and 3 (= dropped)


def test_rule_must_be_known():
    with pytest.raises(ValueError, match="rule must be one of"):
        TaggedSequential(toy_model(), 2, SHAPE, rule="dense")


# ---------------------------------------------------------------------------- slimmable
def test_switchable_bn_each_width_uses_its_own_statistics():
    net = TaggedSequential(toy_model(), 3, SHAPE, rule="full", switchable_bn=True)
    net.set_prefix_tags(COUNTS)
    warm(net, torch.randn(16, *SHAPE))
    x = torch.randn(4, *SHAPE)
    before = [net(x, subnet=k) for k in (1, 2, 3)]
    with torch.no_grad():
        net.norm_of(0, 2).running_mean += 4.0  # only subnet 2's copy of the first BN
    after = [net(x, subnet=k) for k in (1, 2, 3)]
    torch.testing.assert_close(before[0], after[0])
    torch.testing.assert_close(before[2], after[2])
    assert not torch.allclose(before[1], after[1])

    # Training subnet 1 updates copy 1 only, and only its active channels.
    stats = [net.norm_of(0, k).running_mean.clone() for k in (1, 2, 3)]
    net.train()
    net(torch.randn(8, *SHAPE) * 3 + 1, subnet=1)
    new = [net.norm_of(0, k).running_mean for k in (1, 2, 3)]
    assert not torch.allclose(stats[0][:2], new[0][:2])
    torch.testing.assert_close(stats[0][2:], new[0][2:])
    torch.testing.assert_close(stats[1], new[1])
    torch.testing.assert_close(stats[2], new[2])


def test_slimmable_matches_budgets_and_trains_every_width(train_set):
    budgets = [0.2, 0.5, 1.0]
    net = slimmable.train(lenet(), train_set, budgets, slimmable.SlimmableConfig(steps=3, batch_size=32))
    fractions = net.mac_fractions()
    assert all(0.8 * b <= f <= b for f, b in zip(fractions, budgets)), fractions
    assert net.history["optimizer_steps"] == 3 and net.history["samples"] == 96
    # The summed loss reaches every width: each subnet's BN copy moved away from its init.
    for k in (1, 2, 3):
        bn = net.net.norm_of(0, k)
        active = net.channels()[k - 1][0]
        assert not torch.allclose(bn.weight[:active], torch.ones(active))
    x = torch.randn(3, *SHAPE)
    for k in (1, 2, 3):
        torch.testing.assert_close(net.export(k)(x), net(x, subnet=k), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["causal", "full"])
def test_matched_widths_are_the_largest_within_budget(rule):
    model = lenet(2.0 if rule == "causal" else 1.0)
    reference = cost.macs(lenet(), SHAPE)
    net = TaggedSequential(model, 3, SHAPE, rule=rule)
    budgets = [0.15, 0.4, 0.7]
    counts, multipliers = match_prefix_counts(net, budgets, reference)
    macs = net.macs_per_subnet()
    assert all(m <= b * reference for m, b in zip(macs, budgets))
    assert multipliers == sorted(multipliers)
    for k in range(3):  # one more channel in every layer would break the budget
        bigger = [c + 1 for c in counts[k]]
        trial = counts[:k] + [bigger] * (3 - k)
        net.set_prefix_tags([[min(c, w) for c, w in zip(row, net.widths())] for row in trial])
        assert net.subnet_macs(subnet=k + 1) > budgets[k] * reference
    with pytest.raises(ValueError, match="below the smallest"):
        match_prefix_counts(TaggedSequential(lenet(), 1, SHAPE), [0.001], reference)


# ---------------------------------------------------------------------------- universally slimmable
def test_us_sandwich_rule_samples_min_and_max_every_step(train_set):
    cfg = universal.USConfig(steps=6, batch_size=32, calibration_samples=64)
    net = universal.train(lenet(), train_set, [0.2, 0.5, 0.9], cfg)
    low, high = net.history["width_range"]
    assert low == pytest.approx(net.multipliers[0]) and high == 1.0
    sampled = net.history["sampled_widths"]
    assert len(sampled) == 6 == net.history["optimizer_steps"]
    for widths in sampled:
        assert len(widths) == 2 + cfg.num_random
        assert widths[0] == low and widths[-1] == high
        assert all(low <= w <= high for w in widths) and widths == sorted(widths)
    assert len({tuple(w[1:-1]) for w in sampled}) == 6  # the middle widths are random
    assert all(f <= b for f, b in zip(net.mac_fractions(), [0.2, 0.5, 0.9]))


def test_bn_recalibration_gives_exact_average_statistics():
    net = TaggedSequential(toy_model(), 2, SHAPE, rule="full", switchable_bn=True)
    net.set_prefix_tags(COUNTS[1:])
    batches = [(torch.randn(8, *SHAPE) * (i + 1) + i, None) for i in range(3)]
    recalibrate_bn(net, 1, iter(batches), 3)
    with torch.no_grad():
        z = torch.cat([net.layers[0](x)[:, :4] for x, _ in batches])
    bn = net.norm_of(0, 1)
    torch.testing.assert_close(bn.running_mean[:4], z.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert torch.equal(net.norm_of(0, 2).running_mean, torch.zeros(6))  # the other width untouched
    assert bn.momentum == 0.1  # restored
    with pytest.raises(ValueError, match="switchable_bn"):
        TaggedSequential(toy_model(), 2, SHAPE).reset_bn_statistics(1)


# ---------------------------------------------------------------------------- any-width
def test_anywidth_obeys_causal_rule_and_steps_incrementally(train_set):
    budgets = [0.2, 0.4, 0.7]
    net = anywidth.train(lenet(2.0), train_set, budgets, anywidth.AnyWidthConfig(steps=4, batch_size=32))
    assert net.history["optimizer_steps"] == 4
    assert all(f <= b for f, b in zip(net.mac_fractions(), budgets))
    channels = net.channels()
    for i in range(net.net.num_hidden):  # regular groups: subnet k owns a prefix of every layer
        tags = net.net.tags(i)
        assert torch.equal(tags, tags.sort().values)
        assert all(a <= b for a, b in zip([c[i] for c in channels], [c[i] for c in channels][1:]))
    x = torch.randn(4, *SHAPE)
    run = net.start(x)
    for k in (1, 2, 3):
        torch.testing.assert_close(run.logits, net(x, subnet=k), atol=1e-5, rtol=1e-5)
        if run.can_step():
            run.step()
    before = [net(x, subnet=k) for k in (1, 2, 3)]
    with torch.no_grad():  # every weight of the larger groups
        for i in range(net.net.num_hidden):
            net.net.layers[i].weight[net.net.tags(i) >= 2] += 1.0
    after = [net(x, subnet=k) for k in (1, 2, 3)]
    torch.testing.assert_close(before[0], after[0])
    assert not torch.allclose(before[1], after[1]) and not torch.allclose(before[2], after[2])


# ---------------------------------------------------------------------------- early exit
def test_early_exit_prefix_property_and_incremental_session(train_set):
    net = earlyexit.train(lenet(), train_set, earlyexit.EarlyExitConfig(steps=3, batch_size=32))
    assert net.num_subnets == 3 and net.exit_points() == [3, 7]  # after each conv block's pool
    fractions = net.mac_fractions()
    assert fractions[-1] == pytest.approx(1.0) and fractions == sorted(fractions) and len(set(fractions)) == 3
    x = torch.randn(4, *SHAPE)
    run = net.start(x)
    for k in (1, 2, 3):
        torch.testing.assert_close(run.logits, net(x, subnet=k))
        torch.testing.assert_close(net.export(k)(x), net(x, subnet=k), atol=1e-5, rtol=1e-5)
        if run.can_step():
            run.step()
    before = [net(x, subnet=k) for k in (1, 2, 3)]
    with torch.no_grad():  # perturb what lies beyond exit 1: later segments and head 2
        for p in list(net.segments[1:].parameters()) + list(net.heads[1].parameters()):
            p.add_(0.5)
    after = [net(x, subnet=k) for k in (1, 2, 3)]
    torch.testing.assert_close(before[0], after[0])
    assert not torch.allclose(before[1], after[1]) and not torch.allclose(before[2], after[2])
    heads = sum(cost.macs(h, s) for h, s in zip(net.heads, [(6, 4, 4), (16, 2, 2)]))
    assert net.path_mac_fraction() == pytest.approx((net.macs()[-1] + heads) / net.reference_macs)


# ---------------------------------------------------------------------------- individual and slicing
def test_individual_splits_the_budget_and_trains_independent_copies(train_set):
    assert split_steps(10, 3) == [3, 3, 4] and sum(split_steps(7, 4)) == 7
    net = individual.train_individual(lenet(), train_set, [0.2, 0.5, 1.0],
                                      individual.IndividualConfig(steps=7, batch_size=32))
    assert net.history["phases"] == {"subnet-1": 2, "subnet-2": 2, "subnet-3": 3}
    assert net.history["optimizer_steps"] == 7 and net.history["samples"] == 7 * 32
    x = torch.randn(3, *SHAPE)
    before = net(x, subnet=1)
    with torch.no_grad():
        for p in net.subnets[1].parameters():
            p.add_(1.0)
    torch.testing.assert_close(net(x, subnet=1), before)


def test_brute_force_slices_are_prefixes_of_the_full_model(train_set):
    model = lenet()
    net = individual.train_sliced(model, train_set, [0.2, 0.5, 1.0], individual.SliceConfig(steps=3, batch_size=32))
    assert net.history["phases"] == {"full": 3}
    x = torch.randn(3, *SHAPE)
    model.eval()
    torch.testing.assert_close(net(x, subnet=3), model(x), atol=1e-5, rtol=1e-5)  # budget 1.0 = the model
    small = net.subnets[0]
    c = net.history["channels"][0][0]
    torch.testing.assert_close(small[0].weight, model[0].weight[:c])


def test_slicing_with_finetuning_changes_only_classifiers_and_bn_statistics(train_set):
    model = lenet()
    cfg = individual.SliceConfig(steps=10, batch_size=32, finetune_fraction=0.3)
    net = individual.train_sliced(model, train_set, [0.2, 0.5, 1.0], cfg)
    assert net.history["phases"] == {"full": 7, "finetune-1": 1, "finetune-2": 1, "finetune-3": 1}
    model.eval()
    largest = net.subnets[2]
    torch.testing.assert_close(largest[0].weight, model[0].weight)  # trunk frozen
    torch.testing.assert_close(largest[1].weight, model[1].weight)  # BN affine frozen
    assert not torch.allclose(largest[-1].weight, model[-1].weight)  # classifier fine-tuned
    assert not torch.allclose(largest[1].running_mean, model[1].running_mean)  # statistics followed
