"""A model as a small program of stages, read from any ``nn.Module`` with ``torch.fx``.

The tagged core (:mod:`dyninfer.nn.tagged`) runs every method on this program instead of on a
flat list, so residual networks and the zoo's plain stacks take the same path. The supported
vocabulary is deliberately small:

* ``layer``: a Conv2d (groups=1) or Linear, with the BatchNorm that directly follows it folded
  into the stage (its only reader);
* ``map``: a per-channel post op (ReLU, max/avg/adaptive-avg pooling, dropout, identity);
* ``flatten``: ``Flatten(1, -1)`` / ``torch.flatten(x, 1)``;
* ``add``: a residual add of two tensors (their channels are tied into one tag group);
* the zero-padded shortcut of CIFAR ResNets ("option A"), with the new channels at the END:
  ``F.pad(x, (0, 0, 0, 0, 0, p))``, optionally after ``x[:, :, ::s, ::s]``. The subsampling is
  read as ``MaxPool2d(1, s)`` (the same values) and the pad as a layer: a frozen 1x1 convolution
  whose weight is the identity over the old channels stacked on zeros for the new ones, so the
  old channels keep their positions and every method, compaction and export treats it as any
  projection shortcut. Its MACs (C_in x C_out per output position) are counted because they run.
  Padding before or around the old channels (the usual option A pads both sides) would move them
  into the middle and break prefix / causal order: refused with a message;
* the ``classifier``: the Linear whose output is the model's output.

Anything else is a ``ValueError`` naming the op and the fx node, so a user's own model either
converts exactly or says what stands in the way.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

MAP_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_SUPPORTED = ("Conv2d, Linear, BatchNorm, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout, add, "
              "zero-padded shortcut (F.pad of channels at the end, x[:, :, ::s, ::s])")


@dataclass(frozen=True)
class Node:
    """One stage: ``op`` in input | layer | map | flatten | add | classifier; ``args`` are the
    indices of the nodes it reads; ``index`` points into the program's layers (layer) or maps
    (map, flatten)."""

    op: str
    args: tuple[int, ...] = ()
    index: int = -1
    name: str = ""


@dataclass
class Program:
    """Nodes in execution order plus the modules they run (shared with the source model)."""

    nodes: list[Node] = field(default_factory=list)
    layers: list[nn.Module] = field(default_factory=list)   # hidden Conv2d / Linear
    norms: list[nn.Module] = field(default_factory=list)    # BatchNorm after each layer, or Identity
    maps: list[nn.Module] = field(default_factory=list)     # post ops (map and flatten nodes)
    classifier: nn.Linear | None = None

    @property
    def has_add(self) -> bool:
        return any(node.op == "add" for node in self.nodes)


def _unsupported(node: fx.Node, what: str) -> ValueError:
    return ValueError(f"{what} at fx node {node.name!r} is not supported in a tagged network; supported: {_SUPPORTED}")


def _module_op(program: Program, node: fx.Node, module: nn.Module, env: dict, users: dict) -> None:
    src = env[node.args[0]]
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"grouped convolutions (fx node {node.name!r}, groups={module.groups}) cannot carry "
                             f"per-neuron tags")
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise ValueError(f"Conv2d(padding_mode={module.padding_mode!r}) at fx node {node.name!r} is not supported; "
                             f"the tagged core pads with zeros")
        program.layers.append(module)
        program.norms.append(nn.Identity())
        program.nodes.append(Node("layer", (src,), len(program.layers) - 1, node.name))
    elif isinstance(module, NORMS):
        prev = program.nodes[src]
        producer = node.args[0]
        if prev.op != "layer" or len(users[producer]) != 1 or not isinstance(program.norms[prev.index], nn.Identity):
            raise ValueError(f"BatchNorm at fx node {node.name!r} must directly follow a Conv2d/Linear layer "
                             f"that nothing else reads")
        program.norms[prev.index] = module
        env[node] = src
        return
    elif isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise ValueError(f"only Flatten(1, -1) is supported, got Flatten({module.start_dim}, {module.end_dim}) "
                             f"at fx node {node.name!r}")
        program.maps.append(module)
        program.nodes.append(Node("flatten", (src,), len(program.maps) - 1, node.name))
    elif isinstance(module, MAP_MODULES):
        if isinstance(module, nn.ReLU) and module.inplace:
            module = nn.ReLU()  # kept pre-activations must survive the ReLU
        if isinstance(module, nn.MaxPool2d) and module.return_indices:
            raise _unsupported(node, "MaxPool2d(return_indices=True)")
        program.maps.append(module)
        program.nodes.append(Node("map", (src,), len(program.maps) - 1, node.name))
    else:
        raise _unsupported(node, f"module {type(module).__name__}")
    env[node] = len(program.nodes) - 1


def zero_pad_layer(channels: int, extra: int) -> nn.Conv2d:
    """The zero-padded shortcut's pad as a frozen 1x1 convolution: old channels first, unchanged,
    ``extra`` zero channels after them."""
    layer = nn.Conv2d(channels, channels + extra, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:channels, :, 0, 0] = torch.eye(channels)
    layer.weight.requires_grad_(False)
    return layer


def _channels_of(program: Program, index: int) -> int | None:
    """Channels of the tensor node ``index`` produces (None: the input image, unknown here)."""
    node = program.nodes[index]
    while node.op in ("map", "add"):
        node = program.nodes[node.args[0]]
    return program.layers[node.index].out_channels if node.op == "layer" else None


def _pad_op(program: Program, node: fx.Node, env: dict) -> None:
    src, spec = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    spec = tuple(spec) if isinstance(spec, (tuple, list)) else None
    if (spec is None or len(spec) != 6 or any(not isinstance(v, int) for v in spec) or mode != "constant"
            or value not in (None, 0, 0.0)):
        raise _unsupported(node, f"F.pad{tuple(node.args[1:])}: only a zero pad of channels, (0, 0, 0, 0, 0, p),")
    if spec[:4] != (0, 0, 0, 0) or spec[4] != 0 or spec[5] < 1:
        raise ValueError(f"the zero-padded shortcut at fx node {node.name!r} pads {spec[4]} channel(s) before and "
                         f"{spec[5]} after the old ones (and {spec[:4]} spatially); pad new channels at the END only, "
                         "F.pad(x, (0, 0, 0, 0, 0, p)), so the old channels keep their positions (prefix / causal "
                         "order)")
    channels = _channels_of(program, env[src])
    if channels is None:
        raise ValueError(f"the zero-padded shortcut at fx node {node.name!r} reads the input image; a tagged "
                         "shortcut pads a layer's output")
    program.layers.append(zero_pad_layer(channels, spec[5]))
    program.norms.append(nn.Identity())
    program.nodes.append(Node("layer", (env[src],), len(program.layers) - 1, node.name))
    env[node] = len(program.nodes) - 1


def _subsample_op(program: Program, node: fx.Node, env: dict) -> bool:
    """``x[:, :, ::s, ::s]`` as ``MaxPool2d(1, s)`` (identical values); False if the index is another."""
    index = node.args[1]
    full = slice(None, None, None)
    if not (isinstance(index, tuple) and len(index) == 4 and index[:2] == (full, full)
            and all(isinstance(i, slice) and i.start is None and i.stop is None for i in index[2:])):
        return False
    steps = [i.step or 1 for i in index[2:]]
    program.maps.append(nn.MaxPool2d(1, stride=tuple(steps)))
    program.nodes.append(Node("map", (env[node.args[0]],), len(program.maps) - 1, node.name))
    env[node] = len(program.nodes) - 1
    return True


def _function_op(program: Program, node: fx.Node, env: dict) -> None:
    fn = node.target
    name = getattr(fn, "__name__", str(fn))
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if fn is F.pad and tensors:
        return _pad_op(program, node, env)
    if fn is operator.getitem and tensors and _subsample_op(program, node, env):
        return None
    if fn in (operator.add, torch.add) and len(tensors) == 2 and not node.kwargs:
        program.nodes.append(Node("add", (env[tensors[0]], env[tensors[1]]), -1, node.name))
    elif fn in (F.relu, torch.relu) and len(tensors) == 1:
        program.maps.append(nn.ReLU())
        program.nodes.append(Node("map", (env[tensors[0]],), len(program.maps) - 1, node.name))
    elif fn is torch.flatten and len(tensors) == 1 and tuple(node.args[1:]) in ((1,), (1, -1)):
        program.maps.append(nn.Flatten())
        program.nodes.append(Node("flatten", (env[tensors[0]],), len(program.maps) - 1, node.name))
    else:
        raise _unsupported(node, f"function {name}")
    env[node] = len(program.nodes) - 1


def _method_op(program: Program, node: fx.Node, env: dict) -> None:
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if node.target == "relu" and len(tensors) == 1:
        program.maps.append(nn.ReLU())
        program.nodes.append(Node("map", (env[tensors[0]],), len(program.maps) - 1, node.name))
    elif node.target == "flatten" and tuple(node.args[1:]) in ((1,), (1, -1)):
        program.maps.append(nn.Flatten())
        program.nodes.append(Node("flatten", (env[tensors[0]],), len(program.maps) - 1, node.name))
    else:
        raise _unsupported(node, f"method .{node.target}()")
    env[node] = len(program.nodes) - 1


def trace(model: nn.Module) -> Program:
    """The program of ``model``: every supported op in order, the classifier last."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many types; the user needs to know which model and why
        raise ValueError(f"cannot convert {type(model).__name__} with torch.fx ({type(error).__name__}: {error}); "
                         f"its forward must be traceable with only these ops: {_SUPPORTED}") from None
    modules = dict(model.named_modules())
    users = {n: list(n.users) for n in graph.nodes}
    program, env = Program(), {}
    for node in graph.nodes:
        if node.op == "placeholder":
            if program.nodes:
                raise ValueError(f"a tagged network takes one input tensor; {type(model).__name__} has another "
                                 f"at fx node {node.name!r}")
            program.nodes.append(Node("input", (), -1, node.name))
            env[node] = 0
        elif node.op == "call_module":
            _module_op(program, node, modules[node.target], env, users)
        elif node.op == "call_function":
            _function_op(program, node, env)
        elif node.op == "call_method":
            _method_op(program, node, env)
        elif node.op == "output":
            _set_classifier(program, node, env, users)
        else:
            raise _unsupported(node, f"{node.op} {node.target}")
    return program


def _set_classifier(program: Program, node: fx.Node, env: dict, users: dict) -> None:
    out = node.args[0]
    last = program.nodes[env[out]] if isinstance(out, fx.Node) and out in env else None
    if (last is None or last.op != "layer" or not isinstance(program.layers[last.index], nn.Linear)
            or not isinstance(program.norms[last.index], nn.Identity) or len(users[out]) != 1
            or last.index != len(program.layers) - 1):
        raise ValueError("the model's output must be an nn.Linear classifier (no BatchNorm or op after it, read by "
                         "nothing else)")
    program.classifier = program.layers.pop()
    program.norms.pop()
    program.nodes[env[out]] = Node("classifier", last.args, len(program.layers), last.name)
