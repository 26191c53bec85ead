"""A two-level, world-size-independent epoch plan that reads each row group once. Ray-free.

The planning layer of the exact data order: :mod:`massl_ray.data.groups` reads and decodes by
it (in-process for the local mode), :mod:`massl_ray.data.feed` runs it on Ray.

The plan of one epoch, a pure function of (row-group sizes, window size, seed, epoch):

1. the row groups (in storage order, sizes ``group_sizes``) are permuted by a generator seeded
   by (seed, epoch), and the permuted list is cut into *windows* of ``window_groups`` groups
   (the last window may hold fewer); the windows come in that order;
2. within a window, its rows (the rows of its groups, in storage order) are permuted by a
   generator seeded by (seed, epoch, window);
3. the epoch's global sequence is the windows' permuted rows back to back.

So the row at global position ``p`` depends on (seed, epoch, p) only, never on the number of
workers: global step ``s`` (global batch ``B``) is positions ``s*B .. s*B+B-1``, and rank ``r``
of ``W`` takes its ``B/W`` consecutive positions of that step. A query materialises one
window's permutation (cached), never the epoch's; the epoch's bookkeeping is a few arrays of
one entry per row group.

Each row group belongs to exactly one window, so a plan that gives each window to one read task
(:meth:`EpochPlan.read_tasks`) reads each row group once per epoch, and a window's groups can
be read sequentially (in storage order: the within-window permutation does not depend on the
order they are read in). A resume at global step ``s`` starts in the window holding position
``s*B``: that window is read again (the only window read that is not wholly used), the rows
before ``s*B`` in it are read but not decoded, and nothing earlier is read (:meth:`resume`).

Mixing: a batch draws from one window (two at a window boundary), so on data stored sorted by
class a batch sees at most the classes of ``window_groups`` row groups. :func:`classes_per_batch`
measures it; benchmarks/scale.py gives the figures at ImageNet scale.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

# Row groups per window when none is given. A window must sit whole in memory (encoded, in the
# object store) while its rows are consumed, and a batch of a class-sorted data set sees about
# the classes of one window's groups. 128 groups of ImageNet's 1,024 (~160,000 rows, ~17.6 GB
# encoded) give a rank's batch of up to ~24 rows at least 95 % of a full shuffle's classes on
# class-sorted data, but a global batch of 1,024 only about a third: no bounded window reaches a
# full shuffle's classes per global batch on class-sorted storage (benchmarks/scale.py,
# docs/performance.md "Data plan at ImageNet scale (simulated)"); data written in shuffled
# order mixes fully with any window.
DEFAULT_WINDOW_GROUPS = 128
# Rows per decode task (data.decode_rows). A task's crops sit in the object store until the
# ranks take them, and a task's latency is its rows' decode time: 256 ImageNet rows (2 x 224 +
# 10 x 96 crops, ~577 KB each) are ~148 MB and a few seconds of one core.
DEFAULT_DECODE_ROWS = 256
_TAG = 0x5EED_91A7  # separates this plan's generators from other uses of (seed, epoch)


@dataclass(frozen=True)
class ReadTask:
    """One window, read once by one task: ``groups`` (storage indices, ascending: a sequential
    read), producing the window's rows in plan order, global positions ``start .. stop-1``.
    ``skip`` leading rows (a resume inside this window) are read but neither decoded nor
    passed on."""
    window: int
    groups: tuple
    start: int
    stop: int
    skip: int = 0


@dataclass(frozen=True)
class DecodeTask:
    """Decode the global positions ``start .. stop-1`` of the epoch as ``units``: (step, j, lo,
    hi), unit ``j`` of global step ``step`` covering positions lo .. hi-1, decoded as one batch
    with crops drawn from a generator keyed by (seed, epoch, step, j). Units never cross a step
    and do not depend on the world size, so neither do the crops. ``pieces`` are the
    (step, rank, lo, hi) slices of the task's output that go to each rank's batch, in order."""
    start: int
    stop: int
    units: tuple
    pieces: tuple


@dataclass(frozen=True)
class Resume:
    """What a resume at global step ``step`` of the epoch must read: the window holding its
    first position (read again, its first ``unused_rows`` rows read but not decoded) and the
    windows after it. ``rows_read_unused`` rows are read and not used; no row before the resume
    position is decoded."""
    step: int
    position: int
    first_window: int
    windows: tuple
    unused_rows: int
    window_rows: int

    @property
    def rows_read_unused(self) -> int:
        return self.unused_rows


@dataclass
class TaskPlan:
    read: list = field(default_factory=list)
    decode: list = field(default_factory=list)


class EpochPlan:
    """The plan of one epoch over row groups of ``group_sizes`` rows (storage order).

    ``window_groups``: row groups per window (default :data:`DEFAULT_WINDOW_GROUPS`; at least
    1; ``>= len(group_sizes)`` makes one window, a full shuffle of rows read once each).
    ``cache_windows``: windows' permutations kept for queries. ``shuffle=False``: storage
    order (no permutation at either level).
    """

    def __init__(self, group_sizes: Sequence[int], seed: int, epoch: int,
                 window_groups: Optional[int] = None, cache_windows: int = 2,
                 shuffle: bool = True):
        sizes = np.asarray(group_sizes, dtype=np.int64)
        if sizes.ndim != 1 or len(sizes) == 0 or (sizes < 0).any():
            raise ValueError("group_sizes must be a non-empty list of non-negative row counts")
        k = DEFAULT_WINDOW_GROUPS if window_groups is None else int(window_groups)
        if k < 1:
            raise ValueError(f"window_groups ({window_groups}) must be at least 1")
        self.seed, self.epoch, self.window_groups = int(seed), int(epoch), k
        self.group_sizes = sizes
        self.group_starts = np.concatenate([[0], np.cumsum(sizes)])  # storage row offsets
        self.n = int(self.group_starts[-1])
        self.shuffle = bool(shuffle)
        rng = np.random.default_rng([self.seed, self.epoch, _TAG])
        perm = rng.permutation(len(sizes)) if self.shuffle else np.arange(len(sizes))
        # Window w holds perm[w*k:(w+1)*k], kept sorted (storage order: a sequential read).
        self._win_groups = [np.sort(perm[i:i + k]) for i in range(0, len(perm), k)]
        wsizes = np.asarray([sizes[g].sum() for g in self._win_groups], dtype=np.int64)
        self.window_starts = np.concatenate([[0], np.cumsum(wsizes)])  # global positions
        self.window_of_group = np.empty(len(sizes), dtype=np.int64)
        for w, g in enumerate(self._win_groups):
            self.window_of_group[g] = w
        self._cache: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._cache_windows = max(1, int(cache_windows))

    # -- windows ------------------------------------------------------------------------------

    @property
    def num_windows(self) -> int:
        return len(self._win_groups)

    def window_groups_of(self, w: int) -> np.ndarray:
        """Storage indices of window ``w``'s row groups, ascending."""
        return self._win_groups[w]

    def window_size(self, w: int) -> int:
        return int(self.window_starts[w + 1] - self.window_starts[w])

    def window_rows(self, w: int) -> np.ndarray:
        """Row indices of window ``w`` in plan order (its groups' rows, permuted)."""
        hit = self._cache.get(w)
        if hit is not None:
            self._cache.move_to_end(w)
            return hit
        groups = self._win_groups[w]
        rows = np.concatenate([np.arange(self.group_starts[g], self.group_starts[g + 1])
                               for g in groups]) if len(groups) else np.zeros(0, np.int64)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, _TAG, w + 1])
            rows = rows[rng.permutation(len(rows))]
        self._cache[w] = rows
        while len(self._cache) > self._cache_windows:
            self._cache.popitem(last=False)
        return rows

    def window_at(self, p: int) -> tuple[int, int]:
        """(window, offset in it) of global position ``p``."""
        if not 0 <= p < self.n:
            raise IndexError(f"position {p} outside the epoch's 0..{self.n - 1}")
        w = int(np.searchsorted(self.window_starts, p, side="right") - 1)
        return w, int(p - self.window_starts[w])

    # -- positions, steps, ranks --------------------------------------------------------------

    def row_at(self, p: int) -> int:
        """The row at global position ``p`` of the epoch."""
        w, off = self.window_at(p)
        return int(self.window_rows(w)[off])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows at global positions ``start .. stop-1`` (may span windows)."""
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"positions {start}..{stop - 1} outside the epoch's 0..{self.n - 1}")
        out, p = [], start
        while p < stop:
            w, off = self.window_at(p)
            take = min(stop - p, self.window_size(w) - off)
            out.append(self.window_rows(w)[off:off + take])
            p += take
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def order(self) -> np.ndarray:
        """The whole epoch's sequence (materialised: for tests and measurements)."""
        return np.concatenate([self.window_rows(w) for w in range(self.num_windows)])

    def steps_per_epoch(self, batch: int) -> int:
        """Whole global steps in the epoch (the last ``n % batch`` positions are not used)."""
        return self.n // _positive(batch, "global batch")

    def step_rows(self, step: int, batch: int) -> np.ndarray:
        """Rows of global step ``step`` (global batch ``batch``)."""
        if not 0 <= step < self.steps_per_epoch(batch):
            raise IndexError(f"step {step} outside the epoch's {self.steps_per_epoch(batch)} "
                             f"steps of {batch} rows")
        return self.rows(step * batch, (step + 1) * batch)

    def rank_rows(self, step: int, rank: int, world: int, batch: int) -> np.ndarray:
        """Rank ``rank`` of ``world``'s rows at global step ``step``: its ``batch/world``
        consecutive positions of the step (``world`` must divide the global ``batch``)."""
        lo, hi = _rank_slice(step, rank, world, batch)
        if not 0 <= step < self.steps_per_epoch(batch):
            raise IndexError(f"step {step} outside the epoch's {self.steps_per_epoch(batch)} "
                             f"steps of {batch} rows")
        return self.rows(lo, hi)

    # -- reading ------------------------------------------------------------------------------

    def resume(self, step: int, batch: int) -> Resume:
        """What a resume at global step ``step`` (of this epoch) reads."""
        spe = self.steps_per_epoch(batch)
        if not 0 <= step < spe:
            raise IndexError(f"step {step} outside the epoch's {spe} steps of {batch} rows")
        p = step * batch
        w, off = self.window_at(p)
        last, _ = self.window_at(spe * batch - 1)
        return Resume(step=step, position=p, first_window=w, windows=tuple(range(w, last + 1)),
                      unused_rows=off, window_rows=self.window_size(w))

    def read_tasks(self, from_step: int = 0, batch: Optional[int] = None) -> list[ReadTask]:
        """One read task per window still needed (all windows, or from a resume at
        ``from_step`` of global batch ``batch``); only windows holding used positions."""
        if from_step and batch is None:
            raise ValueError("a resume (from_step > 0) needs the global batch")
        if batch is None:
            first, skip, windows = 0, 0, range(self.num_windows)
        else:
            r = self.resume(from_step, batch)
            first, skip, windows = r.first_window, r.unused_rows, r.windows
        return [ReadTask(window=w, groups=tuple(int(g) for g in self._win_groups[w]),
                         start=int(self.window_starts[w]), stop=int(self.window_starts[w + 1]),
                         skip=skip if w == first else 0) for w in windows]

    def task_plan(self, batch: int, world: int, from_step: int = 0,
                  decode_rows: int = DEFAULT_DECODE_ROWS) -> TaskPlan:
        """Read and decode tasks of the epoch from global step ``from_step`` on: one read task
        per window (each row group of it read once), and decode tasks of at most
        ``decode_rows`` positions (:func:`decode_tasks`)."""
        return TaskPlan(read=self.read_tasks(from_step, batch),
                        decode=decode_tasks(self.steps_per_epoch(batch), batch, world, from_step,
                                            decode_rows=decode_rows))


