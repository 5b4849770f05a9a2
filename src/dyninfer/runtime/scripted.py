"""The whole incremental network as one TorchScript module, for deployments without dyninfer.

``m = torch.jit.load(path)``, then

* ``m(x, k)``: logits of subnet k from scratch;
* ``logits, state = m.start(x)``: subnet 1, with the activations later steps reuse in ``state``;
* ``logits, state = m.step(state, logits, k)``: subnet k -> k+1, computing only what is new;
* ``m.steps(x, k)``: the logits of subnets 1..k, by stepping.

It runs the same prepared blocks (memory format, permuted columns) as
:class:`dyninfer.runtime.compaction.CompactNet`, so its outputs equal the library's.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

# post op codes: [RELU], [MAXPOOL, kh, kw, sh, sw, ph, pw, dh, dw, ceil],
# [AVGPOOL, kh, kw, sh, sw, ph, pw, ceil, count_include_pad, divisor or 0], [FLATTEN]
RELU, MAXPOOL, AVGPOOL, FLATTEN = 0, 1, 2, 3


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _post_codes(post: nn.Module | None) -> list[list[int]]:
    codes: list[list[int]] = []
    for m in (list(post) if post is not None else []):
        if isinstance(m, nn.ReLU):
            codes.append([RELU])
        elif isinstance(m, nn.MaxPool2d):
            codes.append([MAXPOOL, *_pair(m.kernel_size), *_pair(m.stride or m.kernel_size), *_pair(m.padding),
                          *_pair(m.dilation), int(m.ceil_mode)])
        elif isinstance(m, nn.AvgPool2d):
            codes.append([AVGPOOL, *_pair(m.kernel_size), *_pair(m.stride or m.kernel_size), *_pair(m.padding),
                          int(m.ceil_mode), int(m.count_include_pad), int(m.divisor_override or 0)])
        elif isinstance(m, nn.Flatten):
            codes.append([FLATTEN])
        elif not isinstance(m, (nn.Identity, nn.Dropout)):
            raise ValueError(f"post op {type(m).__name__} cannot be exported")
    return codes


class IncrementalScript(nn.Module):
    """Scriptable stepping network built from a :class:`CompactNet` (see the module docstring)."""

    num_subnets: int
    channels_last: bool
    kinds: List[int]
    conv_args: List[List[int]]
    posts: List[List[List[int]]]
    prefix_w: List[List[Tensor]]
    prefix_b: List[List[Tensor]]
    step_w: List[List[Tensor]]
    step_b: List[List[Tensor]]
    has_rows: List[List[bool]]
    cls_prefix: List[Tensor]
    cls_steps_t: List[Tensor]
    cls_bias: Tensor
    input_shape: List[int]

    def __init__(self, cnet):
        super().__init__()
        layers = cnet.layers
        self.num_subnets = int(cnet.num_subnets)
        self.channels_last = bool(cnet.channels_last)
        self.input_shape = [int(v) for v in cnet.input_shape]
        self.kinds = [0 if layer.kind == "conv" else 1 for layer in layers]
        self.conv_args = [_pair(layer.stride) + _pair(layer.padding) + _pair(layer.dilation) for layer in layers]
        self.posts = [_post_codes(layer.post) for layer in layers]
        self.prefix_w = [list(ws) for ws in cnet._pw]
        self.prefix_b = [[b.contiguous() for b in layer.prefix_biases] for layer in layers]
        self.step_w = [list(ws) for ws in cnet._sw]
        self.step_b = [[b.contiguous() for b in layer.step_biases] for layer in layers]
        self.has_rows = [[w.shape[0] > 0 for w in layer.step_weights] for layer in layers]
        self.cls_prefix = list(cnet._cls_prefix)
        self.cls_steps_t = list(cnet._cls_steps_t)
        bias = cnet._cls_bias
        self.cls_bias = bias if bias is not None else torch.zeros(cnet.classifier_prefix[0].shape[0])

    def _post(self, x: Tensor, i: int) -> Tensor:
        for p in self.posts[i]:
            op = p[0]
            if op == 0:  # RELU
                x = torch.relu(x)
            elif op == 1:  # MAXPOOL
                x = torch.max_pool2d(x, [p[1], p[2]], [p[3], p[4]], [p[5], p[6]], [p[7], p[8]], p[9] == 1)
            elif op == 2:  # AVGPOOL
                divisor: Optional[int] = None
                if p[9] > 0:
                    divisor = p[9]
                x = torch.nn.functional.avg_pool2d(x, [p[1], p[2]], [p[3], p[4]], [p[5], p[6]], p[7] == 1,
                                                   p[8] == 1, divisor)
            else:
                if x.dim() == 4 and self.channels_last:
                    x = x.permute(0, 2, 3, 1).flatten(1)
                else:
                    x = x.flatten(1)
        return x

    def _layer(self, x: Tensor, w: Tensor, b: Tensor, i: int) -> Tensor:
        if self.kinds[i] == 0:
            a = self.conv_args[i]
            z = torch.conv2d(x, w, b, [a[0], a[1]], [a[2], a[3]], [a[4], a[5]])
        else:
            z = torch.nn.functional.linear(x, w, b)
        return self._post(z, i)

    def _check(self, x: Tensor, subnet: int) -> Tensor:
        if subnet < 1 or subnet > self.num_subnets:
            raise ValueError("subnet must be in 1..num_subnets")
        if x.dim() != 4 or list(x.shape[1:]) != self.input_shape:
            raise ValueError("expected input of shape (batch, *input_shape)")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Tensor, subnet: int) -> Tensor:
        """Logits of subnet ``subnet`` (1-based) computed from scratch."""
        x = self._check(x, subnet)
        for i in range(len(self.kinds)):
            x = self._layer(x, self.prefix_w[i][subnet - 1], self.prefix_b[i][subnet - 1], i)
        return torch.nn.functional.linear(x, self.cls_prefix[subnet - 1], self.cls_bias)

    @torch.jit.export
    def start(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """Subnet 1's logits and the session state (the input, then each hidden layer's input)."""
        x = self._check(x, 1)
        state: List[Tensor] = [x]
        for i in range(len(self.kinds) - 1):
            state.append(torch.empty(0))
        return self._advance(state, torch.empty(0), 0)

    @torch.jit.export
    def step(self, state: List[Tensor], logits: Tensor, subnet: int) -> Tuple[Tensor, List[Tensor]]:
        """From subnet ``subnet`` (its ``logits`` and ``state``) to subnet ``subnet + 1``."""
        if subnet < 1 or subnet >= self.num_subnets:
            raise ValueError("can step only from subnets 1..num_subnets-1")
        return self._advance(list(state), logits, subnet)

    def _advance(self, state: List[Tensor], logits: Tensor, s: int) -> Tuple[Tensor, List[Tensor]]:
        last = len(self.kinds) - 1
        new = torch.empty(0)
        have = False
        for i in range(len(self.kinds)):
            if not self.has_rows[i][s]:
                have = False
                continue
            new = self._layer(state[i], self.step_w[i][s], self.step_b[i][s], i)
            have = True
            if i < last:
                if s == 0:
                    state[i + 1] = new
                else:
                    state[i + 1] = torch.cat([state[i + 1], new], 1)
        if not have:
            if s == 0:
                return self.cls_bias.expand(state[0].shape[0], self.cls_bias.shape[0]).clone(), state
            return logits, state
        if s == 0:
            return torch.addmm(self.cls_bias, new, self.cls_steps_t[s]), state
        return torch.addmm(logits, new, self.cls_steps_t[s]), state

    @torch.jit.export
    def steps(self, x: Tensor, upto: int) -> List[Tensor]:
        """Logits of subnets 1..``upto``, each step reusing everything computed before it."""
        logits, state = self.start(x)
        out: List[Tensor] = [logits]
        for k in range(1, upto):
            logits, state = self.step(state, logits, k)
            out.append(logits)
        return out
