"""Training on Ray: TorchTrainer set-up, the Ray worker context, and the local mode driver.

Shell module (imports ray). The loop itself is :func:`massl_ray.train.loop.run_loop`.
"""

from __future__ import annotations

import contextlib
import json
import math
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Union

import pyarrow as pa
import ray
import torch

from massl_ray.method.checkpoint import (CheckpointError, RunLock, copy_checkpoint,
                                        delete_checkpoint, is_uri, probe_writable, read_meta,
                                        save_checkpoint, verify_checkpoint)
from massl_ray.config import Config, ConfigError, config_from_dict, dump_config
from massl_ray.method.distributed import all_gather_cat, broadcast_state
from massl_ray.method.learner import NonFiniteLoss
from massl_ray.method.memory import memory_checksum
from massl_ray.evaluate.online import OnlineKnn, knn_vs_random_init
from massl_ray.method.checkpoint import (READ_BYTES, latest_valid_checkpoint, list_checkpoints,
                                        load_latest_valid_checkpoint)
from massl_ray.train.loop import LocalLoopContext, LoopContext, run_loop
from massl_ray.train.log_sync import APPEND_FILES, DRIVER_FILES, WORKER_FILES, log_sync_for
from massl_ray.data.sources import DataError, DataSourceError, Source, open_source
from massl_ray.data.views import DecodeReport
from massl_ray.runtime import cluster_capacity, init_ray, planned_cluster_cpus, train_log_level

log = logging.getLogger("massl_ray")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the stream of the
    moment the handler was made: that one may since have been replaced and closed)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger("massl_ray")
    root.setLevel(level)
    if not any(getattr(h, "_massl", False) for h in root.handlers):
        h = _StderrHandler()
        h._massl = True  # type: ignore[attr-defined]
        root.addHandler(h)
    for h in root.handlers:
        if getattr(h, "_massl", False):
            h.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    root.propagate = False


# ---- driver-side preparation (before any cluster resources are taken) ----------------------

def run_dir_of(cfg: Config) -> Path:
    """Where logs (TensorBoard, JSONL, config, summaries) go. For object-store storage the logs
    are written on the driver's (and rank 0's) disk under ``~/massl_runs/<name>`` and copied to
    ``<storage_path>/<name>/logs/`` (massl_ray.train.log_sync); checkpoints go to the URI."""
    if is_uri(cfg.run.storage_path):
        return Path.home() / "massl_runs" / cfg.run.name
    return Path(cfg.run.storage_path).absolute() / cfg.run.name


def checkpoint_root(cfg: Config) -> Union[Path, str]:
    """Where this run's checkpoints live, ``<storage_path>/<name>/checkpoint_*``: the run
    directory for a local storage path (a :class:`Path`), a URI prefix for an object store (a
    ``str``), which Ray Train (and ``--local``) write to and every resume reads from."""
    if is_uri(cfg.run.storage_path):
        return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    return run_dir_of(cfg)


def prepare(cfg: Config) -> tuple[Config, Source]:
    """Validate the config and the data source, derive steps per epoch. Takes no resources."""
    cfg.validate()
    d = cfg.data
    src = open_source(d.train, d.format, d.image_column, d.label_column, what="data.train")
    rows = src.num_rows if d.limit is None else min(d.limit, src.num_rows)
    if cfg.optim.steps_per_epoch is None:
        spe = rows // cfg.global_batch_size
        if spe == 0:
            raise ConfigError(
                f"data.train has {rows} rows, fewer than one global batch "
                f"({cfg.global_batch_size}): lower optim.batch_size_per_worker")
        cfg.optim.steps_per_epoch = spe
    elif cfg.optim.steps_per_epoch * cfg.global_batch_size > rows:
        raise ConfigError(
            f"optim.steps_per_epoch={cfg.optim.steps_per_epoch} steps of a global batch of "
            f"{cfg.global_batch_size} need {cfg.optim.steps_per_epoch * cfg.global_batch_size} "
            f"rows per epoch, but data.train has {rows}: lower optim.steps_per_epoch (or leave "
            f"it null: derived from the rows)")
    if cfg.run.final_knn and (d.eval_train or d.eval_test):
        for key in ("eval_train", "eval_test"):
            open_source(getattr(d, key), "auto", d.image_column, d.label_column,
                        require_labels=True, what=f"data.{key}")
    check_storage(cfg)
    return cfg, src


