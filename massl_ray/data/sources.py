"""Training/evaluation data sources: Parquet and image folders, local or object-store URIs.

Opening a source validates it on the driver *before* any training resources are taken: a
missing path, an empty folder, a truncated Parquet file, a Parquet file without the image
column, or a label column that is not integer or has nulls is refused with one clear
:class:`DataSourceError`. Ray-free (pyarrow only), so the
same code serves the Ray Data pipeline and the in-process local mode.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataSourceError(ValueError):
    """A data source that cannot be trained on; the message says which path and why."""


class DataError(RuntimeError):
    """Training data found unusable during training where a retry cannot help (a unit of a
    step with no decodable row): the run ends at once naming it, like a non-finite loss,
    whatever run.max_failures says. (Unreadable files and row groups, and undecodable images,
    are skipped and named instead.)"""


@dataclass
class Source:
    kind: str  # "parquet" | "folder"
    uri: str
    filesystem: pafs.FileSystem
    files: list[str]  # paths inside ``filesystem``
    num_rows: int
    image_column: str = "image"
    label_column: Optional[str] = None  # None: unlabeled
    classes: Optional[list[str]] = None  # folder sources with class sub-folders
    rows_per_file: list[int] = field(default_factory=list)
    # Parquet: the row counts of each file's row groups (from the footers read at opening).
    row_groups: list[list[int]] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        return self.label_column is not None or self.classes is not None

    def label_of_path(self, path: str) -> int:
        assert self.classes is not None
        return self.classes.index(posixpath.basename(posixpath.dirname(path)))


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            raise DataSourceError(f"data source {uri!r} cannot be opened: {e}") from None
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def open_source(uri: Optional[str], fmt: str = "auto", image_column: str = "image",
                label_column: Optional[str] = "label", require_labels: bool = False,
                what: str = "data.train") -> Source:
    """Resolve and validate a source. ``label_column`` is used if present in a Parquet source."""
    if not uri:
        raise DataSourceError(f"{what} is not set: give a Parquet file/folder or an image folder")
    fs, path = _filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise DataSourceError(f"{what} {uri!r} cannot be read: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataSourceError(f"{what} {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        files = [path]
    else:
        sel = pafs.FileSelector(path, recursive=True)
        files = sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File
                       and not posixpath.basename(i.path).startswith("."))
    parquet = [f for f in files if f.endswith(".parquet")]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if fmt == "auto":
        fmt = "parquet" if parquet else "folder"
    if fmt == "parquet":
        if not parquet and info.type == pafs.FileType.File:
            parquet = files
        if not parquet:
            raise DataSourceError(f"{what} {uri!r} contains no .parquet files")
        src = _open_parquet(uri, fs, parquet, image_column, label_column, what)
    elif fmt == "folder":
        if not images:
            raise DataSourceError(
                f"{what} {uri!r} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        src = _open_folder(uri, fs, path, images)
    else:
        raise DataSourceError(f"data.format {fmt!r} must be auto, parquet or folder")
    if src.num_rows == 0:
        raise DataSourceError(f"{what} {uri!r} has no rows")
    if require_labels and not src.labeled:
        raise DataSourceError(
            f"{what} {uri!r} has no labels (a Parquet column {label_column!r} or class sub-folders)")
    return src


def _open_parquet(uri, fs, files, image_column, label_column, what) -> Source:
    rows, groups, label_ok = [], [], label_column is not None
    for f in files:
        try:
            with fs.open_input_file(f) as fh:
                meta = pq.ParquetFile(fh)
                schema = meta.schema_arrow
                n = meta.metadata.num_rows
                groups.append([meta.metadata.row_group(i).num_rows
                               for i in range(meta.metadata.num_row_groups)])
        except (pa.ArrowInvalid, OSError) as e:
            raise DataSourceError(f"{what}: Parquet file {f!r} is unreadable (truncated or not Parquet): {e}") from None
        if image_column not in schema.names:
            raise DataSourceError(
                f"{what}: Parquet file {f!r} has no image column {image_column!r} (columns: "
                f"{', '.join(schema.names)}); set data.image_column")
        t = schema.field(image_column).type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            raise DataSourceError(f"{what}: column {image_column!r} of {f!r} is {t}, not binary image bytes")
        if label_ok and label_column not in schema.names:
            label_ok = False
        if label_column in schema.names:
            _check_labels(fs, f, meta, label_column, what)
        rows.append(n)
    return Source("parquet", uri, fs, files, int(sum(rows)), image_column,
                  label_column if label_ok else None, None, rows, groups)


def _check_labels(fs, f, meta: pq.ParquetFile, column: str, what: str) -> None:
    """Refuse a label column that is not integer or has nulls (the footer's null counts; the
    column is read only where a row group has none)."""
    t = meta.schema_arrow.field(column).type
    why = None if pa.types.is_integer(t) else f"is {t}, not integer class indices"
    md, j = meta.metadata, meta.schema_arrow.get_field_index(column)
    for i in range(md.num_row_groups if why is None else 0):
        st = md.row_group(i).column(j).statistics
        if st is not None and st.has_null_count:
            nulls = st.null_count
        else:
            with fs.open_input_file(f) as fh:
                nulls = pq.ParquetFile(fh).read_row_group(i, columns=[column]).column(0).null_count
        if nulls:
            why = f"has {nulls} null(s) in row group {i}"
            break
    if why:
        raise DataSourceError(
            f"{what}: label column {column!r} of {f!r} {why}; fix the data, or set "
            f"data.label_column=null to train without labels")


def _open_folder(uri, fs, root, images) -> Source:
    rel_dirs = {posixpath.dirname(posixpath.relpath(p, root)) for p in images}
    classes = None
    if "" not in rel_dirs and all("/" not in d for d in rel_dirs):
        classes = sorted(rel_dirs)  # one level of class sub-folders
    return Source("folder", uri, fs, images, len(images), "image", None, classes, [1] * len(images))


# ---- in-process reading (local mode, evaluation) -------------------------------------------

def row_id(data: bytes, path: Optional[str] = None) -> str:
    """A row's name: its id if it has one (an image file's path, or :func:`parquet_row_id` for
    the training order's rows), else the hash of its bytes (Parquet rows read without their
    position: :func:`iter_rows` for evaluation, and Ray Data's streaming order, where identical
    rows therefore share a name)."""
    return path if path else "sha1:" + hashlib.sha1(data).hexdigest()[:16]


def parquet_row_id(file: str, index: int) -> str:
    """A Parquet row's unique, stable name: ``<file>#<row index in that file>`` (two identical
    undecodable rows are two skipped rows, each named)."""
    return f"{file}#{index}"


def iter_rows(src: Source, limit: Optional[int] = None, order: Optional[np.ndarray] = None,
              batch_rows: int = 256) -> Iterator[dict]:
    """Yield batches ``{"image": list[bytes], "label": np.ndarray | None, "id": list[str]}``.

    ``order`` (a permutation of the first ``limit`` rows) selects the row order; without it
    rows come in storage order.
    """
    n = src.num_rows if limit is None else min(limit, src.num_rows)
    if src.kind == "parquet":
        cols = [src.image_column] + ([src.label_column] if src.label_column else [])
        tables = []
        taken = 0
        for f, rows in zip(src.files, src.rows_per_file):
            if taken >= n:
                break
            with src.filesystem.open_input_file(f) as fh:
                t = pq.read_table(fh, columns=cols)
            tables.append(t.slice(0, n - taken))
            taken += min(rows, n - taken)
        table = pa.concat_tables(tables) if tables else None
        images = table.column(src.image_column).to_pylist()
        labels = (np.asarray(table.column(src.label_column).to_numpy(), dtype=np.int64)
                  if src.label_column else None)
        ids = [None] * len(images)
    else:
        paths = src.files[:n]
        images, ids = None, paths
        labels = (np.asarray([src.label_of_path(p) for p in paths], dtype=np.int64)
                  if src.classes else None)
    idx = np.arange(n) if order is None else np.asarray(order)
    for i in range(0, len(idx), batch_rows):
        sel = idx[i:i + batch_rows]
        if images is not None:
            data = [images[j] for j in sel]
            rid = [row_id(images[j]) for j in sel]  # evaluation ids: the hash of the bytes
        else:
            data = []
            for j in sel:
                with src.filesystem.open_input_stream(ids[j]) as fh:
                    data.append(fh.read())
            rid = [ids[j] for j in sel]
        yield {"image": data, "label": labels[sel] if labels is not None else None, "id": rid}
