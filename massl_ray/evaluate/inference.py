"""Ray Data batch inference with a checkpoint's teacher: one helper (:func:`teacher_batches`:
the weights in the object store once, an actor pool running a ``map_batches`` callable of
:mod:`features` or :mod:`retrieval`, batches back to the driver in row order) and its three
uses: labeled features for the evaluations, embeddings for ``embed``, revisited descriptors.

Shell module (imports ray); the in-process paths run the same callables without it.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from massl_ray.data.sources import Source
from massl_ray.evaluate.embed import ShardWriter, select_blocks
from massl_ray.evaluate.features import EvalViewsFn, FeatureFn, FeatureSet, Teacher
from massl_ray.evaluate.retrieval import RevisitedDataset, RevisitedFn

#: ``s`` below: the job's :class:`massl_ray.evaluate.jobs.EvalSettings` (not imported: jobs
#: imports this module).
Settings = Any


def _actor_pool_size(s: Settings) -> int:
    import ray

    if s.concurrency:
        return s.concurrency
    res = ray.cluster_resources()
    if s.gpus_per_actor > 0:
        return max(1, int(res.get("GPU", 0) // s.gpus_per_actor))
    free = res.get("CPU", 1.0) - s.decode_cpus
    return max(1, min(4, int(free // s.cpus_per_actor)))


def teacher_batches(make_dataset: Callable[[], Any], fn: type, teacher: Teacher,
                    s: Settings, map_batch: int, **fn_kwargs) -> Iterator[dict]:
    """Numpy batches of ``make_dataset()`` mapped by ``fn`` (``map_batch`` rows a call) on an
    actor pool of ``s.cpus_per_actor`` / ``s.gpus_per_actor``, in row order, no progress bars
    (the DataContext is set before the dataset is made and restored after). ``fn`` is built with
    the teacher (``weights`` fetched once per actor, ``model``, ``mean``, ``std``, ``device``,
    ``threads``) and ``fn_kwargs``.

    Ray Data starts an actor pool's actors with ``max_restarts=-1`` and hands each its
    DataContext and map function by object reference, so Ray 2.60's core worker prints "Actor
    ... has constructor arguments in the object store and max_restarts > 0" for every pool
    (ray-project/ray#57733). On a Ray this process started (no ``RAY_ADDRESS``) there is no
    node to lose and a restart would repeat what killed the actor: the actors get none
    (through Ray 2.60's deprecated ``ray_remote_args``, its warning dropped), and the line
    goes. On a cluster Ray Data's restarts stay."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        gpu = s.gpus_per_actor > 0
        weights_ref = ray.put(teacher.weights)
        kwargs = dict(
            fn_constructor_kwargs={
                "weights": functools.partial(ray.get, weights_ref), "model": teacher.model_spec,
                "mean": list(teacher.mean), "std": list(teacher.std),
                "device": "cuda" if gpu else "cpu", "threads": max(1, int(s.cpus_per_actor)),
                **fn_kwargs},
            batch_size=map_batch, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=_actor_pool_size(s)),
            num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor if gpu else None)
        if not os.environ.get("RAY_ADDRESS"):
            kwargs["max_restarts"] = 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = make_dataset().map_batches(fn, **kwargs)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _views(jobs: list[tuple[Source, Optional[int]]], views_fn: EvalViewsFn,
           s: Settings) -> Callable[[], Any]:
    """The dataset maker of the view stage: read the sources (one after the other), decode +
    eval view on CPU tasks of ``s.decode_cpus``."""
    from massl_ray.data.pipeline import read_source

    def make():
        parts = [read_source(src, limit) for src, limit in jobs]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        # A Parquet file is often read as one block, decoded by one task on one CPU: cut it.
        ds = ds.repartition(target_num_rows_per_block=4 * s.batch_size)
        return ds.map_batches(views_fn, batch_size=s.batch_size, batch_format="numpy",
                              num_cpus=s.decode_cpus, zero_copy_batch=True)
    return make


def _rows(src: Source, limit: Optional[int]) -> int:
    return src.num_rows if limit is None else min(limit, src.num_rows)


def features_ray_data(teacher: Teacher, jobs: list[tuple[Source, Optional[int]]], size: int,
                      s: Settings) -> list[FeatureSet]:
    """Features of one or more labeled sources in a single pipeline (sources that differ in
    reader or label columns: one pipeline each). Row order is kept (few-shot draws index rows)."""
    def columns(src: Source) -> tuple:
        return (src.kind, src.image_column, src.label_column, src.classes)

    first = jobs[0][0]
    if any(columns(src) != columns(first) for src, _ in jobs[1:]):
        return [features_ray_data(teacher, [job], size, s)[0] for job in jobs]
    views = EvalViewsFn(size, first.image_column, first.label_column, first.classes)
    batches = list(teacher_batches(_views(jobs, views, s), FeatureFn, teacher, s, s.batch_size,
                                   blocks=s.linear_blocks, batch_size=s.batch_size))
    feats, labels, ok = (np.concatenate([b[k] for b in batches]) for k in ("features", "label", "ok"))
    counts = [_rows(src, limit) for src, limit in jobs]
    if sum(counts) != len(ok):
        raise RuntimeError(f"batch inference returned {len(ok)} rows for {sum(counts)} inputs")
    out, start = [], 0
    for (src, _), n in zip(jobs, counts):  # every input row gives one output row, in order
        keep = ok[start:start + n].astype(bool)
        if not keep.any():
            raise ValueError(f"no decodable labeled images in {src.uri!r}")
        out.append(FeatureSet(torch.from_numpy(feats[start:start + n][keep]),
                              torch.from_numpy(labels[start:start + n][keep].astype(np.int64)),
                              int((~keep).sum())))
        start += n
    return out


def embed_ray_data(teacher: Teacher, src: Source, limit: Optional[int], size: int, width: int,
                   blocks: int, s: Settings, writer: ShardWriter) -> None:
    """The driver writes the shards as batches arrive, in row order."""
    views = EvalViewsFn(size, src.image_column, src.label_column, src.classes, with_ids=True,
                        require_labels=False)
    start = 0
    for b in teacher_batches(_views([(src, limit)], views, s), FeatureFn, teacher, s,
                             s.batch_size, blocks=width, batch_size=s.batch_size):
        n = len(b["ok"])
        writer.add(np.arange(start, start + n), list(b["id"]),
                   b["label"] if src.labeled else None, select_blocks(b["features"], blocks),
                   b["ok"], n)
        start += n
    if writer.seen != _rows(src, limit):
        raise RuntimeError(f"batch inference returned {writer.seen} rows for {writer.total} inputs")


def revisited_ray_data(teacher: Teacher, ds: RevisitedDataset, s: Settings
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(database, queries) descriptors of a revisited data set. The actors read the images by
    path (on a cluster: a filesystem every node sees)."""
    import ray

    rows = [{"index": i, "path": str(p), "has_bbx": b is not None,
             "bbx": [float(x) for x in b] if b is not None else [0.0] * 4}
            for i, (p, b) in enumerate(ds.items())]
    feats = np.zeros((len(rows), teacher.backbone.embed_dim), dtype=np.float32)
    seen = np.zeros(len(rows), dtype=bool)
    blocks = max(1, min(len(rows), 8 * _actor_pool_size(s)))
    for b in teacher_batches(lambda: ray.data.from_items(rows, override_num_blocks=blocks),
                             RevisitedFn, teacher, s, 8, imsize=s.revisited_imsize,
                             scales=[float(x) for x in s.revisited_scales]):
        feats[b["index"]] = b["feature"]
        seen[b["index"]] = True
    if not seen.all():
        raise RuntimeError(f"revisited batch inference returned {int(seen.sum())} of {len(rows)} images")
    n = len(ds.imlist)
    return torch.from_numpy(feats[:n]), torch.from_numpy(feats[n:])
