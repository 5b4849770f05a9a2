"""Doubly nested network: channel-causal groups, depth exits with a shared FC stage, the grid from
one pass, exports, the MAC sanity check of the paper, and selection under limits."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import dyninfer as dy
from dyninfer.methods import doubly_nested as dn

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def net():
    grid = dn.build(groups=4, depth=20, input_shape=SHAPE, seed=0)
    grid.net.train()
    with torch.no_grad():
        grid.forward_grid(torch.randn(16, *SHAPE))  # BatchNorm statistics that are not the identity
    grid.net.eval()
    return grid


def test_the_grid_has_an_exit_after_the_stem_and_every_block(net):
    assert (net.num_depths, net.num_widths) == (1 + 9, 4)  # ResNet-20: stem + 8 exits + the classifier
    macs = net.grid_macs()
    assert all(a < b for row in macs for a, b in zip(row, row[1:]))  # wider costs more at every depth
    assert all(macs[d][-1] < macs[d + 1][-1] for d in range(net.num_depths - 1))  # so does deeper


def test_group_g_ignores_larger_groups(net):
    x = torch.randn(3, *SHAPE)
    before = [[z.clone() for z in row] for row in net.forward_grid(x)]
    tagged = net.net
    with torch.no_grad():
        for i, layer in enumerate(tagged.layers):
            layer.weight[tagged.layer_tags(i) > 2] += 1.0  # perturb every channel of groups 3 and 4
        saved = [p.clone() for p in tagged.parameters()]
    after = net.forward_grid(x)
    for d in range(net.num_depths):
        torch.testing.assert_close(after[d][1], before[d][1])  # width 2 reads groups 1..2 only
        assert (after[d][3] - before[d][3]).abs().max() > 1e-4
    with torch.no_grad():
        for p, q in zip(tagged.parameters(), saved):
            p.copy_(q)
        for i, layer in enumerate(tagged.layers):
            layer.weight[tagged.layer_tags(i) > 2] -= 1.0


def test_sliced_cell_equals_the_grid_and_its_dense_module(net):
    x = torch.randn(2, *SHAPE)
    grid = net.forward_grid(x)
    for d, c in [(1, 1), (4, 2), (net.num_depths, 4), (7, 3)]:
        sliced = net(x, depth=d, width=c)
        torch.testing.assert_close(sliced, grid[d - 1][c - 1], atol=1e-5, rtol=1e-4)
        dense = net.dense(d, c)
        torch.testing.assert_close(dense(x), sliced, atol=1e-5, rtol=1e-4)
        assert dy.cost.flop_counter_macs(dense, SHAPE) == net.macs(d, c)  # reported = executed
        assert net.causal_macs(d, c) <= net.macs(d, c)


def test_widths_at_one_depth_share_the_fc_weights(net):
    """(l, c) and (l, c+1) differ by exactly group c+1's FC share: the first c FCs are the same."""
    x = torch.randn(2, *SHAPE)
    d = 3
    tagged = net.net
    head = tagged.exits[d - 1]
    with torch.no_grad():
        head.weight[:, tagged._exit_tags(d) == 2] += 1.0  # only group 2's FC
    try:
        grid = net.forward_grid(x)
        fresh = net(x, depth=d, width=1)
        torch.testing.assert_close(grid[d - 1][0], fresh)
    finally:
        with torch.no_grad():
            head.weight[:, tagged._exit_tags(d) == 2] -= 1.0


def test_resnet32_mac_sanity_check_of_the_paper():
    """A dense ResNet-32 is about 69 M MACs and its largest depth-only exit under 24 M MACs is D5."""
    grid = dn.build(groups=4, depth=32, seed=0)
    full = [grid.macs(d, 4) for d in range(1, grid.num_depths + 1)]
    assert 68e6 < full[-1] < 70e6
    assert max(d for d, m in enumerate(full, start=1) if m < 24e6) == 5


