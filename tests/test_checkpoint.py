import json
import os
import pickle
import struct
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dyninfer import checkpoint as ckpt
from dyninfer.checkpoint import CheckpointMismatchError


@dataclass
class NetConfig:
    name: str = "tiny"
    num_classes: int = 3
    expansion: float = 1.0
    input_shape: tuple = (1, 6, 6)


class Tiny(nn.Module):
    def __init__(self, width=4, **cfg):
        super().__init__()
        self.dyninfer_config = NetConfig(**cfg)
        self.conv = nn.Conv2d(1, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, self.dyninfer_config.num_classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "i64": torch.arange(7),
        "u8": torch.randint(0, 255, (2, 3), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6, generator=g).t(),  # non-contiguous view
    }


def test_round_trip_tensors_and_meta(tmp_path):
    tensors = _tensors()
    tensors["alias"] = tensors["f32"]  # same storage twice: safetensors alone refuses this
    meta = {"epoch": 3, "lr": 0.1, "name": "x", "nested": {"a": [1, 2, None], "ok": True}}
    written = ckpt.save(tmp_path / "run", tensors, meta)
    assert written == tmp_path / "run.safetensors"
    loaded, meta2 = ckpt.load(tmp_path / "run")
    assert meta2 == meta
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_suffixes_name_the_same_pair(tmp_path):
    ckpt.save(tmp_path / "a.safetensors", {"x": torch.ones(2)}, {"k": 1})
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.safetensors"]
    for p in ("a", "a.safetensors", "a.json"):
        tensors, meta = ckpt.load(tmp_path / p)
        assert meta == {"k": 1} and torch.equal(tensors["x"], torch.ones(2))
    assert ckpt.exists(tmp_path / "a") and not ckpt.exists(tmp_path / "b")


def test_no_temp_files_after_save_and_overwrite(tmp_path):
    for i in range(3):
        ckpt.save(tmp_path / "c", {"x": torch.full((3,), float(i))}, {"i": i})
    assert sorted(os.listdir(tmp_path)) == ["c.json", "c.safetensors"]
    tensors, meta = ckpt.load(tmp_path / "c")
    assert meta == {"i": 2} and torch.equal(tensors["x"], torch.full((3,), 2.0))


def test_failed_save_keeps_old_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    ckpt.save(tmp_path / "c", {"x": torch.zeros(2)}, {"v": "old"})

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(tmp_path / "c", {"x": torch.ones(2)}, {"v": "new"})
    assert sorted(os.listdir(tmp_path)) == ["c.json", "c.safetensors"]
    tensors, meta = ckpt.load(tmp_path / "c")
    assert meta == {"v": "old"} and torch.equal(tensors["x"], torch.zeros(2))


def test_unserialisable_meta_raises_before_writing(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ckpt.save(tmp_path / "c", {"x": torch.ones(1)}, {"f": object()})
    assert os.listdir(tmp_path) == []


def test_torn_pair_is_detected(tmp_path):
    ckpt.save(tmp_path / "a", {"x": torch.zeros(1)}, {})
    ckpt.save(tmp_path / "b", {"x": torch.ones(1)}, {})
    os.replace(tmp_path / "a.json", tmp_path / "b.json")  # json of one save, tensors of another
    with pytest.raises(CheckpointMismatchError, match="different saves"):
        ckpt.load(tmp_path / "b")


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ckpt.load(tmp_path / "nope")
    ckpt.save(tmp_path / "half", {"x": torch.ones(1)}, {})
    (tmp_path / "half.json").unlink()
    with pytest.raises(FileNotFoundError, match="half.json"):
        ckpt.load(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="no_dir"):
        ckpt.save(tmp_path / "no_dir" / "x", {"x": torch.ones(1)}, {})


def test_files_are_safetensors_and_json_not_pickle(tmp_path):
    ckpt.save_model(tmp_path / "m", Tiny(), {"note": "hi"})
    raw = (tmp_path / "m.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])  # safetensors: u64 length + JSON header + raw bytes
    assert {"conv.weight", "bn.running_mean", "fc.bias"} <= set(header)
    assert not raw.startswith(b"\x80") and b"torch._utils" not in raw and b"PK\x03\x04" not in raw
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["meta"]["note"] == "hi"
    assert sidecar["meta"]["model"] == {"name": "tiny", "num_classes": 3, "expansion": 1.0, "input_shape": [1, 6, 6]}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_disguised_as_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "c.safetensors").write_bytes(pickle.dumps(_Evil(str(marker))))
    torch.save({"x": torch.ones(1)}, tmp_path / "d.safetensors")
    for name in ("c", "d"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"format": ckpt.FORMAT, "token": None, "meta": {}}))
        with pytest.raises(ValueError, match="safetensors"):
            ckpt.load(tmp_path / name)
    assert not marker.exists()


