"""Tiny torch.distributed helpers; no-ops in a single process. Ray-free."""

from __future__ import annotations

import math
from typing import Optional

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


def _flatten(obj, tensors: list):
    """``obj`` with every tensor replaced by its index in ``tensors`` (appended)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorSlot(len(tensors) - 1)
    if isinstance(obj, dict):
        return _same_dict(obj, {k: _flatten(v, tensors) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        out = [_flatten(v, tensors) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def _unflatten(obj, tensors: list):
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return _same_dict(obj, {k: _unflatten(v, tensors) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        out = [_unflatten(v, tensors) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def _same_dict(like: dict, items: dict) -> dict:
    """``items`` in ``like``'s dict type (a module's OrderedDict state dict keeps its type and
    its ``_metadata``, which ``load_state_dict`` reads)."""
    if type(like) is dict:
        return items
    out = type(like)(items)
    if hasattr(like, "_metadata"):
        out._metadata = like._metadata
    return out


class _TensorSlot:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return (_TensorSlot, (self.index,))


def broadcast_object(obj, src: int = 0):
    """A small picklable object from rank ``src`` to every rank (identity in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_state(state, src: int = 0, device: Optional[torch.device] = None):
    """A (nested dict/list) training state held by rank ``src`` (``None`` elsewhere, or ``None``
    everywhere for "no state"), delivered to every rank over the process group: the structure
    and plain values once (pickled, small), then the tensors in one flat buffer per dtype.
    Returns CPU tensors. ``device``: where the buffers travel (the process group's device:
    CUDA for NCCL, CPU for gloo). Identity in one process."""
    if not is_distributed():
        return state
    me = dist.get_rank()
    tensors: list = []
    skeleton = _flatten(state, tensors) if me == src else None
    if me == src:
        specs = [(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in tensors]
    else:
        specs = None
    skeleton, specs = broadcast_object((skeleton, specs), src)
    if skeleton is None:
        return None
    device = device or torch.device("cpu")
    by_dtype: dict[str, list[int]] = {}
    for i, (dt, _) in enumerate(specs):
        by_dtype.setdefault(dt, []).append(i)
    out: list = [None] * len(specs)
    for dt, idx in sorted(by_dtype.items()):
        dtype = getattr(torch, dt)
        sizes = [math.prod(specs[i][1]) for i in idx]
        if me == src:
            flat = torch.cat([tensors[i].detach().reshape(-1).to(device) for i in idx]) \
                if sum(sizes) else torch.empty(0, dtype=dtype, device=device)
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        if dtype == torch.bool:  # not every backend reduces/broadcasts bool: travel as uint8
            view = flat.to(torch.uint8)
            dist.broadcast(view, src=src)
            flat = view.to(torch.bool)
        else:
            dist.broadcast(flat, src=src)
        flat = flat.cpu()
        for i, part in zip(idx, torch.split(flat, sizes)):
            out[i] = tensors[i] if me == src else part.reshape(specs[i][1]).clone()
    return _unflatten(skeleton, out)
