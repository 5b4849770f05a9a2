"""The common face of every method built on one tagged network.

Evaluation, plots, the compare harness, export and benchmarks talk to methods only through
``num_subnets``, ``mac_fractions()`` and ``forward(x, subnet=k)``; methods holding a
:class:`~dyninfer.nn.tagged.TaggedSequential` as ``self.net`` and the original network's MACs as
``self.reference_macs`` get that face from this mixin.
"""

from __future__ import annotations

import torch


class TaggedSubnets:
    """Mixin: subnet count, exact MACs and from-scratch forward of ``self.net``."""

    @property
    def num_subnets(self) -> int:
        return self.net.num_subnets

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.net.input_shape

    def macs(self) -> list[int]:
        """Exact MACs of each subnet (pruned weights excluded)."""
        return self.net.macs_per_subnet()

    def mac_fractions(self) -> list[float]:
        """MACs of each subnet / MACs of the original (unexpanded) network."""
        return [m / self.reference_macs for m in self.macs()]

    def subnet_macs(self, input_shape=None, subnet=None) -> int:
        return self.net.subnet_macs(input_shape, subnet)

    def forward(self, x: torch.Tensor, subnet: int | None = None) -> torch.Tensor:
        return self.net(x, subnet)
