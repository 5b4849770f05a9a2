"""Incremental sessions: answer with subnet k now, step up to k+1 later computing only what is new.

The cache holds, per layer, the inputs computed so far (channels sorted by tag, so they are a
contiguous prefix); a step runs each layer's step block on that prefix and appends the new
channels.  Logits of subnet k+1 are subnet k's logits plus the classifier's partial sum over the
new features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Session:
    """``run = net.start(x)``; ``run.logits``; ``run.step()``; ``run.step_down()``."""

    def __init__(self, net, x: torch.Tensor, subnet: int = 1):
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(net.input_shape):
            raise ValueError(f"expected input of shape (batch, {', '.join(map(str, net.input_shape))}), got {tuple(x.shape)}")
        if not 1 <= subnet <= net.num_subnets:
            raise ValueError(f"subnet must be in 1..{net.num_subnets}, got {subnet!r}")
        self.net = net
        self._inputs: list[torch.Tensor | None] = [x] + [None] * len(net.layers)
        self._logits: list[torch.Tensor] = []
        self.subnet = 0
        with torch.no_grad():
            while self.subnet < subnet:
                self.step()

    @property
    def logits(self) -> torch.Tensor:
        return self._logits[self.subnet - 1]

    @property
    def reached(self) -> int:
        """The largest subnet computed so far (its activations are cached)."""
        return len(self._logits)

    def can_step(self) -> bool:
        return self.subnet < self.net.num_subnets

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Subnet k -> k+1, computing only the neurons of step k+1; returns the new logits."""
        if not self.can_step():
            raise RuntimeError(f"already at the largest subnet ({self.net.num_subnets})")
        if self.subnet < self.reached:  # stepping back up after step_down: already computed
            self.subnet += 1
            return self.logits
        s = self.subnet  # 0-based index of the step being computed
        for i, layer in enumerate(self.net.layers):
            weight = layer.step_weights[s]
            if weight.shape[0] == 0:
                continue
            new = layer.apply(self._inputs[i], weight, layer.step_biases[s])
            old = self._inputs[i + 1]
            self._inputs[i + 1] = new if old is None else torch.cat([old, new], dim=1)
            if i == len(self.net.layers) - 1:
                self._new_features = new
        cls = self.net.classifier_steps[s]
        if cls.shape[1] > 0:
            part = F.linear(self._new_features, cls)
        else:
            part = torch.zeros(self._inputs[0].shape[0], cls.shape[0])
        if s == 0:
            logits = part if self.net.classifier_bias is None else part + self.net.classifier_bias
        else:
            logits = self._logits[-1] + part
        self._logits.append(logits)
        self.subnet += 1
        return logits

    def step_down(self) -> torch.Tensor:
        """Back to subnet k-1's answer, at no cost (its logits are kept)."""
        if self.subnet <= 1:
            raise RuntimeError("already at the smallest subnet")
        self.subnet -= 1
        return self.logits

    def cache_bytes(self) -> int:
        """Memory held by cached activations (layer inputs later steps read) and logits."""
        tensors = [t for t in self._inputs if t is not None] + self._logits
        return sum(t.numel() * t.element_size() for t in tensors)
