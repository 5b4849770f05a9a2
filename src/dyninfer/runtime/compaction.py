"""Compaction: a tagged network turned into its inference form.

Channels of every layer are permuted so each subnet's channels are contiguous (sorted by tag),
the next layer's inputs are permuted to match, BatchNorm is folded into the weights, and for
every step s the dense block that computes step s's new outputs from all inputs available at
step s is stored once.  No masks and no index gathers remain in the hot path; pruned weights
stay as zeros inside the blocks (see :meth:`CompactNet.block_density`).

The hot path is prepared once per net (``_prepare``): weights converted to the chosen memory
format (channels_last by default: the biggest CPU lever, DESIGN.md "Real speed"), linear layers
that read a flattened channels_last activation get their columns permuted to (h, w, c) order so
the flatten is a view, and each subnet's from-scratch pass is a list of closures over
pre-converted tensors, so a call does no Python work beyond one closure per layer.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dyninfer.checks import check_input, check_subnet
from dyninfer.runtime.session import Session
from dyninfer.nn.tagged import TaggedNet, fold_batchnorm
from dyninfer.runtime.graph import CompactGraph

CACHE_MODES = ("buffer", "cat")


@dataclass
class CompactLayer:
    """One hidden layer in inference form (values in plain NCHW order, as exported)."""

    kind: str                          # "conv" or "linear"
    step_weights: list[torch.Tensor]   # step s: (new rows of tag s, inputs with tag <= s)
    step_biases: list[torch.Tensor]
    prefix_weights: list[torch.Tensor]  # subnet k from scratch: (rows tag <= k, inputs tag <= k)
    prefix_biases: list[torch.Tensor]
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    post: nn.Module | None = None      # ReLU / pooling / flatten, shared by all steps
    bounds: list[int] = field(default_factory=list)  # rows with tag <= s are [:bounds[s]]
    positions: int = 1                 # output positions per channel (H x W of a conv's output)

    def __post_init__(self) -> None:
        if not self.bounds:
            sizes = [w.shape[0] for w in self.step_weights]
            self.bounds = [sum(sizes[:s]) for s in range(len(sizes) + 1)]

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Reference (unprepared) evaluation of one block; the hot path does not use it."""
        if self.kind == "conv":
            z = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        else:
            z = F.linear(x, weight, bias)
        return self.post(z) if self.post is not None else z


def _nhwc_columns(weight: torch.Tensor, channels: list[int], repeat: int) -> torch.Tensor:
    """Columns of ``weight`` grouped in pieces of ``c * repeat`` (channel-major) -> (h, w, c) order.

    A channels_last activation of one piece flattens as a view in (h, w, c) order, so permuting
    the reading layer's columns once replaces a copy per call.
    """
    if repeat == 1:
        return weight.contiguous()
    out, start, pieces = weight.shape[0], 0, []
    for c in channels:
        block = weight[:, start:start + c * repeat]
        pieces.append(block.reshape(out, c, repeat).transpose(1, 2).reshape(out, repeat * c))
        start += c * repeat
    return torch.cat(pieces, dim=1).contiguous() if pieces else weight.contiguous()


def _post_fns(post: nn.Module | None, channels_last: bool) -> tuple[list[Callable], bool]:
    """Post ops as plain torch callables (in-place ReLU on fresh outputs); also whether it flattens."""
    fns: list[Callable] = []
    flattens = False
    for m in (list(post) if post is not None else []):
        if isinstance(m, nn.ReLU):
            fns.append(torch.relu_)
        elif isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise ValueError("MaxPool2d(return_indices=True) is not supported in the inference form")
            fns.append(functools.partial(torch.max_pool2d, kernel_size=m.kernel_size, stride=m.stride or m.kernel_size,
                                         padding=m.padding, dilation=m.dilation, ceil_mode=m.ceil_mode))
        elif isinstance(m, nn.AvgPool2d):
            fns.append(functools.partial(F.avg_pool2d, kernel_size=m.kernel_size, stride=m.stride or m.kernel_size,
                                         padding=m.padding, ceil_mode=m.ceil_mode,
                                         count_include_pad=m.count_include_pad, divisor_override=m.divisor_override))
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError(f"only Flatten(1, -1) is supported, got Flatten({m.start_dim}, {m.end_dim})")
            flattens = True
            fns.append(_flatten_nhwc if channels_last else _flatten_nchw)
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            continue
        else:
            raise ValueError(f"post op {type(m).__name__} is not supported in the inference form")
    return fns, flattens


