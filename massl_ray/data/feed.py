"""The exact data order on Ray: each row group read once per epoch, decoded on the cluster's CPUs.

Shell module (imports ray); the work is :mod:`massl_ray.data.groups` and the order
:class:`~massl_ray.data.plan.EpochPlan`.

One :class:`FeedCoordinator` actor per run (CPU-free, owned by the driver or the Tune trial
that trains) turns the plan into Ray tasks, ahead of the ranks by a bounded number of decode
tasks:

- per window of row groups, one **read task per row group**: it reads the group once,
  sequentially, and cuts its rows into the parts of the decode tasks they feed (the map side
  of a shuffle within the window; rows before a resume position are read and dropped); a
  window's reads start when the ranks reach the window before it, so at most two windows of
  encoded rows sit in the object store;
- **decode tasks** of ``data.decode_rows`` positions (:func:`massl_ray.data.plan.decode_tasks`)
  take their parts, decode + multi-crop them and return one object per (step, rank) piece;
- each rank asks the coordinator for its pieces step by step (a few steps ahead) and fetches
  them from the object store: the train worker process only trains.

The pieces of a step do not depend on the world size (the crops are keyed by position), so a
restart with another number of workers continues the same global order. A request that goes
back in time (a restart from a checkpoint) or comes with another world size resets the
coordinator at that step: nothing before it is decoded again, and only the window holding it is
read again.

Why Ray tasks under an actor rather than a Ray Data ``Dataset``: the pieces of a global step
must reach given ranks in step order, and a restart must resume at a given position; Ray
Data's ``streaming_split`` hands blocks to whichever consumer asks first, and a Dataset
restarts from its beginning. The evaluation pipelines and ``prepare`` stay on Ray Data.

The coordinator is pinned to the node that starts it, which keeps it alive when worker
nodes leave and outside the caller's placement group: inside a Tune trial's, the trial's
placement group would capture its read and decode tasks, which could then never be scheduled.

Faults. Neither a dead actor nor a hung task stops a run silently:

- The coordinator restarts when its process dies (up to
  :data:`~massl_ray.data.pipeline.ACTOR_MAX_RESTARTS` times; calls to it are retried by Ray
  meanwhile). Its state is derivable: the constructor rebuilds the plan, and the ranks' next
  requests reset it at their step, as a restart from a checkpoint does. The pieces it had
  submitted are lost with it (it owns them): a rank that finds its pieces gone
  (``OwnerDiedError``, or any lost object) requests the step again, at most
  :data:`REQUEST_ATTEMPTS` times per step, and gets the same bits (a piece is a pure function of
  the run's seed, epoch and position). Its :meth:`FeedCoordinator.stats` then describe the
  restarted coordinator only (``restarted: true``).
- A rank waits at most ``data.fetch_timeout_s`` for each step (the coordinator's answer and its
  pieces together). Past it, it force-cancels the decode task(s) it waited for (freeing their
  CPU) and raises :class:`FeedTimeout`, naming the global step, the rank and the decode task(s)
  with the row groups that feed them. That is an ordinary worker failure: Ray Train's
  FailureConfig restarts the worker group from the last checkpoint while ``run.max_failures``
  allows (a lost or stuck task is redone then; one that hangs on the same rows again times out
  again, and the run ends with this error once the failures are used up).
- A decode task's :class:`~massl_ray.data.sources.DataError` (a unit with no decodable row)
  reaches its ranks as itself: the run ends at once, no retry (``train.trainer``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Iterator, Optional

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from massl_ray.config import Config, CropConfig
from massl_ray.data.groups import (concat_pieces, decode_task, group_read, read_and_split,
                                   route, source_groups, window_groups_of)
from massl_ray.data.multicrop import MultiCrop, decode_task_memory
from massl_ray.data.pipeline import ACTOR_MAX_RESTARTS, restarted_actor
from massl_ray.data.plan import EpochPlan, decode_tasks
from massl_ray.data.sources import DataError, Source

log = logging.getLogger(__name__)

# data.fetch_timeout_s's default (a RankFeed built without one asks its coordinator).
DEFAULT_FETCH_TIMEOUT_S = 600.0
# Requests of one step by a rank whose pieces were lost (a restarted coordinator's pieces die
# with the old process): the first one and up to REQUEST_ATTEMPTS - 1 more.
REQUEST_ATTEMPTS = 4


class FeedError(RuntimeError):
    """A rank could not get its pieces of a global step (see the module docstring, Faults)."""

    def __init__(self, message: str, step: int, rank: int, waiting_for: str = ""):
        super().__init__(message)
        self.step, self.rank, self.waiting_for = step, rank, waiting_for

    def __reduce__(self):
        return type(self), (self.args[0], self.step, self.rank, self.waiting_for)


class FeedTimeout(FeedError, TimeoutError):
    """A rank waited longer than ``data.fetch_timeout_s`` for its pieces of a global step. An
    ordinary worker failure: Ray Train's FailureConfig retries it (``run.max_failures``)."""

