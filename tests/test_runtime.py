"""Runtime: compacted form, incremental sessions, exports, latency model, controller, simulate, bench."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import random_tags
from dyninfer import cost, export, models
from dyninfer.methods.stepping import SteppingNet
from dyninfer.nn.tagged import TaggedSequential
from dyninfer.runtime import compact, latency, predict
from dyninfer.runtime import simulate as sim
from dyninfer.cli.runtime import add_commands

SHAPE = (1, 8, 8)
N = 3


def tagged_lenet(seed: int = 0, name: str = "lenet-5") -> TaggedSequential:
    """Zoo model on 1x8x8 with random tags and warmed BatchNorm (lenet-3c1l slimmed to stay fast)."""
    torch.manual_seed(seed)
    model = models.create(name, num_classes=10, expansion=1.0 if name == "lenet-5" else 0.25, input_shape=SHAPE)
    net = TaggedSequential(model, N, SHAPE)
    random_tags(net, seed)
    net.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics to fold
        for k in range(1, N + 1):
            net(torch.randn(16, *SHAPE), subnet=k)
    net.eval()
    return net


@pytest.fixture(scope="module")
def tagged():
    return tagged_lenet()


BUILT: dict[str, TaggedSequential] = {}
OPTIONS = [dict(channels_last=False, cache="cat"), dict(channels_last=True, cache="cat"),
           dict(channels_last=True, cache="buffer"), dict(channels_last=False, cache="buffer")]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{'cl' if o['channels_last'] else 'nchw'}-{o['cache']}")
@pytest.mark.parametrize("name", ["lenet-5", "lenet-3c1l"])
def test_compacted_and_steps_equal_training_form(name, options):
    if name not in BUILT:
        BUILT[name] = tagged_lenet(1, name)
    net = BUILT[name]
    cnet = compact(net, **options)
    for batch in (1, 7):
        x = torch.randn(batch, *SHAPE)
        run = cnet.start(x)
        for k in range(1, N + 1):
            expected = net(x, subnet=k)
            torch.testing.assert_close(cnet(x, subnet=k), expected, atol=1e-5, rtol=1e-5)
            assert run.subnet == k
            torch.testing.assert_close(run.logits, expected, atol=1e-5, rtol=1e-5)
            if run.can_step():
                run.step()
        assert not run.can_step()


@pytest.mark.parametrize("options", OPTIONS[:3], ids=["nchw-cat", "cl-cat", "cl-buffer"])
def test_steps_with_empty_blocks(options):
    """A layer with no neuron of some tag (and a last step adding no feature) still steps exactly."""
    net = tagged_lenet(3)
    with torch.no_grad():
        first = net.tags(0)
        first[first == 2] = 3                 # conv 1 has no neuron of subnet 2
        last = net.tags(net.num_hidden - 1)
        last[last == 3] = 2                   # no feature is new in subnet 3
    cnet = compact(net, **options)
    x = torch.randn(3, *SHAPE)
    run = cnet.start(x)
    for k in range(1, N + 1):
        torch.testing.assert_close(run.logits, net(x, subnet=k), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cnet(x, subnet=k), net(x, subnet=k), atol=1e-5, rtol=1e-5)
        if run.can_step():
            run.step()
    torch.testing.assert_close(export.incremental(cnet).steps(x, N)[-1], run.logits, atol=1e-6, rtol=1e-6)


def test_compaction_refuses_non_incremental_networks():
    model = models.create("lenet-5", num_classes=10, expansion=1.0, input_shape=SHAPE)
    try:
        net = TaggedSequential(model, N, SHAPE, rule="full")
    except TypeError:
        pytest.skip("this TaggedSequential has no connectivity rules other than causal")
    with pytest.raises(ValueError, match="causal rule with shared BatchNorm"):
        compact(net)


def test_session_started_at_a_later_subnet_and_bad_inputs(tagged):
    cnet = compact(tagged)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(cnet.start(x, subnet=3).logits, tagged(x, subnet=3), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"subnet must be an int in 1..3"):
        cnet.start(x, subnet=4)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 1, 8, 8\)"):
        cnet(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="cache must be one of"):
        compact(tagged, cache="list")


def test_step_down_returns_earlier_logits_exactly(tagged):
    run = compact(tagged).start(torch.randn(4, *SHAPE))
    first = run.logits.clone()
    second = run.step().clone()
    third = run.step().clone()
    assert torch.equal(run.step_down(), second)
    assert torch.equal(run.step_down(), first)
    assert torch.equal(run.step(), second) and torch.equal(run.step(), third)
    assert run.reached == 3
    with pytest.raises(RuntimeError, match="largest"):
        run.step()


def test_steps_execute_their_blocks_and_report_their_live_weights():
    """Counted independently: FlopCounterMode on each step equals the step's dense blocks, and the
    reported MACs equal the non-zero weights of the exported subnet times its output positions
    (pruned weights are zeros in the blocks: executed, not reported)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = tagged_lenet(seed=4)
    with torch.no_grad():
        net.layers[1].weight[:, :, :2] = 0.0  # some pruned weights inside the step blocks
    net.prune(1e-5)
    cnet = compact(net)
    x = torch.randn(1, *SHAPE)

    def counted(fn):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            result = fn()
        return result, counter.get_total_flops() // 2

    run, first = counted(lambda: cnet.start(x))
    executed = [first] + [counted(run.step)[1] for _ in range(N - 1)]
    assert executed == cnet.executed_step_macs()
    for k in range(1, N + 1):
        dense = export.subnet(net, k)
        live, shapes = 0, {}
        hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, o.shape)) for m in dense.modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        dense(x)
        for h in hooks:
            h.remove()
        for m, shape in shapes.items():
            positions = shape[2] * shape[3] if len(shape) == 4 else 1
            live += int((m.weight != 0).sum()) * positions
        assert cnet.macs()[k - 1] == live, k
    assert sum(executed) > cnet.macs()[-1]  # the pruned zeros ride along
    assert cnet.block_density()[1] < 1 and all(0 < d <= 1 for d in cnet.block_density())


