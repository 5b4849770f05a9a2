"""Channel importance as objects (Torch-Pruning style): ``importance(net) -> [scores per tag group]``.

One score per channel of every tag group of a :class:`~dyninfer.nn.tagged.TaggedNet`. Where a
residual add ties several layers into one group, a channel is scored over all the layers that
write it, so both sides of the add are kept or dropped together. The allocation machinery
(:mod:`dyninfer.methods.allocate`) takes any such object; SteppingNet's first-order score (Eq. 3)
is :func:`dyninfer.methods.stepping.importance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dyninfer.nn.tagged import SwitchableBatchNorm, TaggedNet

__all__ = ["FilterNorm", "BatchNormScale", "IMPORTANCES", "group_lasso"]


@dataclass(frozen=True)
class FilterNorm:
    """Group-lasso importance: the L2 norm of each channel's output filters (in every writer layer)."""

    name: str = "filter-norm"

    @torch.no_grad()
    def __call__(self, net: TaggedNet) -> list[torch.Tensor]:
        squares = [torch.zeros(w, dtype=net.classifier.weight.dtype) for w in net.widths()]
        for i, layer in enumerate(net.layers):
            squares[net.layer_group[i]] += layer.weight.detach().flatten(1).pow(2).sum(1).cpu()
        return [s.sqrt() for s in squares]


@dataclass(frozen=True)
class BatchNormScale:
    """Network-slimming importance: |gamma| of each channel's BatchNorm, summed over writer layers
    (with switchable BN, averaged over the subnets' copies)."""

    name: str = "bn-scale"

    @torch.no_grad()
    def __call__(self, net: TaggedNet) -> list[torch.Tensor]:
        scores = [torch.zeros(w, dtype=net.classifier.weight.dtype) for w in net.widths()]
        seen = [False] * net.num_groups
        for i, norm in enumerate(net.norms):
            copies = list(norm.choices) if isinstance(norm, SwitchableBatchNorm) else [norm]
            gammas = [m.weight for m in copies if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
                      and m.weight is not None]
            if gammas:
                g = net.layer_group[i]
                scores[g] += torch.stack([w.detach().abs().cpu() for w in gammas]).mean(0)
                seen[g] = True
        missing = [g for g, ok in enumerate(seen) if not ok]
        if missing:
            raise ValueError(f"bn-scale importance needs an affine BatchNorm after a layer of every tag group; "
                             f"groups {missing} have none (use filter-norm)")
        return scores


IMPORTANCES = {"filter-norm": FilterNorm(), "bn-scale": BatchNormScale()}


def group_lasso(net: TaggedNet) -> torch.Tensor:
    """sum over channels of the L2 norm of their filters (all writer layers): the sparsity penalty
    whose minimisation drives whole channels to zero (structured sparsity, group lasso)."""
    squares = [None] * net.num_groups
    for i, layer in enumerate(net.layers):
        g = net.layer_group[i]
        s = layer.weight.flatten(1).pow(2).sum(1)
        squares[g] = s if squares[g] is None else squares[g] + s
    return sum((s + 1e-12).sqrt().sum() for s in squares)
