"""Every command that takes ``--seed`` is bit-reproducible on CPU: run twice, same files.

Weights are compared tensor by tensor (safetensors), reports line by line with the fields that
are measured times removed; nothing here compares a run with itself.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dyninfer.cli import main
from dyninfer.runtime.simulate import load_trace

TIMED = ("seconds", "_s", "_ms", "ms_", "latency", "images_per_s", "time", "command", "created")


def _untimed(obj):
    """``obj`` without keys that hold wall-clock measurements (they differ between two runs)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not any(t in k for t in TIMED)}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _weights(folder):
    files = sorted(p.relative_to(folder) for p in folder.rglob("*.safetensors"))
    assert files, f"no weights written under {folder}"
    return {str(f): load_file(str(folder / f)) for f in files}


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].keys() == wb[name].keys(), name
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), f"{name}: {key} differs between two seeded runs"


DIGITS = ["--data", "digits"]
COMMANDS = {
    "train": ["train", "--model", "lenet-5", *DIGITS, "--epochs", "1", "--quiet"],
    "construct": ["construct", "--model", "lenet-5", *DIGITS, "--budgets", "0.4,0.9", "--iterations", "3",
                  "--batches-per-iteration", "2", "--batch-size", "64", "--retrain-epochs", "1", "--quiet"],
    "lcnet": ["lcnet", "train", *DIGITS, "--expansion", "0.25", "--epochs", "1", "--l1", "0.5", "--quiet"],
    "nonuniform": ["nonuniform", "train", "--model", "lenet-5", *DIGITS, "--steps", "6", "--batch-size", "32",
                   "--budgets", "0.5,1.0", "--multiple", "2", "--quiet"],
    "dnn": ["dnn", "train", "--depth", "20", "--groups", "2", *DIGITS, "--steps", "4", "--batch-size", "32",
            "--quiet"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_training_commands_are_bit_reproducible(command, tmp_path):
    for name in ("a", "b"):
        assert main([*COMMANDS[command], "--seed", "5", "--out", str(tmp_path / name)]) == 0
    _assert_same_weights(tmp_path / "a", tmp_path / "b")
    # a different seed must change them, or the test above could not fail
    assert main([*COMMANDS[command], "--seed", "6", "--out", str(tmp_path / "c")]) == 0
    wa, wc = _weights(tmp_path / "a"), _weights(tmp_path / "c")
    assert any(not torch.equal(t, wc[f][k]) for f in wa for k, t in wa[f].items() if k in wc.get(f, {}))


def test_compare_is_bit_reproducible(tmp_path):
    args = ["compare", "--model", "lenet-5", *DIGITS, "--methods", "stepping,slimmable", "--budgets", "0.4,0.9",
            "--steps", "6", "--batch-size", "32", "--latency-repeats", "1", "--latency-batch", "2", "--seed", "5",
            "--quiet"]
    for name in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
    # compare keeps no weights once it has finished; its report carries each method's accuracies,
    # MACs and a content hash of the trained weights
    a, b = (_untimed(json.loads((tmp_path / n / "compare.json").read_text())["methods"]) for n in ("a", "b"))
    assert a == b
    assert main([*args[:-2], "6", "--quiet", "--out", str(tmp_path / "c")]) == 0
    c = json.loads((tmp_path / "c" / "compare.json").read_text())["methods"]
    assert all(c[m]["weights_fingerprint"] != a[m]["weights_fingerprint"] for m in a)


def test_simulate_is_bit_reproducible(tmp_path):
    assert main(COMMANDS["construct"] + ["--seed", "0", "--out", str(tmp_path / "run")]) == 0
    reports = []
    for name in ("a", "b", "c"):
        trace = tmp_path / f"{name}.csv"
        seed = "6" if name == "c" else "5"
        assert main(["simulate", str(tmp_path / "run"), "--trace", str(trace), "--make-trace", "--trace-ms", "30",
                     "--inputs", "20", "--deadlines", "0.5,2", "--seed", seed, "--out", str(tmp_path / name)]) == 0
        reports.append((trace.read_text(), json.loads((tmp_path / name / "simulate.json").read_text())))
    (trace_a, rep_a), (trace_b, rep_b), (trace_c, _) = reports
    assert trace_a == trace_b and trace_a != trace_c
    assert load_trace(tmp_path / "a.csv").rates == load_trace(tmp_path / "b.csv").rates
    assert _untimed(rep_a["deadlines"]) == _untimed(rep_b["deadlines"])