def estimate_checkpoint_bytes(cfg: Config) -> int:
    """Size of one checkpoint's state.pt: student + teacher + AdamW's two moments (4 x the
    parameters in fp32), the memory bank (K x D fp32), and the container's overhead (measured:
    ~17 KB of RNG states and config plus ~1.6 KB of names and headers per parameter tensor;
    counted as 32 KiB + 2 KiB per tensor). The model is built on the meta device (no memory, no
    weights). Never below the real file and within 1 % of it (tested)."""
    import torch

    from massl_ray.method.model import ProjectionHead, build_backbone

    with torch.device("meta"):
        bb = build_backbone(cfg.model, cfg.crops.global_size, 0.0)
        head = ProjectionHead(bb.embed_dim, cfg.model.head_hidden_dim, cfg.model.head_out_dim)
    n = sum(p.numel() for p in bb.parameters()) + sum(p.numel() for p in head.parameters())
    tensors = len(bb.state_dict()) + len(head.state_dict())
    return (4 * 4 * n + 4 * cfg.massl.memory_size * cfg.model.head_out_dim
            + 32 * 1024 + 2048 * tensors)


def check_storage(cfg: Config) -> None:
    """Refuse an unwritable or too full storage path at start-up, not after an hour.

    Object storage (a URI): one small object written and deleted under the run's prefix (a
    missing bucket, a wrong endpoint or credentials that may not write there are refused here,
    in one line, before Ray starts). A local path needs room for
    ``run.num_checkpoints_to_keep + 1`` checkpoints (a new one is written before the oldest is
    deleted) plus 64 MiB for logs.
    """
    if is_uri(cfg.run.storage_path):
        try:
            probe_writable(checkpoint_root(cfg))
        except (OSError, pa.ArrowException, CheckpointError) as e:
            raise ConfigError(f"run.storage_path {cfg.run.storage_path!r} is not writable: "
                              f"{_one_line(e)}") from None
        return
    d = run_dir_of(cfg)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=d, prefix=".write_probe_", delete=True)
        probe.write(b"x" * 4096)
        probe.flush()
        probe.close()
    except OSError as e:
        raise ConfigError(f"run.storage_path {cfg.run.storage_path!r} is not writable: {e}") from None
    one = estimate_checkpoint_bytes(cfg)
    need = (cfg.run.num_checkpoints_to_keep + 1) * one + 64 * 2**20
    free = shutil.disk_usage(d).free
    if free < need:
        mib = 2**20
        raise ConfigError(
            f"run.storage_path {cfg.run.storage_path!r} has {free / mib:,.0f} MiB free; this run "
            f"needs about {need / mib:,.0f} MiB ({cfg.run.num_checkpoints_to_keep} + 1 "
            f"checkpoints of {one / mib:,.0f} MiB + logs): free space, choose another "
            f"run.storage_path or lower run.num_checkpoints_to_keep")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def resume_checkpoint(cfg: Config, ckpt_root: Union[Path, str]) -> Union[Path, str, None]:
    """Resolve run.resume: auto (latest valid checkpoint of this run, if any) | never | a
    checkpoint directory. The same for a local run directory and an object-store prefix, and a
    checkpoint given by path or by URI (returned as given: a Path, or a URI str)."""
    r = cfg.run.resume
    try:
        if r == "never":
            if list_checkpoints(ckpt_root):
                raise ConfigError(
                    f"run {cfg.run.name!r} already has checkpoints in {ckpt_root} and "
                    f"run.resume=never: choose another run.name or set run.resume=auto")
            return None
        if r == "auto":
            found = latest_valid_checkpoint(ckpt_root)
            if found is not None:
                log.info("resuming run %r from %s", cfg.run.name, found)
            return found
        p = r if is_uri(r) else Path(r)
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            raise ConfigError(f"run.resume: {e}") from None
        log.info("run %r starts from run.resume=%s (global step %d)", cfg.run.name, p,
                 int(read_meta(p)["global_step"]))
        return p
    except (OSError, pa.ArrowException) as e:  # the storage itself failed (not a checkpoint)
        raise ConfigError(f"run.resume={r}: cannot read the checkpoints of run {cfg.run.name!r} "
                          f"in {ckpt_root}: {_one_line(e)}") from None