_MULTICROP: dict = {}


def _multicrop(crops: CropConfig) -> MultiCrop:
    key = repr(crops)
    mc = _MULTICROP.get(key)
    if mc is None:
        _MULTICROP.clear()
        mc = _MULTICROP[key] = MultiCrop(crops)
    return mc


def _read_task(gr, r):
    parts = read_and_split(gr, r)
    return parts[0] if len(parts) == 1 else tuple(parts)


def _decode_task(task, crops, seed, epoch, reporter, *parts):
    torch.set_num_threads(1)
    pieces, bad = decode_task(parts, task, _multicrop(crops), seed, epoch)
    if bad and reporter is not None:
        # Wait for the actor (bad rows are rare): the count is complete when the data is.
        ray.get(reporter.record.remote(bad))
    return pieces[0] if len(pieces) == 1 else tuple(pieces)


class _Epoch:
    """The coordinator's view of one epoch: its plan, decode tasks and routed windows."""

    def __init__(self, plan: EpochPlan, tasks: list, epoch: int):
        self.plan, self.tasks, self.epoch = plan, tasks, epoch
        self.starts = np.asarray([t.start for t in tasks], dtype=np.int64)
        self.stops = np.asarray([t.stop for t in tasks], dtype=np.int64)
        self.next = 0              # next task to submit
        self.routed: set = set()   # windows whose reads were submitted
        self.parts: dict = {}      # task index -> refs of its parts
        self.task_groups: dict = {}  # task index -> row groups that feed it


