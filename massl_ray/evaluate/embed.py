"""Embeddings of a source written as sharded Parquet (``python -m massl_ray embed``). Ray-free.

The features are the evaluations' own (:class:`features.TeacherFeatures` on the eval views of
:func:`features.decode_views`): by default the final-norm [CLS] token, the k-NN / few-shot
feature; ``blocks = n`` writes the concatenated [CLS] of the last ``n`` blocks (the linear-probe
feature). The Ray Data path lives in :mod:`inference`; both paths write through
:class:`ShardWriter`.

Output directory: ``part-00000.parquet``, ``part-00001.parquet``, ... with the columns

- ``row`` (int64): the row's index in the source (storage order, before the limit);
- ``id`` (string): the image path for an image folder, ``sha1:<16 hex>`` of the image bytes for
  Parquet (as :func:`massl_ray.data.sources.row_id`);
- ``label`` (int64): only when the source is labeled (a label column or class sub-folders);
- ``embedding`` (fixed-size list of float32),

and ``_embed.json``: the model, source, image size, blocks, dimension, rows written, undecodable
rows skipped (not written), the shard files and the time taken.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from massl_ray.config import ConfigError
from massl_ray.data.sources import Source, iter_rows
from massl_ray.evaluate.features import TeacherFeatures, decode_views

EMBED_FORMAT = "massl_ray/embeddings/1"
MANIFEST = "_embed.json"


def select_blocks(features: torch.Tensor | np.ndarray, blocks: int) -> np.ndarray:
    """``[B, n, D]`` -> ``[B, blocks * D]``: the last ``blocks`` [CLS] tokens, concatenated."""
    f = np.asarray(features)
    return np.ascontiguousarray(f[:, -blocks:].reshape(f.shape[0], -1), dtype=np.float32)


class ShardWriter:
    """Rows arrive in order in batches; every ``rows_per_shard`` rows become one Parquet file
    (written to a temporary name, then renamed). ``progress`` gets a line at most every 2 s
    and at the end."""

    def __init__(self, out_dir: Union[str, os.PathLike], rows_per_shard: int, labeled: bool,
                 total: int, progress: Optional[Callable[[str], None]] = None):
        if rows_per_shard <= 0:
            raise ValueError("rows_per_shard must be positive")
        self.dir = Path(out_dir)
        old = sorted(self.dir.glob("part-*.parquet")) if self.dir.is_dir() else []
        if old:
            raise ConfigError(f"{self.dir} already holds embeddings ({old[0].name}, ...): "
                             f"choose a new --out or remove them")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.labeled = labeled
        self.total = total
        self.progress = progress
        self.buf: list[dict] = []
        self.buffered = 0
        self.files: list[str] = []
        self.written = 0
        self.seen = 0
        self.skipped = 0
        self.dim: Optional[int] = None
        self.t0 = time.perf_counter()
        self.last_report = -1e9

    def add(self, rows: np.ndarray, ids: list[str], labels: Optional[np.ndarray],
            emb: np.ndarray, ok: np.ndarray, seen: int) -> None:
        """The kept rows of a batch (``ok``), and how many source rows the batch covered."""
        ok = np.asarray(ok, dtype=bool)
        self.seen += seen
        self.skipped += int((~ok).sum())
        if ok.any():
            self.dim = int(emb.shape[1])
            part = {"row": np.asarray(rows, dtype=np.int64)[ok],
                    "id": [str(i) for i, k in zip(ids, ok) if k],
                    "embedding": np.asarray(emb, dtype=np.float32)[ok]}
            if self.labeled:
                part["label"] = np.asarray(labels, dtype=np.int64)[ok]
            self.buf.append(part)
            self.buffered += int(ok.sum())
        while self.buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)
        now = time.perf_counter()
        if self.progress and (now - self.last_report >= 2.0 or self.seen >= self.total):
            self.last_report = now
            dt = now - self.t0
            self.progress(f"embed: {self.seen}/{self.total} rows ({100.0 * self.seen / max(self.total, 1):.0f}%), "
                          f"{self.seen / max(dt, 1e-9):.0f} img/s, {len(self.files)} shard(s) written, "
                          f"{self.skipped} undecodable")

    def _flush(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {k: [] for k in self.buf[0]}
        for part in self.buf:
            for k, v in part.items():
                cols[k].append(v)
        merged = {k: (np.concatenate(v) if k != "id" else sum(v, [])) for k, v in cols.items()}
        take = {k: v[:n] for k, v in merged.items()}
        rest = {k: v[n:] for k, v in merged.items()}
        emb = take["embedding"]
        arrays = {"row": pa.array(take["row"], pa.int64()), "id": pa.array(take["id"], pa.string())}
        if self.labeled:
            arrays["label"] = pa.array(take["label"], pa.int64())
        arrays["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
        name = f"part-{len(self.files):05d}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(pa.table(arrays), tmp)
        os.replace(tmp, self.dir / name)
        self.files.append(name)
        self.written += len(take["row"])
        left = len(rest["row"])
        self.buf = [rest] if left else []
        self.buffered = left

    def close(self, info: dict) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        if self.written == 0:
            raise ValueError("embed: no decodable image in the source")
        manifest = {"format": EMBED_FORMAT, **info, "dim": self.dim, "rows": self.written,
                    "skipped": self.skipped, "shards": self.files,
                    "seconds": time.perf_counter() - self.t0}
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        return manifest


def embed_in_process(embed: TeacherFeatures, src: Source, writer: ShardWriter, size: int,
                     blocks: int, limit: Optional[int] = None, batch_rows: int = 256) -> None:
    start = 0
    for rows in iter_rows(src, limit=limit, batch_rows=batch_rows):
        views, ok, _ = decode_views(rows["image"], size)
        emb = np.zeros((len(ok), 0), dtype=np.float32)
        if views.shape[0]:
            good = select_blocks(embed(views).numpy(), blocks)
            emb = np.zeros((len(ok), good.shape[1]), dtype=np.float32)
            emb[ok] = good
        writer.add(np.arange(start, start + len(ok)), list(rows["id"]), rows["label"], emb, ok,
                   len(ok))
        start += len(ok)


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
