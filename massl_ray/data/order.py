"""Index-keyed data order: which rows, and which crops, every (epoch, step, rank) gets. Ray-free.

The exact data order (``data.order=exact``, the default) makes the data position a pure
function of the global step, so a checkpoint's ``global_step`` *is* the data position:

- each epoch has a seeded permutation of the row indices (:func:`epoch_order`), the same in
  every process that computes it;
- global step ``s`` of an epoch takes the next ``world x batch`` rows of that permutation, rank
  ``r`` the ``r``-th slice of ``batch`` rows (:func:`step_rows`): the ranks' rows are disjoint
  and an epoch sees ``steps_per_epoch x world x batch`` distinct rows, none twice;
- the crops of a step come from a generator seeded by (seed, epoch, step, rank).

A run resumed at global step ``g`` (after a SIGKILL, a driver restart, on another machine)
therefore decodes exactly the batches the uninterrupted run would have seen from ``g`` on,
without reading the skipped rows. :class:`RowStore` fetches encoded rows by index (Parquet row
groups through a bounded cache, or one file per row for image folders) and
:func:`step_batch` turns one step's rows into its views. The local mode calls it in-process;
on Ray, decode tasks call it (``massl_ray.data.pipeline.build_step_dataset``).

Undecodable rows are skipped and reported; the batch keeps its size by repeating decodable rows
of the same step (so the step-to-rows map never shifts). A step whose rows are all undecodable
takes the next rows of the epoch's order.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from massl_ray.config import CropConfig
from massl_ray.data.multicrop import MultiCrop
from massl_ray.data.sources import Source, parquet_row_id
from massl_ray.data.views import DecodeReport, batch_generator, make_views

# shuffle=blocks: rows are permuted within windows of this many consecutive chunks (Parquet row
# groups, or runs of FOLDER_CHUNK_ROWS files), after the chunk order itself is permuted. A decode
# task then touches a few row groups per step instead of one per row.
BLOCK_WINDOW_CHUNKS = 4
FOLDER_CHUNK_ROWS = 1024
# A step whose rows are all undecodable tries this many further slices of the epoch's order.
MAX_REFILL_TRIES = 8


def epoch_order(n: int, seed: int, epoch: int, shuffle: str = "full",
                chunks: Optional[list[int]] = None) -> np.ndarray:
    """The permutation of rows ``0..n-1`` for one epoch (deterministic in (seed, epoch)).

    ``full``: a uniform permutation. ``blocks``: the chunk order is permuted, then rows are
    permuted within windows of :data:`BLOCK_WINDOW_CHUNKS` consecutive chunks (``chunks`` are
    the chunk sizes in storage order, summing to at least ``n``). ``none``: storage order.
    """
    if shuffle == "none":
        return np.arange(n)
    rng = np.random.default_rng([seed, epoch])
    if shuffle == "full" or not chunks:
        return rng.permutation(n)
    if shuffle != "blocks":
        raise ValueError(f"shuffle {shuffle!r} must be full, blocks or none")
    starts = np.concatenate([[0], np.cumsum(chunks)[:-1]])
    parts = [np.arange(s, min(s + c, n)) for s, c in zip(starts, chunks) if s < n]
    parts = [parts[i] for i in rng.permutation(len(parts))]
    out = []
    for w in range(0, len(parts), BLOCK_WINDOW_CHUNKS):
        window = np.concatenate(parts[w:w + BLOCK_WINDOW_CHUNKS])
        out.append(window[rng.permutation(len(window))])
    return np.concatenate(out)


def step_rows(order: np.ndarray, step: int, rank: int, world: int, batch: int) -> np.ndarray:
    """Row indices of ``rank``'s batch at ``step`` (step within the epoch)."""
    start = (step * world + rank) * batch
    rows = order[start:start + batch]
    if len(rows) != batch:
        raise IndexError(f"step {step} of rank {rank} needs rows {start}..{start + batch - 1} of "
                         f"the epoch's {len(order)}: beyond the epoch")
    return rows


