"""The non-parametric memory: a FIFO queue of K unit-norm teacher embeddings. Ray-free."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from massl_ray.method.distributed import identity_gather


class MemoryBank(nn.Module):
    """K x D unit rows and a FIFO pointer, both buffers (so both are in ``state_dict``).

    Every worker holds an identical replica: the rows start from the same seed and each step
    writes the same all-gathered keys (``gather`` is injected: identity in one process,
    ``distributed.all_gather_cat`` under a process group).
    """

    def __init__(self, size: int, dim: int, seed: int = 0,
                 gather: Callable[[torch.Tensor], torch.Tensor] = identity_gather):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"memory size ({size}) and dim ({dim}) must be positive")
        g = torch.Generator().manual_seed(seed)
        rows = F.normalize(torch.randn(size, dim, generator=g), dim=1)
        self.register_buffer("rows", rows)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.gather = gather

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    @torch.no_grad()
    def update(self, keys: torch.Tensor) -> torch.Tensor:
        """Gather ``keys`` [B, D] from all workers and write them FIFO; returns the gathered keys."""
        keys = self.gather(keys.detach())
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot write {n} keys into a memory of {self.size} rows")
        # Slot indices computed on the device: no host sync for the pointer (wraps modulo K).
        idx = (self.ptr + torch.arange(n, device=self.rows.device)).remainder_(self.size)
        self.rows.index_copy_(0, idx, keys.to(self.rows.dtype))
        self.ptr.add_(n).remainder_(self.size)
        return keys

    @torch.no_grad()
    def checksum(self) -> torch.Tensor:
        """A float64 fingerprint of rows + pointer, for comparing replicas across workers."""
        return memory_checksum(self.rows, self.ptr)


@torch.no_grad()
def memory_checksum(rows: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    """[3] float64: two position-weighted sums of the rows (weights never zero, with periods
    9973 and 10007, so a change or a swap of elements is seen) and the pointer."""
    flat = rows.double().flatten()
    idx = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64)
    w1 = idx.remainder(9973) + 1
    w2 = idx.remainder(10007) + 1
    return torch.stack([(flat * w1).sum(), (flat * w2).sum(), ptr.double().to(flat.device)])


def block_permutation(size: int, block_size: int, generator: torch.Generator,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """A random partition of ``size`` slots into blocks: LongTensor [size // block_size, block_size].

    Drawn on ``device`` from ``generator`` (which must live on that device), so no host
    round-trip and a seed reproduces it.
    """
    if block_size <= 0 or size % block_size != 0:
        raise ValueError(f"memory size {size} is not divisible by block size {block_size}")
    perm = torch.randperm(size, generator=generator, device=device or generator.device)
    return perm.view(size // block_size, block_size)
