"""The common face of every method built on one tagged network.

Evaluation, plots, the compare harness, export and benchmarks talk to methods only through
``num_subnets``, ``mac_fractions()`` and ``forward(x, subnet=k)``; methods holding a
:class:`~dyninfer.nn.tagged.TaggedSequential` as ``self.net`` and the original network's MACs as
``self.reference_macs`` get that face from this mixin.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dyninfer import checkpoint as ckpt
from dyninfer import models
from dyninfer.nn.tagged import TaggedNet


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

    def _save_tagged(self, path: str | Path, kind: str, meta: dict) -> None:
        """safetensors (weights, tags, masks, BatchNorm) + JSON (``kind``, model, budgets, ``meta``)."""
        meta = {"kind": kind, "budgets": self.budgets, "reference_macs": self.reference_macs,
                "num_subnets": self.num_subnets, "input_shape": list(self.input_shape),
                "model": self.net.dyninfer_config, **meta}
        tensors = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ckpt.save(path, tensors, json.loads(json.dumps(meta, default=str)))


def load_tagged(path: str | Path, kind: str, **options) -> tuple[TaggedNet, dict]:
    """The tagged net saved at ``path`` by ``_save_tagged(kind=...)`` (rebuilt from its zoo model and
    ``options``: the rule and BatchNorm), in eval mode, and the saved metadata."""
    tensors, meta = ckpt.load(path)
    if meta.get("kind") != kind:
        raise ValueError(f"{path} is not a {kind} checkpoint (kind={meta.get('kind')!r})")
    spec = meta["model"]
    model = models.create(spec["name"], num_classes=spec["num_classes"], expansion=spec["expansion"],
                          input_shape=tuple(spec["input_shape"]))
    net = TaggedNet(model, meta["num_subnets"], tuple(meta["input_shape"]), **options)
    net.load_state_dict(tensors)
    return net.eval(), meta
