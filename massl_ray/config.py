"""One typed configuration for massl_ray.

Every default lives here exactly once. YAML files (``jobs/*.yaml``) override the defaults and
``section.key=value`` arguments override the YAML. Unknown keys are refused, and
:meth:`Config.validate` checks the method's invariants eagerly, with messages that say what to
change. This module never imports ray.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key and the rule."""


#: run.name and sweep.name: one path component, never '.', '..' or a hidden name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# scheme://userinfo@host...: credentials in a URI (shown in logs, configs and job metadata).
_URI_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")


def check_name(value: Any, key: str) -> Optional[str]:
    """The reason ``value`` is not a valid run/sweep name, or None."""
    if isinstance(value, str) and NAME_PATTERN.fullmatch(value):
        return None
    return (f"{key} ({value!r}) must match [A-Za-z0-9][A-Za-z0-9._-]* (a folder name: "
            f"letters, digits, '.', '_', '-', not starting with '.' or '-')")


def uri_with_credentials(value: Any) -> bool:
    """Whether ``value`` is a URI with a user or password in it (``s3://KEY:SECRET@bucket``)."""
    return isinstance(value, str) and bool(_URI_USERINFO.match(value.strip()))


def credentials_refusal(key: str, value: str) -> str:
    """The message refusing a URI with credentials (the credentials themselves not repeated)."""
    shown = _URI_USERINFO.sub(lambda m: m.group(0).split("://", 1)[0] + "://***@", value.strip())
    return (f"{key} ({shown}) holds credentials in the URI: they would be written to logs, "
            f"config.yaml and the job's metadata; remove the user:password@ part and give the "
            f"nodes an IAM instance profile or the environment's credentials instead")


@dataclass
class ModelConfig:
    # A preset of ``massl_ray.method.model.ARCHS`` (vit_micro, vit_tiny, vit_small, vit_base) or any
    # timm ViT name (e.g. ``vit_small_patch16_224``).
    arch: str = "vit_small"
    patch_size: int = 16
    # Optional overrides of the architecture (timm keyword arguments); null keeps the preset's.
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    drop_path_rate: float = 0.1  # student only; the teacher uses 0
    head_hidden_dim: int = 2048
    head_out_dim: int = 256
    # Warm start of a *new* run from a local weights file (backbone state dict; .pt/.pth or
    # .safetensors). Not a resume: optimizer, memory and step start fresh.
    init_from: Optional[str] = None


@dataclass
class CropConfig:
    global_size: int = 224
    local_size: int = 96
    num_local_crops: int = 10
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    # Gaussian blur probability for (global crop 1, global crop 2, local crops).
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Solarisation probability for (global crop 1, global crop 2, local crops).
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class MasslConfig:
    memory_size: int = 131072
    # Give either block_size or num_blocks (the other is derived); both must agree if both set.
    block_size: Optional[int] = 16384
    num_blocks: Optional[int] = None
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    momentum_teacher: float = 0.992
    # Split the loss computation into chunks of this many blocks to bound memory (0 = all).
    loss_chunk_blocks: int = 0


@dataclass
class OptimConfig:
    epochs: float = 800
    # Steps per epoch. null: derived from the number of training rows and the global batch.
    steps_per_epoch: Optional[int] = None
    batch_size_per_worker: int = 64
    lr: float = 5e-4  # base lr for a global batch of 256 (linear scaling rule)
    min_lr: float = 1e-6
    warmup_epochs: float = 0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-parameter-tensor L2 norm; 0 disables
    betas: tuple[float, float] = (0.9, 0.999)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a GradScaler; GPU only)
    fused_adamw: bool = True  # used where the device supports it (CUDA)