def test_options_share_weights_and_change_the_fingerprint(tagged):
    cnet = compact(tagged, channels_last=True)
    other = cnet.with_options(channels_last=False)
    assert other.layers is cnet.layers and not other.channels_last
    assert other.fingerprint() != cnet.fingerprint()
    assert compact(tagged, channels_last=True).fingerprint() == cnet.fingerprint()


# ---------------------------------------------------------------------------- export
def test_exports_equal_library_and_load_without_dyninfer(tagged, tmp_path):
    cnet = compact(tagged)
    x = torch.randn(5, *SHAPE)
    scratch = [cnet(x, subnet=k) for k in range(1, N + 1)]
    for k in range(1, N + 1):
        torch.testing.assert_close(export.subnet(tagged, k)(x), scratch[k - 1], atol=1e-5, rtol=1e-5)
    export.torchscript(tagged, 2, tmp_path / "sub2.pt", channels_last=True)
    scripted = export.incremental(cnet, tmp_path / "incr.pt")
    run = cnet.start(x)
    stepped = [run.logits] + [run.step() for _ in range(N - 1)]
    for k in range(1, N + 1):
        torch.testing.assert_close(scripted(x, k), scratch[k - 1], atol=1e-6, rtol=1e-6)
    for a, b in zip(scripted.steps(x, N), stepped):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.save({"x": x, "scratch": scratch, "stepped": stepped}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        f"d = torch.load(r'{tmp_path / 'io.pt'}')\n"
        f"m = torch.jit.load(r'{tmp_path / 'incr.pt'}')\n"
        f"s = torch.jit.load(r'{tmp_path / 'sub2.pt'}')\n"
        "assert 'dyninfer' not in sys.modules\n"
        "x = d['x']\n"
        f"for k in range(1, {N + 1}):\n"
        "    assert torch.allclose(m(x, k), d['scratch'][k - 1], atol=1e-6), k\n"
        "assert torch.allclose(s(x), d['scratch'][1], atol=1e-5)\n"
        "logits, state = m.start(x)\n"
        "out = [logits]\n"
        f"for k in range(1, {N}):\n"
        "    logits, state = m.step(state, logits, k)\n"
        "    out.append(logits)\n"
        "for a, b in zip(out, d['stepped']):\n"
        "    assert torch.allclose(a, b, atol=1e-6)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def _onnx_modules():
    """The ONNX packages; ``make test`` installs them and sets DYNINFER_REQUIRE_ONNX=1, so CI runs
    this test instead of skipping it (elsewhere it skips without the ``[onnx]`` extra)."""
    if os.environ.get("DYNINFER_REQUIRE_ONNX") == "1":
        import onnx
        import onnxruntime
        return onnx, onnxruntime
    return pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")


def test_onnx_export_is_one_quiet_file_that_runs(tagged, tmp_path, capfd):
    onnx, ort = _onnx_modules()
    path = export.onnx(tagged, 2, tmp_path / "sub2.onnx")
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)  # no exporter chatter
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub2.onnx"]  # self-contained: no .data sidecar
    onnx.checker.check_model(onnx.load(str(path)))
    x = torch.randn(3, *SHAPE)
    session = ort.InferenceSession(str(path))
    (y,) = session.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), tagged(x, subnet=2), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- controller