def test_select_returns_the_best_feasible_cell():
    table = [{"depth": 1, "width": 1, "macs": 10, "params": 5, "val_accuracy": 0.5},
             {"depth": 2, "width": 1, "macs": 30, "params": 9, "val_accuracy": 0.7},
             {"depth": 1, "width": 2, "macs": 25, "params": 20, "val_accuracy": 0.8},
             {"depth": 2, "width": 2, "macs": 60, "params": 30, "val_accuracy": 0.9}]
    grid = dn.build(groups=2, depth=20, input_shape=SHAPE, seed=0)
    assert grid.select(max_macs=30, table=table) == (1, 2)
    assert grid.select(max_macs="30", max_params=10, table=table) == (2, 1)
    assert grid.select(table=table) == (2, 2)
    for limit in (0, 5):
        with pytest.raises(ValueError, match="no \\(depth, width\\) fits"):
            grid.select(max_macs=limit, table=table)
    with pytest.raises(ValueError, match="known unit"):
        grid.select(max_macs="24 parsecs", table=table)
    with pytest.raises(ValueError, match=">= 0"):
        grid.select(max_memory=-1, table=table)
    with pytest.raises(ValueError, match="validate"):
        grid.select(max_macs=10, table=[{k: v for k, v in table[0].items() if k != "val_accuracy"}])
    assert dn.parse_limit("24M", "x") == 24e6 and dn.parse_limit("1MB", "x") == 1024 ** 2


def test_build_rejects_widths_the_groups_do_not_divide():
    with pytest.raises(ValueError, match="multiple of groups=3"):
        dn.build(groups=3, depth=20, input_shape=SHAPE)


def test_joint_training_lowers_the_grid_loss_and_the_frontier_follows_validation():
    data = dy.data.synthetic(128, SHAPE, seed=0)
    grid = dn.build(groups=2, depth=20, input_shape=SHAPE, seed=0)
    x, y = next(data.batches(128))
    grid.net.eval()

    def mean_loss():
        with torch.no_grad():
            return sum(torch.nn.functional.cross_entropy(z, y) for row in grid.forward_grid(x) for z in row).item()

    before = mean_loss()
    dn.train(grid, data, dn.DoublyNestedConfig(steps=15, batch_size=32, lr=0.05))
    assert mean_loss() < before
    assert grid.frontier() == [(grid.num_depths, 1), (grid.num_depths, 2)]  # before validation
    grid.validate(data)
    frontier = grid.frontier()
    macs = [grid.macs(*cell) for cell in frontier]
    accs = [grid.val_accuracy[d - 1][c - 1] for d, c in frontier]
    assert macs == sorted(macs) and all(a < b for a, b in zip(accs, accs[1:]))
    assert grid.num_subnets == len(frontier) and len(grid.mac_fractions()) == len(frontier)
    torch.testing.assert_close(grid(x, subnet=1), grid(x, depth=frontier[0][0], width=frontier[0][1]))


@settings(max_examples=10, deadline=None)
@given(moves=st.lists(st.sampled_from(["deeper", "wider"]), max_size=8), seed=st.integers(0, 1000))
def test_deeper_and_wider_equal_computing_from_scratch(net, moves, seed):
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(seed))
    run = net.start(x, depth=1, width=1)
    for move in moves:
        at_edge = (run.depth == net.num_depths) if move == "deeper" else (run.width == net.num_widths)
        if at_edge:
            with pytest.raises(RuntimeError, match="already"):
                getattr(run, move)()
            continue
        getattr(run, move)()
        torch.testing.assert_close(run.logits, net(x, depth=run.depth, width=run.width), atol=1e-5, rtol=1e-4)