class RowStore:
    """Encoded rows of a source by index: ``fetch(indices) -> (images, labels, ids)``.

    Parquet: the row groups holding the rows are read whole (image column, plus the label column
    if any) and kept in an LRU cache of at most ``cache_bytes``; with ``data.shuffle=full`` on
    data much larger than the cache, nearly every row costs a row-group read (use
    ``data.shuffle=blocks`` there). Image folders: one file read per row.
    """

    def __init__(self, src: Source, limit: Optional[int] = None, cache_bytes: int = 1 << 30):
        self.src = src
        self.n = src.num_rows if limit is None else min(limit, src.num_rows)
        self.cache_bytes = cache_bytes
        self._cache: "OrderedDict[tuple[int, int], tuple]" = OrderedDict()
        self._cached = 0
        self._groups: Optional[list[tuple[int, int, int]]] = None  # (start row, file, group)
        self._starts: Optional[np.ndarray] = None
        self._lock = threading.Lock()
        self.reads = 0  # row groups read (a cache miss each)

    def _index(self) -> None:
        if self._groups is not None:
            return
        groups, start = [], 0
        for fi, f in enumerate(self.src.files):
            with self.src.filesystem.open_input_file(f) as fh:
                md = pq.ParquetFile(fh).metadata
            for gi in range(md.num_row_groups):
                groups.append((start, fi, gi))
                start += md.row_group(gi).num_rows
        self._groups = groups
        self._starts = np.asarray([g[0] for g in groups] + [start])
        self._file_start = {}  # file index -> global index of its first row
        for g0, fi, _ in reversed(groups):
            self._file_start[fi] = g0

    def chunk_sizes(self) -> list[int]:
        if self.src.kind != "parquet":
            return [FOLDER_CHUNK_ROWS] * -(-self.n // FOLDER_CHUNK_ROWS)
        self._index()
        return [int(x) for x in np.diff(self._starts)]

    def _group(self, g: int) -> tuple:
        with self._lock:
            hit = self._cache.get(g)
            if hit is not None:
                self._cache.move_to_end(g)
                return hit
        _, fi, gi = self._groups[g]
        cols = [self.src.image_column] + ([self.src.label_column] if self.src.label_column else [])
        with self.src.filesystem.open_input_file(self.src.files[fi]) as fh:
            t = pq.ParquetFile(fh).read_row_group(gi, columns=cols)
        images = t.column(self.src.image_column).combine_chunks()
        labels = (np.asarray(t.column(self.src.label_column).to_numpy(), dtype=np.int64)
                  if self.src.label_column else None)
        entry = (images, labels, images.nbytes)
        with self._lock:
            self.reads += 1
            self._cache[g] = entry
            self._cached += entry[2]
            while self._cached > self.cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= old[2]
        return entry

    def fetch(self, indices: np.ndarray) -> tuple[list[bytes], Optional[np.ndarray], list[str]]:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"row index out of range 0..{self.n - 1}")
        if self.src.kind != "parquet":
            images = []
            paths = [self.src.files[i] for i in indices]
            for p in paths:
                with self.src.filesystem.open_input_stream(p) as fh:
                    images.append(fh.read())
            labels = (np.asarray([self.src.label_of_path(p) for p in paths], dtype=np.int64)
                      if self.src.classes else None)
            return images, labels, paths
        self._index()
        gidx = np.searchsorted(self._starts, indices, side="right") - 1
        images: list[bytes] = [b""] * len(indices)
        ids: list[str] = [""] * len(indices)
        labels = np.zeros(len(indices), np.int64) if self.src.label_column else None
        for g in np.unique(gidx):
            col, lab, _ = self._group(int(g))
            fi = self._groups[g][1]
            where = np.nonzero(gidx == g)[0]
            for k in where:
                j = int(indices[k] - self._starts[g])
                v = col[j].as_py()
                images[k] = v if v is not None else b""
                ids[k] = parquet_row_id(self.src.files[fi], int(indices[k] - self._file_start[fi]))
                if labels is not None:
                    labels[k] = lab[j]
        return images, labels, ids