class FakeModel:
    def __init__(self, step_ms):
        self.step_ms = list(step_ms)
        self.asked = []

    def next_step_ms(self, subnet):
        self.asked.append(subnet)
        return self.step_ms[subnet]


class FakeClock:
    """Seconds that advance by a fixed amount on every reading."""

    def __init__(self, tick_ms):
        self.t, self.tick = 0.0, tick_ms / 1e3

    def __call__(self):
        now = self.t
        self.t += self.tick
        return now


def test_controller_never_starts_a_step_predicted_not_to_fit(tagged):
    cnet = compact(tagged)
    x = torch.randn(2, *SHAPE)
    # step 2 -> 3 is predicted to take far longer than the deadline: stop at subnet 2
    out = predict(cnet, x, deadline_ms=1e3, model=FakeModel([1.0, 1.0, 1e6]))
    assert out.subnet == 2 and out.steps == 1 and out.stopped_by == "deadline"
    torch.testing.assert_close(out.logits, tagged(x, subnet=2), atol=1e-5, rtol=1e-5)
    # deterministic clock: 3 ms per reading, every step predicted 5 ms, deadline 20 ms
    out = predict(cnet, x, deadline_ms=20.0, model=FakeModel([5.0, 5.0, 5.0]), clock=FakeClock(3.0))
    assert out.subnet == 3 and out.stopped_by == "largest"
    out = predict(cnet, x, deadline_ms=14.0, model=FakeModel([5.0, 5.0, 5.0]), clock=FakeClock(3.0))
    assert out.subnet == 2 and out.stopped_by == "deadline"
    for record in out.records[1:]:
        assert record.predicted_ms <= record.remaining_ms
    assert out.time_ms == pytest.approx(18.0)  # six clock readings of 3 ms


def test_controller_scales_predictions_by_the_slowdown_it_observes(tagged):
    cnet = compact(tagged)
    x = torch.randn(1, *SHAPE)
    # calibrated 1 ms per step, but every clock reading advances 3 ms: subnet 1 took 3x longer
    # than calibrated, so the next step is predicted at 3 ms, not 1 ms
    out = predict(cnet, x, deadline_ms=8.0, model=FakeModel([1.0, 1.0, 1.0]), clock=FakeClock(3.0))
    assert out.subnet == 1 and out.stopped_by == "deadline"  # 2 ms left < 3 ms predicted
    out = predict(cnet, x, deadline_ms=9.5, model=FakeModel([1.0, 1.0, 1.0]), clock=FakeClock(3.0))
    assert out.subnet >= 2 and out.records[1].predicted_ms == pytest.approx(3.0)


class FakeTailModel(FakeModel):
    def __init__(self, step_ms, tail_ms):
        super().__init__(step_ms)
        self.tail_ms = list(tail_ms)

    def next_step_tail_ms(self, subnet):
        return self.tail_ms[subnet]


def test_controller_with_tail_predicts_no_less_than_the_95th_percentile(tagged):
    cnet = compact(tagged)
    x = torch.randn(1, *SHAPE)
    model = FakeTailModel([1.0, 1.0, 1.0], [1.0, 4.0, 4.0])  # median 1 ms, tail 4 ms per step
    clock = lambda: FakeClock(1.0)  # noqa: E731
    # 1 ms per reading: after subnet 1, 7 - 2 = 5 ms are left; the median fits twice, the tail once
    assert predict(cnet, x, deadline_ms=7.0, model=model, clock=clock(), tail=False).subnet == 3
    out = predict(cnet, x, deadline_ms=7.0, model=model, clock=clock(), tail=True)
    assert out.subnet == 2 and out.records[1].predicted_ms == pytest.approx(4.0)
    # a model without tails (e.g. calibrated by an older dyninfer) falls back to the median
    assert predict(cnet, x, deadline_ms=7.0, model=FakeModel([1.0, 1.0, 1.0]), clock=clock(), tail=True).subnet == 3