def _flatten_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def _flatten_nhwc(x: torch.Tensor) -> torch.Tensor:
    # a view for channels_last tensors; the reading layer's columns are in (h, w, c) order
    return x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x


def _conv_fn(weight, bias, stride, padding, dilation, posts):
    conv = torch.conv2d
    if not posts:
        return lambda x: conv(x, weight, bias, stride, padding, dilation)
    if len(posts) == 1:
        p0 = posts[0]
        return lambda x: p0(conv(x, weight, bias, stride, padding, dilation))
    if len(posts) == 2:
        p0, p1 = posts
        return lambda x: p1(p0(conv(x, weight, bias, stride, padding, dilation)))

    def run(x):
        x = conv(x, weight, bias, stride, padding, dilation)
        for p in posts:
            x = p(x)
        return x

    return run


def _linear_fn(weight, bias, posts):
    linear = torch._C._nn.linear
    if not posts:
        return lambda x: linear(x, weight, bias)
    if len(posts) == 1:
        p0 = posts[0]
        return lambda x: p0(linear(x, weight, bias))

    def run(x):
        x = linear(x, weight, bias)
        for p in posts:
            x = p(x)
        return x

    return run


class CompactNet(nn.Module):
    """Inference form of a causal tagged network: ``forward(x, subnet)`` and per-step blocks.

    ``channels_last``: run convolutions in channels_last (default: yes when there are convs).
    ``cache``: how sessions keep conv activations, ``"cat"`` (``torch.cat`` onto the cache each
    step; default) or ``"buffer"`` (preallocated per session, new channels written by slice).
    A conv needs a contiguous input, so reading a slice of a buffer copies it anyway and "cat"
    measured as fast or faster; linear activations always live in a preallocated buffer, which
    BLAS reads by stride without any copy.
    """

    def __init__(self, layers: list[CompactLayer], classifier_steps: list[torch.Tensor],
                 classifier_prefix: list[torch.Tensor], classifier_bias: torch.Tensor | None,
                 input_shape: tuple, num_subnets: int, density: list[float], *,
                 macs: list[int] | None = None, in_repeat: list[int] | None = None,
                 channels_last: bool | None = None, cache: str = "cat"):
        super().__init__()
        self.layers = layers
        self.classifier_steps = classifier_steps
        self.classifier_prefix = classifier_prefix
        self.classifier_bias = classifier_bias
        self.input_shape = tuple(input_shape)
        self.num_subnets = num_subnets
        self._density = density
        self._macs = list(macs) if macs is not None else None
        has_conv = any(layer.kind == "conv" for layer in layers)
        self.channels_last = has_conv if channels_last is None else bool(channels_last and has_conv)
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        self.cache = cache
        if in_repeat is None:  # positions per channel of each layer's input (flatten multiplicity)
            in_repeat = [1]
            for i, layer in enumerate(layers):
                nxt = classifier_prefix[-1] if i + 1 == len(layers) else layers[i + 1].prefix_weights[-1]
                in_repeat.append(max(1, nxt.shape[1] // max(layer.bounds[-1], 1)))
        self.in_repeat = list(in_repeat)
        self.eval()
        self._prepare()

    # ------------------------------------------------------------------ public helpers
    def block_density(self) -> list[float]:
        """Fraction of non-zero weights inside the stored step blocks, per layer (pruned = 0)."""
        return list(self._density)

    def macs(self) -> list[int]:
        """Exact MACs of each subnet (live weights x output positions), as ``dyninfer.cost`` counts them."""
        if self._macs is None:
            raise ValueError("this CompactNet was built without MAC counts; build it with compact(net)")
        return list(self._macs)

    def step_macs(self) -> list[int]:
        """MACs of each step: subnet 1 from scratch, then the increments k -> k+1."""
        m = self.macs()
        return [m[0]] + [b - a for a, b in zip(m, m[1:])]

    def executed_step_macs(self) -> list[int]:
        """MACs each step really multiplies: whole dense blocks, pruned weights (stored as zeros)
        included. ``step_macs`` counts live weights only; the difference is the pruning the dense
        blocks do not exploit."""
        return [sum(layer.step_weights[s].numel() * layer.positions for layer in self.layers)
                + self.classifier_steps[s].numel() for s in range(self.num_subnets)]

    def with_options(self, *, channels_last: bool | None = None, cache: str | None = None) -> "CompactNet":
        """The same net (weights shared) prepared with another memory format or cache mode."""
        return CompactNet(self.layers, self.classifier_steps, self.classifier_prefix, self.classifier_bias,
                          self.input_shape, self.num_subnets, self._density, macs=self._macs,
                          in_repeat=self.in_repeat,
                          channels_last=self.channels_last if channels_last is None else channels_last,
                          cache=self.cache if cache is None else cache)

    def fingerprint(self) -> str:
        """Hash of the weights, block structure and execution options (keys latency caches)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.input_shape, self.num_subnets, self.channels_last, self.cache,
                       [(layer.kind, layer.bounds, layer.stride, layer.padding, layer.dilation, repr(layer.post))
                        for layer in self.layers])).encode())
        tensors = [t for layer in self.layers for t in (layer.prefix_weights[-1], layer.prefix_biases[-1])]
        tensors += [self.classifier_prefix[-1]] + ([self.classifier_bias] if self.classifier_bias is not None else [])
        for t in tensors:
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ hot path preparation
    def _check_subnet(self, subnet) -> int:
        return check_subnet(subnet, self.num_subnets)

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.input_shape)

    @torch.no_grad()
    def _prepare(self) -> None:
        cl = self.channels_last
        fmt = torch.channels_last if cl else torch.contiguous_format
        n, layers = self.num_subnets, self.layers
        self._format = fmt
        posts, flat = zip(*[_post_fns(layer.post, cl) for layer in layers]) if layers else ((), ())
        self._posts, self._flattens = list(posts), list(flat)

        def reads_nhwc(i: int) -> bool:  # layer i (or the classifier, i == len) reads a flattened CL conv output
            return cl and i > 0 and layers[i - 1].kind == "conv" and self._flattens[i - 1]

        def pieces(i: int, first: int, upto: int) -> list[int]:  # input channels of layer i, steps first..upto
            b = layers[i - 1].bounds
            return [b[s] - b[s - 1] for s in range(first, upto + 1)]

        def prep(i: int, w: torch.Tensor, sizes: Callable[[], list[int]]) -> torch.Tensor:
            if w.dim() == 4:  # explicit strides: .contiguous() keeps NCHW strides when C == 1 or H == W == 1,
                # and a conv then runs (and hands on) NCHW, mixing layouts
                return torch.empty_like(w, memory_format=fmt).copy_(w)
            if reads_nhwc(i):
                return _nhwc_columns(w, sizes(), self.in_repeat[i])
            return w.contiguous()

        # From scratch, a whole prefix flattens at once; a step's cache holds one piece per step.
        self._pw = [[prep(i, layer.prefix_weights[k], lambda i=i, k=k: [layers[i - 1].bounds[k + 1]])
                     for k in range(n)] for i, layer in enumerate(layers)]
        self._sw = [[prep(i, layer.step_weights[s], lambda i=i, s=s: pieces(i, 1, s + 1))
                     for s in range(n)] for i, layer in enumerate(layers)]
        last = len(layers)
        self._cls_prefix = [prep(last, w, lambda k=k: [layers[last - 1].bounds[k + 1]])
                            for k, w in enumerate(self.classifier_prefix)]
        self._cls_steps_t = [prep(last, w, lambda s=s: pieces(last, s + 1, s + 1)).t()
                             for s, w in enumerate(self.classifier_steps)]
        bias = self.classifier_bias
        self._cls_bias = bias.contiguous() if bias is not None else None

        def layer_fn(i: int, w: torch.Tensor, b: torch.Tensor):
            layer = layers[i]
            if layer.kind == "conv":
                return _conv_fn(w, b, tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), self._posts[i])
            return _linear_fn(w, b, self._posts[i])

        self._scratch = [[layer_fn(i, self._pw[i][k], layer.prefix_biases[k].contiguous())
                          for i, layer in enumerate(layers)] for k in range(n)]
        self._step_fns = [[(layer_fn(i, self._sw[i][s], layer.step_biases[s].contiguous())
                            if layer.step_weights[s].shape[0] > 0 else None)
                           for i, layer in enumerate(layers)] for s in range(n)]

        # Shapes of every layer's output for one sample (allocation of session buffers).
        x = torch.zeros(1, *self.input_shape).contiguous(memory_format=fmt)
        self._out_shapes = []
        for f in self._scratch[-1]:
            x = f(x)
            self._out_shapes.append(tuple(x.shape[1:]))
        # Input-feature bounds of layer i+1 per step (channels for conv inputs, features for linear)
        self._in_bounds = []
        for i, layer in enumerate(layers):
            shape = self._out_shapes[i]
            per = 1 if len(shape) == 3 else shape[0] // max(layer.bounds[-1], 1)
            self._in_bounds.append([b * per for b in layer.bounds])

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, subnet: int | None = None) -> torch.Tensor:
        """Subnet k from scratch with dense prefix weights (one op per layer and post op)."""
        k = self._check_subnet(subnet)
        self._check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for f in self._scratch[k - 1]:
            x = f(x)
        return torch._C._nn.linear(x, self._cls_prefix[k - 1], self._cls_bias)

    def start(self, x: torch.Tensor, subnet: int = 1):
        """Incremental session at ``subnet`` (see :class:`dyninfer.runtime.session.Session`)."""
        return Session(self, x, subnet)

    # ------------------------------------------------------------------ incremental steps
    def _new_state(self, x: torch.Tensor) -> list:
        """Per-session cache: the input, then each hidden layer's input (preallocated buffers)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        state: list = [x]
        batch = x.shape[0]
        for i in range(len(self.layers) - 1):
            shape = self._out_shapes[i]
            if len(shape) == 3 and self.cache == "cat":
                state.append(None)
            elif len(shape) == 3:
                state.append(torch.empty((batch, *shape), dtype=x.dtype, memory_format=self._format))
            else:
                state.append(torch.empty((batch, *shape), dtype=x.dtype))
        return state

    def _step(self, state: list, s: int, logits: torch.Tensor | None) -> torch.Tensor:
        """Compute step ``s`` (0-based: subnet s+1's new neurons) in place in ``state``; new logits."""
        fns = self._step_fns[s]
        last = len(fns) - 1
        new = None
        cat = self.cache == "cat"
        for i, f in enumerate(fns):
            if f is None:  # no new neurons in this layer at this step
                new = None
                continue
            if i == 0:
                inp = state[0]
            else:
                b = self._in_bounds[i - 1][s + 1]
                inp = state[i] if (cat and state[i].dim() == 4) else state[i][:, :b]
            new = f(inp)
            if i < last:
                lo, hi = self._in_bounds[i][s], self._in_bounds[i][s + 1]
                buf = state[i + 1]
                if buf is None:
                    state[i + 1] = new
                elif new.dim() == 4 and cat:
                    state[i + 1] = torch.cat([buf, new], dim=1)
                else:
                    buf[:, lo:hi].copy_(new)
        if new is None:  # no new features: subnet s+1 answers like subnet s
            if logits is not None:
                return logits
            base = self._cls_bias if self._cls_bias is not None else torch.zeros(())
            return base.expand(state[0].shape[0], self.classifier_prefix[0].shape[0]).clone()
        w_t = self._cls_steps_t[s]
        if logits is None:
            if self._cls_bias is None:
                return torch.mm(new, w_t)
            return torch.addmm(self._cls_bias, new, w_t)
        return torch.addmm(logits, new, w_t)


def _folded(net: TaggedNet, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked weight and bias of hidden layer i with its BatchNorm (eval statistics) folded in."""
    layer, norm = net.layers[i], net.norms[i]
    weight = layer.weight * net.weight_mask(i)
    bias = layer.bias if layer.bias is not None else torch.zeros(weight.shape[0])
    if isinstance(norm, (nn.BatchNorm2d, nn.BatchNorm1d)):
        if norm.running_var is None:
            raise ValueError(f"layer {i}'s BatchNorm keeps no running statistics, so it cannot be folded into "
                             f"the inference form (export it with net.dense(k))")
        weight, bias = fold_batchnorm(weight, bias, norm)
    return weight, bias


@torch.no_grad()
def compact(net: TaggedNet, *, channels_last: bool | None = None, cache: str = "cat") -> CompactNet | CompactGraph:
    """Permute channels by tag and store dense per-step and per-subnet weight blocks.

    A plain stack gets the chain-specialised :class:`CompactNet`; a residual network the
    :class:`~dyninfer.runtime.graph.CompactGraph` over its program of stages.

    Needs an incremental network (causal rule, shared BatchNorm); a ``full``-rule or
    switchable-BN network has no step blocks: export its subnets with ``net.dense(k)``.
    """
    if not getattr(net, "incremental", True):
        raise ValueError(f"compaction into step blocks needs the causal rule with shared BatchNorm; this network "
                         f"has rule={getattr(net, 'rule', None)!r}, switchable_bn={getattr(net, 'switchable_bn', None)}"
                         f" (export its subnets with net.dense(k))")
    if not net.chain:
        return CompactGraph(net, channels_last=channels_last)
    n = net.num_subnets
    in_order = torch.arange(net.input_shape[0])
    in_bounds = [net.input_shape[0]] * (n + 1)  # inputs with tag <= s are in_order[:in_bounds[s]]
    in_bounds[0] = 0
    layers, density = [], []
    for i in range(net.num_hidden):
        tags = net.tags(i)
        order = torch.cat([torch.nonzero(tags == s).squeeze(1) for s in range(1, n + 1)])
        row_bounds = [0] + [int((tags <= s).sum()) for s in range(1, n + 1)]
        weight, bias = _folded(net, i)
        weight = weight[order][:, in_order].contiguous()
        bias = bias[order].contiguous()
        steps_w, steps_b, pre_w, pre_b = [], [], [], []
        nonzero = elements = 0
        for s in range(1, n + 1):
            block = weight[row_bounds[s - 1]:row_bounds[s], :in_bounds[s]].contiguous()
            steps_w.append(block)
            steps_b.append(bias[row_bounds[s - 1]:row_bounds[s]].contiguous())
            pre_w.append(weight[:row_bounds[s], :in_bounds[s]].contiguous())
            pre_b.append(bias[:row_bounds[s]].contiguous())
            nonzero += int((block != 0).sum())
            elements += block.numel()
        density.append(nonzero / max(elements, 1))
        layer = net.layers[i]
        conv = isinstance(layer, nn.Conv2d)
        post = [m for m in net.posts[i] if not isinstance(m, nn.Dropout)]
        layers.append(CompactLayer(
            "conv" if conv else "linear", steps_w, steps_b, pre_w, pre_b,
            tuple(layer.stride) if conv else (1, 1),
            (layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)) if conv else (0, 0),
            tuple(layer.dilation) if conv else (1, 1), nn.Sequential(*post).eval() if post else None,
            row_bounds, int(net.out_positions[i])))
        repeat = net.in_repeat[i + 1]
        in_order = (order.unsqueeze(1) * repeat + torch.arange(repeat)).reshape(-1)
        in_bounds = [b * repeat for b in row_bounds]
    cls_weight = (net.classifier.weight * net.weight_mask(net.num_hidden))[:, in_order].contiguous()
    cls_steps = [cls_weight[:, in_bounds[s - 1]:in_bounds[s]].contiguous() for s in range(1, n + 1)]
    cls_prefix = [cls_weight[:, :in_bounds[s]].contiguous() for s in range(1, n + 1)]
    bias = net.classifier.bias.detach().clone() if net.classifier.bias is not None else None
    return CompactNet(layers, cls_steps, cls_prefix, bias, net.input_shape, n, density,
                      macs=net.macs_per_subnet(), in_repeat=list(net.in_repeat),
                      channels_last=channels_last, cache=cache)


def state_key(module: nn.Module) -> tuple:
    """Changes whenever any parameter or buffer of ``module`` is replaced or written in place."""
    return tuple((k, v.data_ptr(), v._version) for k, v in module.state_dict().items())


def cached_compact(owner) -> CompactNet | CompactGraph:
    """``compact(owner.net)``, kept on ``owner`` until its weights, tags or statistics change."""
    key = state_key(owner.net)
    if getattr(owner, "_compact_key", None) != key:
        owner._compact, owner._compact_key = compact(owner.net), key
    return owner._compact


def as_compact(net) -> CompactNet:
    """The inference form of a SteppingNet, TaggedNet, CompactNet or CompactGraph (cached by SteppingNet)."""
    if isinstance(net, (CompactNet, CompactGraph)):
        return net
    if hasattr(net, "compact") and callable(net.compact):
        return net.compact()
    if isinstance(net, TaggedNet):
        return compact(net)
    raise TypeError(f"expected a SteppingNet, TaggedNet, CompactNet or CompactGraph, got {type(net).__name__}")