# max_task_retries=-1: a call made while it restarts waits for the new process (a retried
# piece() is safe: the pieces are a pure function of the step, and a repeated request resets
# the coordinator at that step at worst).
@ray.remote(num_cpus=0, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=-1)
class FeedCoordinator:
    """Plans and submits the read and decode tasks of the exact order; serves each rank the
    object refs of its (step, rank) pieces. See the module docstring.

    ``fetch_timeout_s``: the run's data.fetch_timeout_s, which it hands to the ranks.
    ``decode_fn``: a test hook, the decode tasks' function (default :func:`_decode_task`, same
    signature); no configuration reaches it."""

    def __init__(self, src: Source, crops: CropConfig, seed: int, batch: int,
                 steps_per_epoch: int, total_steps: int, limit: Optional[int],
                 window_groups: Optional[int], decode_rows: int, prefetch_tasks: int,
                 decode_cpus: float, read_cpus: float, shuffle: bool = True,
                 reporter: Optional[str] = None,
                 fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
                 decode_fn: Optional[Callable] = None):
        self.restarted = restarted_actor()
        if self.restarted:
            log.warning("data feed: the coordinator restarted (its process died): plan rebuilt; "
                        "the ranks' next requests reset it at their step")
        self.src, self.crops, self.seed, self.batch = src, crops, seed, batch
        self.spe, self.total = steps_per_epoch, total_steps
        self.groups = source_groups(src, limit)
        self.sizes = [g.rows for g in self.groups]
        self.window_groups = len(self.groups) if window_groups is None else window_groups
        self.decode_rows, self.prefetch = decode_rows, max(1, prefetch_tasks)
        self.shuffle = shuffle
        # The decode report by name, not by handle: an actor handle among the constructor's
        # arguments travels through the object store, which Ray warns about on the screen for
        # an actor that restarts (its restart would need that object).
        self.reporter = ray.get_actor(reporter) if reporter else None
        self.fetch_timeout_s = float(fetch_timeout_s)
        self._read = ray.remote(_read_task)
        self._decode = ray.remote(decode_fn or _decode_task)
        self.read_cpus, self.decode_cpus = read_cpus, decode_cpus
        self.world: Optional[int] = None
        self.resets: list = []
        self.reads: dict = {}       # epoch -> reads per row group (count)
        self.decoded: list = []     # [epoch, lo, hi, attempt]: positions decoded, merged
        self.rows_decoded = 0

    # -- state --------------------------------------------------------------------------------

    def _reset(self, g: int, world: int) -> None:
        self.world = world
        self.steps: dict = {}        # global step -> {rank: [(ref, what its task is)]}
        self.taken: dict = {}        # global step -> set of ranks that took their pieces
        self.upto: dict = {}         # rank -> the step after the last one it requested
        self.inflight: deque = deque()  # last global step of each submitted decode task
        self.base = g                # steps below are done (taken by every rank) or skipped
        self.ep: Optional[_Epoch] = None
        self.resets.append([int(g), int(world)])
        self._start_epoch(g // self.spe, g % self.spe)

    def _start_epoch(self, epoch: int, from_step: int) -> bool:
        if epoch * self.spe >= self.total:
            self.ep = None
            return False
        plan = EpochPlan(self.sizes, self.seed, epoch, self.window_groups,
                         shuffle=self.shuffle)
        to = min(self.spe, self.total - epoch * self.spe)
        tasks = decode_tasks(self.spe, self.batch, self.world, from_step, to, self.decode_rows)
        self.ep = _Epoch(plan, tasks, epoch)
        self.reads.setdefault(epoch, np.zeros(len(self.groups), np.int64))
        for e in sorted(self.reads):  # keep 4 epochs, this one always: bounded memory
            if len(self.reads) <= 4:
                break
            if e != epoch:
                del self.reads[e]
        return True

    # -- submission -----------------------------------------------------------------------------

    def _route_window(self, ep: _Epoch, w: int) -> None:
        if w in ep.routed or w >= ep.plan.num_windows:
            return
        ep.routed.add(w)
        ws, we = ep.plan.window_starts[w], ep.plan.window_starts[w + 1]
        i0 = int(np.searchsorted(ep.stops, ws, side="right"))
        i1 = int(np.searchsorted(ep.starts, we, side="left"))
        if i0 >= i1:
            return
        assert i0 >= ep.next, "a window was routed after a task needing it was submitted"
        for r in route(ep.plan, self.groups, ep.tasks[i0:i1], w, i0):
            refs = self._read.options(num_returns=len(r.tasks), num_cpus=self.read_cpus).remote(
                group_read(self.src, self.groups[r.group]), r)
            refs = [refs] if len(r.tasks) == 1 else list(refs)
            for t, ref in zip(r.tasks, refs):
                ep.parts.setdefault(t, []).append(ref)
                ep.task_groups.setdefault(t, set()).add(r.group)
            self.reads[ep.epoch][r.group] += 1

    def _submit_next(self) -> bool:
        ep = self.ep
        if ep is None:
            return False
        if ep.next >= len(ep.tasks):
            if not self._start_epoch(ep.epoch + 1, 0):
                return False
            return self._submit_next()
        i = ep.next
        t = ep.tasks[i]
        w0, _ = ep.plan.window_at(t.start)
        w1, _ = ep.plan.window_at(t.stop - 1)
        for w in range(w0, w1 + 2):  # its windows, and the next one read ahead
            self._route_window(ep, w)
        parts = ep.parts.pop(i)
        what = self._describe(ep.epoch, t, ep.task_groups.pop(i, ()))
        refs = self._decode.options(num_returns=len(t.pieces), num_cpus=self.decode_cpus,
                                    memory=decode_task_memory(self.crops, t)).remote(
            t, self.crops, self.seed, ep.epoch, self.reporter, *parts)
        refs = [refs] if len(t.pieces) == 1 else list(refs)
        off = ep.epoch * self.spe
        for (s, rk, _, _), ref in zip(t.pieces, refs):
            self.steps.setdefault(off + s, {}).setdefault(rk, []).append((ref, what))
        ep.next += 1
        self.inflight.append(off + t.units[-1][0])
        self._note_decoded(ep.epoch, t.start, t.stop)
        return True

    def _describe(self, epoch: int, t, groups) -> str:
        """A decode task and the row groups its read tasks read, for a rank's error message."""
        gs = sorted(groups)
        src = self.src

        def name(gi: int) -> str:
            g = self.groups[gi]
            if g.file >= 0:
                return f"{src.files[g.file]} row group {g.index}"
            return f"{g.rows} files from {src.files[g.start]}"

        idx = ", ".join(str(g) for g in gs[:8]) + (", ..." if len(gs) > 8 else "")
        named = "; ".join(name(g) for g in gs[:2]) + (f"; {len(gs) - 2} more" if len(gs) > 2
                                                       else "")
        return (f"the decode task of epoch {epoch} positions {t.start}..{t.stop - 1}, fed by "
                f"row group(s) {idx} of {len(self.groups)} ({named})")

    def _note_decoded(self, epoch: int, lo: int, hi: int) -> None:
        self.rows_decoded += hi - lo
        attempt = len(self.resets) - 1  # a reset starts a new attempt
        last = self.decoded[-1] if self.decoded else None
        if last is not None and last[0] == epoch and last[2] == lo and last[3] == attempt:
            last[2] = hi
        else:
            self.decoded.append([epoch, lo, hi, attempt])
            del self.decoded[:-1000]

    def _frontier(self) -> int:
        """The first global step no submitted task covers."""
        return self.inflight[-1] + 1 if self.inflight else self.base

    # -- the ranks' side -------------------------------------------------------------------

    def piece(self, rank: int, world: int, g: int) -> tuple[list, list]:
        """The object refs of rank ``rank``'s pieces of global step ``g`` (in order; usually
        one) and, for each, what produces it (its decode task and row groups, for an error
        message). A step before the ones still held, a piece already taken, or another world
        size is a restart: the coordinator starts again at ``g``. A rank that asks for ``g`` is
        done with every step before it (its requests go forward): a step it skipped (it held
        the pieces from before a reset, or a restarted coordinator never served it) counts as
        taken, so the steps held can be released."""
        if not 0 <= g < self.total:
            raise IndexError(f"global step {g} outside the run's 0..{self.total - 1}")
        if (self.world != world or g < self.base
                or rank in self.taken.get(g, ())):
            if self.world is not None:
                log.info("data feed: restart at global step %d with %d worker(s)", g, world)
            self._reset(g, world)
        while self._frontier() <= g:
            if not self._submit_next():
                break
        # a step's pieces can come from several tasks (one per rank when data.decode_rows is a
        # rank's batch): the frontier can pass g before this rank's piece is submitted
        while rank not in self.steps.get(g, ()) and self._submit_next():
            pass
        while len(self.inflight) < self.prefetch and self._submit_next():
            pass
        for s in range(max(self.base, self.upto.get(rank, self.base)), g):
            self._take(s, rank)
        got = self.steps[g][rank]
        self._take(g, rank)
        self.upto[rank] = g + 1
        self._advance()
        return [ref for ref, _ in got], [what for _, what in got]

    def _take(self, g: int, rank: int) -> None:
        took = self.taken.setdefault(g, set())
        if rank in took:
            return
        took.add(rank)
        held = self.steps.get(g)
        if held is not None:
            held.pop(rank, None)
            if len(took) == self.world:
                del self.steps[g]

    def fetch_timeout(self) -> float:
        """data.fetch_timeout_s of the run, for the ranks."""
        return self.fetch_timeout_s

    def _advance(self) -> None:
        while self.base in self.taken and len(self.taken[self.base]) == self.world:
            del self.taken[self.base]
            self.base += 1
        while self.inflight and self.inflight[0] < self.base:
            self.inflight.popleft()

    def stats(self) -> dict:
        """Reads per row group (recent epochs); decoded position ranges [epoch, lo, hi,
        attempt] (attempt: index into ``resets``, the [global step, world size] of each
        (re)start). ``restarted``: this is a restarted coordinator, whose counts begin at its
        restart (the process before it took its counts along)."""
        return {"restarted": bool(self.restarted),
                "reads_per_group": {int(e): c.tolist() for e, c in self.reads.items()},
                "decoded": [list(x) for x in self.decoded], "rows_decoded": self.rows_decoded,
                "resets": self.resets, "row_groups": len(self.groups),
                "windows": -(-len(self.groups) // self.window_groups)}


def start_feed(cfg: Config, src: Source, reporter=None, prefetch_tasks: Optional[int] = None,
               decode_fn: Optional[Callable] = None) -> "ray.actor.ActorHandle":
    """The run's coordinator, owned by the caller (it dies with the driver or trial).
    ``decode_fn``: a test hook (see :class:`FeedCoordinator`)."""
    d = cfg.data
    if prefetch_tasks is None:
        prefetch_tasks = d.prefetch_tasks or auto_prefetch(cfg)
    # On this (the driver's) node: it owns every piece, and it must outlive any worker node
    # (an elastic run loses nodes); it takes no CPU. Hard affinity: a soft one to a CPU-less
    # head mostly lands on a worker node (measured: 5 of 6 actors), which an elastic run may
    # lose; a 0-resource actor always fits its caller's own node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    reporter_name = ray.get(reporter.name.remote()) if reporter is not None else None
    return FeedCoordinator.options(scheduling_strategy=here).remote(
        src, cfg.crops, cfg.run.seed, cfg.global_batch_size, cfg.optim.steps_per_epoch,
        cfg.total_steps(), d.limit, window_groups_of(cfg), d.decode_rows, prefetch_tasks,
        d.decode_cpus, d.read_cpus, d.shuffle != "none", reporter_name,
        fetch_timeout_s=d.fetch_timeout_s, decode_fn=decode_fn)


def auto_prefetch(cfg: Config) -> int:
    """Decode tasks kept ahead of the ranks: two per CPU left to decoding (so every decode CPU
    has the next task queued), at least 2, and at most what fills a quarter of the cluster's
    object store with crops (a task holds data.decode_rows rows of crops until the ranks take
    them: ~148 MB for 256 ImageNet rows)."""
    try:
        res = ray.cluster_resources()
    except Exception:  # noqa: BLE001 - no Ray yet: the minimum
        return 2
    train = cfg.world_size * cfg.run.cpus_per_worker
    slots = max(1.0, (res.get("CPU", 1.0) - train) / max(cfg.data.decode_cpus, 1e-3))
    c = cfg.crops
    task_bytes = cfg.data.decode_rows * 3 * (2 * c.global_size ** 2
                                             + c.num_local_crops * c.local_size ** 2)
    cap = int(0.25 * res.get("object_store_memory", 0) / max(task_bytes, 1))
    return max(2, min(int(2 * slots), cap))


# What a rank survives by requesting its step again: the coordinator restarting or gone (its
# calls fail), or a piece lost (its owner, the coordinator, died; or it was evicted and could
# not be rebuilt).
_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


class RankFeed:
    """A rank's batches from the coordinator, ``lookahead`` steps requested ahead.

    ``fetch_timeout_s``: the most it waits for one step (None: the coordinator's, i.e. the
    run's data.fetch_timeout_s). See the module docstring (Faults) for what it survives and
    what it raises. ``retries``: the requests it repeated because pieces were lost."""

    def __init__(self, coordinator, rank: int, world: int, lookahead: int = 2,
                 pin_memory: bool = False, fetch_timeout_s: Optional[float] = None):
        self.coord, self.rank, self.world = coordinator, rank, world
        self.lookahead = max(1, lookahead)
        self.pin = pin_memory
        self.fetch_timeout_s = fetch_timeout_s
        self.retries = 0

    def _timeout(self) -> float:
        if self.fetch_timeout_s is None:
            self.fetch_timeout_s = float(ray.get(self.coord.fetch_timeout.remote(),
                                                 timeout=DEFAULT_FETCH_TIMEOUT_S))
        return self.fetch_timeout_s

    def iter_steps(self, first: int, stop: int) -> Iterator[dict]:
        """Batches of global steps ``first .. stop-1`` as dicts of torch tensors."""
        pending: deque = deque()
        nxt = first
        for g in range(first, stop):
            timeout = self._timeout()  # read at each step (the attribute may change)
            for attempt in range(1, REQUEST_ATTEMPTS + 1):
                if not pending:  # the first step, or a step requested again
                    pending.append(self.coord.piece.remote(self.rank, self.world, g))
                    nxt = g + 1
                try:
                    pieces = self._fetch(pending[0], g, timeout)
                    break
                except _LOST as e:
                    if attempt == REQUEST_ATTEMPTS:
                        raise FeedError(
                            f"data feed: rank {self.rank} of {self.world} lost its pieces of "
                            f"global step {g} {attempt} times (the feed's coordinator died and "
                            f"did not come back, or the pieces keep being lost): "
                            f"{type(e).__name__}: {_first_line(e)}", g, self.rank) from e
                    log.warning("data feed: rank %d lost its pieces of global step %d (%s: "
                                "the coordinator restarted?): requesting it again", self.rank,
                                g, type(e).__name__)
                    self.retries += 1
                    # Every request made before is suspect (refs of a dead coordinator): ask
                    # again from this step, in order. (Requests ahead go out only once a step's
                    # pieces arrived, so a restarted coordinator first hears of this step.)
                    pending.clear()
            pending.popleft()
            while nxt < stop and len(pending) < self.lookahead:
                pending.append(self.coord.piece.remote(self.rank, self.world, nxt))
                nxt += 1
            batch = concat_pieces(pieces)
            del pieces
            out = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
            if self.pin:
                out = {k: v.pin_memory() for k, v in out.items()}
            yield out

    def _fetch(self, call, g: int, timeout: float) -> list:
        """The pieces of step ``g`` (``call``: its piece() request), within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        who = f"rank {self.rank} of {self.world}"
        retried = ("This step fails: Ray Train restarts the worker group from the last "
                   "checkpoint while run.max_failures allows (a lost or stuck task is redone "
                   "then; one that hangs again on the same rows times out again)")
        try:
            refs, about = ray.get(call, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise FeedTimeout(
                f"data feed: {who} waited {timeout:g} s (data.fetch_timeout_s) for the feed's "
                f"coordinator to answer its request of global step {g}: the coordinator is "
                f"stuck or restarting over and over. {retried}.", g, self.rank,
                "the coordinator") from None
        what = "; ".join(dict.fromkeys(about))
        try:
            return ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            for ref in refs:  # free the CPU of a task that hangs (done ones: nothing happens)
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort; the error below is the point
                    pass
            raise FeedTimeout(
                f"data feed: {who} waited {timeout:g} s (data.fetch_timeout_s) for its "
                f"piece(s) of global step {g} and got none: it waited for {what}. That task, "
                f"or a read task of those row groups, hangs (e.g. on a pathological image) or "
                f"was lost; the decode task was cancelled. {retried}.", g, self.rank,
                what) from None
        except DataError as e:  # a decode task's (a RayTaskError): as itself, for Ray Train
            raise DataError(str(getattr(e, "cause", e))) from None
        except (ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError) as e:
            raise FeedError(
                f"data feed: {who}: its piece(s) of global step {g} failed ({type(e).__name__}: "
                f"cancelled, e.g. after another rank's timeout, or its worker process died on "
                f"every try): {what}", g, self.rank, what) from e


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def iter_batches(cfg: Config, src: Source, start_step: int = 0, stop_step: Optional[int] = None,
                 rank: int = 0, world: int = 1, reporter=None) -> Iterator[dict]:
    """Rank ``rank`` of ``world``'s batches of the exact order from the driver (Ray
    initialised): for benchmarks and tests. ``cfg`` is validated, with steps per epoch set."""
    coord = start_feed(cfg, src, reporter)
    stop = cfg.total_steps() if stop_step is None else stop_step
    try:
        yield from RankFeed(coord, rank, world, cfg.data.prefetch_batches,
                            fetch_timeout_s=cfg.data.fetch_timeout_s).iter_steps(start_step, stop)
    finally:
        ray.kill(coord)
