"""Checkpoints as safetensors (tensors) + a JSON sidecar (everything else), written atomically.

``save("run/ckpt", tensors, meta)`` writes ``run/ckpt.safetensors`` and ``run/ckpt.json``.
Nothing is ever pickled, so loading a file cannot run code. Nested state such as an
optimizer's ``state_dict()`` goes through :func:`pack_state`: its tensors into the safetensors
file, its structure into JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import uuid
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointMismatchError",
    "save",
    "load",
    "exists",
    "paths",
    "save_model",
    "load_model",
    "check_model",
    "model_config",
    "pack_state",
    "unpack_state",
]

FORMAT = "dyninfer.checkpoint/1"
_TOKEN_KEY = "dyninfer.token"
# Identity of a model: a checkpoint whose dyninfer_config differs in one of these won't load.
CONFIG_KEYS = ("name", "num_classes", "expansion", "input_shape")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model (or the expectations) it is loaded into."""


def paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(tensor_file, json_file)`` for ``path`` given with or without ``.safetensors``/``.json``."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def exists(path: str | os.PathLike) -> bool:
    """Whether both files of the checkpoint at ``path`` are present."""
    return all(f.is_file() for f in paths(path))


def remove(path: str | os.PathLike) -> None:
    """Delete both files of the checkpoint at ``path`` (missing files are fine)."""
    for f in paths(path):
        f.unlink(missing_ok=True)


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short content hash of named tensors: says whether a checkpoint belongs to this state."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temp_in(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and directories on some OSes) refuse fsync
        pass
    finally:
        os.close(fd)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two entries sharing storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r} ({type(name).__name__})")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        t = t.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if not t.is_contiguous() or (ptr is not None and ptr in seen):
            t = t.clone(memory_format=torch.contiguous_format)
        elif ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def save(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``tensors`` to ``<path>.safetensors`` and ``meta`` to ``<path>.json``, atomically.

    Each file goes to a temporary file in the same directory and is renamed into place, so a
    reader sees the old pair or the new one, never a torn file. Both carry one random token so
    :func:`load` notices a pair torn by a crash between the two renames. ``meta`` must be
    JSON-serialisable (tuples come back as lists). Returns the tensor file's path.
    """
    tensor_file, json_file = paths(path)
    if not tensor_file.parent.is_dir():
        raise FileNotFoundError(f"directory {str(tensor_file.parent)!r} does not exist (saving {str(tensor_file)!r})")
    meta = dict(meta or {})
    token = uuid.uuid4().hex
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint meta must be JSON-serialisable ({err}); keys: {sorted(meta)}") from None
    prepared = _prepare_tensors(tensors)

    tmp_tensors = _temp_in(tensor_file.parent, tensor_file.name)
    tmp_json = _temp_in(json_file.parent, json_file.name)
    try:
        save_file(prepared, str(tmp_tensors), metadata={_TOKEN_KEY: token})
        _fsync(tmp_tensors)
        # the tensor file's checksum: bytes flipped later (disk, copy, hand edit) are caught on load
        text = json.dumps({"format": FORMAT, "token": token, "sha256": _sha256(tmp_tensors), "meta": meta}, indent=2)
        with open(tmp_json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_tensors, tensor_file)
        os.replace(tmp_json, json_file)
    finally:
        for tmp in (tmp_tensors, tmp_json):
            tmp.unlink(missing_ok=True)
    try:
        _fsync(tensor_file.parent)
    except OSError:
        pass
    return tensor_file


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` from a checkpoint written by :func:`save`; tensors are on the CPU."""
    tensor_file, json_file = paths(path)
    for f in (tensor_file, json_file):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file {str(f)!r} not found")
    try:
        with open(json_file, encoding="utf-8") as f:
            sidecar = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(json_file)!r} is not valid JSON ({err})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise ValueError(f"{str(json_file)!r} is not a dyninfer checkpoint sidecar (expected format {FORMAT!r})")
    try:
        with safe_open(str(tensor_file), framework="pt") as f:
            token = (f.metadata() or {}).get(_TOKEN_KEY)
        tensors = load_file(str(tensor_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(tensor_file)!r} is not a readable safetensors file ({err})") from None
    if token != sidecar.get("token"):
        raise CheckpointMismatchError(
            f"{str(tensor_file)!r} and {str(json_file)!r} come from different saves (a write was "
            "interrupted, or one file was replaced by hand); restore both files of one save"
        )
    expected = sidecar.get("sha256")  # absent in checkpoints written before checksums
    if expected is not None and _sha256(tensor_file) != expected:
        raise ValueError(f"{str(tensor_file)!r} is damaged: its SHA-256 differs from the one recorded in "
                         f"{str(json_file)!r} when it was saved; restore it from a copy or rerun the command")
    return tensors, sidecar.get("meta", {})


# --- models ---------------------------------------------------------------------------------

def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else model


def model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """``model.dyninfer_config`` as a JSON-ready dict (None when the model has none)."""
    cfg = getattr(_unwrap(model), "dyninfer_config", None)
    if cfg is None:
        return None
    if is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = asdict(cfg)
    elif hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"model.dyninfer_config must be a dict or dataclass, got {type(cfg).__name__}")
    try:
        return json.loads(json.dumps(dict(cfg)))  # tuples -> lists, as they will come back
    except (TypeError, ValueError) as err:
        raise TypeError(f"model.dyninfer_config must be JSON-serialisable ({err})") from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_model(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` unless ``tensors``/``meta`` fit ``model``.

    Compares the identity fields of ``dyninfer_config`` (:data:`CONFIG_KEYS`) when both sides
    have one, then state_dict keys and shapes.
    """
    model = _unwrap(model)
    saved, current = meta.get("model"), model_config(model)
    if isinstance(saved, Mapping) and current is not None:
        diffs = [f"{k}: {source} has {saved.get(k)!r}, model has {current.get(k)!r}"
                 for k in CONFIG_KEYS
                 if (k in saved or k in current) and not _same(saved.get(k), current.get(k))]
        if diffs:
            raise CheckpointMismatchError(f"{source} was saved from a different model; " + "; ".join(diffs))
    state = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                            "safetensors checkpoints hold tensors only")
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(state[k].shape)}"
              for k in state if k in tensors and tensors[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing in checkpoint: {_few(missing)}")
    if unexpected:
        problems.append(f"only in checkpoint: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape differs: {_few(shapes)}")
    if problems:
        name = (current or {}).get("name", type(model).__name__)
        raise CheckpointMismatchError(f"{source} does not fit model {name!r}: " + "; ".join(problems))


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def save_model(path: str | os.PathLike, model: torch.nn.Module, meta: Mapping[str, Any] | None = None) -> Path:
    """Save ``model.state_dict()`` with ``meta`` plus ``meta["model"] = dyninfer_config``."""
    model = _unwrap(model)
    meta = dict(meta or {})
    meta["model"] = model_config(model)
    state = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    return save(path, state, meta)


def load_model(path: str | os.PathLike, model: torch.nn.Module,
               expect: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load weights saved by :func:`save_model` into ``model``; returns the checkpoint's meta.

    Raises :class:`CheckpointMismatchError` when the saved model config, the state_dict keys or
    shapes, or any ``expect`` entry (``meta[key] == value``) differ; ``model`` is untouched then.
    """
    tensors, meta = load(path)
    source = f"checkpoint {str(paths(path)[0])!r}"
    for key, want in (expect or {}).items():
        have = meta.get(key, "<absent>")
        if json.loads(json.dumps(want)) != have:
            raise CheckpointMismatchError(f"{source}: meta[{key!r}] is {have!r}, expected {want!r}")
    check_model(model, tensors, meta, source)
    _unwrap(model).load_state_dict(tensors, strict=True)
    return meta


# --- nested state (optimizer, scheduler, callbacks) -------------------------------------------

def pack_state(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts/lists/tuples/scalars/tensors) into tensors and a JSON skeleton.

    Tensors are named ``<prefix>.<path>`` and replaced by ``{"__tensor__": name}``; tuples and
    dicts with non-string keys (optimizer state is keyed by int) are tagged so that
    :func:`unpack_state` rebuilds the exact structure.
    """
    tensors: dict[str, torch.Tensor] = {}

    def name_for(parts: list[str]) -> str:
        name = ".".join([prefix, *parts])
        base, n = name, 1
        while name in tensors:
            name, n = f"{base}#{n}", n + 1
        return name

    def walk(obj: Any, parts: list[str]) -> Any:
        if isinstance(obj, torch.Tensor):
            name = name_for(parts)
            tensors[name] = obj
            return {"__tensor__": name}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, tuple):
            return {"__tuple__": [walk(v, parts + [str(i)]) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, parts + [str(i)]) for i, v in enumerate(obj)]
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: walk(v, parts + [k]) for k, v in obj.items()}
            for k in obj:
                if k is not None and not isinstance(k, (bool, int, float, str)):
                    raise TypeError(f"cannot store key {k!r} at {'.'.join([prefix, *parts])}: keys must be str/int/float/bool/None")
            return {"__items__": [[k, walk(v, parts + [str(k)])] for k, v in obj.items()]}
        raise TypeError(f"cannot store {type(obj).__name__} at {'.'.join([prefix, *parts])} without pickle; "
                        "state may hold tensors, dicts, lists, tuples, str, int, float, bool and None")

    return tensors, walk(state, [])


def unpack_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(skeleton, list):
        return [unpack_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            name = skeleton["__tensor__"]
            if name not in tensors:
                raise CheckpointMismatchError(f"checkpoint is missing tensor {name!r}")
            return tensors[name]
        if set(skeleton) == {"__tuple__"}:
            return tuple(unpack_state(v, tensors) for v in skeleton["__tuple__"])
        if set(skeleton) == {"__items__"}:
            return {k: unpack_state(v, tensors) for k, v in skeleton["__items__"]}
        return {k: unpack_state(v, tensors) for k, v in skeleton.items()}
    return skeleton
