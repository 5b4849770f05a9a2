"""The comparison harness: equal training budgets (asserted from the methods' own logs and a
global optimizer hook), matched-MAC tables, files written, and the `compare` command."""

import argparse
import json

import pytest
import torch

from dyninfer import compare, data
from dyninfer.methods import stepping
from dyninfer.cli.compare import add_commands

SHAPE = (1, 8, 8)
STEPS, BATCH = 10, 32


@pytest.fixture(scope="module")
def split():
    return data.split(data.synthetic(320, SHAPE, seed=0), 0.25, seed=0)


@pytest.fixture(scope="module")
def record(split, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    return compare.run("lenet-5", split, methods=compare.METHODS, budgets=[0.3, 0.6, 0.9], steps=STEPS,
                       batch_size=BATCH, seed=0, out=out, latency_batch=4, latency_repeats=1)


def test_every_method_gets_the_same_steps_times_batch(record):
    assert set(record["methods"]) == set(compare.METHODS)
    for name, r in record["methods"].items():
        assert r["optimizer_steps"] == STEPS, name
        assert r["counted_optimizer_steps"] == STEPS, name
        assert r["samples"] == STEPS * BATCH, name
        assert sum(r["phases"].values()) == STEPS, (name, r["phases"])
    phases = record["methods"]["stepping"]["phases"]
    assert phases["construct"] >= 1 and phases["construct"] + phases.get("retrain", 0) == STEPS
    assert record["methods"]["individual"]["phases"] == {"subnet-1": 3, "subnet-2": 3, "subnet-3": 4}


def test_subnets_are_matched_to_the_budgets(record):
    for name, r in record["methods"].items():
        assert len(r["accuracy"]) == len(r["mac_fractions"]) == r["num_subnets"]
        assert all(0 <= a <= 1 for a in r["accuracy"])
        if name != "earlyexit":  # exits sit where the architecture puts them
            assert all(f <= b * 1.0001 for f, b in zip(r["mac_fractions"], [0.3, 0.6, 0.9])), (name, r["mac_fractions"])
        for b in record["budgets"]:
            cell = record["matched"][name][str(b)]
            if cell is not None:
                assert cell["mac_fraction"] <= b * (1 + compare.MATCH_TOLERANCE)
    incremental = {n for n, r in record["methods"].items() if r["incremental"]}
    assert incremental == {"stepping", "stepping-paper", "anywidth", "earlyexit"}
    for name, r in record["methods"].items():
        if r["incremental"]:
            assert r["path_mac_fraction"] < r["recompute_mac_fraction"]
        assert len(r["latency_ms"]) == r["num_subnets"] and all(t > 0 for t in r["latency_ms"])


def test_table_json_and_plot_are_written(record):
    md, js, png = map(lambda p: __import__("pathlib").Path(p), record["files"])
    assert md.name == "compare.md" and js.name == "compare.json" and png.name == "compare.png"
    text = md.read_text()
    for name in compare.METHODS:
        assert f"| {name} |" in text
    assert "Incremental cost" in text and "counted by hook" in text
    saved = json.loads(js.read_text())
    assert saved["methods"]["slimmable"]["accuracy"] == record["methods"]["slimmable"]["accuracy"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_harness_rejects_a_method_that_overspends(split, monkeypatch):
    honest = compare.BUILDERS["earlyexit"]

    def greedy(setup):
        net = honest(setup)
        extra = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        extra.step()  # one optimizer step the method's own log does not report
        return net

    monkeypatch.setitem(compare.BUILDERS, "earlyexit", greedy)
    with pytest.raises(RuntimeError, match="broke the training budget"):
        compare.run("lenet-5", split, methods=["earlyexit"], budgets=[0.5, 1.0], steps=2, batch_size=16,
                    latency_repeats=0)


def test_matched_picks_the_largest_subnet_within_budget():
    assert compare.matched([0.1, 0.3, 0.55], [0.5, 0.7, 0.8], 0.5) == {"subnet": 2, "mac_fraction": 0.3,
                                                                       "accuracy": 0.7}
    assert compare.matched([0.1, 0.3, 0.505], [0.5, 0.7, 0.8], 0.5)["subnet"] == 3  # within 1 %
    assert compare.matched([0.2], [0.9], 0.1) is None


def test_step_view_yields_exactly_the_requested_full_batches(split):
    view = stepping._StepView(split[0], 7, 16, seed=3)
    batches = list(view.batches(16, shuffle=True, augment=True))
    assert len(view) == 7 * 16 and len(batches) == 7 and all(x.shape[0] == 16 for x, _ in batches)


def _parser():
    parser = argparse.ArgumentParser(prog="dyninfer")
    add_commands(parser.add_subparsers(dest="command"))
    return parser


def test_compare_command_writes_the_report(tmp_path, capsys):
    args = _parser().parse_args(["compare", "--model", "lenet-5", "--data", "digits", "--methods",
                                 "slimmable,earlyexit", "--budgets", "0.3,0.9", "--steps", "3", "--batch-size", "32",
                                 "--latency-repeats", "1", "--latency-batch", "4", "--out", str(tmp_path), "--quiet"])
    assert args.func(args) == 0
    assert "slimmable" in capsys.readouterr().out
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["data"] == "digits" and saved["command"].startswith("dyninfer")
    assert {r["optimizer_steps"] for r in saved["methods"].values()} == {3}


@pytest.mark.parametrize("argv,message", [
    (["--methods", "slimmable,dropout"], "unknown methods"),
    (["--budgets", "0.5,0.3"], "strictly increasing"),
    (["--budgets", "0.5,x"], "comma-separated"),
    (["--options", "{\"us\": 3}"], "--options"),
])
def test_compare_command_user_errors(argv, message, tmp_path):
    args = _parser().parse_args(["compare", "--model", "lenet-5", "--steps", "1", "--out", str(tmp_path)] + argv)
    with pytest.raises(ValueError, match=message):
        args.func(args)


def test_us_can_be_deployed_at_another_methods_exact_fractions(split):
    rec = compare.run("lenet-5", split, methods=["earlyexit", "us"], budgets=[0.3, 0.6], steps=2, batch_size=16,
                      latency_repeats=0, options={"us": {"at": "earlyexit", "calibration_samples": 32}})
    exits, us = rec["methods"]["earlyexit"]["mac_fractions"], rec["methods"]["us"]["mac_fractions"]
    assert len(us) == len(exits) == 3 and us[-1] == 1.0  # not the 2 budgets: the exits' fractions
    assert all(0.8 * e <= u <= e for u, e in zip(us, exits)), (us, exits)
    with pytest.raises(ValueError, match="compared before us"):
        compare.run("lenet-5", split, methods=["us"], budgets=[0.5], steps=1, batch_size=16, latency_repeats=0,
                    options={"us": {"at": "stepping"}})


def test_compare_command_takes_a_teacher_run_and_refuses_one_of_other_data(tmp_path, capsys):
    from dyninfer.cli import CLIError, main

    teacher = tmp_path / "orig"
    assert main(["train", "--model", "lenet-5", "--data", "digits", "--epochs", "1", "--out", str(teacher)]) == 0
    args = _parser().parse_args(["compare", "--model", "lenet-5", "--data", "DIGITS", "--methods", "slimmable",
                                 "--budgets", "0.3,0.9", "--steps", "2", "--batch-size", "32", "--latency-repeats",
                                 "0", "--teacher", str(teacher), "--out", str(tmp_path / "cmp"), "--quiet"])
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["teacher"]["name"] == str(teacher) and 0 < saved["teacher"]["test_top1"] <= 1
    assert "distils from the same teacher" in (tmp_path / "cmp" / "compare.md").read_text()
    args = _parser().parse_args(["compare", "--model", "lenet-5", "--data", "fashion-mnist", "--steps", "1",
                                 "--teacher", str(teacher), "--out", str(tmp_path / "other")])
    with pytest.raises(CLIError, match="trained on digits, not fashion-mnist"):
        args.func(args)


@pytest.mark.parametrize("options, message", [
    ({"slimmable": {"no_such_option": 1}}, "no_such_option"),
    ({"us": {"steps": "many"}}, "us"),
    ({"stepping": {"granularity": 0}}, "granularity must be >= 1"),
    ({"anywidth": {"expansion": -1}}, "expansion must be a number > 0"),
])
def test_every_methods_options_are_checked_before_anything_trains(split, monkeypatch, options, message):
    trained = []
    for name in compare.METHODS:
        monkeypatch.setitem(compare.BUILDERS, name, lambda s, name=name: trained.append(name))
    with pytest.raises(ValueError, match=message):
        compare.run("lenet-5", split, methods=["stepping", "slimmable", "us", "anywidth"], budgets=[0.5, 0.9],
                    steps=2, batch_size=16, latency_repeats=0, options=options)
    assert trained == []


def test_a_teacher_and_teacher_fraction_conflict_is_refused_before_anything_trains(split, monkeypatch):
    trained = []
    for name in compare.METHODS:
        monkeypatch.setitem(compare.BUILDERS, name, lambda s, name=name: trained.append(name))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, split[0].num_classes))
    with pytest.raises(ValueError, match="teacher_fraction must be 0"):
        compare.run("lenet-5", split, methods=["slimmable", "stepping"], budgets=[0.5, 0.9], steps=2, batch_size=16,
                    latency_repeats=0, teacher=teacher, options={"stepping": {"teacher_fraction": 0.2}})
    with pytest.raises(ValueError, match="must name a method compared before us"):
        compare.run("lenet-5", split, methods=["us", "earlyexit"], budgets=[0.5, 0.9], steps=2, batch_size=16,
                    latency_repeats=0, options={"us": {"at": "earlyexit"}})
    assert trained == []


