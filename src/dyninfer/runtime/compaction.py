"""Compaction: a tagged network turned into its inference form.

Channels of every layer are permuted so each subnet's channels are contiguous (sorted by tag),
the next layer's inputs are permuted to match, BatchNorm is folded into the weights, and for
every step s the dense block that computes step s's new outputs from all inputs available at
step s is stored once.  No masks and no index gathers remain in the hot path; pruned weights
stay as zeros inside the blocks (see :meth:`CompactNet.block_density`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dyninfer.nn.tagged import TaggedSequential


@dataclass
class CompactLayer:
    """One hidden layer in inference form."""

    kind: str                          # "conv" or "linear"
    step_weights: list[torch.Tensor]   # step s: (new rows of tag s, inputs with tag <= s)
    step_biases: list[torch.Tensor]
    prefix_weights: list[torch.Tensor]  # subnet k from scratch: (rows tag <= k, inputs tag <= k)
    prefix_biases: list[torch.Tensor]
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    post: nn.Module | None = None      # ReLU / pooling / flatten, shared by all steps

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            z = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        else:
            z = F.linear(x, weight, bias)
        return self.post(z) if self.post is not None else z


class CompactNet(nn.Module):
    """Inference form of a causal tagged network: ``forward(x, subnet)`` and per-step blocks."""

    def __init__(self, layers: list[CompactLayer], classifier_steps: list[torch.Tensor],
                 classifier_prefix: list[torch.Tensor], classifier_bias: torch.Tensor | None,
                 input_shape: tuple, num_subnets: int, density: list[float]):
        super().__init__()
        self.layers = layers
        self.classifier_steps = classifier_steps
        self.classifier_prefix = classifier_prefix
        self.classifier_bias = classifier_bias
        self.input_shape = tuple(input_shape)
        self.num_subnets = num_subnets
        self._density = density

    def block_density(self) -> list[float]:
        """Fraction of non-zero weights inside the stored step blocks, per layer (pruned = 0)."""
        return list(self._density)

    def forward(self, x: torch.Tensor, subnet: int | None = None) -> torch.Tensor:
        """Subnet k from scratch with dense prefix weights (one conv per layer)."""
        k = self.num_subnets if subnet is None else subnet
        if not 1 <= k <= self.num_subnets:
            raise ValueError(f"subnet must be in 1..{self.num_subnets}, got {subnet!r}")
        for layer in self.layers:
            x = layer.apply(x, layer.prefix_weights[k - 1], layer.prefix_biases[k - 1])
        return F.linear(x, self.classifier_prefix[k - 1], self.classifier_bias)

    def start(self, x: torch.Tensor, subnet: int = 1):
        from dyninfer.runtime.session import Session

        return Session(self, x, subnet)


def _folded(net: TaggedSequential, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked weight and bias of hidden layer i with its BatchNorm (eval statistics) folded in."""
    layer, norm = net.layers[i], net.norms[i]
    weight = layer.weight * net.weight_mask(i)
    bias = layer.bias if layer.bias is not None else torch.zeros(weight.shape[0])
    if isinstance(norm, (nn.BatchNorm2d, nn.BatchNorm1d)):
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = norm.bias if norm.bias is not None else torch.zeros_like(scale)
        weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
        bias = (bias - norm.running_mean) * scale + shift
    return weight, bias


@torch.no_grad()
def compact(net: TaggedSequential) -> CompactNet:
    """Permute channels by tag and store dense per-step and per-subnet weight blocks."""
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
            layer.stride if conv else (1, 1), layer.padding if conv else (0, 0),
            layer.dilation if conv else (1, 1), nn.Sequential(*post).eval() if post else None))
        repeat = net.in_repeat[i + 1]
        in_order = (order.unsqueeze(1) * repeat + torch.arange(repeat)).reshape(-1)
        in_bounds = [b * repeat for b in row_bounds]
    cls_weight = (net.classifier.weight * net.weight_mask(net.num_hidden))[:, in_order].contiguous()
    cls_steps = [cls_weight[:, in_bounds[s - 1]:in_bounds[s]].contiguous() for s in range(1, n + 1)]
    cls_prefix = [cls_weight[:, :in_bounds[s]].contiguous() for s in range(1, n + 1)]
    bias = net.classifier.bias.detach().clone() if net.classifier.bias is not None else None
    return CompactNet(layers, cls_steps, cls_prefix, bias, net.input_shape, n, density)