def test_calibrated_tails_are_at_least_the_medians(tagged):
    from dyninfer.runtime.latency import LatencyModel, calibrate, clear_cache

    clear_cache()
    model = calibrate(compact(tagged), batch=1, repeats=5, warmup=1)
    assert len(model.step_tail_ms) == N
    assert all(t >= m for t, m in zip(model.step_tail_ms, model.step_ms))
    again = LatencyModel.from_dict({k: v for k, v in model.to_dict().items() if k != "step_tail_ms"})
    assert again.next_step_tail_ms(1) == again.next_step_ms(1)  # an old cache entry: no tails


def test_controller_with_random_predictions_only_takes_fitting_steps(tagged):
    cnet = compact(tagged)
    x = torch.randn(1, *SHAPE)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        steps = (torch.rand(N, generator=g) * 10).tolist()
        model = FakeModel(steps)
        out = predict(cnet, x, deadline_ms=12.0, model=model, clock=FakeClock(1.0))
        for record in out.records[1:]:
            assert record.predicted_ms <= record.remaining_ms
        if out.subnet < N:  # the refused step was asked about and did not fit
            assert model.asked[-1] == out.subnet


def test_budget_macs_uses_exact_subnet_macs(tagged):
    net = SteppingNet(tagged, [0.2, 0.5, 1.0], reference_macs=cost.macs(tagged, SHAPE, subnet=N))
    macs = net.macs()
    x = torch.randn(3, *SHAPE)
    assert predict(net, x, budget_macs=macs[1]).subnet == 2
    assert predict(net, x, budget_macs=macs[1]).macs == macs[1]
    out = predict(net, x, budget_macs=macs[1] - 1)
    assert out.subnet == 1 and out.stopped_by == "budget"
    assert predict(net, x, budget_macs=10 * macs[-1]).subnet == N
    assert predict(net, x, budget_macs=1).subnet == 1  # subnet 1 always answers
    with pytest.raises(ValueError, match="budget_macs must be > 0"):
        predict(net, x, budget_macs=0)


# ---------------------------------------------------------------------------- latency model
def test_latency_model_is_cached_in_memory_and_on_disk(tagged, tmp_path, monkeypatch):
    cnet = compact(tagged)
    latency.clear_cache()
    model = latency.calibrate(cnet, batch=2, threads=1, repeats=2, warmup=0, cache_dir=tmp_path)
    assert len(model.step_ms) == N and len(model.scratch_ms) == N
    assert all(t > 0 for t in model.step_ms + model.scratch_ms)
    assert model.path_ms(N) == pytest.approx(sum(model.step_ms))
    assert model.next_step_ms(0) == model.step_ms[0]
    assert latency.calibrate(cnet, batch=2, threads=1) is model  # memory
    files = list(tmp_path.glob("latency-*-b2-t1.json"))
    assert len(files) == 1
    latency.clear_cache()

    def no_timing(*args, **kwargs):
        raise AssertionError("should have come from the disk cache")

    monkeypatch.setattr(latency, "interleaved", no_timing)
    again = latency.calibrate(cnet, batch=2, threads=1, cache_dir=tmp_path)
    assert again.step_ms == model.step_ms and again is not model
    with pytest.raises(AssertionError):  # another batch size is another key
        latency.calibrate(cnet, batch=3, threads=1, cache_dir=tmp_path)
    latency.clear_cache()


def test_predict_with_a_deadline_calibrates_a_model(tagged):
    latency.clear_cache()
    cnet = compact(tagged)
    out = predict(cnet, torch.randn(1, *SHAPE), deadline_ms=1e4)
    assert out.subnet == N and out.time_ms > 0
    latency.clear_cache()


