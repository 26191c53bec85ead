"""Data sources: Parquet and image folders, validation errors, in-process view batches."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from massl_ray.config import CropConfig
from massl_ray.data.sources import DataSourceError, iter_rows, open_source
from massl_ray.data.views import DecodeReport, local_view_batches

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "jobs" / "data" / "cifar10-quick" / "train.parquet"


def _png(color, size=(20, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "classes"
    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 255, 0))):
        (root / c).mkdir(parents=True)
        for i in range(5):
            (root / c / f"{i}.png").write_bytes(_png(color))
    (root / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    return root


def test_parquet_source_reads_counts_and_labels():
    src = open_source(str(QUICK))
    assert src.kind == "parquet" and src.num_rows == 5000 and src.labeled
    batch = next(iter_rows(src, limit=10, batch_rows=10))
    assert len(batch["image"]) == 10 and batch["label"].shape == (10,)


def test_class_folder_source_labels_from_subfolders(class_folder):
    src = open_source(str(class_folder))
    assert src.kind == "folder" and src.classes == ["cat", "dog"] and src.num_rows == 11
    rows = next(iter_rows(src, batch_rows=100))
    labels = dict(zip(rows["id"], rows["label"].tolist()))
    assert labels[str(class_folder / "cat" / "0.png")] == 0
    assert labels[str(class_folder / "dog" / "3.png")] == 1


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png((0, 0, 255)))
    src = open_source(str(tmp_path))
    assert src.classes is None and not src.labeled
    with pytest.raises(DataSourceError, match="no labels"):
        open_source(str(tmp_path), require_labels=True)


def test_local_view_batches_skip_and_count_bad_files(class_folder):
    crops = CropConfig(global_size=16, local_size=8, num_local_crops=2)
    report = DecodeReport()
    batches = list(local_view_batches(open_source(str(class_folder)), crops, batch_size=4,
                                      epoch=0, seed=0, report=report, decode_batch_size=3))
    assert len(batches) == 2  # 10 good images -> two full batches of 4
    assert batches[0]["global_crops"].shape == (4, 2, 3, 16, 16)
    assert batches[0]["local_crops"].shape == (4, 2, 3, 8, 8)
    assert report.count() == 1
    assert str(class_folder / "dog" / "broken.jpg") in report.summary()["rows"]


def test_local_view_batches_are_deterministic_per_epoch():
    src = open_source(str(QUICK))
    crops = CropConfig(global_size=16, local_size=8, num_local_crops=1)
    a = next(local_view_batches(src, crops, 8, epoch=0, seed=1, limit=64))
    b = next(local_view_batches(src, crops, 8, epoch=0, seed=1, limit=64))
    c = next(local_view_batches(src, crops, 8, epoch=1, seed=1, limit=64))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["global_crops"], c["global_crops"])


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "no_image_column", "not_binary",
                                  "string_labels", "null_labels", "null_labels_no_stats"])
def test_bad_sources_are_refused_with_one_clear_message(tmp_path, case):
    if case == "missing":
        path, match = tmp_path / "nope", "does not exist"
    elif case == "empty":
        path, match = tmp_path / "empty", "contains no images"
        path.mkdir()
    elif case == "truncated":
        path, match = tmp_path / "t.parquet", "unreadable"
        data = QUICK.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "no_image_column":
        path, match = tmp_path / "n.parquet", "no image column 'image'"
        pq.write_table(pa.table({"pixels": pa.array([b"x"], pa.binary())}), path)
    elif case == "not_binary":
        path, match = tmp_path / "s.parquet", "not binary"
        pq.write_table(pa.table({"image": pa.array(["a string"])}), path)
    elif case == "string_labels":  # e.g. synset names: not class indices
        path, match = tmp_path / "l.parquet", r"label column 'label' .* is string, not integer"
        pq.write_table(pa.table({"image": pa.array([_png((0, 0, 0))], pa.binary()),
                                 "label": pa.array(["n01440764"])}), path)
    else:  # a null in the last row group (read from the footer's statistics, or the column)
        path = tmp_path / "n.parquet"
        match = r"label column 'label' .* has 1 null\(s\) in row group 2"
        pq.write_table(pa.table({"image": pa.array([_png((0, 0, 0))] * 6, pa.binary()),
                                 "label": pa.array([0, 1, 0, 1, 0, None], pa.int64())}), path,
                       row_group_size=2, write_statistics=case == "null_labels")
    with pytest.raises(DataSourceError, match=match):
        open_source(str(path))


def _two_parquet_files_with_identical_bad_rows(root: Path) -> Path:
    """Two files of 6 rows; the same undecodable bytes at rows 1 and 4 of a.parquet and row 2
    of b.parquet (identical content, three different rows)."""
    root.mkdir()
    junk = b"identical undecodable bytes"
    for name, bad in (("a.parquet", (1, 4)), ("b.parquet", (2,))):
        imgs = [junk if i in bad else _png((40 * i, 0, 0)) for i in range(6)]
        pq.write_table(pa.table({"image": pa.array(imgs, pa.binary())}), root / name)
    return root


def test_identical_undecodable_parquet_rows_are_each_counted_and_named(tmp_path):
    """The training order's row store names a Parquet row by file and position: identical
    undecodable bytes in three rows are three skipped rows, each named, and counted once per
    row over two epochs (not once in all, as a hash of the bytes would, nor once per visit)."""
    from massl_ray.data.groups import LocalFeed, group_read, read_group, source_groups
    from massl_ray.data.multicrop import MultiCrop

    src = open_source(str(_two_parquet_files_with_identical_bad_rows(tmp_path / "pq")))
    a, b = src.files
    groups = source_groups(src)
    ids = read_group(group_read(src, groups[1]))["id"]  # the second file's row group
    assert ids == [f"{b}#{i}" for i in range(6)]
    report = DecodeReport()
    mc = MultiCrop(CropConfig(global_size=16, local_size=8, num_local_crops=1))
    feed = LocalFeed(src, mc, 0, 3, 4, report=report)
    for epoch in (0, 1):
        for out in feed.batches(epoch):
            assert len(out["global_crops"]) == 3
    assert report.count() == 3
    assert set(report.summary()["rows"]) == {f"{a}#1", f"{a}#4", f"{b}#2"}
