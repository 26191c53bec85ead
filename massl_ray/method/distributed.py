"""Tiny torch.distributed helpers; no-ops in a single process. Ray-free."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def identity_gather(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order (no gradient).

    Identity when there is no process group (or it has one process).
    """
    if not is_distributed():
        return x
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


def default_gather():
    """The gather a training step should use: all-gather under a process group, else identity."""
    return all_gather_cat if is_distributed() else identity_gather
