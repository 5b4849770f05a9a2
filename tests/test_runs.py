"""The run directory: dy.load returns the right object for each kind; bad run.json files get clear errors."""

import json

import pytest
import torch

import dyninfer as dy
from dyninfer import runs
from dyninfer.cli import main
from dyninfer.methods.nonuniform import NonUniformNet


def test_load_gives_each_kind_its_object(tmp_path):
    assert main(["train", "--model", "lenet-5", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "t"),
                 "--quiet"]) == 0
    assert main(["nonuniform", "train", "--model", "lenet-5", "--data", "digits", "--steps", "4", "--batch-size", "32",
                 "--budgets", "0.5,1.0", "--multiple", "2", "--out", str(tmp_path / "n"), "--quiet"]) == 0
    model = dy.load(tmp_path / "t")
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    net = dy.load(tmp_path / "n")
    assert isinstance(net, NonUniformNet) and net.num_subnets == 2


def test_bad_run_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run.json"):
        runs.read_meta(tmp_path)
    (tmp_path / "run.json").write_text('{"kind": "stepping",\n')  # truncated
    with pytest.raises(ValueError, match=r"run.json is damaged"):
        runs.read_meta(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"kind": "lcnet"}))
    with pytest.raises(ValueError, match="expected one made by `dyninfer construct` or `dyninfer demo`"):
        runs.read_meta(tmp_path, "stepping")
    (tmp_path / "run.json").write_text(json.dumps({"model": "lenet-5"}))
    with pytest.raises(ValueError, match="no 'kind'"):
        dy.load(tmp_path)


def test_train_with_one_seed_twice_gives_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert main(["train", "--model", "lenet-5", "--data", "digits", "--epochs", "1", "--seed", "3",
                     "--out", str(tmp_path / name), "--quiet"]) == 0
    a, b = (load_file(str(next((tmp_path / n).glob("model*.safetensors")))) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
