"""The training loop every worker runs, written against a small context interface.

:func:`run_loop` is the same code under Ray Train (``trainer.RayLoopContext``) and in the local
in-process mode (``LocalLoopContext`` below): batches from the context, the core
:class:`~massl_ray.method.learner.Learner` step, metrics on rank 0 (progress line, TensorBoard, JSONL),
periodic checkpoints, resume from the context's latest checkpoint. Ray-free.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from massl_ray.method.checkpoint import (CHECKPOINT_PREFIX, CheckpointError, latest_valid_checkpoint,
                                        list_checkpoints, load_checkpoint, read_meta,
                                        save_checkpoint, verify_checkpoint)
from massl_ray.config import Config
from massl_ray.method.learner import Learner, NonFiniteLoss
from massl_ray.data.sources import Source
from massl_ray.data.multicrop import MultiCrop
from massl_ray.data.views import DecodeReport

log = logging.getLogger("massl_ray")

class InjectedFailure(RuntimeError):
    """Raised by the fault-injection hook (run.fault_injection_step) to test recovery."""


class LoopContext(abc.ABC):
    """What the loop needs from its environment (Ray Train or in-process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    run_dir: Optional[Path] = None  # where rank 0 writes logs (None: no logs)

    @abc.abstractmethod
    def batches(self, epoch: int, skip: int) -> Iterator[dict]:
        """Batches of epoch ``epoch``; ``skip`` is the number already consumed before a resume."""

    @abc.abstractmethod
    def latest_state(self) -> Optional[dict]:
        """The training state to resume from, or None for a fresh start."""

    @abc.abstractmethod
    def report(self, metrics: dict, state: Optional[dict]) -> None:
        """Publish metrics (and, with ``state``, a checkpoint). Every rank calls it alike."""

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def preemption_notice(self) -> Optional[object]:
        """A notice that a node of this run is being preempted, or None. Collective: every
        rank calls it at the same steps (the control points). In one process: never."""
        return None

    def agree(self, values: list[int]) -> list[int]:
        """Rank 0's ``values`` on every rank (a broadcast). In one process: ``values``."""
        return values


class ControlPoints:
    """When the ranks poll for a preemption notice and agree on a time-based checkpoint.

    A control point is a global step at which every rank, before running that step, calls
    :meth:`LoopContext.preemption_notice` (a barrier, when polling is on) and then takes rank
    0's decisions through :meth:`LoopContext.agree`: the step of the next control point (rank
    0's measured seconds per step turned into about ``every_s`` seconds of steps, at least 1,
    at most ``max_gap``) and whether ``checkpoint_every_s`` has passed since the last
    checkpoint on rank 0's clock. Every rank therefore polls equally often, and all
    checkpoint at the same step; between control points a step costs one integer compare.
    """

    def __init__(self, start_step: int, every_s: float, poll: bool, checkpoint_every_s: float,
                 max_gap: int = 1000, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.poll = poll
        self.checkpoint_every_s = checkpoint_every_s
        self.max_gap = max_gap
        self.clock = clock
        self.enabled = poll or checkpoint_every_s > 0
        self.next_step = start_step if self.enabled else None
        self._mark = (start_step, clock())  # rank 0: the previous control point
        self._last_checkpoint = clock()  # rank 0: the last checkpoint (or the start)
        self._handled = None  # the last notice a checkpoint was saved for
        self.polls = 0  # control points passed, and the wall seconds they took (all of them)
        self.seconds = 0.0

    @classmethod
    def from_config(cls, cfg: Config, start_step: int, **kw) -> "ControlPoints":
        r = cfg.run
        every = r.preemption_check_seconds if r.preemption_check_seconds > 0 else 60.0
        if r.checkpoint_every_minutes > 0:
            every = min(every, max(1.0, r.checkpoint_every_minutes * 60 / 10))
        return cls(start_step, every, r.preemption_check_seconds > 0,
                   r.checkpoint_every_minutes * 60, **kw)

    def due(self, step: int) -> bool:
        return self.next_step is not None and step >= self.next_step

    def decide(self, step: int, ctx: "LoopContext") -> Optional[str]:
        """At a control point (every rank): ``"preemption"`` or ``"time"`` when this step must
        checkpoint, else None."""
        notice = None
        poll_start = now = self.clock()
        if self.poll:
            notice = ctx.preemption_notice()
        s0, t_mark = self._mark
        per_step = (now - t_mark) / (step - s0) if step > s0 else None
        gap = 1 if per_step is None else int(self.every_s / max(per_step, 1e-9))
        gap = max(1, min(self.max_gap, gap))
        time_due = int(self.checkpoint_every_s > 0
                       and now - self._last_checkpoint >= self.checkpoint_every_s)
        gap, time_due = ctx.agree([gap, time_due])
        poll_end = self.clock()
        self.polls += 1
        # this control point's own time (the poll's barrier and the broadcast), never the
        # steps between control points
        self.seconds += poll_end - poll_start
        # the next interval is measured from here: the steps' time, not this poll's
        self._mark = (step, poll_end)
        self.next_step = step + int(gap)
        if notice is not None and notice != self._handled:
            self._handled = notice
            log.warning("rank %d: preemption notice (%s): checkpoint at global step %d",
                        ctx.rank, notice, step + 1)
            return "preemption"
        return "time" if time_due else None

    def checkpointed(self) -> None:
        self._last_checkpoint = self.clock()


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsSink:
    """Rank 0's metric outputs: JSONL + TensorBoard in the run directory."""

    def __init__(self, run_dir: Optional[Path]):
        self.jsonl = None
        self.tb = None
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard is a dependency; keep training if it is missing
            log.warning("tensorboard is not installed: no event files")

    def write(self, metrics: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
        if self.tb:
            step = metrics["step"]
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def flush(self) -> None:
        if self.tb:
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


Monitor = Callable[[Learner], dict]


def run_loop(cfg: Config, ctx: LoopContext, monitor: Optional[Monitor] = None) -> dict:
    """Train until the schedule (or run.max_steps) ends. Returns the last metrics.

    ``monitor`` (rank 0's, e.g. the online k-NN of :mod:`massl_ray.evaluate.online`): called
    with the learner at every logged step, its dict merged into that step's metrics. The
    caller builds it, so this loop depends on no evaluation code. Every epoch yields exactly
    its steps: a unit with undecodable rows is refilled (massl_ray.data.groups), one with none
    ends the run (DataError)."""
    learner = Learner(cfg, ctx.device, wrap_student=ctx.wrap_model)
    state = ctx.latest_state()
    if state is not None:
        learner.load_state_dict(state)
        log.info("rank %d: resumed at global step %d (memory bank pointer %d)", ctx.rank,
                 learner.global_step, int(learner.memory.ptr))
    del state
    steps = _Steps(cfg, ctx, learner, monitor)
    spe = learner.schedules.steps_per_epoch
    try:
        while learner.global_step < steps.stop:
            epoch, pos = divmod(learner.global_step, spe)
            t_wait = time.perf_counter()
            for batch in ctx.batches(epoch, pos):
                steps.window_wait += time.perf_counter() - t_wait
                steps.run(batch, epoch)
                if learner.global_step >= steps.stop or learner.global_step % spe == 0:
                    break
                t_wait = time.perf_counter()
            else:
                raise RuntimeError(f"the data feed ended epoch {epoch} at global step "
                                   f"{learner.global_step}, before its {spe} steps")
    finally:
        steps.close()
    return steps.last


class _Steps:
    """One worker's steps of :func:`run_loop`: the fault-injection hook, the checkpoint
    decision, the learner step, and the logged metrics (progress line, JSONL, TensorBoard)."""

    def __init__(self, cfg: Config, ctx: LoopContext, learner: Learner,
                 monitor: Optional[Monitor]):
        self.cfg, self.ctx, self.learner, self.monitor = cfg, ctx, learner, monitor
        total = learner.schedules.total_steps
        self.stop = min(total, cfg.run.max_steps or total)
        self.sink = MetricsSink(ctx.run_dir if ctx.rank == 0 else None)
        self.last: dict = {"step": learner.global_step}
        self.window_t0, self.window_wait, self.window_steps = time.perf_counter(), 0.0, 0
        self.run_t0, self.start_step = time.perf_counter(), learner.global_step
        self.rows_log = None
        if cfg.run.record_rows and ctx.run_dir is not None:  # audit: the rows of every batch
            (ctx.run_dir / "workers").mkdir(parents=True, exist_ok=True)
            self.rows_log = open(ctx.run_dir / "workers" / f"rows_rank{ctx.rank}.jsonl", "a",
                                 buffering=1)
        self.control = ControlPoints.from_config(cfg, learner.global_step)
        self.ckpt_log = (ctx.run_dir / "checkpoints.jsonl") if ctx.rank == 0 and ctx.run_dir else None

    def _inject_fault(self, step: int) -> None:
        """run.fault_injection_step: fail once at that step (the marker file makes it once)."""
        r = self.cfg.run
        if r.fault_injection_step != step or self.ctx.run_dir is None:
            return
        marker = self.ctx.run_dir / f".fault_injected_{step}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        if r.fault_injection_mode == "kill":
            log.warning("injected failure: SIGKILL of this worker at global step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFailure(f"injected failure at global step {step}")

    def _checkpoint_reason(self, step: int) -> Optional[str]:
        """Why this step checkpoints (final | interval | preemption | time), or None."""
        reason = self.control.decide(step, self.ctx) if self.control.due(step) else None
        if step + 1 == self.stop:
            return "final"
        if (step + 1) % self.cfg.run.checkpoint_every_steps == 0:
            return "interval"
        return reason

    def run(self, batch: dict, epoch: int) -> None:
        step = self.learner.global_step
        self._inject_fault(step)
        reason = self._checkpoint_reason(step)
        log_now = (step + 1) % self.cfg.run.log_every_steps == 0 or step + 1 == self.stop
        if self.rows_log is not None and "row" in batch:
            self.rows_log.write(json.dumps({"step": step, "rank": self.ctx.rank,
                                            "world": self.ctx.world_size,
                                            "rows": batch["row"].tolist()}) + "\n")
        # The finite check is collective (all ranks agree, see Learner._check_finite): on CPU
        # every step, elsewhere at every logged or checkpointed step - the same steps on every
        # rank, so no non-finite state is ever reported or saved.
        res = self.learner.step(batch["global_crops"], batch.get("local_crops"),
                                check_finite=True if (log_now or reason) else None)
        self.window_steps += 1
        if log_now or reason:
            m = res.metrics()  # host sync only here
            if not math.isfinite(m["loss"]):
                raise NonFiniteLoss(step, m["loss"])
            self._record(m, epoch, reason)

    def _record(self, m: dict, epoch: int, reason: Optional[str]) -> None:
        """A logged (or checkpointed) step: its metrics, the progress line, the checkpoint."""
        now = time.perf_counter()
        elapsed = now - self.window_t0
        m.update(epoch=epoch,
                 images_per_s=self.cfg.global_batch_size * self.window_steps / max(elapsed, 1e-9),
                 data_wait_share=self.window_wait / max(elapsed, 1e-9),
                 wall_s=now - self.run_t0, start_step=self.start_step,
                 control_points=self.control.polls, control_s=self.control.seconds)
        if self.monitor is not None:
            m.update(self.monitor(self.learner))
        g = self.learner.global_step
        if self.ctx.rank == 0:
            eta = (self.stop - g) * (now - self.run_t0) / max(g - self.start_step, 1)
            log.info("step %d/%d | epoch %d | loss %.4f | %.1f img/s | data-wait %.0f%% | "
                     "teacher entropy %.2f/%.2f | argmax slots %d | ETA %s",
                     m["step"], self.stop, epoch, m["loss"], m["images_per_s"],
                     100 * m["data_wait_share"], m["teacher_entropy"], m["teacher_entropy_max"],
                     m["distinct_argmax_slots"], format_eta(eta))
            self.sink.write(m)
        if reason:
            self.sink.flush()
            t_ckpt = time.perf_counter()
            self.ctx.report(m, self.learner.state_dict())
            _record_checkpoint(self.ckpt_log, g, reason, time.perf_counter() - t_ckpt)
            self.control.checkpointed()
        else:
            self.ctx.report(m, None)
        self.last = m
        self.window_t0, self.window_wait, self.window_steps = time.perf_counter(), 0.0, 0

    def close(self) -> None:
        self.sink.close()
        if self.rows_log is not None:
            self.rows_log.close()


def _record_checkpoint(path: Optional[Path], step: int, reason: str, stall_s: float) -> None:
    """Rank 0: one line per checkpoint in ``<run dir>/checkpoints.jsonl``: its step, why it was
    taken (interval, time, preemption, final) and how long the loop stood still for it (the
    local write, plus the upload when run.checkpoint_upload=sync)."""
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "reason": reason, "stall_s": round(stall_s, 6),
                            "time": time.time()}) + "\n")


# ---- local (in-process) mode ---------------------------------------------------------------

class LocalLoopContext(LoopContext):
    """One process, no Ray: data decoded in-process, checkpoints written by this process."""

    def __init__(self, cfg: Config, src: Source, run_dir: Path, resume_from: Optional[Path],
                 report: DecodeReport, device: Optional[str] = None):
        self.cfg = cfg
        self.src = src
        self.run_dir = run_dir
        self.resume_from = resume_from
        self.decode_report = report
        self.device = torch.device(device or ("cuda" if cfg.run.use_gpu else "cpu"))
        self.checkpoints: list[Path] = []
        # checkpoint directory -> None if verified intact, else why it is broken
        self._broken: dict[Path, Optional[str]] = {}
        if resume_from is not None:
            self._broken[Path(resume_from)] = None
        self._store = None

    def batches(self, epoch: int, skip: int) -> Iterator[dict]:
        # The exact order (massl_ray.data.plan), in this process: step s of epoch e is the same
        # batch in every run with this seed and on Ray, so a resume at step s continues at the
        # exact data position.
        from massl_ray.data.groups import LocalFeed, window_groups_of

        c, d = self.cfg, self.cfg.data
        if self._store is None:
            self._store = LocalFeed(self.src, MultiCrop(c.crops), c.run.seed,
                                    c.global_batch_size, c.optim.steps_per_epoch, d.limit,
                                    window_groups_of(c), d.decode_rows, d.row_cache_mb << 20,
                                    self.decode_report, shuffle=d.shuffle != "none")
        for out in self._store.batches(epoch, skip):
            yield {k: torch.from_numpy(v) for k, v in out.items()}

    def latest_state(self) -> Optional[dict]:
        if self.resume_from is None:
            return None
        return load_checkpoint(self.resume_from)

    def report(self, metrics: dict, state: Optional[dict]) -> None:
        if state is None:
            return
        step = int(state["global_step"])
        final = self.run_dir / f"{CHECKPOINT_PREFIX}{step:09d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp_ckpt_", dir=self.run_dir))
        save_checkpoint(state, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic publish of a complete directory
        self.resume_from = final
        self._broken[final] = None
        self._prune(step)

    def _prune(self, step: int) -> None:
        """Keep the newest run.num_checkpoints_to_keep *good* checkpoints. A broken one (left by
        a crash, or corrupted since) never takes a good one's place: once this run has written
        a good checkpoint past it, it is deleted. Each directory is verified once per process."""
        good = []
        for d in list_checkpoints(self.run_dir):
            if d not in self._broken:
                try:
                    verify_checkpoint(d)
                    self._broken[d] = None
                except CheckpointError as e:
                    self._broken[d] = str(e)
            if self._broken[d] is None:
                good.append(d)
                continue
            try:
                older = int(read_meta(d)["global_step"]) < step
            except (CheckpointError, KeyError, ValueError, TypeError):
                older = True  # incomplete: it has no step at all
            if older:
                log.warning("deleting broken checkpoint %s, superseded by the good checkpoint of "
                            "step %d (%s)", d, step, self._broken.pop(d))
                shutil.rmtree(d, ignore_errors=True)
        for stale in self.run_dir.glob(".tmp_ckpt_*"):  # half-written by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        keep = self.cfg.run.num_checkpoints_to_keep
        for old in good[keep:]:
            shutil.rmtree(old, ignore_errors=True)
            self._broken.pop(old, None)
