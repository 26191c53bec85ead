"""Evaluation jobs: features by Ray Data batch inference (or in-process), then k-NN, linear
probe, few-shot, low-shot, class-level and revisited Oxford/Paris retrieval and fine-tuning on
a checkpoint's (or an exported backbone's) teacher, written as JSON and a markdown summary;
and the ``embed`` job (features of a source written as sharded Parquet).

Shell module (Ray Data for the batch inference; ``local=True`` runs without Ray).
``python -m massl_ray eval --checkpoint <dir> --train-data ... --test-data ...`` calls
:func:`evaluate_checkpoint`; the sweep runs the same function as a dependent Ray task.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from massl_ray.config import ConfigError, _coerce
from massl_ray.evaluate.features import (EvalViewsFn, FeatureCache, FeatureFn, FeatureSet, Teacher,
                       TeacherFeatures, cache_key, extract_in_process, iter_eval_batches,
                       load_teacher)
from massl_ray.evaluate.finetune import fine_tune, views_and_labels
from massl_ray.evaluate.embed import ShardWriter, embed_in_process, print_progress, select_blocks
from massl_ray.evaluate.knn import DEFAULT_KS, knn_accuracy
from massl_ray.evaluate.lowshot import DEFAULT_FRACTIONS, DEFAULT_SHOTS, low_shot
from massl_ray.evaluate.probe import DEFAULT_LRS, few_shot, linear_probe
from massl_ray.evaluate.retrieval import (DEFAULT_RETRIEVAL_KS, DINO_SCALES, MultiScaleFeatures,
                                          class_retrieval, evaluate_revisited, load_revisited,
                                          revisited_cache_key, revisited_features)
from massl_ray.data.sources import Source, open_source

log = logging.getLogger("massl_ray")

RESULT_FILE = "eval.json"
SUMMARY_FILE = "eval.md"


@dataclass
class EvalSettings:
    """Everything an evaluation job can be told (CLI flags, a sweep's ``evaluation:`` section)."""

    train_data: Optional[str] = None  # labeled bank / probe training set
    test_data: Optional[str] = None  # labeled queries / test set
    format: str = "auto"  # auto | parquet | folder
    image_column: str = "image"
    label_column: str = "label"
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    image_size: Optional[int] = None  # null: the checkpoint's crops.global_size
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = 0.07
    linear: bool = True
    linear_blocks: int = 4  # [CLS] of the last n blocks, concatenated (DINO ViT-S: 4)
    linear_epochs: int = 100
    linear_lrs: tuple[float, ...] = DEFAULT_LRS
    linear_batch_size: int = 256
    few_shot: tuple[int, ...] = (1, 5, 10)  # () disables
    few_shot_draws: int = 5
    # Low-shot (MSN / DINO splits): n per class and fractions of the labels, seeded splits.
    low_shot: bool = False
    low_shot_shots: tuple[int, ...] = DEFAULT_SHOTS
    low_shot_fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    low_shot_draws: int = 3
    low_shot_c: float = 1.0
    # Class-level retrieval: test images as queries against the train images as the database.
    retrieval: bool = False
    retrieval_ks: tuple[int, ...] = DEFAULT_RETRIEVAL_KS
    # Revisited Oxford / Paris: data set directories (gnd_<name>.pkl + jpg/), multi-scale.
    revisited: tuple[str, ...] = ()
    revisited_imsize: int = 224  # longer side at most this many pixels
    revisited_scales: tuple[float, ...] = DINO_SCALES
    # Fine-tuning transfer (whole backbone + head; AdamW, layer-wise lr decay, warmup + cosine).
    finetune: bool = False
    finetune_epochs: int = 10
    finetune_lr: float = 5e-4  # scaled by batch / 256
    finetune_batch_size: int = 128
    finetune_layer_decay: float = 0.75
    finetune_weight_decay: float = 0.05
    finetune_warmup_epochs: float = 1.0
    seed: int = 0
    batch_size: int = 256  # images per inference batch
    # Where features are computed: in this process (local) or by Ray Data batch inference.
    local: bool = False
    concurrency: Optional[int] = None  # feature actors; null: 1 per GPU, or from the CPUs
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # > 0: the actors run the backbone on GPU
    decode_cpus: float = 1.0  # per decode + resize task
    device: str = "auto"  # in-process: auto | cpu | cuda
    threads: Optional[int] = None  # torch threads in this process (null: leave as is)
    cache_dir: Optional[str] = None  # null: <out>/features

    @classmethod
    def from_dict(cls, data: Optional[dict], what: str = "evaluation") -> "EvalSettings":
        s = cls()
        hints = _hints()
        known = [f.name for f in fields(cls)]
        for k, v in (data or {}).items():
            if k not in known:
                raise ConfigError(f"unknown key {what}.{k}; known keys: {', '.join(known)}")
            elem = _list_elem(hints[k])
            if elem is not None:  # a list: a YAML list, one value, or "a,b,c"
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    v = [v]
                if isinstance(v, str):
                    v = [x.strip() for x in v.split(",") if x.strip()]
                if not isinstance(v, (list, tuple)):
                    raise ConfigError(f"{what}.{k}: expected a list, got {v!r}")
                v = tuple(_coerce(x, elem, f"{what}.{k}") for x in v)
            else:
                v = _coerce(v, hints[k], f"{what}.{k}")
            setattr(s, k, v)
        return s.validate(what)

    def validate(self, what: str = "evaluation") -> "EvalSettings":
        errs = []
        if not self.ks or any(k <= 0 for k in self.ks):
            errs.append(f"{what}.ks ({list(self.ks)}) must be positive integers")
        if self.temperature <= 0:
            errs.append(f"{what}.temperature must be positive")
        if self.linear and (self.linear_epochs <= 0 or not self.linear_lrs
                            or any(lr <= 0 for lr in self.linear_lrs)):
            errs.append(f"{what}.linear_epochs and linear_lrs must be positive")
        if self.linear_blocks <= 0:
            errs.append(f"{what}.linear_blocks must be positive")
        if any(n <= 0 for n in self.few_shot) or self.few_shot_draws <= 0:
            errs.append(f"{what}.few_shot and few_shot_draws must be positive")
        if self.low_shot and (any(n <= 0 for n in self.low_shot_shots) or self.low_shot_draws <= 0
                              or self.low_shot_c <= 0
                              or any(not 0 < f <= 1 for f in self.low_shot_fractions)
                              or not (self.low_shot_shots or self.low_shot_fractions)):
            errs.append(f"{what}.low_shot_shots / low_shot_draws / low_shot_c must be positive and "
                        f"low_shot_fractions in (0, 1] (at least one split)")
        if self.retrieval and (not self.retrieval_ks or any(k <= 0 for k in self.retrieval_ks)):
            errs.append(f"{what}.retrieval_ks ({list(self.retrieval_ks)}) must be positive integers")
        if self.finetune and (self.finetune_epochs <= 0 or self.finetune_lr <= 0
                              or self.finetune_batch_size <= 0 or self.finetune_weight_decay < 0
                              or self.finetune_warmup_epochs < 0
                              or not 0 < self.finetune_layer_decay <= 1):
            errs.append(f"{what}.finetune_epochs / lr / batch_size must be positive, weight decay "
                        f"and warmup >= 0, layer_decay in (0, 1]")
        if self.revisited and (self.revisited_imsize <= 0 or not self.revisited_scales
                               or any(x <= 0 for x in self.revisited_scales)):
            errs.append(f"{what}.revisited_imsize and revisited_scales must be positive")
        for k in ("limit_train", "limit_test", "image_size", "concurrency", "threads"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                errs.append(f"{what}.{k} ({v}) must be positive or null")
        if self.cpus_per_actor <= 0 or self.decode_cpus <= 0 or self.gpus_per_actor < 0:
            errs.append(f"{what}.cpus_per_actor / decode_cpus must be positive, gpus_per_actor >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            errs.append(f"{what}.device ({self.device!r}) must be auto, cpu or cuda")
        if self.format not in ("auto", "parquet", "folder"):
            errs.append(f"{what}.format ({self.format!r}) must be auto, parquet or folder")
        if errs:
            raise ConfigError("invalid evaluation settings:\n  - " + "\n  - ".join(errs))
        return self

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _list_elem(hint: Any) -> Optional[type]:
    """``X`` for a ``tuple[X, ...]`` hint, else None."""
    from typing import get_args, get_origin

    args = get_args(hint)
    if get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


@functools.lru_cache(maxsize=1)
def _hints() -> dict:
    from typing import get_type_hints

    return get_type_hints(EvalSettings)


def default_out_dir(checkpoint: Path) -> Path:
    """``<run dir>/eval/<checkpoint name>``: next to the run, not inside the checkpoint (Ray
    deletes old checkpoint directories); for an exported ``x.safetensors``: ``eval/x`` next to it."""
    name = checkpoint.stem if checkpoint.suffix == ".safetensors" else checkpoint.name
    return checkpoint.parent / "eval" / name


# ---- features ------------------------------------------------------------------------------

def _device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def features_in_process(teacher: Teacher, src: Source, size: int, limit: Optional[int],
                        s: EvalSettings) -> FeatureSet:
    embed = TeacherFeatures(teacher.backbone, teacher.mean, teacher.std,
                            s.linear_blocks, _device(s.device), s.batch_size)
    return extract_in_process(embed, src, size, limit, batch_rows=s.batch_size)


def _views_to_features(ds, views_fn, s, teacher, weights_ref, blocks: int):
    """The batch-inference stages every Ray evaluation path shares: encoded rows -> eval views
    (Ray Data tasks of ``s.decode_cpus``) -> teacher features (an actor pool of
    ``s.cpus_per_actor`` / ``s.gpus_per_actor``), the [CLS] of the last ``blocks`` blocks."""
    import ray

    # A Parquet file is often read as one block, decoded by one task on one CPU: cut it.
    ds = ds.repartition(target_num_rows_per_block=4 * s.batch_size)
    ds = ds.map_batches(views_fn, batch_size=s.batch_size, batch_format="numpy",
                        num_cpus=s.decode_cpus, zero_copy_batch=True)
    gpu = s.gpus_per_actor > 0
    return _map_actor_pool(
        ds, FeatureFn,
        fn_constructor_kwargs={
            "weights": functools.partial(ray.get, weights_ref), "model": teacher.model_spec,
            "mean": list(teacher.mean), "std": list(teacher.std), "blocks": blocks,
            "device": "cuda" if gpu else "cpu",
            "threads": max(1, int(s.cpus_per_actor)), "batch_size": s.batch_size},
        batch_size=s.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=_actor_pool_size(s)),
        num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor if gpu else None)


def _map_actor_pool(ds, fn, **kwargs):
    """``ds.map_batches(fn, **kwargs)`` on an actor pool, without restarts on a Ray this process
    started on this machine (no ``RAY_ADDRESS``: :func:`massl_ray.runtime.init_ray`'s rule).

    Ray Data starts an actor pool's actors with ``max_restarts=-1`` and hands each its
    DataContext and the map function by object reference, so Ray 2.60's core worker prints
    "Actor with class name: 'MapWorker(...)' ... has constructor arguments in the object store
    and max_restarts > 0" on the driver's screen for every actor pool, whatever the function's
    own arguments (ray-project/ray#57733; the dataset keeps those references alive). On one
    machine there is no node to lose and a restart would repeat what killed the actor (an
    out-of-memory kill, a crash): the actors get none, and the line goes (Ray 2.60 takes
    ``max_restarts`` only through its deprecated ``ray_remote_args``, whose warning is dropped
    here; with it Ray Data also stops fusing the CPU decode stage into the actors). On a cluster
    (``RAY_ADDRESS``) Ray Data's restarts stay: a lost node's actors come back elsewhere."""
    if os.environ.get("RAY_ADDRESS"):
        return ds.map_batches(fn, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs, max_restarts=0)


def _actor_pool_size(s: EvalSettings) -> int:
    import ray

    if s.concurrency:
        return s.concurrency
    res = ray.cluster_resources()
    if s.gpus_per_actor > 0:
        return max(1, int(res.get("GPU", 0) // s.gpus_per_actor))
    free = res.get("CPU", 1.0) - s.decode_cpus
    return max(1, min(4, int(free // s.cpus_per_actor)))


def features_ray_data(teacher: Teacher, jobs: list[tuple[Source, Optional[int]]], size: int,
                      s: EvalSettings) -> list[FeatureSet]:
    """Batch inference over one or more labeled sources in a single Ray Data pipeline:
    read -> decode + eval view (CPU tasks) -> teacher backbone (an actor pool, CPU or GPU).

    The backbone weights go to the object store once; each actor fetches them when it starts,
    so the actors may run on any node. Row order is preserved (few-shot draws index rows).
    """
    import ray

    from massl_ray.data.pipeline import read_source

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    first = jobs[0][0]

    def columns(src: Source) -> tuple:
        return (src.kind, src.image_column, src.label_column, src.classes)

    if any(columns(src) != columns(first) for src, _ in jobs[1:]):
        # Different readers or label sources (Parquet vs class folders): one pipeline each.
        return [features_ray_data(teacher, [job], size, s)[0] for job in jobs]
    try:
        weights_ref = ray.put(teacher.weights)
        parts = [read_source(src, limit) for src, limit in jobs]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        ds = _views_to_features(
            ds, EvalViewsFn(size, first.image_column, first.label_column, first.classes),
            s, teacher, weights_ref, s.linear_blocks)
        feats, labels, ok = [], [], []
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            feats.append(b["features"])
            labels.append(b["label"])
            ok.append(b["ok"])
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    feats_a = np.concatenate(feats)
    labels_a = np.concatenate(labels).astype(np.int64)
    ok_a = np.concatenate(ok).astype(bool)
    # Every input row gives one output row, in order: the sources are consecutive ranges.
    counts = [src.num_rows if limit is None else min(limit, src.num_rows) for src, limit in jobs]
    if sum(counts) != len(ok_a):
        raise RuntimeError(f"batch inference returned {len(ok_a)} rows for {sum(counts)} inputs")
    out, start = [], 0
    for (src, _), n in zip(jobs, counts):
        sl = slice(start, start + n)
        keep = ok_a[sl]
        if not keep.any():
            raise ValueError(f"no decodable labeled images in {src.uri!r}")
        out.append(FeatureSet(torch.from_numpy(feats_a[sl][keep]),
                              torch.from_numpy(labels_a[sl][keep]), int((~keep).sum())))
        start += n
    return out


def get_features(teacher: Teacher, splits: dict[str, tuple[Source, Optional[int]]], size: int,
                 s: EvalSettings, cache: FeatureCache) -> tuple[dict[str, FeatureSet], dict]:
    """Features of each split (name -> (source, limit)), from the cache where present; the
    missing ones are computed together (one Ray Data pipeline, or in this process) and cached.
    Returns the features and, per split, how they were obtained and how long it took."""
    out: dict[str, FeatureSet] = {}
    info: dict[str, dict] = {}
    missing = []
    for name, (src, limit) in splits.items():
        key = cache_key(teacher.sha256, src, limit, size, s.linear_blocks)
        t0 = time.perf_counter()
        fs = cache.load(name, key)
        if fs is None:
            missing.append((name, key))
            continue
        out[name] = fs
        info[name] = {"cached": True, "seconds": time.perf_counter() - t0, "key": key,
                      "rows": len(fs), "skipped": fs.skipped}
    if missing:
        mode = "in_process" if s.local else "ray_data"
        t0 = time.perf_counter()
        if s.local:
            computed = []
            for name, _ in missing:
                t1 = time.perf_counter()
                src, limit = splits[name]
                computed.append(features_in_process(teacher, src, size, limit, s))
                info[name] = {"seconds": time.perf_counter() - t1}
        else:
            computed = features_ray_data(teacher, [splits[n] for n, _ in missing], size, s)
            secs = time.perf_counter() - t0
            n_all = sum(len(f) for f in computed)
            for (name, _), fs in zip(missing, computed):
                # One pipeline: its wall time is shared out by rows.
                info[name] = {"seconds": secs * len(fs) / max(n_all, 1), "pipeline_s": secs}
        for (name, key), fs in zip(missing, computed):
            src, limit = splits[name]
            out[name] = fs
            info[name].update(cached=False, key=key, mode=mode, rows=len(fs), skipped=fs.skipped,
                              images_per_s=len(fs) / max(info[name]["seconds"], 1e-9))
            cache.save(name, key, fs, {"checkpoint": str(teacher.checkpoint),
                                       "checkpoint_sha256": teacher.sha256, "source": src.uri,
                                       "limit": limit, "size": size, "blocks": s.linear_blocks,
                                       "rows": len(fs), "skipped": fs.skipped})
    return out, info


# ---- the evaluation ------------------------------------------------------------------------

def revisited_eval(teacher: Teacher, path: str, s: EvalSettings, cache_dir: Path) -> dict:
    """One revisited Oxford/Paris data set: multi-scale features (cached as
    ``revisited-<name>-<key>.npz``), rankings, mAP / mP@k per setting. The images differ in
    size, so each is one forward per scale: in this process (``local``, on ``device``), or by
    Ray Data batch inference (an actor pool that reads, decodes and embeds each image)."""
    t0 = time.perf_counter()
    ds = load_revisited(path)
    key = revisited_cache_key(teacher.sha256, ds, s.revisited_imsize, s.revisited_scales)
    f = cache_dir / f"revisited-{ds.name}-{key}.npz"
    feats, cached = None, False
    if f.is_file():
        try:
            with np.load(f) as z:
                feats = (torch.from_numpy(z["database"].copy()), torch.from_numpy(z["queries"].copy()))
            cached = True
        except (OSError, ValueError, KeyError):
            feats = None
    if feats is None:
        embed = MultiScaleFeatures(teacher.backbone, teacher.mean, teacher.std,
                                   s.revisited_scales, _device(s.device))
        total = len(ds.imlist) + len(ds.qimlist)
        step = max(1, total // 10)

        def progress(done: int, n: int) -> None:
            if done % step == 0 or done == n:
                log.info("revisited %s: %d/%d images (%.0fs)", ds.name, done, n,
                         time.perf_counter() - t0)

        if s.local:
            feats = revisited_features(embed, ds, s.revisited_imsize, progress)
        else:
            feats = revisited_features_ray_data(teacher, ds, s)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, database=feats[0].numpy(), queries=feats[1].numpy())
        os.replace(tmp, f)
    t1 = time.perf_counter()
    res = evaluate_revisited(None, ds, s.revisited_imsize, s.retrieval_ks, features=feats)
    res.update(features_s=t1 - t0, features_cached=cached, metrics_s=time.perf_counter() - t1,
               source=str(ds.gnd_file), imsize=s.revisited_imsize,
               scales=[float(x) for x in s.revisited_scales])
    return res


class RevisitedFn:
    """``map_batches`` stage of the revisited features: rows ``{index, path, bbx, has_bbx}`` ->
    ``{index, feature}`` (read, decode, crop, shrink, multi-scale descriptor; one image at a
    time, as in process)."""

    def __init__(self, weights: Any, model: dict, mean: list, std: list, scales: list,
                 imsize: int, device: str = "cpu", threads: Optional[int] = None):
        from massl_ray.evaluate.features import build_from_spec

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        if callable(weights):
            weights = weights()
        self.embed = MultiScaleFeatures(build_from_spec(model, weights), mean, std, scales, device)
        self.imsize = imsize

    def __call__(self, batch: dict) -> dict:
        from massl_ray.evaluate.retrieval import prepare_image

        out = []
        for path, bbx, has in zip(batch["path"], batch["bbx"], batch["has_bbx"]):
            with open(str(path), "rb") as f:
                img = prepare_image(f.read(), self.imsize, list(bbx) if has else None)
            out.append(self.embed(img).numpy())
        return {"index": np.asarray(batch["index"]), "feature": np.stack(out)}


def revisited_features_ray_data(teacher: Teacher, ds: Any, s: EvalSettings
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(database, queries) features of a revisited data set by Ray Data batch inference. The
    images are read by path in the actors (a filesystem every node sees, on a cluster)."""
    import ray

    rows = [{"index": i, "path": str(ds.image_path(n)), "bbx": [0.0] * 4, "has_bbx": False}
            for i, n in enumerate(ds.imlist)]
    for j, (n, g) in enumerate(zip(ds.qimlist, ds.gnd)):
        b = g.get("bbx")
        rows.append({"index": len(ds.imlist) + j, "path": str(ds.image_path(n)),
                     "bbx": [float(x) for x in b] if b is not None else [0.0] * 4,
                     "has_bbx": b is not None})
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    gpu = s.gpus_per_actor > 0
    try:
        weights_ref = ray.put(teacher.weights)
        data = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 8 * _actor_pool_size(s))))
        data = _map_actor_pool(
            data, RevisitedFn, fn_constructor_kwargs={
                "weights": functools.partial(ray.get, weights_ref), "model": teacher.model_spec,
                "mean": list(teacher.mean), "std": list(teacher.std),
                "scales": [float(x) for x in s.revisited_scales], "imsize": s.revisited_imsize,
                "device": "cuda" if gpu else "cpu", "threads": max(1, int(s.cpus_per_actor))},
            batch_size=8, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=_actor_pool_size(s)),
            num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor if gpu else None)
        feats = np.zeros((len(rows), teacher.backbone.embed_dim), dtype=np.float32)
        seen = np.zeros(len(rows), dtype=bool)
        for b in data.iter_batches(batch_size=None, batch_format="numpy"):
            feats[b["index"]] = b["feature"]
            seen[b["index"]] = True
    finally:
        ctx.enable_progress_bars = saved
    if not seen.all():
        raise RuntimeError(f"revisited batch inference returned {int(seen.sum())} of {len(rows)} images")
    n = len(ds.imlist)
    return torch.from_numpy(feats[:n]), torch.from_numpy(feats[n:])


def evaluate_checkpoint(checkpoint: Union[str, os.PathLike], settings: EvalSettings,
                        out_dir: Optional[Union[str, os.PathLike]] = None) -> dict:
    """Features (cached) -> k-NN, linear probe, few-shot, low-shot, class-level retrieval (on
    train/test data) and revisited Oxford/Paris retrieval, as the settings select. Writes
    ``eval.json`` + ``eval.md``. ``checkpoint``: a checkpoint or run directory, or an exported
    ``.safetensors`` backbone."""
    s = settings.validate()
    if bool(s.train_data) != bool(s.test_data):
        raise ConfigError("evaluation: give both train_data and test_data (or neither, with revisited)")
    if not s.train_data and not s.revisited:
        raise ConfigError("evaluation: nothing to evaluate: give train_data and test_data, or revisited")
    t_start = time.time()
    t0 = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    teacher = load_teacher(checkpoint)
    out = Path(out_dir) if out_dir else default_out_dir(teacher.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(s.cache_dir) if s.cache_dir else out / "features"
    cache = FeatureCache(cache_dir)
    size = s.image_size or teacher.image_size
    timings: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    result: dict[str, Any] = {
        "checkpoint": str(teacher.checkpoint), "kind": teacher.kind,
        "global_step": teacher.global_step, "checkpoint_sha256": teacher.sha256,
        "image_size": size, "train": None, "test": None, "num_classes": None,
        "knn_top1": None, "knn_k": None, "knn": None, "linear_top1": None, "linear": None,
        "few_shot": None, "low_shot": None, "retrieval": None, "revisited": None,
        "finetune": None}
    if s.train_data:
        tr = open_source(s.train_data, s.format, s.image_column, s.label_column,
                         require_labels=True, what="train data")
        te = open_source(s.test_data, s.format, s.image_column, s.label_column,
                         require_labels=True, what="test data")
        log.info("evaluating %s (step %s) at %d px: train %s, test %s -> %s", teacher.checkpoint,
                 teacher.global_step, size, tr.uri, te.uri, out)
        feats, info = get_features(teacher, {"train": (tr, s.limit_train),
                                             "test": (te, s.limit_test)}, size, s, cache)
        ftr, fte = feats["train"], feats["test"]
        timings["features_train"] = info["train"]
        timings["features_test"] = info["test"]
        num_classes = int(max(ftr.labels.max(), fte.labels.max())) + 1

        t = time.perf_counter()
        knn = knn_accuracy(ftr.cls, ftr.labels, fte.cls, fte.labels, ks=s.ks,
                           temperature=s.temperature, num_classes=num_classes)
        timings["knn_s"] = time.perf_counter() - t
        k_main = 20 if 20 in s.ks else s.ks[0]
        result.update(train={"source": tr.uri, "rows": len(ftr), "skipped": ftr.skipped},
                      test={"source": te.uri, "rows": len(fte), "skipped": fte.skipped},
                      num_classes=num_classes, knn_top1=knn[f"knn_top1_k{k_main}"], knn_k=k_main,
                      knn=knn)
        if s.linear:
            t = time.perf_counter()
            linear = linear_probe(ftr.concat(s.linear_blocks), ftr.labels,
                                  fte.concat(s.linear_blocks), fte.labels, num_classes,
                                  s.linear_lrs, s.linear_epochs, s.linear_batch_size, seed=s.seed)
            linear["linear_feature_dim"] = int(ftr.concat(s.linear_blocks).shape[1])
            timings["linear_s"] = time.perf_counter() - t
            result.update(linear=linear, linear_top1=linear["linear_top1"])
        if s.few_shot:
            t = time.perf_counter()
            result["few_shot"] = few_shot(ftr.cls, ftr.labels, fte.cls, fte.labels, s.few_shot,
                                          s.few_shot_draws, s.seed, num_classes)
            timings["few_shot_s"] = time.perf_counter() - t
        if s.low_shot:
            t = time.perf_counter()
            result["low_shot"] = low_shot(ftr.cls, ftr.labels, fte.cls, fte.labels,
                                          s.low_shot_shots, s.low_shot_fractions,
                                          s.low_shot_draws, s.seed, s.low_shot_c, num_classes)
            timings["low_shot_s"] = time.perf_counter() - t
        if s.finetune:
            t = time.perf_counter()
            tv, tl = views_and_labels(iter_eval_batches(tr, size, s.limit_train, s.batch_size))
            qv, ql = views_and_labels(iter_eval_batches(te, size, s.limit_test, s.batch_size))
            result["finetune"] = fine_tune(
                teacher.backbone, tv, tl, qv, ql, teacher.mean, teacher.std, num_classes,
                s.finetune_epochs, s.finetune_batch_size, s.finetune_lr, s.finetune_layer_decay,
                s.finetune_weight_decay, s.finetune_warmup_epochs, s.seed, _device(s.device))
            timings["finetune_s"] = time.perf_counter() - t
        if s.retrieval:
            t = time.perf_counter()
            result["retrieval"] = class_retrieval(fte.cls, fte.labels, ftr.cls, ftr.labels,
                                                  s.retrieval_ks)
            timings["retrieval_s"] = time.perf_counter() - t
    if s.revisited:
        t = time.perf_counter()
        result["revisited"] = {}
        for path in s.revisited:
            r = revisited_eval(teacher, path, s, cache_dir)
            result["revisited"][r["dataset"]] = r
        timings["revisited_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    result.update(timings=timings, started_at=t_start, ended_at=time.time(), settings=s.to_dict())
    _write_json(out / RESULT_FILE, result)
    (out / SUMMARY_FILE).write_text(summary_markdown(result))
    log.info("%s | %.1fs -> %s", headline(result), timings["total_s"], out)
    return result


def headline(r: dict) -> str:
    """One line: the main number of each evaluation that ran."""
    parts = []
    if r.get("knn") is not None:
        parts.append(f"k-NN top-1 (k={r['knn_k']}): {r['knn_top1']:.2f}%")
        parts.append("linear top-1: " + ("-" if r["linear_top1"] is None
                                         else f"{r['linear_top1']:.2f}%"))
    if r.get("low_shot"):
        parts.append("low-shot " + ", ".join(f"{k}: {_fmt(v['mean'])}"
                                             for k, v in r["low_shot"].items()))
    if r.get("finetune"):
        parts.append(f"fine-tune top-1: {r['finetune']['finetune_top1']:.2f}%")
    if r.get("retrieval"):
        parts.append(f"retrieval mAP: {r['retrieval']['map']:.2f}")
    for name, v in (r.get("revisited") or {}).items():
        parts.append(f"{name} mAP M/H: {_fmt(v['medium']['map'])}/{_fmt(v['hard']['map'])}")
    return " | ".join(parts)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def summary_markdown(r: dict) -> str:
    st = r["settings"]
    step = "" if r["global_step"] is None else f" (step {r['global_step']})"
    lines = [f"# Evaluation of `{r['checkpoint']}`{step}", ""]
    t = r["timings"]
    if r["knn"] is not None:
        lines += [f"Teacher backbone [CLS] features at {r['image_size']} px (resize + centre crop); "
                  f"train {r['train']['rows']} images ({r['train']['skipped']} undecodable skipped) "
                  f"from `{r['train']['source']}`, test {r['test']['rows']} images "
                  f"({r['test']['skipped']} skipped) from `{r['test']['source']}`, "
                  f"{r['num_classes']} classes.", "",
                  "## k-NN (cosine, votes weighted by exp(sim / 0.07))", "", "| k | top-1 | top-5 |",
                  "|---|---|---|"]
        for k in st["ks"]:
            lines.append(f"| {k} | {_fmt(r['knn'].get(f'knn_top1_k{k}'))} | "
                         f"{_fmt(r['knn'].get(f'knn_top5_k{k}'))} |")
    if r["linear"]:
        li = r["linear"]
        lines += ["", f"## Linear probe ({li['linear_epochs']} epochs, SGD + cosine, features of "
                      f"the last {st['linear_blocks']} block(s), dim "
                      f"{li['linear_feature_dim']})", "",
                  f"Best top-1 **{_fmt(li['linear_top1'])}** (top-5 {_fmt(li['linear_top5'])}) "
                  f"at lr {li['linear_best_lr']}; per lr: "
                  + ", ".join(f"{k}: {v:.2f}" for k, v in li["linear_per_lr"].items())]
    if r["few_shot"]:
        lines += ["", f"## Few-shot (logistic regression, {st['few_shot_draws']} draws, "
                      f"seed {st['seed']})", "", "| shots / class | top-1 mean | std |",
                  "|---|---|---|"]
        for n, v in r["few_shot"].items():
            lines.append(f"| {n} | {_fmt(v['mean'])} | {_fmt(v['std'])} |"
                         + (f" skipped: {v['skipped']}" if v.get("skipped") else ""))
    if r["low_shot"]:
        lines += ["", f"## Low-shot (logistic regression on frozen features, C = "
                      f"{st['low_shot_c']}, {st['low_shot_draws']} seeded splits, seed {st['seed']})",
                  "", "| labels | labeled rows | top-1 mean | std |", "|---|---|---|---|"]
        for n, v in r["low_shot"].items():
            lines.append(f"| {n} | {v['train_rows'] if v['train_rows'] is not None else '-'} | "
                         f"{_fmt(v['mean'])} | {_fmt(v['std'])} |"
                         + (f" skipped: {v['skipped']}" if v.get("skipped") else ""))
    if r.get("finetune"):
        ft = r["finetune"]
        lines += ["", f"## Fine-tuning ({ft['finetune_epochs']} epochs, AdamW, lr "
                      f"{ft['finetune_lr']} x batch / 256, layer decay {ft['finetune_layer_decay']}, "
                      f"warmup {ft['finetune_warmup_epochs']} epoch(s) + cosine, {ft['finetune_train_rows']} "
                      f"train images)", "",
                  f"Top-1 **{ft['finetune_top1']:.2f}**; per epoch: "
                  + ", ".join(f"{a:.2f}" for a in ft["finetune_top1_per_epoch"])]
    if r["retrieval"]:
        rt = r["retrieval"]
        lines += ["", f"## Class-level retrieval (test queries against the train images, cosine)",
                  "", f"mAP **{rt['map']:.2f}** over {rt['queries']} queries; "
                  + ", ".join(f"P@{k} {v:.2f}" for k, v in rt["precision_at"].items())]
    for name, v in (r["revisited"] or {}).items():
        lines += ["", f"## Revisited {name} ({v['database']} images, {v['num_queries']} queries, "
                      f"longer side <= {v['imsize']} px, scales "
                      f"{', '.join(f'{x:.3f}' for x in v['scales'])})", "",
                  "| setting | mAP | " + " | ".join(f"mP@{k}" for k in st["retrieval_ks"]) + " |",
                  "|---|---|" + "---|" * len(st["retrieval_ks"])]
        for setting in ("easy", "medium", "hard"):
            m = v[setting]
            mp = m["mp_at"] or {}
            lines.append(f"| {setting} | {_fmt(m['map'])} | "
                         + " | ".join(_fmt(mp.get(str(k))) for k in st["retrieval_ks"]) + " |")

    def feat_time(name: str) -> str:
        i = t[f"features_{name}"]
        if i["cached"]:
            return f"{name} from the cache"
        return f"{name} {i['rows']} images {i['seconds']:.1f}s ({i['images_per_s']:.0f} img/s, {i['mode']})"

    lines += ["", "## Time", ""]
    if "features_train" in t:
        pipe = t["features_train"].get("pipeline_s") or t["features_test"].get("pipeline_s")
        lines.append(f"- features: {feat_time('train')}; {feat_time('test')}"
                     + (f" (one Ray Data pipeline, {pipe:.1f}s)" if pipe else ""))
    stages = [("k-NN", "knn_s"), ("linear", "linear_s"), ("few-shot", "few_shot_s"),
              ("low-shot", "low_shot_s"), ("fine-tune", "finetune_s"), ("retrieval", "retrieval_s"),
              ("revisited (features + metrics)", "revisited_s")]
    lines.append("- " + "; ".join(f"{n} {t[k]:.1f}s" for n, k in stages if k in t)
                 + f"; total {t['total_s']:.1f}s")
    lines.append("")
    return "\n".join(lines)


# ---- embed: features of a source as sharded Parquet ----------------------------------------

def embed_source(checkpoint: Union[str, os.PathLike], data: str, out_dir: Union[str, os.PathLike],
                 s: EvalSettings, blocks: int = 1, limit: Optional[int] = None,
                 rows_per_shard: int = 50_000,
                 progress: Optional[Callable[[str], None]] = print_progress) -> dict:
    """Embeddings of every row of ``data`` (labeled or not) -> ``out_dir/part-*.parquet`` +
    ``_embed.json`` (see :mod:`massl_ray.evaluate.embed`). ``s`` supplies the view size,
    reader, batch size and where the backbone runs (``local``: this process; else Ray Data batch
    inference with an actor pool). The backbone pass is the evaluation's (the [CLS] of the last
    ``max(blocks, linear_blocks)`` blocks), so the final-[CLS] embedding is bit for bit the
    evaluations' k-NN feature at the same batch size."""
    s = s.validate("embed")
    if blocks <= 0:
        raise ConfigError("embed: --blocks must be positive")
    if s.threads:
        torch.set_num_threads(s.threads)
    teacher = load_teacher(checkpoint)
    src = open_source(data, s.format, s.image_column, s.label_column, what="embed data")
    size = s.image_size or teacher.image_size
    width = max(blocks, s.linear_blocks)
    total = src.num_rows if limit is None else min(limit, src.num_rows)
    writer = ShardWriter(out_dir, rows_per_shard, src.labeled, total, progress)
    log.info("embedding %s (%d rows) with %s at %d px -> %s", src.uri, total, teacher.checkpoint,
             size, out_dir)
    t0 = time.perf_counter()
    if s.local:
        embed = TeacherFeatures(teacher.backbone, teacher.mean, teacher.std, width,
                                _device(s.device), s.batch_size)
        embed_in_process(embed, src, writer, size, blocks, limit, batch_rows=s.batch_size)
        mode = "in_process"
    else:
        _embed_ray_data(teacher, src, limit, size, width, blocks, s, writer)
        mode = "ray_data"
    info = {"checkpoint": str(teacher.checkpoint), "kind": teacher.kind,
            "checkpoint_sha256": teacher.sha256, "global_step": teacher.global_step,
            "source": src.uri, "limit": limit, "image_size": size, "blocks": blocks,
            "feature": "final [CLS]" if blocks == 1 else f"[CLS] of the last {blocks} blocks",
            "mode": mode, "labeled": src.labeled}
    manifest = writer.close(info)
    manifest["wall_s"] = time.perf_counter() - t0
    return manifest


def _embed_ray_data(teacher: Teacher, src: Source, limit: Optional[int], size: int, width: int,
                    blocks: int, s: EvalSettings, writer: ShardWriter) -> None:
    """read -> decode + eval view (CPU tasks) -> backbone (actor pool) -> the driver writes the
    shards as batches arrive, in row order."""
    import ray

    from massl_ray.data.pipeline import read_source

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        weights_ref = ray.put(teacher.weights)
        ds = _views_to_features(
            read_source(src, limit),
            EvalViewsFn(size, src.image_column, src.label_column, src.classes, with_ids=True,
                        require_labels=False),
            s, teacher, weights_ref, width)
        start = 0
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(b["ok"])
            writer.add(np.arange(start, start + n), list(b["id"]),
                       b["label"] if src.labeled else None, select_blocks(b["features"], blocks),
                       b["ok"], n)
            start += n
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    if writer.seen != (src.num_rows if limit is None else min(limit, src.num_rows)):
        raise RuntimeError(f"batch inference returned {writer.seen} rows for {writer.total} inputs")
