"""The exact data order's work (massl_ray/data/groups.py in-process, massl_ray/data/feed.py on
Ray): each row once per epoch, each row group read once, the same global batches for any number
of workers, a mid-epoch resume that decodes nothing consumed, undecodable rows skipped, counted,
named with batches kept full."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import massl_ray.data.groups as groups_mod
from massl_ray.config import CropConfig
from massl_ray.data.groups import LocalFeed, source_groups
from massl_ray.data.multicrop import MultiCrop
from massl_ray.data.plan import EpochPlan
from massl_ray.data.sources import open_source
from massl_ray.data.views import DecodeReport

CROPS = CropConfig(global_size=8, local_size=4, num_local_crops=1)
GROUP_ROWS, GROUPS = 20, 6  # 120 rows, class-sorted: row group g holds class g
COLS = ("global_crops", "local_crops", "label", "row")


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _data(tmp_path, bad=()):
    n = GROUP_ROWS * GROUPS
    imgs = [b"not an image %d" % i if i in bad else _png(i) for i in range(n)]
    path = tmp_path / "sorted.parquet"
    pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()),
                             "label": pa.array(np.arange(n) // GROUP_ROWS, pa.int64())}),
                   path, row_group_size=GROUP_ROWS)
    return open_source(str(path))


def _feed(src, batch=12, spe=None, window_groups=2, decode_rows=24, shuffle=True, report=None):
    spe = spe or src.num_rows // batch
    return LocalFeed(src, MultiCrop(CROPS), 7, batch, spe, window_groups=window_groups,
                     decode_rows=decode_rows, report=report, shuffle=shuffle)


def _global(feed, epoch, world, from_step=0):
    """The global batches of an epoch: the ranks' batches of each step, concatenated."""
    per_rank = [list(feed.batches(epoch, from_step, r, world)) for r in range(world)]
    return [{k: np.concatenate([per_rank[r][s][k] for r in range(world)]) for k in COLS}
            for s in range(len(per_rank[0]))]


@pytest.mark.parametrize("window_groups,shuffle", [(2, True), (None, True), (1, False)])
def test_every_row_once_per_epoch_and_every_row_group_read_once(tmp_path, window_groups,
                                                                shuffle):
    src = _data(tmp_path)
    for epoch in (0, 1):
        feed = _feed(src, window_groups=window_groups, shuffle=shuffle)
        rows = np.concatenate([b["row"] for b in feed.batches(epoch)])
        assert len(rows) == 120 and len(set(rows.tolist())) == 120  # 10 steps of 12: all, once
        assert feed.reads == GROUPS  # each row group read once (the cache holds a window)
        if shuffle:
            assert not np.array_equal(rows, np.arange(120))
        else:
            assert np.array_equal(rows, np.arange(120))  # storage order
    if shuffle:
        e0 = np.concatenate([b["row"] for b in feed.batches(0)])
        e1 = np.concatenate([b["row"] for b in feed.batches(1)])
        assert not np.array_equal(e0, e1)  # a new order each epoch
        assert np.array_equal(e0, np.concatenate([b["row"] for b in _feed(src, window_groups=
                                                  window_groups).batches(0)]))  # seeded


def test_a_window_mixes_only_its_row_groups_and_a_full_shuffle_mixes_all(tmp_path):
    src = _data(tmp_path)
    for k, most in ((2, 2 * 2), (None, GROUPS)):  # a batch spans at most 2 windows
        for b in _feed(src, window_groups=k).batches(0):
            assert len(set(b["label"].tolist())) <= most
        labels = [len(set(b["label"].tolist())) for b in _feed(src, window_groups=k).batches(0)]
        if k is None:
            assert max(labels) > 4  # mixes beyond two row groups


@pytest.mark.parametrize("decode_rows", [24, 5, 12])
def test_global_batches_are_identical_for_world_sizes_1_2_and_4(tmp_path, decode_rows):
    # decode_rows 24: two steps per task; 5: a step cut into units (and a rank slice across
    # two tasks at W=2, 4); 12: one step per task.
    src = _data(tmp_path)
    feed = _feed(src, decode_rows=decode_rows)
    ref = _global(feed, 1, 1)
    for world in (2, 4):
        got = _global(feed, 1, world)
        assert len(got) == len(ref) == 10
        for s, (a, b) in enumerate(zip(ref, got)):
            for k in COLS:
                assert np.array_equal(a[k], b[k]), (world, s, k)  # bitwise, crops included


def test_mid_epoch_resume_gives_the_uninterrupted_batches_and_decodes_nothing_consumed(
        tmp_path, monkeypatch):
    src = _data(tmp_path)
    full = _global(_feed(src), 0, 2)
    decoded: list = []
    real = groups_mod.make_views

    def spy(images, ids, *a, **kw):
        decoded.extend(ids)
        return real(images, ids, *a, **kw)

    monkeypatch.setattr(groups_mod, "make_views", spy)
    feed = _feed(src)
    resumed = _global(feed, 0, 2, from_step=3)
    assert len(resumed) == 7
    for a, b in zip(full[3:], resumed):
        for k in COLS:
            assert np.array_equal(a[k], b[k])
    consumed = set(np.concatenate([b["row"] for b in full[:3]]).tolist())
    ids = {int(i.rsplit("#", 1)[1]) for i in decoded}
    assert not ids & consumed
    # Two ranks each decode their tasks in this in-process test; each row of steps 3..9 once
    # per rank, none before.
    assert len(decoded) == 2 * 7 * 12 and ids == set(range(120)) - consumed