def test_every_method_is_saved_for_resuming_as_it_finishes(record):
    folder = next(iter(record["files"])).rsplit("/", 1)[0]
    from pathlib import Path

    saved = {p.stem for p in (Path(folder) / "compare.partial").glob("*.pt")}
    assert saved == set(compare.METHODS)


def test_a_rerun_resumes_finished_methods_and_trains_the_rest(split, tmp_path, monkeypatch):
    kwargs = dict(budgets=[0.3, 0.6, 0.9], steps=4, batch_size=BATCH, out=tmp_path, latency_batch=2,
                  latency_repeats=1)
    first = compare.run("lenet-5", split, methods=["slimmable", "anywidth"], **kwargs)

    def refuse(setup):
        raise AssertionError("a finished method was trained again")

    monkeypatch.setitem(compare.BUILDERS, "slimmable", refuse)
    monkeypatch.setitem(compare.BUILDERS, "anywidth", refuse)
    second = compare.run("lenet-5", split, methods=["slimmable", "anywidth", "earlyexit"], **kwargs)
    for name in ("slimmable", "anywidth"):
        assert second["methods"][name]["accuracy"] == first["methods"][name]["accuracy"]
        assert len(second["methods"][name]["latency_ms"]) == 3  # the resumed net itself was timed
    assert second["methods"]["earlyexit"]["optimizer_steps"] == 4
    with pytest.raises(AssertionError, match="trained again"):  # other settings: nothing to resume
        compare.run("lenet-5", split, methods=["slimmable"], **{**kwargs, "steps": 5})
    with pytest.raises(AssertionError, match="trained again"):
        compare.run("lenet-5", split, methods=["slimmable"], resume=False, **kwargs)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("method, options", [("us", {}), ("nonuniform", {}), ("individual", {}),
                                             ("stepping", {"iterations": 3})])