def test_model_round_trip(tmp_path):
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    a.bn.running_mean.fill_(0.25)
    ckpt.save_model(tmp_path / "m", a, {"epochs": 2})
    meta = ckpt.load_model(tmp_path / "m", b, expect={"epochs": 2})
    assert meta["epochs"] == 2 and meta["model"]["name"] == "tiny"
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("field,value,shown", [
    ("num_classes", 5, "num_classes: checkpoint"),
    ("name", "other", "'tiny'"),
    ("expansion", 1.8, "expansion"),
    ("input_shape", (3, 6, 6), "input_shape"),
])
def test_other_model_config_is_a_clear_mismatch(tmp_path, field, value, shown):
    ckpt.save_model(tmp_path / "m", Tiny())
    other = Tiny(**{field: value})
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="different model") as info:
        ckpt.load_model(tmp_path / "m", other)
    assert shown in str(info.value) and field in str(info.value)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())  # untouched


def test_wrong_shapes_and_keys_are_clear_mismatches(tmp_path):
    ckpt.save_model(tmp_path / "m", Tiny(width=4))
    plain = nn.Sequential(nn.Linear(2, 2))  # no dyninfer_config: only the state_dict is compared
    with pytest.raises(CheckpointMismatchError, match="missing in checkpoint: 0.bias, 0.weight"):
        ckpt.load_model(tmp_path / "m", plain)
    wider = Tiny(width=8)
    with pytest.raises(CheckpointMismatchError, match=r"conv.weight: checkpoint .*\(4, 1, 3, 3\) vs model \(8, 1, 3, 3\)"):
        ckpt.load_model(tmp_path / "m", wider)
    with pytest.raises(CheckpointMismatchError, match=r"meta\['epochs'\] is '<absent>', expected 3"):
        ckpt.load_model(tmp_path / "m", Tiny(), expect={"epochs": 3})
    assert issubclass(CheckpointMismatchError, ValueError)


def test_pack_state_restores_optimizer_exactly(tmp_path):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4))
    opt = torch.optim.Adam([w], lr=0.1, betas=(0.8, 0.9))
    for _ in range(3):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    tensors, skeleton = ckpt.pack_state(opt.state_dict(), "optimizer")
    assert all(k.startswith("optimizer.") for k in tensors) and len(tensors) == 3
    ckpt.save(tmp_path / "o", tensors, {"optimizer": skeleton})
    tensors2, meta = ckpt.load(tmp_path / "o")
    w2 = nn.Parameter(w.detach().clone())
    opt2 = torch.optim.Adam([w2], lr=1.0)
    opt2.load_state_dict(ckpt.unpack_state(meta["optimizer"], tensors2))
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9) and opt2.param_groups[0]["lr"] == 0.1
    for o, p in ((opt, w), (opt2, w2)):
        o.zero_grad()
        (p ** 2).sum().backward()
        o.step()
    assert torch.equal(w, w2)


def test_pack_state_refuses_what_json_cannot_hold():
    with pytest.raises(TypeError, match=r"opt\.x.*without pickle"):
        ckpt.pack_state({"x": object()}, "opt")
    skeleton = ckpt.pack_state({1: (2, "a"), "__odd": [None]}, "s")[1]
    assert ckpt.unpack_state(json.loads(json.dumps(skeleton)), {}) == {1: (2, "a"), "__odd": [None]}


def test_bytes_flipped_inside_the_tensor_file_are_caught(tmp_path):
    from dyninfer import checkpoint as ckpt

    stem = tmp_path / "w"
    tensors = {"w": torch.arange(4096, dtype=torch.float32)}
    ckpt.save(stem, tensors, {"a": 1})
    tensor_file, _ = ckpt.paths(stem)
    data = bytearray(tensor_file.read_bytes())
    data[-100] ^= 0x40  # a payload byte: the file still parses as safetensors
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged: its SHA-256 differs"):
        ckpt.load(stem)