# ---------------------------------------------------------------------------- simulate
def test_trace_roundtrip_and_errors(tmp_path):
    path = tmp_path / "t.csv"
    trace = sim.make_trace(path, high=1000.0, duration_ms=50.0, segment_ms=5.0, seed=1)
    loaded = sim.load_trace(path)
    assert loaded.times == trace.times and loaded.rates == trace.rates
    assert all(100.0 <= r <= 1000.0 for r in loaded.rates)
    flat = sim.Trace([0.0, 10.0], [100.0, 50.0])
    assert flat.finish(0.0, 1500.0) == pytest.approx(20.0)
    assert flat.work(5.0, 12.0) == pytest.approx(600.0)
    assert math.isinf(sim.Trace([0.0], [0.0]).finish(0.0, 1.0))
    (tmp_path / "bad.csv").write_text("time,rate\n0,1\n")
    with pytest.raises(ValueError, match="time_ms,macs_per_ms"):
        sim.load_trace(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="strictly increasing"):
        sim.Trace([0.0, 5.0, 5.0], [1.0, 1.0, 1.0])
    with pytest.raises(FileNotFoundError):
        sim.load_trace(tmp_path / "missing.csv")


def test_simulate_incremental_wastes_nothing_and_restart_wastes_when_compute_drops():
    macs = [100, 300, 600]
    correct = torch.tensor([[True, True, True], [False, True, True], [False, False, True]])
    steady = sim.simulate(sim.Trace([0.0], [600.0]), macs, correct, [1.0], inputs=3)["deadlines"][0]
    for policy in ("incremental", "restart"):
        assert steady[policy]["mean_subnet"] == 3 and steady[policy]["accuracy"] == 1.0
        assert steady[policy]["wasted_macs_per_input"] == 0
    # compute drops from 600 to 100 MACs/ms half-way through each 1 ms window
    drop = sim.Trace([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], [600.0, 100.0, 600.0, 100.0, 600.0, 100.0])
    r = sim.simulate(drop, macs, correct, [1.0], inputs=3)["deadlines"][0]
    inc, rst = r["incremental"], r["restart"]
    assert inc["wasted_macs_per_input"] == 0 and inc["answered"] == 1.0
    assert inc["subnet_histogram"] == [0, 0, 3, 0]  # subnet 2 banked before the drop
    assert rst["wasted_macs_per_input"] > 0 and rst["answered"] < 1.0
    assert 0 <= rst["accuracy"] <= inc["accuracy"] <= 1
    assert inc["accuracy"] == pytest.approx(2 / 3)


def make_run(tmp_path):
    """A stepping run directory (random tags, digits-shaped) as `dyninfer construct` writes it."""
    tagged = tagged_lenet(2)
    net = SteppingNet(tagged, [0.2, 0.5, 1.0], reference_macs=cost.macs(tagged, SHAPE, subnet=N))
    run = tmp_path / "run"
    net.save(run / "stepping")
    (run / "run.json").write_text(json.dumps({"kind": "stepping", "model": "lenet-5", "data": "digits",
                                              "data_root": None}))
    return run


def cli(argv):
    parser = argparse.ArgumentParser(prog="dyninfer")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_simulate_command_writes_report_and_plot(tmp_path, capsys):
    run = make_run(tmp_path)
    trace = tmp_path / "trace.csv"
    code = cli(["simulate", str(run), "--trace", str(trace), "--make-trace", "--trace-ms", "40",
                "--inputs", "40", "--deadlines", "0.5,2", "--out", str(tmp_path / "out")])
    assert code == 0 and trace.exists()
    data = json.loads((tmp_path / "out" / "simulate.json").read_text())
    assert [r["deadline_ms"] for r in data["deadlines"]] == [0.5, 2.0]
    for row in data["deadlines"]:
        for policy in ("incremental", "restart"):
            assert 0 <= row[policy]["accuracy"] <= 1 and row[policy]["wasted_macs_per_input"] >= 0
    assert "digits test set" in data["labels"]
    assert (tmp_path / "out" / "simulate.png").stat().st_size > 1000
    assert "dyninfer simulate" in capsys.readouterr().out


def test_commands_reject_bad_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a dyninfer run directory"):
        cli(["bench", str(tmp_path)])
    (tmp_path / "run.json").write_text(json.dumps({"kind": "train"}))
    with pytest.raises(ValueError, match="stepping run"):
        cli(["simulate", str(tmp_path), "--trace", "x.csv"])


