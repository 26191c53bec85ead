"""The exact data order (massl_ray/order.py): which rows and crops each (epoch, step, rank) gets,
fetching rows by index, and how undecodable rows are handled. Ray-free."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from massl_ray.config import CropConfig
from massl_ray.data.multicrop import MultiCrop
from massl_ray.data.order import (BLOCK_WINDOW_CHUNKS, RowStore, epoch_order,
                             random_access_warning, step_batch, step_rows)
from massl_ray.data.sources import open_source
from massl_ray.data.views import DecodeReport

CROPS = CropConfig(global_size=16, local_size=8, num_local_crops=2)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (value, 255 - value, value // 2)).save(buf, "PNG")
    return buf.getvalue()


def _parquet(path: Path, n: int, row_group_size: int, bad: tuple[int, ...] = ()) -> Path:
    imgs = [b"garbage" if i in bad else _png(i % 256) for i in range(n)]
    pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()),
                             "label": pa.array(np.arange(n) % 7)}),
                   path, row_group_size=row_group_size)
    return path


def test_epoch_order_is_a_seeded_permutation_new_each_epoch():
    a = epoch_order(1000, seed=3, epoch=0)
    assert np.array_equal(np.sort(a), np.arange(1000))
    assert np.array_equal(a, epoch_order(1000, seed=3, epoch=0))  # any process, any time
    assert not np.array_equal(a, epoch_order(1000, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(1000, seed=4, epoch=0))
    assert np.array_equal(epoch_order(10, 0, 5, "none"), np.arange(10))


def test_blocks_order_permutes_rows_only_within_windows_of_chunks():
    chunks = [100] * 12
    o = epoch_order(1200, seed=1, epoch=0, shuffle="blocks", chunks=chunks)
    assert np.array_equal(np.sort(o), np.arange(1200))
    w = BLOCK_WINDOW_CHUNKS * 100
    for start in range(0, 1200, w):
        # each window holds exactly the rows of BLOCK_WINDOW_CHUNKS whole chunks
        assert set(o[start:start + w] // 100).__len__() == BLOCK_WINDOW_CHUNKS
    assert not np.array_equal(o, np.sort(o))
    # a limit cuts the last chunk
    assert np.array_equal(np.sort(epoch_order(250, 1, 0, "blocks", chunks)), np.arange(250))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_get_disjoint_rows_and_an_epoch_sees_no_row_twice(world):
    n, batch = 1000, 16
    spe = n // (world * batch)
    order = epoch_order(n, seed=0, epoch=2)
    seen = [step_rows(order, s, r, world, batch) for s in range(spe) for r in range(world)]
    flat = np.concatenate(seen)
    assert len(flat) == spe * world * batch == len(set(flat.tolist()))
    # a resumed run at step k gets the same rows for steps >= k: the rows are a function of
    # (seed, epoch, step, rank) only
    again = epoch_order(n, seed=0, epoch=2)
    assert np.array_equal(step_rows(again, spe - 1, world - 1, world, batch), seen[-1])
    with pytest.raises(IndexError, match="beyond the epoch"):
        step_rows(order, spe + 1, 0, world, batch)


def test_row_store_fetches_parquet_rows_by_index_through_a_bounded_cache(tmp_path):
    path = _parquet(tmp_path / "d.parquet", 100, row_group_size=10)
    src = open_source(str(path))
    pf = pq.ParquetFile(path)
    sizes = [pf.read_row_group(g).column("image").combine_chunks().nbytes for g in range(10)]
    assert 3 * min(sizes) > 2 * max(sizes)
    store = RowStore(src, cache_bytes=2 * max(sizes))  # room for two row groups, not three
    assert store.chunk_sizes() == [10] * 10
    idx = np.array([95, 3, 47, 3, 0])
    images, labels, ids = store.fetch(idx)
    table = pq.read_table(path)
    assert images == [table.column("image")[int(i)].as_py() for i in idx]
    assert labels.tolist() == [int(i) % 7 for i in idx]
    assert ids == [f"{src.files[0]}#{int(i)}" for i in idx]  # unique per row, not per content
    assert store.reads == 3  # groups 0, 4, 9 (read in that order), each once
    assert sorted(store._cache) == [4, 9]  # bounded: the least recently used (0) was evicted
    store.fetch(np.array([41, 99]))
    assert store.reads == 3  # cache hits
    store.fetch(np.array([1]))
    assert store.reads == 4 and sorted(store._cache) == [0, 9]
    with pytest.raises(IndexError):
        store.fetch(np.array([100]))
    limited = RowStore(src, limit=30)
    with pytest.raises(IndexError):
        limited.fetch(np.array([30]))


def test_row_store_reads_folder_rows_with_labels(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            (tmp_path / c / f"{i}.png").write_bytes(_png(i))
    src = open_source(str(tmp_path))
    images, labels, ids = RowStore(src).fetch(np.array([4, 0]))
    assert ids == [str(tmp_path / "b" / "1.png"), str(tmp_path / "a" / "0.png")]
    assert images[0] == (tmp_path / "b" / "1.png").read_bytes()
    assert labels.tolist() == [1, 0]


def test_step_batch_is_deterministic_and_keyed_by_epoch_step_rank(tmp_path):
    src = open_source(str(_parquet(tmp_path / "d.parquet", 64, 16)))
    store, mc = RowStore(src), MultiCrop(CROPS)
    order = epoch_order(64, seed=0, epoch=0)
    a, _ = step_batch(store, mc, order, 0, 0, 1, 0, 2, 8)
    b, _ = step_batch(RowStore(src), MultiCrop(CROPS), order, 0, 0, 1, 0, 2, 8)
    assert a["global_crops"].shape == (8, 2, 3, 16, 16) and a["local_crops"].shape == (8, 2, 3, 8, 8)
    for k in a:
        assert np.array_equal(a[k], b[k])
    other_rank, _ = step_batch(store, mc, order, 0, 0, 1, 1, 2, 8)
    assert not np.array_equal(a["global_crops"], other_rank["global_crops"])
    assert np.array_equal(a["label"], np.asarray(step_rows(order, 1, 0, 2, 8)) % 7)


def test_step_batch_keeps_its_size_when_rows_are_undecodable(tmp_path):
    bad = (1, 2, 5)
    src = open_source(str(_parquet(tmp_path / "d.parquet", 16, 8, bad=bad)))
    store, mc, report = RowStore(src), MultiCrop(CROPS), DecodeReport()
    order = np.arange(16)
    out, skipped = step_batch(store, mc, order, 0, 0, 0, 0, 1, 8, report)
    assert len(out["global_crops"]) == 8
    # the three have the same bytes but are three rows: each is counted and named by position
    assert len(skipped) == 3 and report.count() == 3
    assert sorted(report.summary()["rows"]) == [f"{src.files[0]}#{i}" for i in bad]
    # the 5 decodable rows (0, 3, 4, 6, 7) are used, then repeated to fill the batch
    assert out["label"].tolist() == [i % 7 for i in (0, 3, 4, 6, 7, 0, 3, 4)]


def test_a_step_with_no_decodable_row_takes_the_next_rows_of_the_order(tmp_path):
    src = open_source(str(_parquet(tmp_path / "d.parquet", 32, 8, bad=tuple(range(8)))))
    out, skipped = step_batch(RowStore(src), MultiCrop(CROPS), np.arange(32), 0, 0, 0, 0, 1, 8)
    assert len(out["global_crops"]) == 8 and len(skipped) == 8
    assert out["label"].tolist() == [i % 7 for i in range(8, 16)]
    all_bad = open_source(str(_parquet(tmp_path / "bad.parquet", 32, 8, bad=tuple(range(32)))))
    with pytest.raises(RuntimeError, match="could be decoded"):
        step_batch(RowStore(all_bad), MultiCrop(CROPS), np.arange(32), 0, 0, 0, 0, 1, 8)


def test_full_shuffle_over_parquet_larger_than_the_row_cache_is_warned_about(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": pa.array([rng.bytes(1024) for _ in range(1500)],
                                               pa.binary())}), path, compression="none")
    src = open_source(str(path))
    assert path.stat().st_size > 1 << 20  # larger than a 1 MiB cache
    msg = random_access_warning(src, "full", cache_mib=1)
    assert msg and "data.shuffle=blocks" in msg and "data.order=stream" in msg
    assert random_access_warning(src, "full", cache_mib=64) is None  # fits the cache
    assert random_access_warning(src, "blocks", cache_mib=1) is None
