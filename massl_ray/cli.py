"""Command line: ``python -m massl_ray train --config jobs/<name>.yaml [section.key=value ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from massl_ray.config import ConfigError, load_config

log = logging.getLogger("massl_ray")


def _train(args: argparse.Namespace) -> int:
    from massl_ray.train.trainer import setup_logging, train

    setup_logging(0)
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"run.num_workers={args.num_workers}")
    if args.local:
        overrides.append("run.num_workers=0")
    cfg = load_config(args.config, overrides)
    result = train(cfg, local=args.local)
    m = result.get("metrics", {})
    print(f"done: {result['mode']} run {cfg.run.name!r}, step {m.get('step')}, "
          f"loss {m.get('loss', float('nan')):.4f}, {result['wall_s']:.0f}s, "
          f"skipped images {result['skipped_images']}, checkpoint {result['checkpoint']}")
    if "knn" in result:
        k = result["knn"]
        print(f"k-NN top-1 (k={k['k']}): trained {k['trained_top1']:.2f}% vs random-init "
              f"backbone {k['random_init_top1']:.2f}%")
    return 0


def _show_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from massl_ray.evaluate.jobs import EvalSettings, evaluate_checkpoint
    from massl_ray.runtime import init_ray
    from massl_ray.train.trainer import setup_logging

    setup_logging(0)
    given = {k: v for k, v in vars(args).items() if k in EVAL_FLAGS and v is not None}
    settings = EvalSettings.from_dict(given, what="eval")
    if not settings.local:
        init_ray()
    r = evaluate_checkpoint(args.checkpoint, settings, args.out)
    from massl_ray.evaluate.jobs import default_out_dir, headline

    print(f"{headline(r)} | {r['timings']['total_s']:.0f}s -> "
          f"{args.out or default_out_dir(Path(r['checkpoint']))}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from massl_ray.evaluate.jobs import EvalSettings, embed_source
    from massl_ray.runtime import init_ray
    from massl_ray.train.trainer import setup_logging

    setup_logging(0)
    given = {k: v for k, v in vars(args).items() if k in EMBED_FLAGS and v is not None}
    settings = EvalSettings.from_dict(given, what="embed")
    if args.rows_per_shard <= 0 or (args.limit is not None and args.limit <= 0):
        raise ConfigError("embed: --rows-per-shard and --limit must be positive")
    if not settings.local:
        init_ray()
    m = embed_source(args.checkpoint, args.data, args.out, settings, blocks=args.blocks,
                     limit=args.limit, rows_per_shard=args.rows_per_shard)
    print(f"wrote {m['rows']} embeddings (dim {m['dim']}, {m['feature']}) in {len(m['shards'])} "
          f"shard(s), {m['skipped']} undecodable skipped, {m['wall_s']:.0f}s ({m['mode']}) -> {args.out}")
    return 0


# ``embed`` flags -> EvalSettings keys.
EMBED_FLAGS = ("format", "image_column", "label_column", "image_size", "batch_size", "concurrency",
               "cpus_per_actor", "gpus_per_actor", "decode_cpus", "device", "threads", "local")


def _add_embed_parser(sub) -> None:
    m = sub.add_parser("embed", help="teacher embeddings of a source as sharded Parquet "
                                     "(Ray Data batch inference, or --local)")
    m.add_argument("--checkpoint", required=True,
                   help="a checkpoint or run directory, or an exported .safetensors backbone")
    m.add_argument("--data", required=True, help="Parquet file/folder or image folder (labels optional)")
    m.add_argument("--out", required=True, help="output directory (part-*.parquet + _embed.json)")
    m.add_argument("--local", action="store_true", default=None,
                   help="run the backbone in this process (no Ray)")
    m.add_argument("--blocks", type=int, default=1,
                   help="concatenate the [CLS] of the last N blocks (default 1: the k-NN feature)")
    m.add_argument("--limit", type=int, default=None, help="only the first N rows")
    m.add_argument("--rows-per-shard", type=int, default=50_000, help="rows per Parquet file")
    for flag, kind, hint in (
            ("--image-size", int, "eval view size (default: the model's)"),
            ("--batch-size", int, "images per inference batch"),
            ("--concurrency", int, "feature actors"), ("--cpus-per-actor", float, None),
            ("--gpus-per-actor", float, "> 0: actors on GPU"), ("--decode-cpus", float, None),
            ("--device", str, "in-process device: auto|cpu|cuda"),
            ("--threads", int, "torch threads in this process"),
            ("--format", str, "auto|parquet|folder"), ("--image-column", str, None),
            ("--label-column", str, None)):
        m.add_argument(flag, type=kind, default=None, help=hint)
    m.set_defaults(fn=_embed)


def _export(args: argparse.Namespace) -> int:
    from massl_ray.evaluate.export import export_teacher, sidecar_path

    meta = export_teacher(args.checkpoint, args.out)
    print(f"wrote {args.out} and {sidecar_path(args.out)}: timm.create_model({meta['timm_name']!r}, "
          f"**{meta['timm_kwargs']}) (step {meta['global_step']})")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from massl_ray.sweep import run_sweep
    from massl_ray.train.trainer import setup_logging

    setup_logging(0)
    s = run_sweep(args.config, args.overrides, retry_errored=args.retry_errored)
    print(f"sweep: {s['finished']}/{s['trials']} trials finished, {s['evaluated']} evaluated, "
          f"{s['wall_s']:.0f}s -> {s['results_md']}"
          + (" (interrupted: run the same command to resume)" if s["interrupted"] else ""))
    return 0 if not s["interrupted"] and not s["errors"] else 1


# ``eval`` flags -> EvalSettings keys (values parsed by EvalSettings.from_dict).
EVAL_FLAGS = ("train_data", "test_data", "format", "image_column", "label_column", "limit_train",
              "limit_test", "image_size", "ks", "linear_epochs", "linear_lrs", "linear_blocks",
              "few_shot", "few_shot_draws", "seed", "batch_size", "concurrency", "cpus_per_actor",
              "gpus_per_actor", "decode_cpus", "device", "threads", "cache_dir", "local", "linear",
              "low_shot", "low_shot_shots", "low_shot_fractions", "low_shot_draws", "low_shot_c",
              "retrieval", "retrieval_ks", "revisited", "revisited_imsize", "revisited_scales",
              "finetune", "finetune_epochs", "finetune_lr", "finetune_batch_size",
              "finetune_layer_decay", "finetune_weight_decay", "finetune_warmup_epochs")


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="k-NN, linear probe, few-/low-shot and retrieval of a "
                                    "checkpoint's teacher (or an exported backbone)")
    e.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory, a run directory (its newest valid checkpoint), or "
                        "an exported .safetensors backbone (with its .json sidecar)")
    e.add_argument("--train-data", default=None,
                   help="labeled bank / probe training set / retrieval database")
    e.add_argument("--test-data", default=None, help="labeled test set / retrieval queries")
    e.add_argument("--out", default=None, help="output directory (default <run>/eval/<checkpoint>)")
    e.add_argument("--local", action="store_true", default=None,
                   help="features in this process (no Ray); default: Ray Data batch inference")
    e.add_argument("--no-linear", dest="linear", action="store_false", default=None,
                   help="skip the linear probe")
    e.add_argument("--low-shot", action="store_true", default=None,
                   help="low-shot: 1/2/5 per class and 1%%/10%% of the labels, seeded splits")
    e.add_argument("--retrieval", action="store_true", default=None,
                   help="class-level retrieval: test queries against the train images (mAP, P@k)")
    e.add_argument("--finetune", action="store_true", default=None,
                   help="fine-tuning transfer: backbone + head, AdamW, layer-wise lr decay, "
                        "warmup + cosine (in this process)")
    e.add_argument("--revisited", default=None,
                   help="revisited Oxford/Paris data set directories (gnd_<name>.pkl + jpg/), "
                        "comma-separated; without --train-data/--test-data only these run")
    for flag, kind, hint in (
            ("--limit-train", int, "use at most N train rows"), ("--limit-test", int, "at most N test rows"),
            ("--image-size", int, "eval view size (default: the run's crops.global_size)"),
            ("--ks", str, "k values, comma-separated (default 10,20,100,200)"),
            ("--linear-epochs", int, "linear probe epochs (default 100)"),
            ("--linear-lrs", str, "linear probe learning rates, comma-separated"),
            ("--linear-blocks", int, "concatenate the [CLS] of the last N blocks (default 4)"),
            ("--few-shot", str, "shots per class, comma-separated (default 1,5,10; '' disables)"),
            ("--few-shot-draws", int, "random draws per shot count (default 5)"),
            ("--low-shot-shots", str, "low-shot images per class, comma-separated (default 1,2,5)"),
            ("--low-shot-fractions", str, "low-shot label fractions (default 0.01,0.1)"),
            ("--low-shot-draws", int, "low-shot seeded splits per setting (default 3)"),
            ("--low-shot-c", float, "inverse L2 penalty of the low-shot logistic regression (1)"),
            ("--finetune-epochs", int, "fine-tune epochs (default 10)"),
            ("--finetune-lr", float, "fine-tune base lr, x batch / 256 (default 5e-4)"),
            ("--finetune-batch-size", int, "fine-tune batch (default 128)"),
            ("--finetune-layer-decay", float, "layer-wise lr decay (default 0.75)"),
            ("--finetune-weight-decay", float, "AdamW weight decay (default 0.05)"),
            ("--finetune-warmup-epochs", float, "linear warmup epochs (default 1)"),
            ("--retrieval-ks", str, "k of precision@k / mP@k, comma-separated (default 1,5,10)"),
            ("--revisited-imsize", int, "revisited: longer image side at most N px (default 224)"),
            ("--revisited-scales", str, "revisited: scales (default 1,0.7071,0.5)"),
            ("--seed", int, "seed of the few-shot draws and the probe"),
            ("--batch-size", int, "images per inference batch"),
            ("--concurrency", int, "feature actors (default: 1 per GPU, or from the CPUs)"),
            ("--cpus-per-actor", float, None), ("--gpus-per-actor", float, "> 0: actors on GPU"),
            ("--decode-cpus", float, None), ("--device", str, "in-process device: auto|cpu|cuda"),
            ("--threads", int, "torch threads in this process"),
            ("--cache-dir", str, "feature cache (default <out>/features)"),
            ("--format", str, "auto|parquet|folder"), ("--image-column", str, None),
            ("--label-column", str, None)):
        e.add_argument(flag, type=kind, default=None, help=hint)
    e.set_defaults(fn=_eval)


def _prepare(args: argparse.Namespace) -> int:
    from massl_ray.data.prepare import PrepareOptions, prepare
    from massl_ray.runtime import init_ray

    opts = PrepareOptions(seed=args.seed, rows_per_shard=args.rows_per_shard,
                          row_group_size=args.row_group_size, max_side=args.max_side,
                          jpeg_quality=args.jpeg_quality, unit_rows=args.unit_rows,
                          limit=args.limit, format=args.format, image_column=args.image_column,
                          label_column=args.label_column or None).check()
    if not args.local:
        init_ray()
    prepare(args.src, args.out, opts, local=args.local, task_cpus=args.task_cpus)
    return 0


def _add_prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="an image folder, Parquet or object-store prefix -> shuffled, "
                                       "validated Parquet shards + manifest.json (resumable)")
    p.add_argument("src", help="image folder (class sub-folders or flat), Parquet file/folder, "
                               "or an s3:// / gs:// prefix of either")
    p.add_argument("out", help="output directory (part-*.parquet, manifest.json, skipped.json); "
                               "rerun the same command to resume")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    p.add_argument("--rows-per-shard", type=int, default=5000, help="rows per Parquet file")
    p.add_argument("--row-group-size", type=int, default=1000, help="rows per row group")
    p.add_argument("--max-side", type=int, default=None,
                   help="downscale images whose short side exceeds N px to N (re-encoded JPEG)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded images")
    p.add_argument("--unit-rows", type=int, default=1000, help="image files per validate task")
    p.add_argument("--limit", type=int, default=None, help="only the first N source rows")
    p.add_argument("--format", default="auto", help="auto|parquet|folder")
    p.add_argument("--image-column", default="image", help="Parquet source image column")
    p.add_argument("--label-column", default="label", help="Parquet source label column ('' none)")
    p.add_argument("--task-cpus", type=float, default=1.0, help="CPUs per Ray task")
    p.add_argument("--local", action="store_true", help="in this process, without Ray")
    p.set_defaults(fn=_prepare)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m massl_ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train MaSSL (Ray Train, or --local in this process)")
    t.add_argument("--config", help="YAML config (jobs/*.yaml); defaults otherwise")
    t.add_argument("--local", action="store_true",
                   help="run in this process without Ray (debuggable); implies one worker")
    t.add_argument("--num-workers", type=int, default=None, help="shortcut for run.num_workers")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.set_defaults(fn=_train)
    c = sub.add_parser("config", help="print the resolved, validated config")
    c.add_argument("--config")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(fn=_show_config)
    _add_eval_parser(sub)
    _add_embed_parser(sub)
    _add_prepare_parser(sub)
    x = sub.add_parser("export", help="write the teacher backbone as timm-loadable safetensors")
    x.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run directory")
    x.add_argument("--out", required=True, help="output .safetensors file (+ .json next to it)")
    x.set_defaults(fn=_export)
    tu = sub.add_parser("tune", help="a Ray Tune sweep with dependent evaluations (resumable)")
    tu.add_argument("--config", required=True, help="a training config with a sweep: section")
    tu.add_argument("--retry-errored", action="store_true",
                    help="on resume, restart trials that failed")
    tu.add_argument("overrides", nargs="*", help="section.key=value or sweep.key=value overrides")
    tu.set_defaults(fn=_tune)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        from massl_ray.data.sources import DataSourceError

        if isinstance(e, DataSourceError):
            print(f"data error: {e}", file=sys.stderr)
            return 2
        from massl_ray.method.checkpoint import CheckpointError

        if isinstance(e, CheckpointError):
            print(f"checkpoint error: {e}", file=sys.stderr)
            return 2
        from massl_ray.data.sources import DataError
        from massl_ray.method.learner import NonFiniteLoss

        # In-process the exception itself; from Ray Train, a failure whose cause chain holds it.
        # Both end a run at once (a retry would repeat them), the last good checkpoint kept.
        msg, cause = None, e
        while cause is not None and msg is None:
            if (isinstance(cause, (NonFiniteLoss, DataError))
                    or "NonFiniteLoss" in type(cause).__name__):
                msg = str(cause)
            cause = cause.__cause__ or cause.__context__
        if msg is None and "non-finite loss" in str(e):
            line = next(ln for ln in str(e).splitlines() if "non-finite loss" in ln)
            msg = line[line.index("non-finite loss"):].strip()
        if msg is not None:
            print(f"training stopped: {msg}", file=sys.stderr)
            return 3
        raise
