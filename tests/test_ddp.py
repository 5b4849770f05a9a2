import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    from torch import nn
    from dyninfer.data import ImageSet
    from dyninfer.train import TrainConfig, fit

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(100 + rank)  # different inits: DDP must broadcast rank 0's weights
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(42) % 2
    images = torch.randint(0, 255, (42, 1, 8, 8), generator=g, dtype=torch.uint8)
    data = ImageSet(images, labels, num_classes=2, augmentation="crop-flip")
    seen = []

    class Record:
        def on_batch_end(self, state):
            seen.append(state.world_size)

    history = fit(model, data, TrainConfig(epochs=2, batch_size=8, progress=False), test=data,
                  out=os.path.join(out, "run"), callbacks=[Record()])
    assert seen == [2] * 6, seen  # 42 images -> 21 per rank -> 3 batches per epoch
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.history"), "w") as f:
        f.write(str(len(history)))
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(w0) == set(w1)
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    torch.manual_seed(100)  # rank 0's initial weights: training must have moved them
    assert not torch.equal(w0["0.weight"], torch.nn.Conv2d(1, 4, 3, padding=1).weight)

    run = tmp_path / "run"  # only rank 0 writes, once per epoch
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.json", "checkpoint.safetensors", "config.json", "metrics.jsonl", "model.json", "model.safetensors"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all("test_top1" in r for r in lines)
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert (tmp_path / "rank1.history").read_text() == "2"


def _torchrun(script, *args, timeout=300, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


STEP_WORKER = textwrap.dedent('''
    import os, sys
    import torch
    from torch import nn
    from dyninfer.data import ImageSet
    from dyninfer.train import TrainConfig, fit

    rank = int(os.environ["RANK"])
    torch.manual_seed(100 + rank)  # different inits: the step mode must start from rank 0's
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 2))
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 255, (40, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(40) % 2,
                    num_classes=2, augmentation="crop-flip")
    torch.manual_seed(100)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    batch = int(sys.argv[2])
    fit(model, data, TrainConfig(steps=7, batch_size=batch, seed=3, progress=False), optimizer=opt)
    torch.save(model.state_dict(), os.path.join(sys.argv[1], f"rank{rank}.pt"))
''')


@pytest.mark.parametrize("batch", [8, 7, 1])  # equal halves, unequal shards (4 + 3), fewer rows than ranks
def test_step_mode_on_two_ranks_equals_one_process_on_whole_batches(tmp_path, batch):
    """Each rank trains on its rows of every batch and the gradients are averaged, weighted by
    rows: without BatchNorm that is the one-process step on the whole batch, up to rounding."""
    from torch import nn

    from dyninfer.data import ImageSet
    from dyninfer.train import TrainConfig, fit

    script = tmp_path / "worker.py"
    script.write_text(STEP_WORKER)
    _torchrun(script, tmp_path, batch)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)

    torch.manual_seed(100)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 2))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 255, (40, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(40) % 2,
                    num_classes=2, augmentation="crop-flip")
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    fit(model, data, TrainConfig(steps=7, batch_size=batch, seed=3, progress=False), optimizer=opt,
        distributed=False)
    for k in w0:
        assert not torch.allclose(initial[k], w0[k], atol=1e-3), k  # training moved it
        torch.testing.assert_close(w0[k], model.state_dict()[k], atol=1e-5, rtol=1e-4)


CLI_WORKER = textwrap.dedent('''
    import os, shutil, sys
    from dyninfer import cli, launch
    from dyninfer.cli import stepping

    keep = sys.argv[1]
    if os.environ.get("FAIL_RANK") == os.environ["RANK"]:  # this rank fails on its own, after rank 0 started
        def fail(args):
            raise RuntimeError("boom on rank " + os.environ["RANK"])
        stepping.cmd_construct = fail
    real_close = launch.Ranks.close

    def close(self, ok=True):  # keep what each rank > 0 wrote in its private copy, for the test to compare
        if self._private is not None:
            shutil.copytree(self._private, os.path.join(keep, f"rank{self.rank}"))
        real_close(self, ok)

    launch.Ranks.close = close
    sys.exit(cli.main(sys.argv[2:]))
''')


def test_torchrun_runs_construct_and_a_baseline_data_parallel(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "cli_worker.py"
    script.write_text(CLI_WORKER)
    out = tmp_path / "construct"
    proc = _torchrun(script, tmp_path / "kept-construct", "construct", "--model", "lenet-5", "--data", "digits",
                     "--budgets", "0.3,0.6,0.9", "--iterations", "3", "--batches-per-iteration", "2",
                     "--batch-size", "32", "--retrain-epochs", "1", "--out", out, "--quiet")
    assert proc.stdout.count("accuracy A_k") == 1  # rank 0 prints; rank 1 is silent
    meta = json.loads((out / "run.json").read_text())
    assert meta["history"]["world_size"] == 2
    assert not any(p.name.startswith("rank") for p in out.iterdir())
    mine, theirs = load_file(out / "stepping.safetensors"), load_file(tmp_path / "kept-construct/rank1/stepping.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    out = tmp_path / "compare"
    _torchrun(script, tmp_path / "kept-compare", "compare", "--model", "lenet-5", "--data", "digits",
              "--methods", "slimmable", "--steps", "6", "--batch-size", "32", "--latency-repeats", "0",
              "--out", out, "--quiet")
    ours = json.loads((out / "compare.json").read_text())["methods"]["slimmable"]
    other = json.loads((tmp_path / "kept-compare/rank1/compare.json").read_text())["methods"]["slimmable"]
    assert ours["counted_optimizer_steps"] == 6
    assert ours["weights_fingerprint"] == other["weights_fingerprint"]


def test_under_torchrun_a_command_without_out_runs_once_and_a_lone_failure_ends_the_run(tmp_path, monkeypatch):
    script = tmp_path / "cli_worker.py"
    script.write_text(CLI_WORKER)
    proc = _torchrun(script, tmp_path / "kept", "info", "lenet-5", timeout=120)
    assert proc.stdout.count("lenet-5 (expansion 1.0)") == 1
    monkeypatch.setenv("FAIL_RANK", "1")  # rank 1 fails while rank 0 trains: nobody waits forever
    proc = _torchrun(script, tmp_path / "kept2", "construct", "--model", "lenet-5", "--data", "digits",
                     "--budgets", "0.3,0.9", "--iterations", "50", "--batches-per-iteration", "20",
                     "--batch-size", "32", "--out", tmp_path / "fails", "--quiet", timeout=240, check=False)
    assert proc.returncode != 0 and "boom on rank 1" in proc.stderr
