"""Data sets kept as uint8 tensors, with batched augmentation and normalisation in torch ops.

Images live in memory as ``uint8`` NCHW tensors (CIFAR-10 is 150 MB that way); every batch is
augmented and normalised with a handful of vectorised ops instead of per-image PIL calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F


@dataclass
class ImageSet:
    """A labelled image set: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,).

    ``mean``/``std`` are per-channel statistics in [0, 1] units used for normalisation;
    ``augmentation`` names the training augmentation ("crop-flip" for CIFAR-like sets,
    "none" otherwise).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str = "custom"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    augmentation: str = "none"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor of shape (N, C, H, W); got dtype "
                f"{self.images.dtype} and shape {tuple(self.images.shape)}"
            )
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},) to match the images; "
                f"got {tuple(self.labels.shape)}"
            )
        channels = self.images.shape[1]
        if len(self.mean) == 1 and channels > 1:
            self.mean, self.std = self.mean * channels, self.std * channels
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} entries, got {self.mean} / {self.std}")
        if self.augmentation not in ("none", "crop-flip"):
            raise ValueError(f"augmentation must be 'none' or 'crop-flip', got {self.augmentation!r}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image: what models are built for."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        """The same set restricted to ``indices`` (statistics and augmentation kept)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return ImageSet(self.images[indices], self.labels[indices], self.num_classes, self.name,
                        self.mean, self.std, self.augmentation)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float batch -> normalised float32 batch."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: normalised float32 NCHW images and int64 labels.

        ``shard=(rank, world)`` gives each distributed rank a disjoint, equally long slice of
        the (shuffled) order, the same contract as torch's DistributedSampler.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if shard is not None:
            rank, world = shard
            if not 0 <= rank < world:
                raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
            per_rank = -(-n // world)
            order = torch.cat([order, order[: per_rank * world - n]])  # pad like DistributedSampler
            order = order[rank::world]
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            images = self.images[idx]
            if augment and self.augmentation == "crop-flip":
                images = crop_flip(images, generator=generator)
            yield self.normalize(images), self.labels[idx]


def crop_flip(images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding + random horizontal flip, batched (standard CIFAR).

    One padded copy of the batch, then a gather with per-image offsets: no Python loop over
    images.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    batch = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()
