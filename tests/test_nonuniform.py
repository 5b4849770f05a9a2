"""Non-uniform subnets: widths fit their budgets and are non-uniform, residual streams keep one
count, each subnet has its own BatchNorm, outputs equal a hand-built dense model, and a subnet
chosen by measured latency runs within its latency budget."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dyninfer as dy
from dyninfer.methods import allocate, importance, nonuniform
from dyninfer.nn.tagged import TaggedNet
from dyninfer.runtime.latency_table import LatencyTable, build_table, grid

SHAPE = (1, 8, 8)
BUDGETS = [0.3, 0.6, 1.0]


@pytest.fixture(scope="module")
def digits():
    return dy.data.load("digits")


@pytest.fixture(scope="module")
def lenet_nu(digits):
    torch.manual_seed(0)
    model = dy.models.create("lenet-5", num_classes=10, input_shape=SHAPE)
    cfg = nonuniform.NonUniformConfig(steps=60, batch_size=64, multiple=2, calibration_samples=256)
    return nonuniform.train(model, digits[0], BUDGETS, cfg)


def test_widths_fit_their_budgets_and_are_not_one_ratio(lenet_nu):
    fractions = lenet_nu.mac_fractions()
    assert all(f <= b + 1e-9 for f, b in zip(fractions, BUDGETS))
    assert all(a < b for a, b in zip(fractions, fractions[1:]))
    full = lenet_nu.net.widths()
    ratios = {round(w / f, 3) for w, f in zip(lenet_nu.widths(1), full)}
    assert len(ratios) > 1, f"subnet 1 keeps one ratio of every layer: {lenet_nu.widths(1)} of {full}"
    # nested: every subnet's counts grow with k
    assert all(a <= b for k in range(1, 3) for a, b in zip(lenet_nu.widths(k), lenet_nu.widths(k + 1)))


def test_subnet_equals_a_hand_built_dense_model(lenet_nu, digits):
    """Build subnet k's plain Sequential by hand (kept channels of each layer, its own BN) and compare."""
    tagged = lenet_nu.net
    x = next(digits[1].batches(16))[0]
    for k in (1, 2, 3):
        layers, cols = [], torch.arange(SHAPE[0])
        for i, (layer, post) in enumerate(zip(tagged.layers, tagged.posts)):
            rows = torch.nonzero(tagged.layer_tags(i) <= k).squeeze(1)
            if isinstance(layer, nn.Conv2d):
                dense = nn.Conv2d(len(cols), len(rows), layer.kernel_size, layer.stride, layer.padding)
            else:
                dense = nn.Linear(len(cols), len(rows))
            with torch.no_grad():
                dense.weight.copy_(layer.weight[rows][:, cols])
                dense.bias.copy_(layer.bias[rows] if layer.bias is not None else torch.zeros(len(rows)))
            layers.append(dense)
            norm = tagged.norm_of(i, k)
            if isinstance(norm, nn.BatchNorm2d):
                bn = nn.BatchNorm2d(len(rows)).eval()
                with torch.no_grad():
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, name).copy_(getattr(norm, name)[rows])
                layers.append(bn)
            layers.extend(post)
            repeat = tagged.in_repeat[i + 1]
            cols = (rows.unsqueeze(1) * repeat + torch.arange(repeat)).reshape(-1)
        head = nn.Linear(len(cols), 10)
        with torch.no_grad():
            head.weight.copy_(tagged.classifier.weight[:, cols])
            head.bias.copy_(tagged.classifier.bias)
        hand = nn.Sequential(*layers, head).eval()
        torch.testing.assert_close(lenet_nu(x, subnet=k), hand(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lenet_nu.export(k)(x), hand(x), atol=1e-5, rtol=1e-5)


def test_each_subnet_uses_its_own_batchnorm(lenet_nu, digits):
    x = next(digits[1].batches(16))[0]
    norm = lenet_nu.net.norms[0]
    shared = lenet_nu.net.tags(0) <= 1
    assert not torch.allclose(norm[1].running_mean[shared], norm[3].running_mean[shared])  # recalibrated apart
    before = lenet_nu(x, subnet=1)
    saved = norm[3].running_mean.clone()
    with torch.no_grad():
        norm[3].running_mean.add_(5.0)
        torch.testing.assert_close(lenet_nu(x, subnet=1), before)  # another subnet's statistics: no effect
        assert (lenet_nu(x, subnet=3) - before).abs().max() > 0
        norm[3].running_mean.copy_(saved)


def test_residual_streams_keep_one_count_and_the_greedy_search_fits():
    torch.manual_seed(0)
    model = dy.models.create("resnet-20", num_classes=10, expansion=0.5, input_shape=SHAPE)
    x, y = torch.randn(32, *SHAPE), torch.randint(0, 10, (32,))
    for search in ("global", "greedy"):
        nu = nonuniform.sample(model, [0.3, 0.7], search=search, multiple=4, held_out=(x, y))
        assert all(f <= b + 1e-9 for f, b in zip(nu.mac_fractions(), [0.3, 0.7]))
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        for k in (1, 2):
            width = dict(zip(names, nu.layer_widths(k)))
            stage1 = {width["stem.0"]} | {width[f"stages.0.{b}.conv2"] for b in range(3)}
            assert len(stage1) == 1  # the stem and every block's second conv: one residual stream
            torch.testing.assert_close(nu.export(k)(x), nu(x, subnet=k), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="held_out"):
        nonuniform.sample(model, [0.3, 0.7], search="greedy")


def test_bad_options_are_clear_errors():
    model = dy.models.create("lenet-5", num_classes=10, input_shape=SHAPE)
    with pytest.raises(ValueError, match="by must be one of"):
        nonuniform.sample(model, [0.5], by="watts")
    with pytest.raises(ValueError, match="below the smallest subnet"):
        nonuniform.sample(model, [0.0001], multiple=8)
    with pytest.raises(ValueError, match="search must be one of"):
        nonuniform.NonUniformConfig(search="random")


def test_an_unreachable_budget_is_refused_before_any_training(digits):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.manual_seed(0)
    model = dy.models.create("lenet-5", num_classes=10, input_shape=SHAPE)
    steps = []
    handle = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        with pytest.raises(ValueError, match="below the smallest subnet"):
            nonuniform.train(model, digits[0], [0.001, 1.0], nonuniform.NonUniformConfig(steps=20, batch_size=16))
    finally:
        handle.remove()
    assert steps == []


def test_importances_score_every_channel_of_every_group():
    torch.manual_seed(0)
    net = TaggedNet(dy.models.create("resnet-20", num_classes=10, expansion=0.5, input_shape=SHAPE), 1, SHAPE)
    with torch.no_grad():
        net.layers[0].weight[3].zero_()  # the stem's channel 3: its other writers still give it weight
    for score in (importance.FilterNorm(), importance.BatchNormScale()):
        scores = score(net)
        assert [len(s) for s in scores] == net.widths() and all((s >= 0).all() for s in scores)
    norms = importance.FilterNorm()(net)
    stem_group = net.layer_group[0]
    expected = sum(net.layers[i].weight[3].detach().pow(2).sum() for i in net.group_layers(stem_group)).sqrt()
    assert float(norms[stem_group][3]) == pytest.approx(float(expected), rel=1e-5)
    assert float(importance.group_lasso(net).detach()) == pytest.approx(float(sum(s.sum() for s in norms)), rel=1e-4)


def test_dense_macs_equal_the_core_count():
    torch.manual_seed(0)
    model = dy.models.create("resnet-20", num_classes=10, expansion=0.5, input_shape=SHAPE)
    nu = nonuniform.sample(model, [0.3, 0.7], multiple=4)
    for k in (1, 2):
        assert allocate.dense_macs(nu.net, nu.widths(k)) == nu.net.subnet_macs(subnet=k) == \
            dy.cost.flop_counter_macs(nu.export(k), SHAPE)


def fake_table(net: TaggedNet, slow_groups: set[int]) -> LatencyTable:
    """A table whose layers cost cin x cout, x10 for layers writing ``slow_groups``: latency unlike MACs."""
    points, ms = [], []
    for i in range(net.num_hidden + 1):
        src = net.layer_source[i]
        ins = [net.input_shape[0]] if src < 0 else grid(net.widths()[src], 4)
        outs = [10] if i == net.num_hidden else grid(net.widths()[net.layer_group[i]], 4)
        slow = 10.0 if i < net.num_hidden and net.layer_group[i] in slow_groups else 1.0
        points.append([ins, outs])
        ms.append([[slow * a * b / 100 for b in outs] for a in ins])
    return LatencyTable(points, ms, 0.5, 1, 1, "fake", {})


def test_budgets_by_latency_follow_the_table_not_the_macs():
    torch.manual_seed(0)
    model = dy.models.create("resnet-20", num_classes=10, expansion=0.5, input_shape=SHAPE)
    view = TaggedNet(model, 1, SHAPE)
    slow = {view.layer_group[i] for i in range(view.num_hidden) if view.layers[i].weight.shape[0] == 32}  # stage 3
    table = fake_table(view, slow)
    by_macs = nonuniform.sample(model, [0.5, 1.0], multiple=4)
    by_latency = nonuniform.sample(model, [0.5, 1.0], by="latency", multiple=4, latency_table=table)
    full = table.predict(by_latency.net, by_latency.net.widths())
    assert table.predict(by_latency.net, by_latency.widths(1)) <= 0.5 * full
    assert by_latency.history["predicted_cost"][0] <= 0.5
    # the slow stage gives up more channels when latency, not MACs, is the budget
    stage3 = [g for g in range(view.num_groups) if g in slow]
    assert sum(by_latency.widths(1)[g] for g in stage3) < sum(by_macs.widths(1)[g] for g in stage3)


def test_widths_by_latency_are_rechosen_until_the_measured_latency_fits():
    """The table predicts without the cost it does not see (here, a fixed cost per channel of
    every layer, like the activations' post-ops); timing the chosen subnets and tightening the
    budgets of those over brings every measured latency within its budget."""
    torch.manual_seed(0)
    model = dy.models.create("resnet-20", num_classes=10, expansion=0.5, input_shape=SHAPE)
    view = TaggedNet(model, 1, SHAPE)
    table = fake_table(view, set())
    budgets = [0.3, 0.6, 1.0]

    def device(net: TaggedNet) -> list[float]:  # independent of the table: layers' own channel sums
        def true_ms(counts):
            return table.predict(net, counts) + 0.05 * sum(counts[g] for g in net.layer_group)
        full = true_ms(net.widths())
        return [true_ms([sum(c[:k]) for c in net.counts()]) / full for k in range(1, net.num_subnets + 1)]

    trusted = nonuniform.sample(model, budgets, by="latency", multiple=4, latency_table=table)
    assert "latency_checks" not in trusted.history  # another device's table alone: nothing measured
    assert device(trusted.net)[0] > budgets[0]       # the prediction alone runs over

    checked = nonuniform.sample(model, budgets, by="latency", multiple=4, latency_table=table, measure=device)
    trail = checked.history["latency_checks"]
    assert len(trail) >= 2 and trail[0]["measured"][0] > budgets[0]
    measured = device(checked.net)
    assert all(m <= b for m, b in zip(measured, budgets)), measured
    assert checked.history["measured_cost"] == pytest.approx(measured)
    for small, large in zip(range(1, 3), range(2, 4)):  # still nested, strictly growing
        assert all(a <= b for a, b in zip(checked.widths(small), checked.widths(large)))
        assert checked.widths(small) != checked.widths(large)


def test_within_measured_stops_when_no_allocation_meets_the_tightened_target():
    calls = []

    def allocate_at(targets):
        calls.append(list(targets))
        if targets[0] < 0.2:
            raise ValueError("below the smallest subnet")
        return [[round(10 * t)] for t in targets]

    def predict(c):
        return c[0] / 10

    def measure(counts):  # this device runs 1.5x slower than predicted
        return [1.5 * predict(counts[0]), 1.0]

    counts, trail = allocate.within_measured(allocate_at, [0.25, 1.0], predict, measure, rounds=5)
    assert calls[1][0] == pytest.approx(0.2 * 0.25 / 0.3)  # predicted x budget / measured
    assert counts == [[2], [10]]  # the last allocation that succeeded...
    assert trail[-1]["measured"][0] > 0.25 and "stopped" in trail[-1]  # ...reported as still over, not hidden


def test_the_measured_table_is_cached_and_predicts_monotonically(tmp_path):
    torch.manual_seed(0)
    net = TaggedNet(dy.models.create("lenet-5", num_classes=10, input_shape=SHAPE), 1, SHAPE)
    table = build_table(net, batch=4, multiple=4, repeats=3, cache_dir=tmp_path)
    files = list(tmp_path.glob("latency-table-*.json"))
    assert len(files) == 1
    again = build_table(net, batch=4, multiple=4, repeats=3, cache_dir=tmp_path)
    assert again.ms == table.ms  # read back, not measured again (a new measurement would differ)
    assert all(v > 0 for layer in table.ms for row in layer for v in row)


def test_cli_train_eval_bench_and_a_bad_out(tmp_path, capsys):
    from dyninfer.cli import main

    out = tmp_path / "nu"
    assert main(["nonuniform", "train", "--model", "lenet-5", "--data", "digits", "--steps", "6", "--batch-size", "32",
                 "--budgets", "0.4,1.0", "--multiple", "2", "--out", str(out), "--quiet"]) == 0
    assert (out / "widths.png").stat().st_size > 1000 and (out / "nonuniform.safetensors").exists()
    trained = capsys.readouterr().out
    assert main(["nonuniform", "eval", str(out)]) == 0
    assert capsys.readouterr().out.strip() == trained.split("wrote")[0].strip()  # the reloaded net, same table
    assert main(["nonuniform", "bench", str(out), "--batches", "2", "--repeats", "2"]) == 0
    assert "latency / full" in capsys.readouterr().out
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["nonuniform", "train", "--out", str(blocker / "sub"), "--steps", "2"]) == 2
    assert "cannot be created" in capsys.readouterr().err
