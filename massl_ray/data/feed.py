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
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Iterator, Optional

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from massl_ray.config import Config, CropConfig
from massl_ray.data.groups import (concat_pieces, decode_task, group_read, read_and_split,
                                   route, source_groups, window_groups_of)
from massl_ray.data.multicrop import MultiCrop
from massl_ray.data.plan import EpochPlan, decode_tasks
from massl_ray.data.sources import Source

log = logging.getLogger(__name__)

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


@ray.remote(num_cpus=0)
class FeedCoordinator:
    """Plans and submits the read and decode tasks of the exact order; serves each rank the
    object refs of its (step, rank) pieces. See the module docstring."""

    def __init__(self, src: Source, crops: CropConfig, seed: int, batch: int,
                 steps_per_epoch: int, total_steps: int, limit: Optional[int],
                 window_groups: Optional[int], decode_rows: int, prefetch_tasks: int,
                 decode_cpus: float, read_cpus: float, shuffle: bool = True, reporter=None):
        self.src, self.crops, self.seed, self.batch = src, crops, seed, batch
        self.spe, self.total = steps_per_epoch, total_steps
        self.groups = source_groups(src, limit)
        self.sizes = [g.rows for g in self.groups]
        self.window_groups = len(self.groups) if window_groups is None else window_groups
        self.decode_rows, self.prefetch = decode_rows, max(1, prefetch_tasks)
        self.shuffle = shuffle
        self.reporter = reporter
        self._read = ray.remote(_read_task)
        self._decode = ray.remote(_decode_task)
        self.read_cpus, self.decode_cpus = read_cpus, decode_cpus
        self.world: Optional[int] = None
        self.resets: list = []
        self.reads: dict = {}       # epoch -> reads per row group (count)
        self.decoded: list = []     # [epoch, lo, hi, attempt]: positions decoded, merged
        self.rows_decoded = 0

    # -- state --------------------------------------------------------------------------------

    def _reset(self, g: int, world: int) -> None:
        self.world = world
        self.steps: dict = {}        # global step -> {rank: [refs]}
        self.taken: dict = {}        # global step -> set of ranks that took their pieces
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
        refs = self._decode.options(num_returns=len(t.pieces), num_cpus=self.decode_cpus).remote(
            t, self.crops, self.seed, ep.epoch, self.reporter, *parts)
        refs = [refs] if len(t.pieces) == 1 else list(refs)
        off = ep.epoch * self.spe
        for (s, rk, _, _), ref in zip(t.pieces, refs):
            self.steps.setdefault(off + s, {}).setdefault(rk, []).append(ref)
        ep.next += 1
        self.inflight.append(off + t.units[-1][0])
        self._note_decoded(ep.epoch, t.start, t.stop)
        return True

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

    def piece(self, rank: int, world: int, g: int) -> list:
        """The object refs of rank ``rank``'s pieces of global step ``g`` (in order; usually
        one). A step before the ones still held, a piece already taken, or another world size
        is a restart: the coordinator starts again at ``g``."""
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
        while len(self.inflight) < self.prefetch and self._submit_next():
            pass
        refs = self.steps[g].pop(rank)
        took = self.taken.setdefault(g, set())
        took.add(rank)
        if len(took) == self.world:
            del self.steps[g]
            self._advance()
        return refs

    def _advance(self) -> None:
        while self.base in self.taken and len(self.taken[self.base]) == self.world:
            del self.taken[self.base]
            self.base += 1
        while self.inflight and self.inflight[0] < self.base:
            self.inflight.popleft()

    def stats(self) -> dict:
        """Reads per row group (recent epochs); decoded position ranges [epoch, lo, hi,
        attempt] (attempt: index into ``resets``, the [global step, world size] of each
        (re)start)."""
        return {"reads_per_group": {int(e): c.tolist() for e, c in self.reads.items()},
                "decoded": [list(x) for x in self.decoded], "rows_decoded": self.rows_decoded,
                "resets": self.resets, "row_groups": len(self.groups),
                "windows": -(-len(self.groups) // self.window_groups)}


def start_feed(cfg: Config, src: Source, reporter=None, prefetch_tasks: Optional[int] = None
               ) -> "ray.actor.ActorHandle":
    """The run's coordinator, owned by the caller (it dies with the driver or trial)."""
    d = cfg.data
    if prefetch_tasks is None:
        prefetch_tasks = d.prefetch_tasks or auto_prefetch(cfg)
    # On this (the driver's) node: it owns every piece, and it must outlive any worker node
    # (an elastic run loses nodes); it takes no CPU. Hard affinity: a soft one to a CPU-less
    # head mostly lands on a worker node (measured: 5 of 6 actors), which an elastic run may
    # lose; a 0-resource actor always fits its caller's own node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return FeedCoordinator.options(scheduling_strategy=here).remote(
        src, cfg.crops, cfg.run.seed, cfg.global_batch_size, cfg.optim.steps_per_epoch,
        cfg.total_steps(), d.limit, window_groups_of(cfg), d.decode_rows, prefetch_tasks,
        d.decode_cpus, d.read_cpus, d.shuffle != "none", reporter)


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


class RankFeed:
    """A rank's batches from the coordinator, ``lookahead`` steps requested ahead."""

    def __init__(self, coordinator, rank: int, world: int, lookahead: int = 2,
                 pin_memory: bool = False):
        self.coord, self.rank, self.world = coordinator, rank, world
        self.lookahead = max(1, lookahead)
        self.pin = pin_memory

    def iter_steps(self, first: int, stop: int) -> Iterator[dict]:
        """Batches of global steps ``first .. stop-1`` as dicts of torch tensors."""
        pending: deque = deque()
        nxt = first
        for _ in range(first, stop):
            while nxt < stop and len(pending) < self.lookahead:
                pending.append(self.coord.piece.remote(self.rank, self.world, nxt))
                nxt += 1
            refs = ray.get(pending.popleft())
            batch = concat_pieces(ray.get(refs))
            del refs
            out = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
            if self.pin:
                out = {k: v.pin_memory() for k, v in out.items()}
            yield out


def iter_batches(cfg: Config, src: Source, start_step: int = 0, stop_step: Optional[int] = None,
                 rank: int = 0, world: int = 1, reporter=None) -> Iterator[dict]:
    """Rank ``rank`` of ``world``'s batches of the exact order from the driver (Ray
    initialised): for benchmarks and tests. ``cfg`` is validated, with steps per epoch set."""
    coord = start_feed(cfg, src, reporter)
    stop = cfg.total_steps() if stop_step is None else stop_step
    try:
        yield from RankFeed(coord, rank, world, cfg.data.prefetch_batches).iter_steps(
            start_step, stop)
    finally:
        ray.kill(coord)
