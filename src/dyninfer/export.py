"""Export a subnet as a standalone dense module: plain torch layers, no masks, no dyninfer needed.

Built the once-for-all way (``get_active_subnet(preserve_weight=True)``): static layers of the
subnet's exact shapes with the sliced, BatchNorm-folded weights copied in.  :func:`incremental`
exports the whole stepping network instead, as one TorchScript module with step methods.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from dyninfer.runtime.graph import CompactGraph


def _compact_of(net):
    from dyninfer.runtime.compaction import as_compact

    try:
        return as_compact(net)
    except TypeError:
        raise TypeError(f"cannot export a {type(net).__name__}; expected a SteppingNet, TaggedSequential "
                        f"or CompactNet") from None


@contextmanager
def _quiet_jit():
    """torch.jit warns that it is deprecated on every call; the saved format is what deployments load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        yield


def _check_k(cnet, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cnet.num_subnets:
        raise ValueError(f"k must be an int in 1..{cnet.num_subnets}, got {k!r}")
    return k


@torch.no_grad()
def subnet(net, k: int) -> nn.Sequential:
    """Subnet ``k`` (1-based) of an incremental network as a dense module (NCHW): an
    ``nn.Sequential`` for a plain stack, an ``fx.GraphModule`` for a residual network."""
    cnet = _compact_of(net)
    _check_k(cnet, k)
    if isinstance(cnet, CompactGraph):
        return cnet.dense(k)
    modules: list[nn.Module] = []
    for layer in cnet.layers:
        weight, bias = layer.prefix_weights[k - 1], layer.prefix_biases[k - 1]
        if layer.kind == "conv":
            dense = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride=layer.stride,
                              padding=layer.padding, dilation=layer.dilation)
        else:
            dense = nn.Linear(weight.shape[1], weight.shape[0])
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
        modules.append(dense)
        if layer.post is not None:
            modules.extend(copy.deepcopy(list(layer.post)))
    weight = cnet.classifier_prefix[k - 1]
    classifier = nn.Linear(weight.shape[1], weight.shape[0], bias=cnet.classifier_bias is not None)
    classifier.weight.copy_(weight)
    if cnet.classifier_bias is not None:
        classifier.bias.copy_(cnet.classifier_bias)
    modules.append(classifier)
    return nn.Sequential(*modules).eval()


def torchscript(net, k: int, path: str | Path | None = None, *, channels_last: bool = False) -> torch.jit.ScriptModule:
    """TorchScript of subnet ``k`` (traced and frozen); saved to ``path`` when given.

    ``channels_last=True`` stores the convolution weights channels_last (the faster layout on
    CPU); the module accepts either layout.
    """
    module = subnet(net, k)
    example = torch.zeros(1, *_compact_of(net).input_shape)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    with _quiet_jit():
        scripted = torch.jit.freeze(torch.jit.trace(module, example).eval())
    if path is not None:
        scripted.save(str(path))
    return scripted


def incremental(net, path: str | Path | None = None) -> torch.jit.ScriptModule:
    """The whole stepping network as one scripted module: ``forward(x, k)``, ``start(x)``,
    ``step(state, logits, k)`` and ``steps(x, k)`` (see :mod:`dyninfer.runtime.scripted`).

    Saved to ``path`` when given; loading it needs only torch (``torch.jit.load``).
    """
    from dyninfer.runtime.scripted import IncrementalScript

    cnet = _compact_of(net)
    if isinstance(cnet, CompactGraph):
        raise ValueError("the incremental TorchScript module covers plain stacks; a residual network's subnets "
                         "export one by one (export.torchscript(net, k)) and step in Python (net.start(x))")
    with _quiet_jit():
        scripted = torch.jit.script(IncrementalScript(cnet).eval())
    if path is not None:
        scripted.save(str(path))
    return scripted


def onnx(net, k: int, path: str | Path) -> Path:
    """ONNX file of subnet ``k`` (needs the optional ``onnx`` extra)."""
    try:
        import onnx as _onnx  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs the optional extra: pip install 'dyninfer[onnx]'") from None
    module = subnet(net, k)
    example = torch.zeros(1, *_compact_of(net).input_shape)
    torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return Path(path)