def test_undecodable_rows_are_skipped_counted_named_and_batches_stay_full(tmp_path):
    bad = {3, 4, 50, 51, 52, 119}
    src = _data(tmp_path, bad=bad)
    report = DecodeReport()
    feed = _feed(src, report=report)
    batches = list(feed.batches(0))
    assert len(batches) == 10
    for b in batches:
        assert all(len(b[k]) == 12 for k in COLS)
        assert not set(b["row"].tolist()) & bad  # a bad row's place is a repeated good one
    assert report.count() == len(bad)
    f = src.files[0]
    assert set(report.summary()["rows"]) == {f"{f}#{i}" for i in bad}
    # Undecodable rows shift nothing: every other row comes in the step it came in without them.
    (tmp_path / "clean").mkdir()
    clean = list(_feed(_data(tmp_path / "clean")).batches(0))
    for a, b in zip(clean, batches):
        assert set(b["row"].tolist()) == set(a["row"].tolist()) - bad


def test_a_unit_with_no_decodable_row_is_a_clear_error(tmp_path):
    src = _data(tmp_path, bad=set(range(120)))
    with pytest.raises(RuntimeError, match="none of the 12 rows"):
        next(_feed(src).batches(0))


def test_folder_sources_are_read_in_groups_of_files(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(7):
            (root / c / f"{i}.png").write_bytes(_png(i + (100 if c == "b" else 0)))
    monkeypatch.setattr(groups_mod, "FOLDER_GROUP_ROWS", 4)
    src = open_source(str(root))
    gs = source_groups(src)
    assert [g.rows for g in gs] == [4, 4, 4, 2]
    feed = LocalFeed(src, MultiCrop(CROPS), 0, 7, 2, window_groups=2)
    rows = np.concatenate([b["row"] for b in feed.batches(0)])
    assert sorted(rows.tolist()) == list(range(14))
    labels = np.concatenate([b["label"] for b in feed.batches(0)])
    assert sorted(labels.tolist()) == [0] * 7 + [1] * 7


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_ray_feed_equals_the_local_feed_reads_once_and_restarts_at_a_step(tmp_path,
                                                                          ray_instance):
    """The coordinator on Ray: two ranks' pieces over two epochs are the in-process feed's,
    bitwise; each row group is read once per epoch; a request that goes back to step 14 (a
    restart from a checkpoint, mid-window) restarts there, decoding nothing before it and
    reading again exactly the row groups that hold its epoch's positions from there on; a
    restart with one worker continues the same global batches."""
    import ray

    from massl_ray.data.feed import FeedCoordinator, RankFeed

    src = _data(tmp_path)
    B, spe, world = 12, 10, 2
    coord = FeedCoordinator.remote(src, CROPS, 7, B, spe, 2 * spe, None, 2, 24, 2, 0.5, 0.5)
    feeds = [RankFeed(coord, r, world, lookahead=2) for r in range(world)]
    its = [f.iter_steps(0, 2 * spe) for f in feeds]
    got = []
    for _ in range(2 * spe):
        parts = [next(it) for it in its]
        got.append({k: np.concatenate([p[k].numpy() for p in parts]) for k in COLS})
    local = _feed(src)
    want = _global(local, 0, 1) + _global(local, 1, 1)
    for s, (a, b) in enumerate(zip(want, got)):
        for k in COLS:
            assert np.array_equal(a[k], b[k]), (s, k)
    st = ray.get(coord.stats.remote())
    assert st["reads_per_group"] == {0: [1] * GROUPS, 1: [1] * GROUPS}
    assert st["decoded"] == [[0, 0, 120, 0], [1, 0, 120, 0]]
    # A restart from the checkpoint of step 14 (epoch 1, position 48), now with one worker.
    restart = 14
    pos = (restart - spe) * B
    again = list(RankFeed(coord, 0, 1).iter_steps(restart, 2 * spe))
    assert len(again) == 2 * spe - restart
    for a, b in zip(want[restart:], again):
        for k in COLS:
            assert np.array_equal(a[k], b[k].numpy()), k
    st = ray.get(coord.stats.remote())
    assert st["resets"] == [[0, 2], [restart, 1]]
    assert st["decoded"][-1] == [1, pos, 120, 1]  # nothing before the resume position
    # Exactly the row groups holding rows at positions >= 48 of epoch 1's plan are read again,
    # once each. Here (seed 7, windows of 2 groups: [0, 3] at positions 0-39, [1, 5] at 40-79,
    # [2, 4] at 80-119) those are 1, 2, 4 and 5: position 48 lies inside window [1, 5], which is
    # read again, and window [0, 3], wholly before it, is not.
    plan = EpochPlan([GROUP_ROWS] * GROUPS, 7, 1, 2)
    needed = sorted(set((plan.rows(pos, GROUPS * GROUP_ROWS) // GROUP_ROWS).tolist()))
    assert needed == [1, 2, 4, 5]
    assert st["reads_per_group"][1] == [1 + (g in needed) for g in range(GROUPS)]
    assert st["reads_per_group"][0] == [1] * GROUPS  # epoch 0 is not read again
    ray.kill(coord)
