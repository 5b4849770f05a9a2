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