@dataclass
class DataConfig:
    # Training source: a Parquet file/folder/glob, an image folder (class sub-folders or flat),
    # local or s3:// / gs:// URI. Required to train.
    train: Optional[str] = None
    format: str = "auto"  # auto | parquet | folder
    image_column: str = "image"
    label_column: Optional[str] = "label"
    # Use at most this many training rows (null: all).
    limit: Optional[int] = None
    # Per-epoch shuffle. Exact order (massl_ray/data/plan.py): window (the default: the row
    # groups' order is shuffled, then the rows within windows of data.window_groups groups),
    # full (one window of every group: a full shuffle; every encoded row sits in the object
    # store at once, so only for data that fits there) or none (storage order). Each row
    # group is read once per epoch in all three. blocks: the same as window (its name before
    # the epoch plan).
    shuffle: str = "window"
    # Row groups per window (null: 128). A batch mixes the rows of about this
    # many row groups; data written by `massl_ray prepare` is shuffled already, so any window
    # mixes fully (docs/performance.md, "Data plan at ImageNet scale").
    window_groups: Optional[int] = None
    # Positions per decode task (a step larger than this is cut into units of it;
    # smaller steps are grouped into one task). The crops of a unit come from a generator keyed
    # by (seed, epoch, step, unit), so they never depend on the number of workers.
    decode_rows: int = 256
    # Decode tasks kept ahead of the slowest rank (0: two per CPU left for
    # decoding); each holds its crops in the object store until the ranks take them.
    prefetch_tasks: int = 0
    # CPUs reserved by each row-group read task.
    read_cpus: float = 0.5
    # CPUs reserved by each decode + multi-crop task.
    decode_cpus: float = 1.0
    # Rows per decode call of the in-process view stream (massl_ray.data.views). Training
    # decodes by data.decode_rows.
    decode_batch_size: int = 64
    # Steps each rank requests ahead from the feed.
    prefetch_batches: int = 2
    # Seconds a rank waits for its batch of one step from the feed (Ray) before it fails,
    # naming the step, the rank and the decode task and row groups it waited for (a task that
    # hangs or was lost would otherwise idle every worker forever). The step fails like any
    # worker error: Ray Train restarts from the last checkpoint while run.max_failures allows.
    # Generous: a first step also waits for the decode workers to start.
    fetch_timeout_s: float = 600.0
    # Data order: exact, the only one. The row and crops at each global position of an epoch
    # are fixed by (run.seed, epoch, position), whatever the number of workers
    # (massl_ray/data/plan.py); each row group is read once per epoch and decoded on Ray tasks
    # (massl_ray/data/feed.py), so a resumed run continues at the exact data position and
    # repeats the uninterrupted run bitwise on CPU. (`stream`, Ray Data's global shuffle, was
    # removed: it measured 0.51x the exact order's images/s per core, docs/performance.md
    # section 11, with an unseeded order and no exact resume.)
    order: str = "exact"
    # Local mode: an LRU cache of this many MiB of encoded row groups.
    row_cache_mb: int = 1024
    # Held-out labeled data for the end-of-run / online k-NN (optional).
    eval_train: Optional[str] = None
    eval_test: Optional[str] = None


