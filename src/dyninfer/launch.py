"""A command under torchrun: one process group for the whole command, and one writer.

``torchrun --nproc-per-node 2 -m dyninfer construct ... --out D`` starts the command once per rank.
Every training loop in the command then runs data-parallel through :func:`dyninfer.train.fit`.
Rank 0 owns ``D`` (its checks, its lock, every file written there). Each other rank works in a
private copy of ``D`` made before any rank starts, so all ranks see the same checkpoints and make
the same resume decisions, and what they write is thrown away at the end. Their standard output
is silenced; their errors still reach standard error. A command without ``--out`` (eval, info,
bench, ...) trains nothing: rank 0 runs it alone. When a rank fails, it leaves without waiting for
the others, and torchrun stops them.

Tested with gloo on CPUs. On GPUs (nccl) each rank takes ``cuda:LOCAL_RANK``; the methods' own
tensors (teachers, importance batches) are not yet moved to the device, so GPU torchrun is
untested.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from dyninfer.runs import LOCK_NAME

__all__ = ["Ranks"]


class Ranks:
    """The command's place among torchrun's ranks (one rank, rank 0, outside torchrun)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.owns_group = False
        self._released = False
        self._private: Path | None = None
        self.device = torch.device("cpu")
        if self.world > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
                self.owns_group = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() == "nccl":  # nccl talks through CUDA tensors only
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count())))
                torch.cuda.set_device(self.device)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def release(self, ok: bool) -> None:
        """Rank 0: tell the others whether ``--out`` is ready (checked and locked); then wait
        until each has copied it."""
        if self.world <= 1 or self._released:
            return
        self._released = True
        flag = torch.tensor([1 if ok else 0], device=self.device)
        dist.broadcast(flag, src=0)
        if ok:
            dist.barrier()

    def private_copy(self, out: str | os.PathLike) -> Path:
        """Ranks > 0: wait for rank 0's ``--out``, copy it, and return the copy to work in."""
        flag = torch.tensor([0], device=self.device)
        dist.broadcast(flag, src=0)
        if not flag.item():
            raise RuntimeError(f"rank 0 stopped before the work (its error names why); rank {self.rank} stops too")
        self._private = Path(tempfile.mkdtemp(prefix=f"dyninfer-rank{self.rank}-"))
        source = Path(out)
        if source.is_dir():
            shutil.copytree(source, self._private, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(LOCK_NAME))
        dist.barrier()
        return self._private

    def close(self, ok: bool = True) -> None:
        """End the command's part in the group. After a failure (``ok=False``) no barrier: the
        others may be inside a collective this rank will never join; torchrun stops them when
        this process exits with an error."""
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
        if self.owns_group and dist.is_initialized():
            if ok:
                with contextlib.suppress(RuntimeError):
                    dist.barrier()  # no rank leaves while another still talks to it
            dist.destroy_process_group()
