"""Encoded image rows -> fixed-shape uint8 multi-crop views. Ray-free.

:func:`make_views` is the one decode + multi-crop function: the Ray Data pipeline runs it
inside ``map_batches`` on CPU workers, and the local (in-process) mode runs it directly through
:func:`local_view_batches`. Undecodable rows are dropped and handed to a report, never a crash.
"""

from __future__ import annotations

import os
import threading
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from massl_ray.config import CropConfig
from massl_ray.data.multicrop import MultiCrop
from massl_ray.data.sources import Source, iter_rows, row_id


class DecodeReport:
    """Unique undecodable rows (id -> reason). Used in-process or as a Ray actor."""

    def __init__(self, max_examples: int = 10000):
        self.bad: dict[str, str] = {}
        self.max_examples = max_examples
        self.overflow = 0
        self._lock = threading.Lock()

    def record(self, items: Sequence[tuple[str, str]]) -> None:
        with self._lock:
            for rid, reason in items:
                if rid in self.bad:
                    continue
                if len(self.bad) < self.max_examples:
                    self.bad[rid] = reason
                else:
                    self.overflow += 1

    def count(self) -> int:
        return len(self.bad) + self.overflow

    def summary(self) -> dict:
        return {"skipped": self.count(), "rows": dict(self.bad)}


def empty_views(crops: CropConfig) -> dict:
    g, l, n = crops.global_size, crops.local_size, crops.num_local_crops
    return {
        "global_crops": np.zeros((0, 2, 3, g, g), np.uint8),
        "local_crops": np.zeros((0, n, 3, l, l), np.uint8),
    }


def make_views(images: Sequence[bytes], ids: Sequence[Optional[str]], multicrop: MultiCrop,
               generator: torch.Generator,
               labels: Optional[np.ndarray] = None) -> tuple[dict, list[tuple[str, str]]]:
    """Decode + multi-crop a batch. Returns (columns, bad rows as (id, reason))."""
    good, keep, bad = [], [], []
    for i, data in enumerate(images):
        data = bytes(data) if data is not None else b""
        img, reason = multicrop.decode(data)  # reduced pixels + full size, training cap
        if img is None:
            bad.append((row_id(data, ids[i]), reason or "undecodable"))
            continue
        good.append(img)
        keep.append(i)
    if not good:
        out = empty_views(multicrop.cfg)
    else:
        g, l = multicrop(good, generator)
        out = {"global_crops": g.numpy(), "local_crops": l.numpy()}
    if labels is not None:
        out["label"] = np.asarray(labels)[keep].astype(np.int64)
    return out, bad


def batch_generator(seed: Optional[int], *key: int) -> torch.Generator:
    """A generator seeded from (seed, key...) or, with seed None, from OS entropy."""
    g = torch.Generator()
    if seed is None:
        g.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    else:
        h = seed
        for k in key:
            h = (h * 1_000_003 + k + 1) % (1 << 63)
        g.manual_seed(h)
    return g


def local_view_batches(src: Source, crops: CropConfig, batch_size: int, epoch: int,
                       seed: int, shuffle: str = "full", limit: Optional[int] = None,
                       report: Optional[DecodeReport] = None,
                       decode_batch_size: int = 64) -> Iterator[dict]:
    """In-process stream of one epoch: dicts of uint8 tensors with exactly ``batch_size`` rows
    (the last partial batch is dropped). Deterministic for a given (seed, epoch)."""
    n = src.num_rows if limit is None else min(limit, src.num_rows)
    order = None
    if shuffle != "none":
        order = np.random.default_rng([seed, epoch]).permutation(n)
    mc = MultiCrop(crops)
    buf: dict[str, list] = {}
    buffered = 0
    for bi, rows in enumerate(iter_rows(src, limit=n, order=order, batch_rows=decode_batch_size)):
        out, bad = make_views(rows["image"], rows["id"], mc, batch_generator(seed, epoch, bi),
                              rows["label"])
        if bad and report is not None:
            report.record(bad)
        for k, v in out.items():
            buf.setdefault(k, []).append(v)
        buffered += len(out["global_crops"])
        while buffered >= batch_size:
            cat = {k: np.concatenate(v) for k, v in buf.items()}
            yield {k: torch.from_numpy(v[:batch_size]) for k, v in cat.items()}
            buf = {k: [v[batch_size:]] for k, v in cat.items()}
            buffered -= batch_size
