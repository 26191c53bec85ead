"""The two-level epoch plan (massl_ray/data/plan.py): exact, seeded, world-size-independent,
each row group read once, resumable mid-epoch, and its batch quality on class-sorted data."""

from __future__ import annotations

import numpy as np
import pytest

from massl_ray.data.plan import (DEFAULT_WINDOW_GROUPS, EpochPlan, batch_quality,
                                 classes_per_batch)

# Uneven row groups (as Parquet writers leave them), 37 groups, 1,000-odd rows.
SIZES = [23, 31, 28, 30, 17, 29, 30, 30, 12, 30, 25, 30, 30, 26, 30, 30, 19, 30, 30, 30,
         27, 30, 30, 14, 30, 30, 30, 22, 30, 30, 30, 30, 9, 30, 30, 30, 21]
N = sum(SIZES)


def _plan(seed=0, epoch=0, k=4):
    return EpochPlan(SIZES, seed, epoch, window_groups=k)


@pytest.mark.parametrize("k", [1, 4, 5, 37, 100])
def test_every_row_exactly_once_per_epoch(k):
    order = _plan(k=k).order()
    assert len(order) == N
    assert np.array_equal(np.sort(order), np.arange(N))


def test_reproducible_from_the_seed_and_different_across_epochs_and_seeds():
    a, b = _plan(3, 5).order(), _plan(3, 5).order()
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _plan(3, 6).order())
    assert not np.array_equal(a, _plan(4, 5).order())
    assert not np.array_equal(a, np.arange(N))


def test_position_queries_agree_with_the_whole_order_and_materialise_one_window_at_a_time():
    plan = _plan(1, 2, k=5)
    order = plan.order()
    fresh = _plan(1, 2, k=5)  # its caches empty: answers come from single windows
    for p in [0, 1, 149, 150, 151, N // 2, N - 1]:
        assert fresh.row_at(p) == order[p]
        assert len(fresh._cache) <= 2
    assert np.array_equal(fresh.rows(140, 460), order[140:460])
    with pytest.raises(IndexError):
        fresh.row_at(N)


def test_global_order_is_independent_of_the_world_size():
    plan, B = _plan(7, 1), 48
    spe = plan.steps_per_epoch(B)
    assert spe == N // B
    for s in range(spe):
        whole = plan.step_rows(s, B)
        assert np.array_equal(whole, plan.order()[s * B:(s + 1) * B])
        for world in (1, 2, 4):
            parts = [plan.rank_rows(s, r, world, B) for r in range(world)]
            assert all(len(p) == B // world for p in parts)
            assert np.array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="divide"):
        plan.rank_rows(0, 0, 5, B)
    with pytest.raises(IndexError):
        plan.step_rows(spe, B)


def test_each_row_group_is_in_exactly_one_window_and_read_by_one_task():
    plan = _plan(2, 3, k=4)
    tasks = plan.read_tasks()
    groups = [g for t in tasks for g in t.groups]
    assert sorted(groups) == list(range(len(SIZES)))  # each once per epoch
    for t in tasks:
        assert list(t.groups) == sorted(t.groups)  # a sequential read
        assert t.stop - t.start == sum(SIZES[g] for g in t.groups)
        got = plan.rows(t.start, t.stop)
        starts = np.concatenate([[0], np.cumsum(SIZES)])
        mine = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in t.groups])
        assert np.array_equal(np.sort(got), mine)  # a window's rows come from its groups only
    assert [t.window for t in tasks] == list(range(plan.num_windows))
    assert tasks[0].start == 0 and tasks[-1].stop == N
    # Windows differ between epochs.
    other = [set(t.groups) for t in _plan(2, 4, k=4).read_tasks()]
    assert other != [set(t.groups) for t in tasks]


