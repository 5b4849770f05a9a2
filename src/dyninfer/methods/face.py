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
from dyninfer import cost, models
from dyninfer.checks import check_path
from dyninfer.nn.tagged import TaggedNet


class TaggedSubnets:
    """Mixin: subnet count, exact MACs and from-scratch forward of ``self.net``."""

    @property
    def num_subnets(self) -> int:
        return self.net.num_subnets

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.net.input_shape

    def macs(self, path: str = "incremental") -> list[int]:
        """MACs of each subnet along ``path``.

        ``"incremental"``: live weights the subnet's own blocks hold (pruned weights and, under
        the causal rule, the forbidden upper blocks excluded): what stepping 1 -> k needs (the
        dense step blocks multiply pruned weights too, as zeros: ``CompactNet.executed_step_macs``).
        ``"scratch"``: what one from-scratch execution of the subnet multiplies, i.e. the dense
        rectangles ``dy.export.subnet(net, k)`` and ``self.net.dense(k)`` run, the zero upper
        blocks of a causal net and pruned weights included. Under the full rule there is no
        incremental path and the two agree up to pruning.
        """
        if check_path(path) == "incremental":
            return self.net.macs_per_subnet()
        return [cost.macs(self.net.dense(k), self.input_shape) for k in range(1, self.num_subnets + 1)]

    def mac_fractions(self, path: str = "incremental") -> list[float]:
        """MACs of each subnet along ``path`` (see :meth:`macs`) / MACs of the original network."""
        return [m / self.reference_macs for m in self.macs(path)]

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