def test_a_session_executes_only_the_new_cells(net):
    """Counted by FlopCounterMode: wider costs the causal increment; deeper costs it plus the new
    exit's head over the groups already computed (the old depth's head is not reused)."""
    x = torch.randn(1, *SHAPE)
    state = {}

    def executed(fn):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        return counter.get_total_flops() // 2

    assert executed(lambda: state.setdefault("run", net.start(x, depth=3, width=2))) == net.causal_macs(3, 2)
    assert executed(lambda: state["run"].wider()) == net.causal_macs(3, 3) - net.causal_macs(3, 2)
    old_head = int((net.net._exit_tags(3) <= 3).sum()) * 10  # depth 3's head over groups 1..3, 10 classes
    assert executed(lambda: state["run"].deeper()) == net.causal_macs(4, 3) - net.causal_macs(3, 3) + old_head


def test_anytime_stopping_reuses_the_session_and_costs_what_it_says(net):
    net.val_accuracy = [[0.1 * d + 0.01 * c for c in range(1, 5)] for d in range(1, net.num_depths + 1)]
    path = net.path()
    assert path[0] == (1, 1) and path[-1] == (net.num_depths, 4)
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        grid = net.forward_grid(x)
    confidences = [torch.softmax(grid[d - 1][c - 1], 1).max(1).values for d, c in path]
    # half the inputs stop at once, the others go on; halfway between two confidences, so that float
    # rounding between the grid and the session cannot flip an input sitting exactly on the threshold
    low, high = confidences[0].sort().values[2:4].tolist()
    threshold = (low + high) / 2
    pred, stop, macs = net.predict_anytime(x, threshold, path)
    assert len(set(stop.tolist())) > 1
    for i in range(6):
        d, c = path[int(stop[i])]
        assert int(pred[i]) == int(grid[d - 1][c - 1][i].argmax())
        first = next(s for s, conf in enumerate(confidences) if conf[i] >= threshold) if any(
            conf[i] >= threshold for conf in confidences) else len(path) - 1
        assert int(stop[i]) == first
    chunked = net.predict_anytime(x, threshold, path, batch_size=4)  # 4 + 2: same answers, same costs
    assert all(torch.equal(a, b) for a, b in zip(chunked, (pred, stop, macs)))
    one = x[:1]
    counter = FlopCounterMode(display=False)
    with counter:
        _, stop1, macs1 = net.predict_anytime(one, threshold, path)
    assert counter.get_total_flops() // 2 == int(macs1[0]) == net.path_costs(path)[int(stop1[0])]
    with pytest.raises(ValueError, match="one deeper\\(\\) or one wider\\(\\)"):
        net.predict_anytime(x, 0.5, [(1, 1), (2, 2)])


def test_calibration_meets_the_average_budget():
    data = dy.data.synthetic(96, SHAPE, seed=2)
    grid = dn.build(groups=2, depth=20, input_shape=SHAPE, seed=1)
    dn.train(grid, data, dn.DoublyNestedConfig(steps=10, batch_size=32, lr=0.05))
    grid.validate(data)
    path = grid.path()
    costs = grid.path_costs(path)
    budget = (costs[0] + costs[-1]) / 2
    threshold = grid.calibrate(data, budget, path)
    x = torch.cat([xb for xb, _ in data.batches(96)])
    assert float(grid.predict_anytime(x, threshold, path)[2].float().mean()) <= budget
    with pytest.raises(ValueError, match="below the path's first cell"):
        grid.calibrate(data, costs[0] - 1, path)


def test_save_and_load_round_trip(net, tmp_path):
    net.save(tmp_path / "dnn")
    again = dn.DoublyNestedNet.load(tmp_path / "dnn")
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(again(x, depth=4, width=3), net(x, depth=4, width=3))
    assert again.val_accuracy == net.val_accuracy