@pytest.mark.parametrize("B,world", [(48, 4), (16, 2), (30, 1)])
def test_task_plan_covers_each_rank_slice_once_in_order(B, world):
    plan = _plan(5, 0, k=3)
    tp = plan.task_plan(B, world, decode_rows=40)
    spe = plan.steps_per_epoch(B)
    # One read task per window holding a used position (the last whole step's end).
    used = [w for w in range(plan.num_windows) if plan.window_starts[w] < spe * B]
    assert [t.window for t in tp.read] == used
    pos = [p for t in tp.decode for p in range(t.start, t.stop)]
    assert pos == list(range(spe * B))  # every used position decoded once, in order
    for t in tp.decode:
        assert t.stop - t.start <= max(40, 0)
        # Units: within one step, at most decode_rows each, covering the task in order.
        assert [q for (_, _, lo, hi) in t.units for q in range(lo, hi)] == list(range(t.start, t.stop))
        for s, j, lo, hi in t.units:
            assert s * B <= lo < hi <= (s + 1) * B and hi - lo <= 40
    got = {}
    for t in tp.decode:
        for s, r, lo, hi in t.pieces:
            got.setdefault((s, r), []).append(plan.rows(lo, hi))
    for s in range(spe):
        for r in range(world):
            assert np.array_equal(np.concatenate(got[(s, r)]), plan.rank_rows(s, r, world, B))


@pytest.mark.parametrize("step", [1, 7, 12, 19])
def test_resume_reads_at_most_one_window_not_wholly_used_and_decodes_nothing_consumed(step):
    plan, B, world = _plan(9, 2, k=4), 48, 4
    spe = plan.steps_per_epoch(B)
    r = plan.resume(step, B)
    p = step * B
    consumed = set(plan.order()[:p].tolist())
    read = plan.read_tasks(step, B)
    assert [t.window for t in read] == list(r.windows)
    assert read[0].window == r.first_window and read[0].skip == r.unused_rows
    # Only the first window read holds rows consumed before the checkpoint.
    for t in read[1:]:
        assert t.skip == 0 and t.start >= p
        assert not consumed & set(plan.rows(t.start, t.stop).tolist())
    first = read[0]
    assert first.start <= p < first.stop and first.start + first.skip == p
    assert r.unused_rows < r.window_rows
    # Rows read but not used: the first window's rows before p (and, in the last window, the
    # positions past the last whole step, as in an uninterrupted epoch).
    assert r.rows_read_unused == p - first.start
    tp = plan.task_plan(B, world, from_step=step, decode_rows=32)
    decoded = [plan.row_at(q) for t in tp.decode for q in range(t.start, t.stop)]
    assert not consumed & set(decoded)
    assert decoded == plan.rows(p, spe * B).tolist()
    # The resumed pieces are the uninterrupted run's.
    full = plan.task_plan(B, world, decode_rows=32)
    tail = [pc for t in full.decode for pc in t.pieces if pc[0] >= step]
    assert _same_slices(tail, [pc for t in tp.decode for pc in t.pieces])


def _same_slices(a, b):
    flat = lambda xs: [(s, r, q) for s, r, lo, hi in xs for q in range(lo, hi)]  # noqa: E731
    return flat(a) == flat(b)


def test_classes_per_batch_counts_distinct_labels():
    labels = np.array([0, 0, 1, 2, 2, 2, 3, 3])
    assert classes_per_batch(labels, np.arange(8), 4).tolist() == [3, 2]
    assert classes_per_batch(labels, np.array([7, 0, 2, 3, 4, 5]), 3).tolist() == [3, 1]


def _class_sorted():
    # ImageNet's geometry scaled down: 1,000 classes stored sorted by class, 1,024 row groups,
    # so that a group holds one or two classes; 24 rows a group.
    n, groups = 24 * 1024, 1024
    labels = (np.arange(n) * 1000) // n
    sizes = np.diff(np.linspace(0, n, groups + 1).astype(np.int64))
    return labels, sizes


def test_default_window_gives_a_ranks_batch_95_percent_of_a_full_shuffles_classes():
    # A rank's batch of 16 rows (global batch 1,024 on 64 workers) on class-sorted data.
    labels, sizes = _class_sorted()
    assert DEFAULT_WINDOW_GROUPS < len(sizes) // 4  # not a disguised full shuffle
    q = batch_quality(labels, sizes, 16, seed=0, epoch=0)
    assert q["full"] > 15.5
    assert q["ratio"] >= 0.95, q
    # A window of 8 row groups sees too few classes: the same measure fails it.
    small = batch_quality(labels, sizes, 16, seed=0, epoch=0, window_groups=8)
    assert small["ratio"] < 0.95, small
    # One window of every group is a full shuffle of rows that are still read once each.
    assert batch_quality(labels, sizes, 16, window_groups=len(sizes))["ratio"] > 0.97


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        EpochPlan([], 0, 0)
    with pytest.raises(ValueError):
        EpochPlan([3, 4], 0, 0, window_groups=0)
    with pytest.raises(ValueError):
        _plan().task_plan(10, 3)
