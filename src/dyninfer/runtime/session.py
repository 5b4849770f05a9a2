"""Incremental sessions: answer with subnet k now, step up to k+1 later computing only what is new.

The cache holds, per layer, the inputs computed so far (channels sorted by tag, so they are a
contiguous prefix); a step runs each layer's step block on that prefix and writes the new
channels after it (into a buffer preallocated when the session starts).  Logits of subnet k+1
are subnet k's logits plus the classifier's partial sum over the new features, so the features
themselves are never cached.
"""

from __future__ import annotations

import torch

from dyninfer.checks import check_subnet


class AnytimeSession:
    """What every incremental session shares: kept logits per subnet, stepping up (replaying kept
    answers after ``step_down``) and stepping down at no cost. Subclasses compute one new step."""

    top_name = "largest subnet"
    bottom_name = "smallest subnet"

    def _begin(self, net, subnet: int) -> None:
        self.net = net
        self._logits: list[torch.Tensor] = []
        self.subnet = 0
        while self.subnet < subnet:
            self.step()

    def _compute_next(self) -> torch.Tensor:
        """Logits of subnet ``self.subnet + 1``, computed from what is cached."""
        raise NotImplementedError

    @property
    def logits(self) -> torch.Tensor:
        return self._logits[self.subnet - 1]

    @property
    def reached(self) -> int:
        """The largest subnet computed so far (its activations are cached)."""
        return len(self._logits)

    def can_step(self) -> bool:
        return self.subnet < self.net.num_subnets

    def step(self) -> torch.Tensor:
        """Subnet k -> k+1, computing only what is new; returns the new logits."""
        if self.subnet >= self.net.num_subnets:
            raise RuntimeError(f"already at the {self.top_name} ({self.net.num_subnets})")
        if self.subnet < len(self._logits):  # stepping back up after step_down: already computed
            self.subnet += 1
            return self._logits[self.subnet - 1]
        logits = self._compute_next()
        self._logits.append(logits)
        self.subnet += 1
        return logits

    def step_down(self) -> torch.Tensor:
        """Back to subnet k-1's answer, at no cost (its logits are kept)."""
        if self.subnet <= 1:
            raise RuntimeError(f"already at the {self.bottom_name}")
        self.subnet -= 1
        return self.logits


class Session(AnytimeSession):
    """``run = net.start(x)``; ``run.logits``; ``run.step()``; ``run.step_down()``."""

    def __init__(self, net, x: torch.Tensor, subnet: int = 1):
        net._check_input(x)
        check_subnet(subnet, net.num_subnets)
        self._state = net._new_state(x.detach())
        self._begin(net, subnet)

    def _compute_next(self) -> torch.Tensor:
        # no autograd context needed: the input is detached and compacted weights never require grad
        return self.net._step(self._state, self.subnet, self._logits[-1] if self._logits else None)

    def cache_bytes(self) -> int:
        """Memory held by the session: cached layer inputs (buffers at full width) and logits."""
        held = self.net.state_tensors(self._state) if hasattr(self.net, "state_tensors") else self._state
        tensors = [t for t in held if t is not None] + self._logits
        return sum(t.numel() * t.element_size() for t in tensors)
