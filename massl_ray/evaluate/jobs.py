"""Evaluation jobs: features by Ray Data batch inference (or in-process), then k-NN, linear
probe and few-shot on a checkpoint's teacher, written as JSON and a markdown summary.

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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from massl_ray.config import ConfigError, _coerce
from massl_ray.evaluate.features import (EvalViewsFn, FeatureCache, FeatureFn, FeatureSet, Teacher,
                       TeacherFeatures, cache_key, extract_in_process, load_teacher)
from massl_ray.evaluate.knn import DEFAULT_KS, knn_accuracy
from massl_ray.evaluate.probe import DEFAULT_LRS, few_shot, linear_probe
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
            if k in ("ks", "linear_lrs", "few_shot") and isinstance(v, (int, float)):
                v = [v]
            if k in ("ks", "linear_lrs", "few_shot"):
                elem = int if k != "linear_lrs" else float
                if isinstance(v, str):
                    v = [x for x in v.split(",") if x.strip()]
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


@functools.lru_cache(maxsize=1)
def _hints() -> dict:
    from typing import get_type_hints

    return get_type_hints(EvalSettings)


def default_out_dir(checkpoint: Path) -> Path:
    """``<run dir>/eval/<checkpoint name>``: next to the run, not inside the checkpoint (Ray
    deletes old checkpoint directories)."""
    return checkpoint.parent / "eval" / checkpoint.name


# ---- features ------------------------------------------------------------------------------

def _device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def features_in_process(teacher: Teacher, src: Source, size: int, limit: Optional[int],
                        s: EvalSettings) -> FeatureSet:
    embed = TeacherFeatures(teacher.backbone, teacher.cfg.crops.mean, teacher.cfg.crops.std,
                            s.linear_blocks, _device(s.device), s.batch_size)
    return extract_in_process(embed, src, size, limit, batch_rows=s.batch_size)


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
        # A Parquet file is often read as one block, decoded by one task on one CPU: cut it.
        ds = ds.repartition(target_num_rows_per_block=4 * s.batch_size)
        ds = ds.map_batches(
            EvalViewsFn(size, first.image_column, first.label_column, first.classes),
            batch_size=s.batch_size, batch_format="numpy", num_cpus=s.decode_cpus,
            zero_copy_batch=True)
        gpu = s.gpus_per_actor > 0
        ds = ds.map_batches(
            FeatureFn,
            fn_constructor_kwargs={
                "weights": functools.partial(ray.get, weights_ref),
                "config": teacher.cfg.to_dict(), "blocks": s.linear_blocks,
                "device": "cuda" if gpu else "cpu",
                "threads": max(1, int(s.cpus_per_actor)), "batch_size": s.batch_size},
            batch_size=s.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=_actor_pool_size(s)),
            num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor if gpu else None)
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

def evaluate_checkpoint(checkpoint: Union[str, os.PathLike], settings: EvalSettings,
                        out_dir: Optional[Union[str, os.PathLike]] = None) -> dict:
    """Features (cached) -> k-NN, linear probe, few-shot. Writes ``eval.json`` + ``eval.md``."""
    s = settings.validate()
    t_start = time.time()
    t0 = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    teacher = load_teacher(checkpoint)
    out = Path(out_dir) if out_dir else default_out_dir(teacher.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(Path(s.cache_dir) if s.cache_dir else out / "features")
    tr = open_source(s.train_data, s.format, s.image_column, s.label_column, require_labels=True,
                     what="train data")
    te = open_source(s.test_data, s.format, s.image_column, s.label_column, require_labels=True,
                     what="test data")
    size = s.image_size or teacher.cfg.crops.global_size
    timings: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    log.info("evaluating %s (step %d) at %d px: train %s, test %s -> %s", teacher.checkpoint,
             teacher.global_step, size, tr.uri, te.uri, out)

    feats, info = get_features(teacher, {"train": (tr, s.limit_train), "test": (te, s.limit_test)},
                               size, s, cache)
    ftr, fte = feats["train"], feats["test"]
    timings["features_train"] = info["train"]
    timings["features_test"] = info["test"]
    num_classes = int(max(ftr.labels.max(), fte.labels.max())) + 1

    t = time.perf_counter()
    knn = knn_accuracy(ftr.cls, ftr.labels, fte.cls, fte.labels, ks=s.ks,
                       temperature=s.temperature, num_classes=num_classes)
    timings["knn_s"] = time.perf_counter() - t
    linear = None
    if s.linear:
        t = time.perf_counter()
        linear = linear_probe(ftr.concat(s.linear_blocks), ftr.labels, fte.concat(s.linear_blocks),
                              fte.labels, num_classes, s.linear_lrs, s.linear_epochs,
                              s.linear_batch_size, seed=s.seed)
        linear["linear_feature_dim"] = int(ftr.concat(s.linear_blocks).shape[1])
        timings["linear_s"] = time.perf_counter() - t
    fewshot = None
    if s.few_shot:
        t = time.perf_counter()
        fewshot = few_shot(ftr.cls, ftr.labels, fte.cls, fte.labels, s.few_shot,
                           s.few_shot_draws, s.seed, num_classes)
        timings["few_shot_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    k_main = 20 if 20 in s.ks else s.ks[0]
    result = {
        "checkpoint": str(teacher.checkpoint),
        "global_step": teacher.global_step,
        "checkpoint_sha256": teacher.sha256,
        "image_size": size,
        "train": {"source": tr.uri, "rows": len(ftr), "skipped": ftr.skipped},
        "test": {"source": te.uri, "rows": len(fte), "skipped": fte.skipped},
        "num_classes": num_classes,
        "knn_top1": knn[f"knn_top1_k{k_main}"],
        "knn_k": k_main,
        "knn": knn,
        "linear_top1": linear["linear_top1"] if linear else None,
        "linear": linear,
        "few_shot": fewshot,
        "timings": timings,
        "started_at": t_start,
        "ended_at": time.time(),
        "settings": s.to_dict(),
    }
    _write_json(out / RESULT_FILE, result)
    (out / SUMMARY_FILE).write_text(summary_markdown(result))
    log.info("k-NN top-1 (k=%d) %.2f%% | linear top-1 %s | %.1fs", k_main, result["knn_top1"],
             f"{result['linear_top1']:.2f}%" if linear else "-", timings["total_s"])
    return result


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def summary_markdown(r: dict) -> str:
    lines = [f"# Evaluation of `{r['checkpoint']}` (step {r['global_step']})", "",
             f"Teacher backbone [CLS] features at {r['image_size']} px (resize + centre crop); "
             f"train {r['train']['rows']} images ({r['train']['skipped']} undecodable skipped) "
             f"from `{r['train']['source']}`, test {r['test']['rows']} images "
             f"({r['test']['skipped']} skipped) from `{r['test']['source']}`, "
             f"{r['num_classes']} classes.", "",
             "## k-NN (cosine, votes weighted by exp(sim / 0.07))", "", "| k | top-1 | top-5 |",
             "|---|---|---|"]
    for k in r["settings"]["ks"]:
        lines.append(f"| {k} | {_fmt(r['knn'].get(f'knn_top1_k{k}'))} | "
                     f"{_fmt(r['knn'].get(f'knn_top5_k{k}'))} |")
    if r["linear"]:
        li = r["linear"]
        lines += ["", f"## Linear probe ({li['linear_epochs']} epochs, SGD + cosine, features of "
                      f"the last {r['settings']['linear_blocks']} block(s), dim "
                      f"{li['linear_feature_dim']})", "",
                  f"Best top-1 **{_fmt(li['linear_top1'])}** (top-5 {_fmt(li['linear_top5'])}) "
                  f"at lr {li['linear_best_lr']}; per lr: "
                  + ", ".join(f"{k}: {v:.2f}" for k, v in li["linear_per_lr"].items())]
    if r["few_shot"]:
        lines += ["", f"## Few-shot (logistic regression, {r['settings']['few_shot_draws']} draws, "
                      f"seed {r['settings']['seed']})", "", "| shots / class | top-1 mean | std |",
                  "|---|---|---|"]
        for n, v in r["few_shot"].items():
            lines.append(f"| {n} | {_fmt(v['mean'])} | {_fmt(v['std'])} |"
                         + (f" skipped: {v['skipped']}" if v.get("skipped") else ""))
    t = r["timings"]

    def feat_time(name: str) -> str:
        i = t[f"features_{name}"]
        if i["cached"]:
            return f"{name} from the cache"
        return f"{name} {i['rows']} images {i['seconds']:.1f}s ({i['images_per_s']:.0f} img/s, {i['mode']})"

    pipe = t["features_train"].get("pipeline_s") or t["features_test"].get("pipeline_s")
    lines += ["", "## Time", "",
              f"- features: {feat_time('train')}; {feat_time('test')}"
              + (f" (one Ray Data pipeline, {pipe:.1f}s)" if pipe else ""),
              f"- k-NN {t['knn_s']:.1f}s; linear {t.get('linear_s', 0):.1f}s; few-shot "
              f"{t.get('few_shot_s', 0):.1f}s; total {t['total_s']:.1f}s", ""]
    return "\n".join(lines)