# ---- Ray Train worker ----------------------------------------------------------------------

class RayLoopContext(LoopContext):
    # rank 0 with an object-store storage path: copies its logs there (massl_ray.train.log_sync)
    log_sync = None

    def __init__(self, cfg: Config, run_dir: Path, resume_from: Optional[str] = None,
                 feed=None, reporter=None, ckpt_root: Optional[str] = None):
        import ray.train.torch as rtt

        self.cfg = cfg
        self.resume_from = resume_from
        # <storage_path>/<name>: the run directory, or the URI prefix on an object store
        self.ckpt_root = ckpt_root or str(run_dir)
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = rtt.get_device()
        self.run_dir = run_dir
        self.reporter = reporter
        from massl_ray.data.feed import RankFeed

        self.feed = RankFeed(feed, self.rank, self.world_size,
                             lookahead=max(1, cfg.data.prefetch_batches),
                             pin_memory=self.device.type == "cuda")
        self._stream: Optional[Iterator[dict]] = None
        self._next_step = -1

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size <= 1:
            return model
        import ray.train.torch as rtt

        return rtt.prepare_model(model, move_to_device=False)

    def batches(self, epoch: int, skip: int) -> Iterator[dict]:
        # One stream over all remaining steps (massl_ray.data.feed: pieces requested a few
        # steps ahead, decoded ahead by the coordinator across epoch boundaries); each call
        # yields one epoch's steps.
        spe = self.cfg.optim.steps_per_epoch
        g = epoch * spe + skip
        if self._stream is None or self._next_step != g:
            c = self.cfg
            stop = min(c.total_steps(), c.run.max_steps or c.total_steps())
            self._stream = self.feed.iter_steps(g, stop)
            self._next_step = g
        for _ in range(spe - skip):
            batch = next(self._stream, None)
            if batch is None:
                return
            self._next_step += 1
            yield batch

    def latest_state(self) -> Optional[dict]:
        """The state to resume from, read once for the whole worker group: rank 0 resolves,
        verifies and reads the checkpoint (one read of state.pt, see
        :func:`~massl_ray.method.checkpoint.load_checkpoint`); the other ranks receive it over
        the process group and read nothing from storage. Each rank appends what it read to
        ``<run dir>/workers/restores.jsonl``."""
        before, t0 = READ_BYTES["state"], time.perf_counter()
        state, where = self._read_latest_state() if self.rank == 0 else (None, None)
        state = broadcast_state(state, src=0, device=self._collective_device())
        if state is not None or self.rank == 0:
            rec = {"rank": self.rank, "world_size": self.world_size, "from": where,
                   "step": None if state is None else int(state["global_step"]),
                   "bytes_read": READ_BYTES["state"] - before,
                   "seconds": round(time.perf_counter() - t0, 3), "time": time.time()}
            d = self.run_dir / "workers"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "restores.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        return state

    def _read_latest_state(self) -> tuple[Optional[dict], Optional[str]]:
        # Every checkpoint of this run is under <storage_path>/<name> (a local directory or an
        # object-store prefix, the same code for both), registered by Ray Train or not yet
        # (ray.train.report persists it before the controller registers it, and a worker can
        # die in between). The newest valid one wins; a broken one (corrupt, or cut short) is
        # skipped with a warning naming it, as is ray.train.get_checkpoint()'s choice when it is
        # the broken one. The driver's run.resume checkpoint wins if newer.
        found, state = load_latest_valid_checkpoint(self.ckpt_root, self.resume_from)
        return state, str(found) if found else None

    def _collective_device(self) -> torch.device:
        """Where tensors travel over the process group: CUDA under NCCL, else the CPU."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")

    def preemption_notice(self):
        return ray.train.get_preemption_info()

    def agree(self, values: list[int]) -> list[int]:
        if self.world_size <= 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64, device=self._collective_device())
        dist.broadcast(t, src=0)
        return [int(v) for v in t.tolist()]

    def report(self, metrics: dict, state: Optional[dict]) -> None:
        from ray.train import CheckpointUploadMode

        # Every rank reports asynchronously (run.checkpoint_upload=async), checkpoints or not:
        # a report waits for the previous ones of its rank, so one synchronous metrics report
        # would wait out the upload before it; and Ray Train's controller takes one report per
        # rank about every 2 s, so synchronous reports closer together block for the rest
        # (measured: ~2 s per back-to-back synchronous report, ~2-6 ms asynchronous).
        up = self.cfg.run.checkpoint_upload
        mode = CheckpointUploadMode.SYNC if up == "sync" else CheckpointUploadMode.ASYNC
        if state is None:
            ray.train.report(metrics, checkpoint_upload_mode=mode)
            return
        # run.checkpoint_upload=auto: a checkpoint report is asynchronous only to object
        # storage. To a local path the "upload" is a copy on the same disk (fast), and an
        # asynchronous one loses the newest checkpoint to a crash right after it (measured: a
        # worker SIGKILLed one step after a checkpoint resumed from the one before).
        if up == "auto" and not is_uri(self.cfg.run.storage_path):
            mode = CheckpointUploadMode.SYNC
        # Replica check on every checkpoint: all ranks' memory banks must be identical.
        sums = all_gather_cat(_memory_checksum(state).unsqueeze(0)).cpu()
        metrics = dict(metrics, memory_checksums=sums[:, 0].tolist(),
                       memory_replicas_identical=bool((sums == sums[0]).all()))
        if self.rank == 0:
            tmp = Path(tempfile.mkdtemp(prefix="massl_ckpt_"))
            try:
                save_checkpoint(state, tmp)
                # Ray Train deletes tmp once it is uploaded (in the background when async).
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                                 checkpoint_upload_mode=mode,
                                 delete_local_checkpoint_after_upload=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if self.log_sync is not None:
                self.log_sync.sync()
        else:
            ray.train.report(metrics, checkpoint_upload_mode=mode)


def _memory_checksum(state: dict) -> torch.Tensor:
    return memory_checksum(state["memory"]["rows"], state["memory"]["ptr"])


def _record_worker(ctx: RayLoopContext) -> None:
    """Each rank notes where it runs (``<run dir>/workers/rank_<r>.json``, on its node's disk)."""
    import socket

    info = {"rank": ctx.rank, "world_size": ctx.world_size, "pid": os.getpid(),
            "hostname": socket.gethostname(), "device": str(ctx.device),
            "node_id": ray.get_runtime_context().get_node_id(),
            # where this worker imported the package from (Ray's py_modules copy, see
            # massl_ray.runtime, or a submitted job's working directory)
            "package": str(Path(__file__).resolve().parents[1])}
    d = ctx.run_dir / "workers"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank_{ctx.rank}.json").write_text(json.dumps(info))


def _quiet_ray_train_logs() -> None:
    # Ray Train V2 logs every report at INFO (with the full metrics dict); keep ours only.
    from ray.train.v2._internal.execution import context as _v2ctx

    logging.getLogger(_v2ctx.__file__).setLevel(logging.WARNING)


def _worker_loop(loop_config: dict) -> None:
    cfg = config_from_dict(loop_config["config"], validate=True)
    world = ray.train.get_context().get_world_size()
    if cfg.elastic or world != cfg.world_size:
        # An elastic group of this size: each worker takes its share of the same global batch.
        cfg = cfg.at_world_size(world).validate()
    _quiet_ray_train_logs()
    ctx = RayLoopContext(cfg, Path(loop_config["run_dir"]), loop_config.get("resume_from"),
                         loop_config.get("feed"), loop_config.get("reporter"),
                         loop_config.get("checkpoint_root"))
    setup_logging(ctx.rank)
    _record_worker(ctx)
    with open(ctx.run_dir / "workers" / "starts.jsonl", "a") as f:  # one line per rank per attempt
        f.write(json.dumps({"rank": ctx.rank, "world_size": ctx.world_size, "pid": os.getpid(),
                            "time": time.time()}) + "\n")
    torch.set_num_threads(max(1, int(loop_config.get("torch_threads", 1))))
    if ctx.rank == 0:
        ctx.log_sync = log_sync_for(cfg.run.storage_path, cfg.run.name, ctx.run_dir, WORKER_FILES)
        if ctx.log_sync is not None:  # a resume on another machine appends to the run's logs
            ctx.log_sync.restore(APPEND_FILES)
    try:
        run_loop(cfg, ctx, OnlineKnn.from_config(cfg) if ctx.rank == 0 else None)
    except NonFiniteLoss as e:
        # A recipe error, not a machine failure: a retry from the last checkpoint would repeat
        # the same steps into the same NaN. Every rank raised it at the same step (the finite
        # check is collective), so every rank records it with the driver's reporter actor and
        # returns normally: Ray Train's FailureConfig never sees it, and the driver raises it.
        if ctx.reporter is None:
            raise
        log.error("rank %d: %s", ctx.rank, e)
        ray.get(ctx.reporter.record_non_finite.remote(e.step, e.value, ctx.rank))
    finally:
        if ctx.log_sync is not None:
            ctx.log_sync.sync()


# ---- driver --------------------------------------------------------------------------------

def _write_summary(run_dir: Path, summary: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def _report_decode_errors(run_dir: Path, summary: dict) -> None:
    n = summary.get("skipped", 0)
    (run_dir / "decode_errors.json").write_text(json.dumps(summary, indent=1))
    where = run_dir / "decode_errors.json"
    partial = summary.get("complete") is False  # the report restarted: a lower bound
    if n:
        shown = list(summary["rows"].items())[:5]
        log.warning("skipped %s%d undecodable image(s) or unreadable file(s)/row group(s) "
                    "(list in %s%s): %s", "at least " if partial else "", n, where,
                    ", incomplete" if partial else "",
                    "; ".join(f"{k}: {v}" for k, v in shown))
    elif partial:
        log.warning("the decode report is incomplete (%s): none recorded since, so the count "
                    "of skipped images is unknown (a lower bound: 0)", summary.get("note", ""))
    else:
        log.info("all images decoded (0 skipped)")


def _stop_on_data_error():
    """A Ray Train callback: a deterministic data error (:class:`DataError`, a unit with no
    decodable row) ends the run at once, whatever run.max_failures says (a retry from the last
    checkpoint would meet the same rows). The rank that meets it raises it (the others, waiting
    for it in a collective, end with Ray Train's teardown); in Ray Train's controller, this
    turns that worker failure into a controller error, which its failure policy never retries.
    (A local class: pickled by value, so the controller imports no torch to load it.)"""
    from ray.train import ControllerError, UserCallback

    class StopOnDataError(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict) -> None:
            for e in worker_exceptions.values():
                if isinstance(e, DataError):
                    raise ControllerError(e)

    return StopOnDataError()


def train(cfg: Config, local: bool = False, callbacks: Optional[list] = None,
          lock: bool = True) -> dict:
    """Train one run. ``local``: everything in this process, no Ray at all (debuggable).
    ``callbacks``: Ray Train callbacks for the TorchTrainer's RunConfig (e.g. Tune's
    ``TuneReportCallback`` when a sweep trial calls this). ``lock``: hold the run's driver lock
    (method/checkpoint.py RunLock: a second driver on the run is refused); a Tune trial passes
    False, Tune already runs one process per trial and may restart it on another host."""
    cfg, src = prepare(cfg)
    root = checkpoint_root(cfg)
    with RunLock(root) if lock else contextlib.nullcontext():
        return _train(cfg, src, root, local, callbacks)


def _train(cfg: Config, src: Source, root: Union[Path, str], local: bool,
           callbacks: Optional[list]) -> dict:
    # run.resume is resolved (and refused: never on an existing run, a broken checkpoint)
    # before this run writes anything, so a refused command leaves the existing run as it was
    resume = resume_checkpoint(cfg, root)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    log.info("run %r: %d training rows, %d steps/epoch, %d total steps, global batch %d -> %s",
             cfg.run.name, src.num_rows if cfg.data.limit is None else min(cfg.data.limit, src.num_rows),
             cfg.optim.steps_per_epoch, cfg.total_steps(), cfg.global_batch_size, run_dir)
    t0 = time.time()
    if local:
        result = _train_local(cfg, src, run_dir, root, resume)
    else:
        result = _train_ray(cfg, src, run_dir, root, resume, callbacks)
    result["wall_s"] = time.time() - t0
    if cfg.run.final_knn and cfg.data.eval_train and cfg.data.eval_test and result.get("checkpoint"):
        result["knn"] = knn_vs_random_init(cfg, result["checkpoint"])
    _write_summary(run_dir, result)
    # on Ray, rank 0 copies its own files (_worker_loop); --local is rank 0
    files = DRIVER_FILES + WORKER_FILES if local else DRIVER_FILES
    sync = log_sync_for(cfg.run.storage_path, cfg.run.name, run_dir, files)
    if sync is not None:
        sync.sync()
        log.info("logs copied to %s", sync.root)
    return result


def _train_local(cfg: Config, src: Source, run_dir: Path, root: Union[Path, str],
                 resume: Union[Path, str, None]) -> dict:
    if cfg.elastic and cfg.min_workers == 1:
        cfg = cfg.at_world_size(1)  # an elastic range that admits one worker
    elif cfg.world_size > 1 or cfg.elastic:
        raise ConfigError("--local runs one process: set run.num_workers to 0 or 1")
    report = DecodeReport()
    if is_uri(root):
        ctx = _LocalToObjectStore(cfg, src, run_dir, resume, report, root)
    else:
        ctx = LocalLoopContext(cfg, src, run_dir, resume, report)
    try:
        last = run_loop(cfg, ctx, OnlineKnn.from_config(cfg))
    finally:  # also when a DataError ends the run: what was skipped until then
        _report_decode_errors(run_dir, report.summary())
    ckpt = ctx.resume_from
    return {"mode": "local", "metrics": last, "checkpoint": str(ckpt) if ckpt else None,
            "skipped_images": report.count()}


class _LocalToObjectStore(LocalLoopContext):
    """``--local`` with ``run.storage_path`` on an object store: each checkpoint is written to
    the local run directory as in local mode, then copied to ``<storage_path>/<name>/`` under
    the same name (meta.json last); there, of the checkpoints up to this step the newest
    ``run.num_checkpoints_to_keep`` stay (a newer one, e.g. a corrupt one this run resumed
    past, stays until this run writes its step again). The logs are copied after each."""

    def __init__(self, cfg: Config, src: Source, run_dir: Path, resume_from, report, root: str):
        super().__init__(cfg, src, run_dir, resume_from, report)
        self.root = root
        self.sync = log_sync_for(cfg.run.storage_path, cfg.run.name, run_dir, WORKER_FILES)
        self.sync.restore(APPEND_FILES)

    def report(self, metrics: dict, state: Optional[dict]) -> None:
        super().report(metrics, state)
        if state is None:
            return
        step = int(state["global_step"])
        copy_checkpoint(self.resume_from, f"{self.root}/{Path(self.resume_from).name}")
        upto = []
        for d in list_checkpoints(self.root):
            try:
                if int(read_meta(d)["global_step"]) > step:
                    continue
            except (CheckpointError, KeyError, ValueError, TypeError):
                pass  # incomplete: counted with the older ones
            upto.append(d)
        for old in upto[self.cfg.run.num_checkpoints_to_keep:]:
            delete_checkpoint(old)
        self.sync.sync()


def _start_ray(cfg: Config) -> None:
    """Start or join Ray for this run. Every refusal that needs no cluster happens before Ray
    starts: the config, data and storage (prepare), the resume choice (train), and the CPU
    split of a local Ray (its size is known). Then the cluster's size now and the most its
    autoscaler can grow it to: refuse only what can never fit; otherwise say that the run
    waits for nodes."""
    from massl_ray.data.pipeline import check_resources

    planned = planned_cluster_cpus()
    if planned is not None:
        check_resources(cfg, planned)
    init_ray()
    now, most = cluster_capacity()
    waits = check_resources(cfg, now.get("CPU", 0.0), (most or {}).get("CPU"),
                            now.get("GPU", 0.0), (most or {}).get("GPU"))
    if waits:
        log.warning(waits)


def _train_ray(cfg: Config, src: Source, run_dir: Path, root: Union[Path, str],
               resume: Union[Path, str, None], callbacks: Optional[list] = None) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from massl_ray.data.feed import start_feed
    from massl_ray.data.pipeline import get_report_actor

    _start_ray(cfg)
    reporter = get_report_actor(cfg.run.name)
    # The run's feed coordinator (massl_ray.data.feed) serves every rank its pieces. It is
    # pinned to this node, outside the caller's placement group (a Tune trial's would capture
    # its read and decode tasks).
    feed = start_feed(cfg, src, reporter)
    r = cfg.run
    res = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        res["GPU"] = r.gpus_per_worker
    storage = r.storage_path if is_uri(r.storage_path) else str(Path(r.storage_path).absolute())
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir),
                           "torch_threads": max(1, math.ceil(r.cpus_per_worker - 1e-9)),
                           "resume_from": str(resume) if resume else None,
                           "checkpoint_root": str(root),
                           "feed": feed,
                           "reporter": reporter},
        scaling_config=ScalingConfig(
            num_workers=(cfg.min_workers, cfg.world_size) if cfg.elastic else cfg.world_size,
            elastic_resize_monitor_interval_s=r.elastic_resize_interval_s,
            use_gpu=r.use_gpu, resources_per_worker=res,
            placement_strategy=r.placement_strategy),
        run_config=RunConfig(
            name=r.name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=r.num_checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=r.max_failures,
                                         max_preemption_failures=r.max_preemption_failures),
            callbacks=list(callbacks or []) + [_stop_on_data_error()],
            logging_config=LoggingConfig(log_level=train_log_level()),
        ),
    )
    data_error = None
    try:
        try:
            result = trainer.fit()
        except ray.train.ControllerError as e:  # _stop_on_data_error's
            data_error = e.controller_failure
            if not isinstance(data_error, DataError):
                raise
        summary = ray.get(reporter.summary.remote())
        stopped = ray.get(reporter.non_finite.remote())
        data_stats = ray.get(feed.stats.remote())
    finally:
        ray.kill(reporter)
        ray.kill(feed)
    (run_dir / "data_feed.json").write_text(json.dumps(data_stats))
    _report_decode_errors(run_dir, summary)
    if data_error is not None:
        raise DataError(str(data_error))
    if stopped is not None:  # the workers ended normally at a non-finite loss (_worker_loop)
        raise NonFiniteLoss(stopped["step"], stopped["value"])
    ckpt = None
    if result.checkpoint is not None:
        ckpt = result.checkpoint.path
        if is_uri(root):  # object storage: keep a local copy of the final checkpoint
            ckpt = result.checkpoint.to_directory(str(run_dir / "final_checkpoint"))
    return {"mode": "ray", "metrics": dict(result.metrics or {}), "checkpoint": ckpt,
            "skipped_images": summary["skipped"]}