def decode_units(step: int, batch: int, decode_rows: int) -> list[tuple[int, int, int, int]]:
    """The units (step, j, lo, hi) of global step ``step``: the step's positions cut into
    pieces of ``decode_rows`` (the whole step when it is smaller)."""
    u = _positive(decode_rows, "decode_rows")
    lo0 = step * batch
    return [(step, j, lo0 + a, lo0 + min(a + u, batch))
            for j, a in enumerate(range(0, batch, u))]


def decode_tasks(steps: int, batch: int, world: int, from_step: int = 0,
                 to_step: Optional[int] = None,
                 decode_rows: int = DEFAULT_DECODE_ROWS) -> list[DecodeTask]:
    """Decode tasks for global steps ``from_step .. to_step-1`` (of an epoch of ``steps``):
    a step of more than ``decode_rows`` positions is cut into units of ``decode_rows``, one
    task each; smaller steps are grouped ``decode_rows // batch`` to a task, the groups aligned
    to the epoch's start (a resume's first task is the rest of its group). Each task's output
    is split into the (step, rank) pieces of the rank slices of ``world`` (which must divide
    ``batch``)."""
    b = _rank_slice(0, 0, world, batch)[1]
    u = _positive(decode_rows, "decode_rows")
    stop = steps if to_step is None else min(steps, to_step)
    per = max(1, u // batch)  # whole steps per task (1 when a step is cut into units)
    out = []
    s = from_step
    while s < stop:
        group_end = min(stop, (s // per + 1) * per)
        if batch > u:
            units_of = [[un] for un in decode_units(s, batch, u)]
            group_end = s + 1
        else:
            units_of = [[decode_units(t, batch, u)[0] for t in range(s, group_end)]]
        for units in units_of:
            pieces = []
            for (st, _, lo, hi) in units:
                x = lo
                while x < hi:
                    y = min(hi, (x // b + 1) * b)  # up to the next rank-slice boundary
                    pieces.append((st, (x - st * batch) // b, x, y))
                    x = y
            out.append(DecodeTask(start=units[0][2], stop=units[-1][3], units=tuple(units),
                                  pieces=tuple(pieces)))
        s = group_end
    return out


def _positive(x: int, what: str) -> int:
    if int(x) < 1:
        raise ValueError(f"{what} ({x}) must be positive")
    return int(x)


def _rank_slice(step: int, rank: int, world: int, batch: int) -> tuple[int, int]:
    _positive(batch, "global batch")
    _positive(world, "world size")
    if batch % world:
        raise ValueError(f"the world size ({world}) must divide the global batch ({batch})")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    b = batch // world
    lo = step * batch + rank * b
    return lo, lo + b


# -- batch quality ----------------------------------------------------------------------------

def classes_per_batch(labels: np.ndarray, rows: np.ndarray, batch: int) -> np.ndarray:
    """Distinct labels in each consecutive batch of ``batch`` rows of ``rows`` (a sequence of
    row indices; a trailing partial batch is dropped)."""
    m = len(rows) // _positive(batch, "batch")
    lab = np.asarray(labels)[np.asarray(rows[:m * batch])].reshape(m, batch)
    lab = np.sort(lab, axis=1)
    return 1 + (np.diff(lab, axis=1) != 0).sum(axis=1)


def batch_quality(labels: np.ndarray, group_sizes: Sequence[int], batch: int, seed: int = 0,
                  epoch: int = 0, window_groups: Optional[int] = None,
                  max_batches: Optional[int] = None) -> dict:
    """Mean classes per batch of the plan against a full shuffle (a uniform permutation of the
    rows) of the same epoch length: ``{"plan", "full", "ratio"}``. ``max_batches`` evenly
    spaced batches of each (all when None)."""
    plan = EpochPlan(group_sizes, seed, epoch, window_groups)
    if len(labels) != plan.n:
        raise ValueError(f"{len(labels)} labels for {plan.n} rows")
    spe = plan.steps_per_epoch(batch)
    steps = np.arange(spe) if max_batches is None or max_batches >= spe else \
        np.linspace(0, spe - 1, max_batches).astype(np.int64)
    ours = np.concatenate([classes_per_batch(labels, plan.step_rows(int(s), batch), batch)
                           for s in steps])
    full = np.random.default_rng([seed, epoch, _TAG, 0]).permutation(plan.n)
    theirs = np.concatenate([classes_per_batch(labels, full[s * batch:(s + 1) * batch], batch)
                             for s in steps])
    return {"plan": float(ours.mean()), "full": float(theirs.mean()),
            "ratio": float(ours.mean() / theirs.mean())}