def test_cli_train_table_select(tmp_path, capsys):
    from dyninfer.cli import main

    out = tmp_path / "dnn"
    assert main(["dnn", "train", "--depth", "20", "--groups", "2", "--data", "digits", "--steps", "4",
                 "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    assert (out / "grid_val_accuracy.png").stat().st_size > 1000 and (out / "grid.csv").exists()
    assert isinstance(dy.load(out), dn.DoublyNestedNet)
    capsys.readouterr()
    assert main(["dnn", "select", str(out), "--max-macs", "0.2M"]) == 0
    chosen = capsys.readouterr().out
    depth, width = (int(v) for v in chosen.split(":")[0].replace("depth", "").replace("width", "").split(","))
    rows = json.loads((out / "grid.json").read_text())["rows"]
    feasible = [r for r in rows if r["macs"] <= 0.2e6]
    assert max(r["val_accuracy"] for r in feasible) == next(
        r["val_accuracy"] for r in rows if (r["depth"], r["width"]) == (depth, width))
    assert main(["dnn", "select", str(out), "--max-ms", "1"]) == 2  # no latency measured yet
    assert "--latency" in capsys.readouterr().err
    assert main(["dnn", "select", str(out), "--max-memory=-1MB"]) == 2
    assert ">= 0" in capsys.readouterr().err


def test_one_recorded_pass_tells_where_every_threshold_stops():
    """calibrate's shortcut against the real thing: for thresholds between recorded confidences,
    the stops and labels read from one full pass equal what real stopping sessions do."""
    data = dy.data.synthetic(64, SHAPE, seed=4)
    grid = dn.build(groups=2, depth=20, input_shape=SHAPE, seed=3)
    dn.train(grid, data, dn.DoublyNestedConfig(steps=8, batch_size=32, lr=0.05))
    grid.validate(data)
    grid.eval()
    path = grid.path()
    x = torch.cat([xb for xb, _ in data.batches(64)])
    conf, labels = grid.path_confidences(x, path, batch_size=24)
    values = conf.flatten().sort().values
    gaps = [(a + b) / 2 for a, b in zip(values[:-1].tolist(), values[1:].tolist()) if b - a > 1e-4]
    thresholds = [0.0, 1.0] + gaps[:: max(1, len(gaps) // 6)]
    stops_seen = set()
    for t in thresholds:
        pred, stop, macs = grid.predict_anytime(x, t, path)
        recorded = grid.stops(conf, t)
        assert torch.equal(recorded, stop), t
        assert torch.equal(labels[torch.arange(len(x)), recorded], pred), t
        assert torch.equal(torch.tensor(grid.path_costs(path))[recorded], macs), t
        stops_seen.update(stop.tolist())
    assert len(stops_seen) > 2  # the thresholds spread the stops over the path


def _area(net, path, acc):
    return sum((1 - acc[a[0] - 1][a[1] - 1]) * (net.causal_macs(*b) - net.causal_macs(*a)) for a, b in zip(path, path[1:]))


def _staircases(L, G):
    """Every monotone path from (1, 1) to (L, G), by brute force."""
    if (L, G) == (1, 1):
        return [[(1, 1)]]
    paths = []
    if L > 1:
        paths += [p + [(L, G)] for p in _staircases(L - 1, G)]
    if G > 1:
        paths += [p + [(L, G)] for p in _staircases(L, G - 1)]
    return paths


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_area_path_is_the_best_staircase_by_brute_force(net, seed):
    g = torch.Generator().manual_seed(seed)
    acc = torch.rand(net.num_depths, net.num_widths, generator=g).tolist()
    every = _staircases(net.num_depths, net.num_widths)
    assert len(every) == 220  # 10 depths x 4 widths
    area = net.path(acc, rule="area")
    assert area in every
    assert _area(net, area, acc) == pytest.approx(min(_area(net, p, acc) for p in every))
    greedy = net.path(acc)
    assert _area(net, area, acc) <= _area(net, greedy, acc)
    with pytest.raises(ValueError, match="greedy' or 'area"):
        net.path(acc, rule="best")


def test_area_path_goes_deep_and_narrow_where_that_pays(net):
    """Accuracy only from depth: widening first buys nothing, so the best staircase stays at W1."""
    acc = [[d / net.num_depths] * net.num_widths for d in range(1, net.num_depths + 1)]
    path = net.path(acc, rule="area")
    assert path[:net.num_depths] == [(d, 1) for d in range(1, net.num_depths + 1)]