# ---------------------------------------------------------------------------- bench
def test_bench_command_writes_the_json_keys(tmp_path, capsys):
    run = make_run(tmp_path)
    code = cli(["bench", str(run), "--batches", "1,3", "--threads", "1", "--repeats", "2", "--warmup", "0",
                "--quiet"])
    assert code == 0
    data = json.loads((run / "bench.json").read_text())
    assert data["command"].startswith(f"dyninfer bench {run}")
    assert {"cpu", "threads", "torch"} <= set(data["machine"])
    assert data["net"]["macs"] == SteppingNet.load(run / "stepping").macs()
    assert [(s["batch"], s["threads"]) for s in data["settings"]] == [(1, 1), (3, 1)]
    for s in data["settings"]:
        assert len(s["scratch"]) == N and len(s["path"]["steps"]) == N
        for row in s["scratch"]:
            for kind in ("compact", "plain"):
                assert set(row[kind]) == {"nchw", "channels_last", "best"}
                assert {"median_ms", "min_ms", "max_ms", "runs"} <= set(row[kind]["best"])
                assert row[kind]["best"]["runs"] == 2
        assert {"subnet_over_largest", "mac_ratio", "compact_over_plain", "path_over_fastest_largest",
                "steps_to_k_over_scratch_k"} <= set(s["ratios"])
        assert s["ratios"]["mac_ratio"][-1] == 1.0 and s["ratios"]["subnet_over_largest"][-1] == 1.0
    assert "| subnet |" in (run / "bench.md").read_text()
    assert "machine:" in capsys.readouterr().out


def test_bench_can_save_the_faster_from_scratch_execution_into_the_run(tmp_path, capsys):
    run = make_run(tmp_path)
    before = SteppingNet.load(run / "stepping")
    assert cli(["bench", str(run), "--batches", "2", "--threads", "1", "--repeats", "2", "--warmup", "0", "--quiet",
                "--choose-scratch"]) == 0
    data = json.loads((run / "bench.json").read_text())
    rows = data["scratch_choice"]["subnets"]
    setting = data["settings"][0]  # from the raw timings: subnet k's chain is the path's first k steps
    steps = [s["median_ms"] for s in setting["path"]["steps"]]
    for k, row in enumerate(rows, start=1):
        assert row["rectangle_ms"] == setting["scratch"][k - 1]["compact"]["best"]["median_ms"]
        assert row["chain_ms"] == pytest.approx(sum(steps[:k]))
        assert row["chosen"] == ("chain" if k > 1 and row["chain_ms"] < row["rectangle_ms"] else "rectangle")
    after = SteppingNet.load(run / "stepping")
    assert after.scratch_execution == [r["chosen"] for r in rows]
    assert after.macs() == before.macs()
    assert after.macs(path="scratch") == data["scratch_choice"]["scratch_macs"]
    x = torch.randn(3, *after.input_shape)
    torch.testing.assert_close(after.eval()(x, subnet=N), before.eval()(x, subnet=N))  # same weights
    assert "--choose-scratch" in data["command"] and "from scratch as" in capsys.readouterr().out


def test_a_non_finite_input_row_spoils_only_its_own_logits():
    """Documented pass-through (dyninfer.checks.check_input): NaN/inf rows are not rejected, and
    in eval mode they touch no other row, in the masked form, the compacted session and export."""
    from dyninfer import export
    from dyninfer.nn.tagged import TaggedSequential
    from helpers import random_tags

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(6 * 8 * 8, 10))
    net = TaggedSequential(model, 2, (1, 8, 8))
    random_tags(net, 3)
    net.eval()
    x = torch.randn(4, 1, 8, 8)
    bad = x.clone()
    bad[1, 0, 2, 2], bad[2, 0, 0, 0] = float("nan"), float("inf")
    cnet = compact(net)
    for forward in (lambda v: net(v, subnet=2), lambda v: cnet.start(v).step(), lambda v: export.subnet(net, 2)(v)):
        clean, spoiled = forward(x), forward(bad)
        assert not torch.isfinite(spoiled[1]).all() and not torch.isfinite(spoiled[2]).all()
        torch.testing.assert_close(spoiled[[0, 3]], clean[[0, 3]])
