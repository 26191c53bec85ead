"""The ``eval`` and ``embed`` jobs: their settings (:class:`EvalSettings`) and the steps that
run them on a checkpoint's (or an exported backbone's) teacher: features (cached; in this
process, or by :mod:`inference`'s Ray Data batch inference), then k-NN, linear probe,
few-shot, low-shot, class-level and revisited Oxford/Paris retrieval and fine-tuning, written
as ``eval.json`` and the :mod:`report`; ``embed`` writes a source's features as Parquet.

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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from massl_ray.config import ConfigError, _coerce
from massl_ray.data.sources import Source, open_source
from massl_ray.evaluate.embed import ShardWriter, embed_in_process, print_progress
from massl_ray.evaluate.features import (FeatureCache, FeatureSet, Teacher, TeacherFeatures,
                                         cache_key, extract_in_process, labeled_views,
                                         load_teacher)
from massl_ray.evaluate.finetune import fine_tune
from massl_ray.evaluate.knn import DEFAULT_KS, knn_accuracy
from massl_ray.evaluate.lowshot import DEFAULT_FRACTIONS, DEFAULT_SHOTS, low_shot
from massl_ray.evaluate.probe import DEFAULT_LRS, few_shot, linear_probe
from massl_ray.evaluate.report import headline, summary_markdown  # noqa: F401 (cli: headline)
from massl_ray.evaluate.retrieval import (DEFAULT_RETRIEVAL_KS, DINO_SCALES, MultiScaleFeatures,
                                          class_retrieval, evaluate_revisited, load_revisited,
                                          revisited_cache_key, revisited_features)

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


def _extractor(teacher: Teacher, s: EvalSettings, blocks: int) -> TeacherFeatures:
    return TeacherFeatures(teacher.backbone, teacher.mean, teacher.std, blocks, _device(s.device),
                           s.batch_size)


def _compute_features(teacher: Teacher, splits: dict[str, tuple[Source, Optional[int]]],
                      names: list[str], size: int, s: EvalSettings) -> dict[str, dict]:
    """The features of ``names`` (one Ray Data pipeline, or in this process), each with how
    long it took (a pipeline's wall time is shared out by rows)."""
    if s.local:
        out = {}
        for name in names:
            t0 = time.perf_counter()
            src, limit = splits[name]
            fs = extract_in_process(_extractor(teacher, s, s.linear_blocks), src, size, limit,
                                    batch_rows=s.batch_size)
            out[name] = {"fs": fs, "seconds": time.perf_counter() - t0}
        return out
    from massl_ray.evaluate.inference import features_ray_data

    t0 = time.perf_counter()
    computed = features_ray_data(teacher, [splits[n] for n in names], size, s)
    secs = time.perf_counter() - t0
    n_all = max(sum(len(f) for f in computed), 1)
    return {name: {"fs": fs, "seconds": secs * len(fs) / n_all, "pipeline_s": secs}
            for name, fs in zip(names, computed)}


def get_features(teacher: Teacher, splits: dict[str, tuple[Source, Optional[int]]], size: int,
                 s: EvalSettings, cache: FeatureCache) -> tuple[dict[str, FeatureSet], dict]:
    """Features of each split (name -> (source, limit)), from the cache where present; the
    missing ones are computed together and cached. Returns the features and, per split, how
    they were obtained and how long it took."""
    out: dict[str, FeatureSet] = {}
    info: dict[str, dict] = {}
    keys = {}
    for name, (src, limit) in splits.items():
        keys[name] = key = cache_key(teacher.sha256, src, limit, size, s.linear_blocks)
        t0 = time.perf_counter()
        fs = cache.load(name, key)
        if fs is not None:
            out[name] = fs
            info[name] = {"cached": True, "seconds": time.perf_counter() - t0, "key": key,
                          "rows": len(fs), "skipped": fs.skipped}
    missing = [name for name in splits if name not in out]
    if not missing:
        return out, info
    mode = "in_process" if s.local else "ray_data"
    for name, got in _compute_features(teacher, splits, missing, size, s).items():
        fs = out[name] = got.pop("fs")
        src, limit = splits[name]
        info[name] = dict(got, cached=False, key=keys[name], mode=mode, rows=len(fs),
                          skipped=fs.skipped, images_per_s=len(fs) / max(got["seconds"], 1e-9))
        cache.save(name, keys[name], fs, {"checkpoint": str(teacher.checkpoint),
                                          "checkpoint_sha256": teacher.sha256, "source": src.uri,
                                          "limit": limit, "size": size, "blocks": s.linear_blocks,
                                          "rows": len(fs), "skipped": fs.skipped})
    return out, info


# ---- the evaluation ------------------------------------------------------------------------

def _revisited_features(teacher: Teacher, ds, s: EvalSettings, t0: float):
    if not s.local:
        from massl_ray.evaluate.inference import revisited_ray_data

        return revisited_ray_data(teacher, ds, s)
    embed = MultiScaleFeatures(teacher.backbone, teacher.mean, teacher.std, s.revisited_scales,
                               _device(s.device))
    step = max(1, (len(ds.imlist) + len(ds.qimlist)) // 10)

    def progress(done: int, n: int) -> None:
        if done % step == 0 or done == n:
            log.info("revisited %s: %d/%d images (%.0fs)", ds.name, done, n,
                     time.perf_counter() - t0)

    return revisited_features(embed, ds, s.revisited_imsize, progress)


def revisited_eval(teacher: Teacher, path: str, s: EvalSettings, cache_dir: Path) -> dict:
    """One revisited Oxford/Paris data set: multi-scale features (cached as
    ``revisited-<name>-<key>.npz``), rankings, mAP / mP@k per setting. The images differ in
    size, so each is one forward per scale: in this process (``local``, on ``device``), or by
    Ray Data batch inference (an actor pool that reads, decodes and embeds each image)."""
    t0 = time.perf_counter()
    ds = load_revisited(path)
    key = revisited_cache_key(teacher.sha256, ds, s.revisited_imsize, s.revisited_scales)
    f = cache_dir / f"revisited-{ds.name}-{key}.npz"
    feats = None
    if f.is_file():
        try:
            with np.load(f) as z:
                feats = (torch.from_numpy(z["database"].copy()), torch.from_numpy(z["queries"].copy()))
        except (OSError, ValueError, KeyError):
            feats = None
    cached = feats is not None
    if not cached:
        feats = _revisited_features(teacher, ds, s, t0)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, database=feats[0].numpy(), queries=feats[1].numpy())
        os.replace(tmp, f)
    t1 = time.perf_counter()
    res = evaluate_revisited(ds, feats, s.retrieval_ks)
    res.update(features_s=t1 - t0, features_cached=cached, metrics_s=time.perf_counter() - t1,
               source=str(ds.gnd_file), imsize=s.revisited_imsize,
               scales=[float(x) for x in s.revisited_scales])
    return res


def _timed(timings: dict, key: str, fn: Callable, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``, its wall seconds recorded as ``timings[key]``."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[key] = time.perf_counter() - t
    return out


def _check_inputs(settings: EvalSettings) -> EvalSettings:
    s = settings.validate()
    if bool(s.train_data) != bool(s.test_data):
        raise ConfigError("evaluation: give both train_data and test_data (or neither, with revisited)")
    if not s.train_data and not s.revisited:
        raise ConfigError("evaluation: nothing to evaluate: give train_data and test_data, or revisited")
    return s


def _empty_result(teacher: Teacher, size: int) -> dict:
    return {"checkpoint": str(teacher.checkpoint), "kind": teacher.kind,
            "global_step": teacher.global_step, "checkpoint_sha256": teacher.sha256,
            "image_size": size, "train": None, "test": None, "num_classes": None,
            "knn_top1": None, "knn_k": None, "knn": None, "linear_top1": None, "linear": None,
            "few_shot": None, "low_shot": None, "retrieval": None, "revisited": None,
            "finetune": None}


def _labeled_evaluations(teacher: Teacher, s: EvalSettings, size: int, cache: FeatureCache,
                         out: Path, result: dict, timings: dict) -> None:
    """Features of train_data / test_data, then every evaluation on them the settings select."""
    tr = open_source(s.train_data, s.format, s.image_column, s.label_column,
                     require_labels=True, what="train data")
    te = open_source(s.test_data, s.format, s.image_column, s.label_column,
                     require_labels=True, what="test data")
    log.info("evaluating %s (step %s) at %d px: train %s, test %s -> %s", teacher.checkpoint,
             teacher.global_step, size, tr.uri, te.uri, out)
    feats, info = get_features(teacher, {"train": (tr, s.limit_train),
                                         "test": (te, s.limit_test)}, size, s, cache)
    ftr, fte = feats["train"], feats["test"]
    timings["features_train"], timings["features_test"] = info["train"], info["test"]
    classes = int(max(ftr.labels.max(), fte.labels.max())) + 1
    knn = _timed(timings, "knn_s", knn_accuracy, ftr.cls, ftr.labels, fte.cls, fte.labels,
                 ks=s.ks, temperature=s.temperature, num_classes=classes)
    k_main = 20 if 20 in s.ks else s.ks[0]
    result.update(train={"source": tr.uri, "rows": len(ftr), "skipped": ftr.skipped},
                  test={"source": te.uri, "rows": len(fte), "skipped": fte.skipped},
                  num_classes=classes, knn_top1=knn[f"knn_top1_k{k_main}"], knn_k=k_main, knn=knn)
    if s.linear:
        xtr, xte = ftr.concat(s.linear_blocks), fte.concat(s.linear_blocks)
        linear = _timed(timings, "linear_s", linear_probe, xtr, ftr.labels, xte, fte.labels,
                        classes, s.linear_lrs, s.linear_epochs, s.linear_batch_size, seed=s.seed)
        linear["linear_feature_dim"] = int(xtr.shape[1])
        result.update(linear=linear, linear_top1=linear["linear_top1"])
    if s.few_shot:
        result["few_shot"] = _timed(timings, "few_shot_s", few_shot, ftr.cls, ftr.labels, fte.cls,
                                    fte.labels, s.few_shot, s.few_shot_draws, s.seed, classes)
    if s.low_shot:
        result["low_shot"] = _timed(timings, "low_shot_s", low_shot, ftr.cls, ftr.labels, fte.cls,
                                    fte.labels, s.low_shot_shots, s.low_shot_fractions,
                                    s.low_shot_draws, s.seed, s.low_shot_c, classes)
    if s.finetune:
        result["finetune"] = _timed(timings, "finetune_s", _finetune, teacher, tr, te, size, s,
                                    classes)
    if s.retrieval:
        result["retrieval"] = _timed(timings, "retrieval_s", class_retrieval, fte.cls, fte.labels,
                                     ftr.cls, ftr.labels, s.retrieval_ks)


def _finetune(teacher: Teacher, tr: Source, te: Source, size: int, s: EvalSettings,
              classes: int) -> dict:
    tv, tl = labeled_views(tr, size, s.limit_train, s.batch_size)
    qv, ql = labeled_views(te, size, s.limit_test, s.batch_size)
    return fine_tune(teacher.backbone, tv, tl, qv, ql, teacher.mean, teacher.std, classes,
                     s.finetune_epochs, s.finetune_batch_size, s.finetune_lr,
                     s.finetune_layer_decay, s.finetune_weight_decay, s.finetune_warmup_epochs,
                     s.seed, _device(s.device))


def evaluate_checkpoint(checkpoint: Union[str, os.PathLike], settings: EvalSettings,
                        out_dir: Optional[Union[str, os.PathLike]] = None) -> dict:
    """Features (cached) -> k-NN, linear probe, few-shot, low-shot, class-level retrieval (on
    train/test data) and revisited Oxford/Paris retrieval, as the settings select. Writes
    ``eval.json`` + ``eval.md``. ``checkpoint``: a checkpoint or run directory, or an exported
    ``.safetensors`` backbone."""
    s = _check_inputs(settings)
    t_start = time.time()
    t0 = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    teacher = load_teacher(checkpoint)
    out = Path(out_dir) if out_dir else default_out_dir(teacher.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(s.cache_dir) if s.cache_dir else out / "features"
    size = s.image_size or teacher.image_size
    timings: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    result = _empty_result(teacher, size)
    if s.train_data:
        _labeled_evaluations(teacher, s, size, FeatureCache(cache_dir), out, result, timings)
    if s.revisited:
        runs = _timed(timings, "revisited_s", lambda: [revisited_eval(teacher, p, s, cache_dir)
                                                       for p in s.revisited])
        result["revisited"] = {r["dataset"]: r for r in runs}
    timings["total_s"] = time.perf_counter() - t0
    result.update(timings=timings, started_at=t_start, ended_at=time.time(), settings=s.to_dict())
    tmp = out / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out / RESULT_FILE)
    (out / SUMMARY_FILE).write_text(summary_markdown(result))
    log.info("%s | %.1fs -> %s", headline(result), timings["total_s"], out)
    return result


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
        embed_in_process(_extractor(teacher, s, width), src, writer, size, blocks, limit,
                         batch_rows=s.batch_size)
    else:
        from massl_ray.evaluate.inference import embed_ray_data

        embed_ray_data(teacher, src, limit, size, width, blocks, s, writer)
    info = {"checkpoint": str(teacher.checkpoint), "kind": teacher.kind,
            "checkpoint_sha256": teacher.sha256, "global_step": teacher.global_step,
            "source": src.uri, "limit": limit, "image_size": size, "blocks": blocks,
            "feature": "final [CLS]" if blocks == 1 else f"[CLS] of the last {blocks} blocks",
            "mode": "in_process" if s.local else "ray_data", "labeled": src.labeled}
    manifest = writer.close(info)
    manifest["wall_s"] = time.perf_counter() - t0
    return manifest