@dataclass
class RunConfig:
    name: str = "massl"
    storage_path: str = "runs"
    seed: int = 0
    # Train workers: an int (fixed), or [min, max] (elastic: Ray Train starts once min fit and
    # resizes the group as nodes leave or join, restarting from the last checkpoint). The
    # global batch is optim.batch_size_per_worker x max and stays fixed at every size: with W
    # workers each takes global / W rows (every W in [min, max] must divide it), so the learning
    # rate, the memory bank and every schedule are unchanged by a resize.
    num_workers: Union[int, list] = 1
    # Elastic runs: how often Ray Train considers growing a healthy worker group (seconds).
    elastic_resize_interval_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    log_every_steps: int = 10
    checkpoint_every_steps: int = 500
    # Also checkpoint when this many minutes have passed since the last checkpoint (0 = off).
    # Rank 0's clock decides, at the control points below, so every rank checkpoints at the
    # same step.
    checkpoint_every_minutes: float = 0.0
    # Checkpoint upload to run.storage_path: async (Ray Train uploads in a background thread;
    # the loop only waits for the local write), sync (the loop waits for the upload) or auto
    # (async to object storage, sync to a local path: a local copy is fast, and an async one
    # is lost to a crash right after the checkpoint). Metrics-only reports are always async
    # unless sync.
    checkpoint_upload: str = "auto"
    num_checkpoints_to_keep: int = 2
    max_failures: int = 0
    # Restarts after a node preemption (Ray Train's FailureConfig.max_preemption_failures),
    # counted apart from run.max_failures (-1 = retry forever, the spot-instance setting).
    max_preemption_failures: int = -1
    # Control points: about every this many seconds (rank 0's measured step time turned into
    # a step count that every rank follows) all ranks poll Ray Train's preemption notice (a
    # barrier) and agree on whether a time-based checkpoint is due. A notice makes the next
    # step a checkpoint. 0 = never poll for preemptions. 20 s leaves most of a two-minute
    # spot notice for the checkpoint and its upload, at one barrier per 20 s.
    preemption_check_seconds: float = 20.0
    resume: str = "auto"  # auto | never | <path to a checkpoint directory>
    # Stop after this many global steps (null: the full schedule). The schedules still span
    # the full run, so a stopped run can be resumed to its end.
    max_steps: Optional[int] = None
    # k-NN on held-out data at the end of training (needs data.eval_train/eval_test).
    final_knn: bool = True
    knn_k: int = 20
    # Online k-NN monitor: every N steps (0 = off) rank 0 measures a k-NN top-1 (k = knn_k) of
    # the teacher on held-out rows of data.eval_train (bank) and data.eval_test (queries),
    # reported with the metrics as online_knn_top1 (a Tune/ASHA signal).
    online_knn_every_steps: int = 0
    online_knn_train_rows: int = 1000
    online_knn_test_rows: int = 500
    # torch.compile the student/teacher forwards (a run.* key: may change across a resume).
    compile: bool = False
    # Audit: every rank appends the row indices of each batch it trains on (with the step and
    # world size) to <run dir>/workers/rows_rank<r>.jsonl (exact order only).
    record_rows: bool = False
    # Fault injection for recovery tests: fail at this global step on the first attempt only,
    # by raising an exception (raise) or by SIGKILL of the worker process (kill).
    fault_injection_step: Optional[int] = None
    fault_injection_mode: str = "raise"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    massl: MasslConfig = field(default_factory=MasslConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def elastic(self) -> bool:
        return isinstance(self.run.num_workers, (list, tuple))

    @property
    def min_workers(self) -> int:
        n = self.run.num_workers
        return max(1, int(n[0])) if self.elastic else max(1, int(n))

    @property
    def world_size(self) -> int:
        """The planned number of workers (an elastic run's maximum)."""
        n = self.run.num_workers
        return max(1, int(n[-1])) if self.elastic else max(1, int(n))

    @property
    def global_batch_size(self) -> int:
        return self.optim.batch_size_per_worker * self.world_size

    def at_world_size(self, world: int) -> "Config":
        """This config as a worker of a group of ``world`` runs it: ``world`` workers, each
        with its share of the same global batch (an elastic run's actual size)."""
        import copy

        gb = self.global_batch_size
        if gb % world:
            raise ConfigError(f"{world} workers cannot share the global batch of {gb} evenly")
        c = copy.deepcopy(self)
        c.run.num_workers = int(world)
        c.optim.batch_size_per_worker = gb // world
        return c

    @property
    def block_size(self) -> int:
        m = self.massl
        if m.block_size is not None:
            return m.block_size
        return m.memory_size // m.num_blocks  # type: ignore[operator]

    @property
    def num_blocks(self) -> int:
        return self.massl.memory_size // self.block_size

    @property
    def num_views(self) -> int:
        return 2 + self.crops.num_local_crops

    @property
    def peak_lr(self) -> float:
        return self.optim.lr * self.global_batch_size / 256.0

    def total_steps(self) -> int:
        if self.optim.steps_per_epoch is None:
            raise ConfigError(
                "optim.steps_per_epoch is not known yet: set it, or let the trainer derive it "
                "from the number of training rows"
            )
        return max(1, int(round(self.optim.epochs * self.optim.steps_per_epoch)))

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> "Config":
        """Check every invariant; raise :class:`ConfigError` listing all violations."""
        errs: list[str] = []
        m, c, o, r, mo, d = self.massl, self.crops, self.optim, self.run, self.model, self.data

        def need(cond: bool, msg: str) -> None:
            if not cond:
                errs.append(msg)

        # memory and blocks
        need(m.memory_size > 0, f"massl.memory_size ({m.memory_size}) must be positive")
        if m.block_size is None and m.num_blocks is None:
            errs.append("set one of massl.block_size or massl.num_blocks")
        if m.block_size is not None:
            need(m.block_size > 0, f"massl.block_size ({m.block_size}) must be positive")
        if m.num_blocks is not None:
            need(m.num_blocks > 0, f"massl.num_blocks ({m.num_blocks}) must be positive")
        if m.memory_size > 0:
            if m.block_size is not None and m.block_size > 0:
                need(
                    m.memory_size % m.block_size == 0,
                    f"massl.memory_size ({m.memory_size}) must be divisible by massl.block_size "
                    f"({m.block_size}): choose a block size that divides it",
                )
                if m.num_blocks is not None and m.num_blocks > 0:
                    need(
                        m.block_size * m.num_blocks == m.memory_size,
                        f"massl.block_size ({m.block_size}) x massl.num_blocks ({m.num_blocks}) "
                        f"must equal massl.memory_size ({m.memory_size}); set only one of them",
                    )
            elif m.num_blocks is not None and m.num_blocks > 0:
                need(
                    m.memory_size % m.num_blocks == 0,
                    f"massl.memory_size ({m.memory_size}) must be divisible by massl.num_blocks "
                    f"({m.num_blocks})",
                )
        need(m.loss_chunk_blocks >= 0, "massl.loss_chunk_blocks must be >= 0 (0 = no chunking)")
        gb = o.batch_size_per_worker * self.world_size
        if m.memory_size > 0 and gb > 0:
            need(
                m.memory_size % gb == 0,
                f"massl.memory_size ({m.memory_size}) must be divisible by the global batch "
                f"({self.world_size} workers x {o.batch_size_per_worker} = {gb}); each step writes "
                f"one global batch of keys into the FIFO memory",
            )
            need(
                m.memory_size >= gb,
                f"massl.memory_size ({m.memory_size}) must be at least the global batch ({gb})",
            )
        need(m.student_temp > 0, f"massl.student_temp ({m.student_temp}) must be positive")
        need(m.teacher_temp > 0, f"massl.teacher_temp ({m.teacher_temp}) must be positive")
        need(
            m.warmup_teacher_temp > 0,
            f"massl.warmup_teacher_temp ({m.warmup_teacher_temp}) must be positive",
        )
        need(m.warmup_teacher_temp_epochs >= 0, "massl.warmup_teacher_temp_epochs must be >= 0")
        need(
            0.0 <= m.momentum_teacher <= 1.0,
            f"massl.momentum_teacher ({m.momentum_teacher}) must be in [0, 1]",
        )

        # model and crops
        need(mo.patch_size > 0, f"model.patch_size ({mo.patch_size}) must be positive")
        for key in ("embed_dim", "depth", "num_heads"):
            v = getattr(mo, key)
            need(v is None or v > 0, f"model.{key} ({v}) must be positive or null")
        if mo.embed_dim and mo.num_heads and mo.embed_dim > 0 and mo.num_heads > 0:
            need(
                mo.embed_dim % mo.num_heads == 0,
                f"model.embed_dim ({mo.embed_dim}) must be divisible by model.num_heads "
                f"({mo.num_heads})",
            )
        need(0.0 <= mo.drop_path_rate < 1.0, "model.drop_path_rate must be in [0, 1)")
        need(mo.head_hidden_dim > 0, "model.head_hidden_dim must be positive")
        need(mo.head_out_dim > 0, "model.head_out_dim must be positive")
        if mo.init_from is not None and "://" not in mo.init_from:
            need(Path(mo.init_from).is_file(), f"model.init_from ({mo.init_from}) is not a file")
        for key in ("global_size", "local_size"):
            v = getattr(c, key)
            need(v > 0, f"crops.{key} ({v}) must be positive")
            if v > 0 and mo.patch_size > 0:
                need(
                    v % mo.patch_size == 0,
                    f"crops.{key} ({v}) must be a multiple of model.patch_size ({mo.patch_size})",
                )
        need(c.num_local_crops >= 0, f"crops.num_local_crops ({c.num_local_crops}) must be >= 0")
        for key in ("global_scale", "local_scale", "blur_sigma"):
            lo, hi = getattr(c, key)
            need(0 < lo <= hi, f"crops.{key} ({lo}, {hi}) must satisfy 0 < low <= high")
        for key in ("global_scale", "local_scale"):
            need(getattr(c, key)[1] <= 1.0, f"crops.{key} upper bound must be <= 1")
        probs = {
            "flip_p": c.flip_p, "jitter_p": c.jitter_p, "grayscale_p": c.grayscale_p,
            **{f"blur_p[{i}]": p for i, p in enumerate(c.blur_p)},
            **{f"solarize_p[{i}]": p for i, p in enumerate(c.solarize_p)},
        }
        for key, p in probs.items():
            need(0.0 <= p <= 1.0, f"crops.{key} ({p}) must be a probability in [0, 1]")
        for key in ("brightness", "contrast", "saturation"):
            need(getattr(c, key) >= 0, f"crops.{key} must be >= 0")
        need(0 <= c.hue <= 0.5, f"crops.hue ({c.hue}) must be in [0, 0.5]")
        need(0 <= c.solarize_threshold <= 255, "crops.solarize_threshold must be in [0, 255]")
        need(all(s > 0 for s in c.std), "crops.std must be positive")

        # optimisation
        need(o.epochs > 0, f"optim.epochs ({o.epochs}) must be positive")
        need(
            o.steps_per_epoch is None or o.steps_per_epoch > 0,
            f"optim.steps_per_epoch ({o.steps_per_epoch}) must be positive or null",
        )
        need(o.batch_size_per_worker > 0, "optim.batch_size_per_worker must be positive")
        need(o.lr > 0, f"optim.lr ({o.lr}) must be positive")
        need(0 <= o.min_lr <= o.lr * max(gb, 1) / 256.0 or o.lr <= 0,
             f"optim.min_lr ({o.min_lr}) must be in [0, peak lr]")
        need(0 <= o.warmup_epochs, "optim.warmup_epochs must be >= 0")
        need(o.warmup_epochs < o.epochs or o.warmup_epochs == 0,
             f"optim.warmup_epochs ({o.warmup_epochs}) must be shorter than optim.epochs ({o.epochs})")
        need(o.weight_decay >= 0 and o.weight_decay_end >= 0, "optim.weight_decay(_end) must be >= 0")
        need(o.clip_grad >= 0, "optim.clip_grad must be >= 0 (0 disables clipping)")
        need(all(0 <= b < 1 for b in o.betas), "optim.betas must be in [0, 1)")
        need(o.precision in ("fp32", "bf16", "fp16"),
             f"optim.precision ({o.precision!r}) must be one of fp32, bf16, fp16")
        if o.precision == "fp16":
            need(r.use_gpu, "optim.precision fp16 needs run.use_gpu=true (use bf16 or fp32 on CPU)")

        # data
        need(d.format in ("auto", "parquet", "folder"),
             f"data.format ({d.format!r}) must be one of auto, parquet, folder")
        need(d.shuffle in ("window", "full", "blocks", "none"),
             f"data.shuffle ({d.shuffle!r}) must be one of window, full, blocks, none")
        need(d.window_groups is None or d.window_groups >= 1,
             f"data.window_groups ({d.window_groups}) must be at least 1 or null")
        need(d.decode_rows >= 1, f"data.decode_rows ({d.decode_rows}) must be positive")
        need(d.prefetch_tasks >= 0, f"data.prefetch_tasks ({d.prefetch_tasks}) must be >= 0")
        need(d.read_cpus > 0, f"data.read_cpus ({d.read_cpus}) must be positive")
        need(d.limit is None or d.limit > 0, "data.limit must be positive or null")
        need(d.decode_cpus > 0, f"data.decode_cpus ({d.decode_cpus}) must be positive")
        need(d.decode_batch_size > 0, "data.decode_batch_size must be positive")
        need(d.order == "exact",
             f"data.order ({d.order!r}) must be exact" + (
                 ": data.order=stream (Ray Data's global shuffle) was removed; the exact order "
                 "measured 1.96x its images/s per core (docs/performance.md section 11)"
                 if d.order == "stream" else ""))
        need(d.row_cache_mb > 0, f"data.row_cache_mb ({d.row_cache_mb}) must be positive")
        need(d.prefetch_batches >= 0, "data.prefetch_batches must be >= 0")
        need(d.fetch_timeout_s > 0,
             f"data.fetch_timeout_s ({d.fetch_timeout_s}) must be a positive number of seconds")

        # run
        if self.elastic:
            n = r.num_workers
            ok = (len(n) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in n)
                  and 1 <= n[0] <= n[1])
            need(ok, f"run.num_workers ({list(n)}) must be an int or [min, max] with "
                     f"1 <= min <= max")
            gb = self.global_batch_size if ok else 1
            bad = [w for w in range(n[0], n[1] + 1) if gb % w] if ok else []
            need(not bad,
                 f"run.num_workers={list(n)}: the global batch ({gb} = "
                 f"optim.batch_size_per_worker {o.batch_size_per_worker} x {n[1]} workers) must "
                 f"split evenly at every size in the range, but not at {bad}: make the global "
                 f"batch a multiple of {_lcm_range(n[0], n[1])} (every size from {n[0]} to "
                 f"{n[1]} divides it) or narrow the range")
            need(r.elastic_resize_interval_s >= 0, "run.elastic_resize_interval_s must be >= 0")
        else:
            need(r.num_workers >= 0,
                 f"run.num_workers ({r.num_workers}) must be >= 0 (0 = local mode)")
        need(r.cpus_per_worker >= 0, "run.cpus_per_worker must be >= 0")
        need(r.gpus_per_worker > 0 or not r.use_gpu, "run.gpus_per_worker must be positive")
        need(r.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
             "run.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
        need(r.log_every_steps > 0, "run.log_every_steps must be positive")
        need(r.checkpoint_every_steps > 0, "run.checkpoint_every_steps must be positive")
        need(r.num_checkpoints_to_keep > 0, "run.num_checkpoints_to_keep must be positive")
        need(r.max_failures >= -1, "run.max_failures must be >= -1 (-1 = retry forever)")
        need(r.max_preemption_failures >= -1,
             "run.max_preemption_failures must be >= -1 (-1 = retry forever)")
        need(r.checkpoint_every_minutes >= 0,
             "run.checkpoint_every_minutes must be >= 0 (0 = step interval only)")
        need(r.preemption_check_seconds >= 0,
             "run.preemption_check_seconds must be >= 0 (0 = never poll)")
        need(r.checkpoint_upload in ("auto", "async", "sync"),
             f"run.checkpoint_upload ({r.checkpoint_upload!r}) must be auto, async or sync")
        need(r.max_steps is None or r.max_steps > 0, "run.max_steps must be positive or null")
        need(r.knn_k > 0, "run.knn_k must be positive")
        need(r.online_knn_every_steps >= 0, "run.online_knn_every_steps must be >= 0 (0 = off)")
        need(r.online_knn_train_rows > 0 and r.online_knn_test_rows > 0,
             "run.online_knn_train_rows and run.online_knn_test_rows must be positive")
        if r.online_knn_every_steps > 0:
            need(bool(d.eval_train and d.eval_test),
                 "run.online_knn_every_steps needs labeled held-out data: set data.eval_train "
                 "and data.eval_test")
        need(r.fault_injection_step is None or r.fault_injection_step >= 0,
             "run.fault_injection_step must be >= 0 or null")
        need(r.fault_injection_mode in ("raise", "kill"),
             f"run.fault_injection_mode ({r.fault_injection_mode!r}) must be raise or kill")
        bad_name = check_name(r.name, "run.name")
        if bad_name:
            errs.append(bad_name)
        for section, values in self.to_dict().items():
            for key, v in values.items():
                for item in (v if isinstance(v, (list, tuple)) else [v]):
                    if uri_with_credentials(item):
                        errs.append(credentials_refusal(f"{section}.{key}", item))

        if errs:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errs))
        return self


