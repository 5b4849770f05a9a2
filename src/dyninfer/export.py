"""Export a subnet as a standalone dense module: plain torch layers, no masks, no dyninfer needed.

Built the once-for-all way (``get_active_subnet(preserve_weight=True)``): static layers of the
subnet's exact shapes with the sliced, BatchNorm-folded weights copied in.  :func:`incremental`
exports the whole stepping network instead, as one TorchScript module with step methods.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from dyninfer.nn.tagged import fold_module
from dyninfer.runtime.compaction import as_compact
from dyninfer.runtime.graph import CompactGraph
from dyninfer.runtime.scripted import IncrementalScript


def _compact_of(net):
    try:
        return as_compact(net)
    except TypeError:
        raise TypeError(f"cannot export a {type(net).__name__}: export takes a network with numbered subnets (a "
                        f"SteppingNet, TaggedNet or CompactNet, or a method object with export(k)) or a zoo "
                        f"model") from None


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


def dense(net, k: int) -> nn.Module:
    """Subnet ``k`` of any dyninfer object as a plain dense torch module (BatchNorm folded, eval
    mode), the one route every file format goes through: an incremental net's compacted prefix
    (:func:`subnet`), a method's own ``export(k)`` (non-uniform, baselines, doubly nested
    frontier cells), or a zoo model trained by ``dyninfer train`` (``k`` must be 1). An LC-Net
    chooses its network per input: it has no subnet k to export (``dyninfer.lcnet`` compiles it)."""
    if getattr(net, "picks_per_input", False):
        raise TypeError(f"a {type(net).__name__} picks its network per input: it has no subnet k to export as one "
                        f"dense module (an LC-Net runs through dyninfer.lcnet.LCRuntime; its static backbone is "
                        f"net.backbone)")
    exporter = getattr(net, "export", None)
    if callable(exporter):
        return exporter(_check_k(net, k)).eval()
    if isinstance(net, nn.Module) and hasattr(net, "dyninfer_config") and not hasattr(net, "num_subnets"):
        if k != 1:
            raise ValueError(f"a plain model has one network; k must be 1, got {k!r}")
        return fold_module(copy.deepcopy(net).eval())
    return subnet(net, k).eval()


def input_shape_of(net) -> tuple[int, ...]:
    """The (C, H, W) a dyninfer object takes."""
    shape = getattr(net, "input_shape", None) or getattr(net, "dyninfer_config", {}).get("input_shape")
    if shape is None:
        raise ValueError(f"cannot tell the input shape of a {type(net).__name__}")
    return tuple(shape)


def torchscript(net, k: int, path: str | Path | None = None, *, channels_last: bool = False) -> torch.jit.ScriptModule:
    """TorchScript of subnet ``k`` (traced and frozen); saved to ``path`` when given.

    ``channels_last=True`` stores the convolution weights channels_last (the faster layout on
    CPU); the module accepts either layout.
    """
    module = dense(net, k)
    example = torch.zeros(1, *input_shape_of(net))
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
    """One self-contained ONNX file of subnet ``k`` (needs the optional ``onnx`` extra); weights go
    to a ``.data`` sidecar only past protobuf's 2 GB limit. Export runs quietly: torch's exporter
    logs and warns about a dozen lines per call that say nothing about this model."""
    try:
        import onnx as _onnx  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx.export's dynamo exporter needs it)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"ONNX export needs the optional extra ({err.name} is missing): "
                          "pip install 'dyninfer[onnx]'") from None
    module = dense(net, k)
    example = torch.zeros(2, *input_shape_of(net))  # batch 2: a batch of 1 may be traced as a constant
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                              external_data=size >= 2 * 1024 ** 3)
    finally:
        logger.setLevel(level)
    return Path(path)