def random_access_warning(src: Source, shuffle: str, cache_mib: int) -> Optional[str]:
    """A warning when the exact order would read a Parquet row group for nearly every row: a full
    shuffle over Parquet data larger than the per-process row cache. None when it is fine."""
    if src.kind != "parquet" or shuffle != "full":
        return None
    size = sum(i.size or 0 for i in src.filesystem.get_file_info(src.files))
    if size <= cache_mib << 20:
        return None
    return (f"data.order=exact with data.shuffle=full on {size / 2**30:.1f} GiB of Parquet, more "
            f"than the {cache_mib} MiB row cache of a decode process: most rows will cost a "
            f"row-group read. Use data.shuffle=blocks (permutes within a few row groups; fine if "
            f"the files were written in shuffled order), raise data.row_cache_mb, or "
            f"data.order=stream (Ray Data's distributed shuffle; no exact mid-epoch resume)")


# Per-process state of decode tasks: Ray reuses a worker process for many tasks, so the row
# cache and the epoch's order survive from one step to the next.
_STORES: dict = {}
_ORDERS: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_MULTICROP: dict = {}


def shared_store(src: Source, limit: Optional[int], cache_bytes: int) -> RowStore:
    key = (src.uri, tuple(src.files), limit)
    st = _STORES.get(key)
    if st is None:
        _STORES.clear()  # one source per process at a time: bounded memory
        st = _STORES[key] = RowStore(src, limit, cache_bytes)
    return st


def shared_order(store: RowStore, seed: int, epoch: int, shuffle: str) -> np.ndarray:
    key = (store.src.uri, store.n, seed, epoch, shuffle)
    o = _ORDERS.get(key)
    if o is None:
        chunks = store.chunk_sizes() if shuffle == "blocks" else None
        o = _ORDERS[key] = epoch_order(store.n, seed, epoch, shuffle, chunks)
        while len(_ORDERS) > 2:
            _ORDERS.popitem(last=False)
    return o


def shared_multicrop(crops: CropConfig) -> MultiCrop:
    key = repr(crops)
    mc = _MULTICROP.get(key)
    if mc is None:
        _MULTICROP.clear()
        mc = _MULTICROP[key] = MultiCrop(crops)
    return mc


def step_batch(store: RowStore, multicrop: MultiCrop, order: np.ndarray, seed: int, epoch: int,
               step: int, rank: int, world: int, batch: int,
               report: Optional[DecodeReport] = None) -> tuple[dict, list[tuple[str, str]]]:
    """The views of ``rank``'s batch at (epoch, step): numpy columns with exactly ``batch`` rows.

    Returns (columns, undecodable rows as (id, reason)); the rows are also recorded in
    ``report`` if given. Undecodable rows are replaced by repeating the step's decodable rows.
    """
    rows = step_rows(order, step, rank, world, batch)
    images, labels, ids = store.fetch(rows)
    out, bad = make_views(images, ids, multicrop, batch_generator(seed, epoch, step, rank), labels)
    all_bad = list(bad)
    tries = 0
    while len(out["global_crops"]) == 0:
        # Every row of the step is undecodable: take further slices of the epoch's order.
        tries += 1
        if tries > MAX_REFILL_TRIES:
            raise RuntimeError(
                f"epoch {epoch} step {step} rank {rank}: none of {batch * (tries)} rows tried "
                f"could be decoded (see the decode report): is data.train a set of images?")
        start = ((step * world + rank) * batch + tries * world * batch) % max(1, len(order) - batch)
        more = order[start:start + batch]
        images, labels, ids = store.fetch(more)
        out, bad = make_views(images, ids, multicrop,
                              batch_generator(seed, epoch, step, rank, tries), labels)
        all_bad += bad
    n = len(out["global_crops"])
    if n < batch:
        sel = np.arange(batch) % n
        out = {k: v[sel] for k, v in out.items()}
    if all_bad and report is not None:
        report.record(all_bad)
    return out, all_bad