# ---- loading, merging, overriding -------------------------------------------------------

def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _lcm_range(a: int, b: int) -> int:
    import math

    out = 1
    for w in range(max(1, a), b + 1):
        out = out * w // math.gcd(out, w)
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if origin is Union:  # Optional[X], or int | list (run.num_workers)
        args = [a for a in get_args(tp) if a is not type(None)]
        if type(None) in get_args(tp) and (
                value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))):
            return None
        if list in args:
            if isinstance(value, str) and value.strip().startswith("["):
                value = yaml.safe_load(value)
            if isinstance(value, (list, tuple)):
                return [_coerce(v, int, f"{key}[{i}]") for i, v in enumerate(value)]
            return _coerce(value, int, key)
        return _coerce(value, args[0], key)
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if f == f and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _section_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in fields(Config)}
    if section not in sections:
        raise ConfigError(
            f"unknown config section {section!r}; known sections: {', '.join(sections)}"
        )
    sub = getattr(cfg, section)
    types = _section_types(type(sub))
    if key not in types:
        raise ConfigError(
            f"unknown config key {section}.{key}; known keys of {section}: {', '.join(types)}"
        )
    setattr(sub, key, _coerce(value, types[key], f"{section}.{key}"))


def merge_dict(cfg: Config, data: dict) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            _apply(cfg, section, key, value)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        if path.count(".") != 1:
            raise ConfigError(f"override {item!r}: the key must be section.key (e.g. massl.memory_size)")
        section, key = path.split(".")
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
        _apply(cfg, section, key, value)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                validate: bool = True) -> Config:
    """Defaults <- YAML file <- ``section.key=value`` overrides, then validation."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        merge_dict(cfg, data)
    apply_overrides(cfg, list(overrides or []))
    if validate:
        cfg.validate()
    return cfg


def config_from_dict(data: dict, validate: bool = True) -> Config:
    cfg = merge_dict(Config(), data)
    return cfg.validate() if validate else cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