def test_a_method_interrupted_mid_training_resumes_from_its_checkpoints_exactly(split, tmp_path, method, options):
    """One phase with its own generator (US), a warm-up then a sandwich phase (non-uniform), one
    phase per subnet (individual), SteppingNet's construction (its own checkpoint per iteration):
    killed at step 6 of 10, the rerun takes the checkpointed steps and ends with the weights and
    log of an uninterrupted run."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    kwargs = dict(methods=[method], budgets=[0.4, 0.9], steps=10, batch_size=BATCH, latency_repeats=0,
                  options={method: options} if options else None)
    whole = compare.run("lenet-5", split, out=tmp_path / "whole", **kwargs)["methods"][method]
    calls = []

    def die(*_):
        calls.append(1)
        if len(calls) == 6:
            raise _Interrupt

    handle = register_optimizer_step_post_hook(die)
    try:
        with pytest.raises(_Interrupt):
            compare.run("lenet-5", split, out=tmp_path / "cut", **kwargs)
    finally:
        handle.remove()
    assert [p for p in (tmp_path / "cut" / "compare.partial" / f"{method}.work").rglob("*.safetensors")
            if "checkpoint" in p.name or "construction" in p.name]
    resumed = compare.run("lenet-5", split, out=tmp_path / "cut", **kwargs)["methods"][method]
    assert resumed["resumed_steps"] >= 4 and resumed["counted_optimizer_steps"] == 10 - resumed["resumed_steps"]
    assert resumed["weights_fingerprint"] == whole["weights_fingerprint"]
    assert resumed["accuracy"] == whole["accuracy"] and resumed["phases"] == whole["phases"]
    assert not (tmp_path / "cut" / "compare.partial" / f"{method}.work").exists()  # removed once saved


def test_a_causal_subnet_from_scratch_is_timed_both_ways_and_reports_the_macs_of_the_faster(split, tmp_path,
                                                                                            monkeypatch):
    """compare times each causal subnet as its dense rectangles and as its chain of steps; where the
    chain is faster (here: made so), the chain is what is reported, and its MACs are what a session
    stepping 1 -> k executes (FlopCounterMode), not the rectangles'."""
    from torch.utils.flop_counter import FlopCounterMode

    real = compare.measure_latency

    def chains_win(configs, *args, **kwargs):
        timed = real(configs, *args, **kwargs)
        for key, entry in timed.items():
            if key[1] in ("chain", "path"):
                entry["ms"] = 1e-6
        return timed

    monkeypatch.setattr(compare, "measure_latency", chains_win)
    record = compare.run("lenet-5", split, methods=["stepping", "slimmable"], budgets=[0.3, 0.6, 0.9], steps=4,
                         batch_size=BATCH, out=tmp_path, latency_batch=2, latency_repeats=1)
    stepped = record["methods"]["stepping"]
    assert stepped["scratch_execution"] == ["rectangle", "chain", "chain"]
    assert record["methods"]["slimmable"]["scratch_execution"] == ["dense"] * 3
    assert stepped["latency_ms"][1:] == [1e-6, 1e-6]
    net = torch.load(tmp_path / "compare.partial" / "stepping.pt", weights_only=False).eval()
    rectangles = net.mac_fractions(path="scratch")  # the saved net: rectangles, as trained
    x = torch.randn(3, *split[0].input_shape)
    net.start(x)  # builds the compacted form outside the count
    for k in (2, 3):
        with FlopCounterMode(display=False) as counter:
            session = net.start(x)
            for _ in range(k - 1):
                session.step()
        chain = counter.get_total_flops() / 2 / x.shape[0] / net.reference_macs
        assert stepped["scratch_mac_fractions"][k - 1] == pytest.approx(chain, rel=1e-9)
        assert chain < rectangles[k - 1]  # a different figure: the rectangles multiply the zero upper blocks
    text = (tmp_path / "compare.md").read_text()
    assert "| layout | as |" in text and "| chain |" in text
    from dyninfer import export  # the record's channels per subnet are the widths its dense export runs
    for k in (1, 2, 3):
        layers = [m for m in export.dense(net, k).modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        widths = [getattr(m, "out_channels", None) or m.out_features for m in layers[:-1]]
        assert stepped["details"]["channels"][k - 1] == widths, k


def test_a_method_that_broke_its_budget_is_not_resumed_as_if_it_had_kept_it(split, tmp_path, monkeypatch):
    """Two optimizer steps per training step break the budget; a rerun must not pass the check by
    taking those steps back from the checkpoints and counting the log's figure instead."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # torch wraps SGD.step in its hooks once
    real_step = torch.optim.SGD.step  # that wrapper: each call fires the step hooks

    def twice(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        return real_step(self, *args, **kwargs)

    twice.hooked = True  # already wrapped: torch must not wrap it again
    monkeypatch.setattr(torch.optim.SGD, "step", twice)
    kwargs = dict(methods=["slimmable"], budgets=[0.4, 0.9], steps=10, batch_size=BATCH, latency_repeats=0,
                  out=tmp_path)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="broke the training budget"):
            compare.run("lenet-5", split, **kwargs)


def test_a_causal_method_with_one_subnet_is_timed_without_a_chain(split):
    record = compare.run("lenet-5", split, methods=["anywidth"], budgets=[0.5], steps=2, batch_size=BATCH,
                         latency_batch=2, latency_repeats=1)
    assert record["methods"]["anywidth"]["scratch_execution"] == ["rectangle"]
