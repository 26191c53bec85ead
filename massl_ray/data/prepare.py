"""``python -m massl_ray prepare SRC OUT``: any source -> shuffled, validated Parquet shards.

The training order reads Parquet row groups (``massl_ray.data.order``, ``massl_ray.data.plan``);
a class-sorted source (an ImageNet ``train/<class>/*.JPEG`` folder, a Parquet export written
class by class) and undecodable or oversized images cost at every epoch. ``prepare`` pays once:

* **Source**: whatever :func:`massl_ray.data.sources.open_source` opens (an image folder with
  class sub-folders or flat, Parquet files, local or an ``s3://`` / ``gs://`` prefix).
* **Shuffled**: row ``i`` of the source (storage order, the row ids of ``sources.py``) goes to
  position ``p = perm[i]`` of a seeded permutation of all rows; shard ``p // rows_per_shard``
  holds positions in increasing order. Class-sorted input therefore gives mixed shards, and the
  result depends on (source, seed, options) only.
* **Validated**: every image is decoded (:func:`massl_ray.data.images.try_decode`); an
  undecodable one is not written and is named in ``OUT/skipped.json`` (a folder image by its
  path, a Parquet row as ``<file>#<row>``) with its reason.
* **Downscaled** (``max_side``): an image whose *short* side exceeds ``max_side`` is reduced to
  it (the convention of ``images.py``: the training crops are taken from the short side) and
  re-encoded as JPEG (``jpeg_quality``); every other image keeps its bytes unchanged.
* **Labels and class names kept**: column ``label`` (int64; a folder's class index, or the
  source's label column), the class names in the manifest and in each file's schema metadata
  (key ``massl_ray.classes``); column ``id`` names the source row.
* **Fixed row groups**: every shard is written with ``row_group_size`` rows per row group (the
  last one of a shard shorter).
* **Manifest** ``OUT/manifest.json``: rows, classes, columns, options, skipped count, and
  ``files``: ``{"path", "rows", "bytes", "row_groups": [rows per row group]}`` per shard, so
  that a reader can plan row-group reads without opening every footer. It holds no timings:
  an interrupted-and-resumed run writes the same manifest (and the same shards) as an
  uninterrupted one.

Two passes, each a Ray Data ``map_batches`` over task specs (or a loop in this process with
``local=True``), so every source row is read once and decoded once:

1. **validate** (one task per source unit: a Parquet row group, or ``unit_rows`` image files):
   read, decode, downscale; the good rows go to ``OUT/.prepare/unit-<u>.arrow``, an Arrow IPC
   file with one record batch per destination shard (sorted by position), plus a small
   ``unit-<u>.json`` (what went where, what was skipped) written last.
2. **shard** (one task per shard): read that shard's record batch from every unit file (Arrow
   IPC random access: only those bytes), order by position, write ``part-<s>.parquet``.

Every file is written under a temporary name and renamed, so a file with its final name is
complete. A rerun with the same options skips finished units and shards and says so; a rerun
with other options is refused (use a new OUT). ``OUT/.prepare`` is removed at the end. The
temporary files do not end in ``.parquet``, so ``open_source(OUT)`` never sees them.

OUT is refused (:func:`check_out`) when it is SRC or inside it (the shards would become part of
the source), and when it already holds files that are not an earlier ``prepare``'s
(``manifest.json``, or ``.prepare/state.json`` of an unfinished one): ``prepare`` writes and
deletes under OUT, so it never starts in a folder of other files. An earlier ``prepare`` of
the same SRC with the same options resumes (or has nothing to do); of another SRC or with
other options it is refused.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from massl_ray.data.sources import DataSourceError, Source, _filesystem, open_source, parquet_row_id

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SKIPPED = "skipped.json"
WORK_DIR = ".prepare"
CLASSES_KEY = b"massl_ray.classes"
FORMAT = "massl_ray.prepared/1"


@dataclass(frozen=True)
class PrepareOptions:
    seed: int = 0
    rows_per_shard: int = 5000
    row_group_size: int = 1000
    max_side: Optional[int] = None
    jpeg_quality: int = 90
    unit_rows: int = 1000  # image files per validate task (a Parquet unit is one row group)
    limit: Optional[int] = None  # only the first N source rows
    format: str = "auto"
    image_column: str = "image"
    label_column: Optional[str] = "label"

    def check(self) -> "PrepareOptions":
        for name in ("rows_per_shard", "row_group_size", "unit_rows"):
            if getattr(self, name) < 1:
                raise DataSourceError(f"prepare: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_side is not None and self.max_side < 1:
            raise DataSourceError(f"prepare: max_side must be >= 1 or unset, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataSourceError(f"prepare: jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.limit is not None and self.limit < 1:
            raise DataSourceError(f"prepare: limit must be >= 1, got {self.limit}")
        return self

    def result_keys(self) -> dict:
        """The options the output depends on (a rerun must repeat them)."""
        d = asdict(self)
        return {k: d[k] for k in ("seed", "rows_per_shard", "row_group_size", "max_side",
                                  "jpeg_quality", "limit", "format", "image_column",
                                  "label_column")}


# ---------------------------------------------------------------------------- planning
@dataclass
class Unit:
    """One validate task: rows ``first .. first + n - 1`` (global source indices)."""
    index: int
    first: int
    n: int
    file: Optional[int] = None  # Parquet: file index and row group
    row_group: Optional[int] = None
    row_in_file: int = 0  # Parquet: index in its file of the unit's first row


def plan_units(src: Source, n: int, unit_rows: int) -> list[Unit]:
    units: list[Unit] = []
    if src.kind == "parquet":
        start = 0
        for fi, f in enumerate(src.files):
            with src.filesystem.open_input_file(f) as fh:
                md = pq.ParquetFile(fh).metadata
            in_file = 0
            for gi in range(md.num_row_groups):
                rows = md.row_group(gi).num_rows
                take = min(rows, n - start)
                if take <= 0:
                    return units
                if rows:
                    units.append(Unit(len(units), start, take, fi, gi, in_file))
                start += take
                in_file += rows
        return units
    for first in range(0, n, unit_rows):
        units.append(Unit(len(units), first, min(unit_rows, n - first)))
    return units


def positions(n: int, seed: int) -> np.ndarray:
    """Row ``i`` of the source -> its position in the shuffled output."""
    return np.random.default_rng([seed, 0x9E3779B1]).permutation(n).astype(np.int64)


def source_classes(src: Source) -> Optional[list[str]]:
    """Class names: a folder's sub-folders, or those a prepared Parquet source carries."""
    if src.classes is not None:
        return list(src.classes)
    if src.kind == "parquet" and src.label_column:
        with src.filesystem.open_input_file(src.files[0]) as fh:
            md = pq.ParquetFile(fh).schema_arrow.metadata or {}
        if CLASSES_KEY in md:
            return list(json.loads(md[CLASSES_KEY]))
    return None


# ---------------------------------------------------------------------------- the two tasks
def _encode_jpeg(t, quality: int) -> bytes:
    from PIL import Image

    arr = np.ascontiguousarray(t.permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _short_side(data: bytes) -> Optional[int]:
    from massl_ray.data.images import open_image

    try:
        with open_image(data) as im:  # the formats try_decode accepts, no other parser
            return min(im.size)
    except Exception:  # noqa: BLE001 - try_decode names the reason
        return None


def unit_spec(src: Source, u: Unit, pos: np.ndarray,
              class_index: Optional[dict[str, int]]) -> dict:
    """Everything a validate task needs for one unit, and nothing else (never the source's
    full file list: an ImageNet folder's is ~100 MB)."""
    spec = {"index": u.index, "n": u.n, "pos": pos[u.first:u.first + u.n].tolist()}
    if src.kind == "parquet":
        spec.update(file=src.files[u.file], row_group=u.row_group, row_in_file=u.row_in_file)
    else:
        paths = src.files[u.first:u.first + u.n]
        spec["paths"] = paths
        if class_index is not None:
            spec["labels"] = [class_index[posixpath.basename(posixpath.dirname(p))] for p in paths]
    return spec


class ValidateFn:
    """Validate task: one unit spec (:func:`unit_spec`) -> ``unit-<u>.arrow`` +
    ``unit-<u>.json`` (its content is returned too)."""

    def __init__(self, src_fs: pafs.FileSystem, image_column: str, label_column: Optional[str],
                 work: str, fs: pafs.FileSystem, opts: PrepareOptions, labeled: bool):
        self.src_fs, self.image_column, self.label_column = src_fs, image_column, label_column
        self.work, self.fs, self.opts, self.labeled = work, fs, opts, labeled

    def _read(self, u: dict) -> tuple[list[bytes], Optional[np.ndarray], list[str]]:
        if "file" in u:
            f = u["file"]
            cols = [self.image_column] + ([self.label_column] if self.label_column else [])
            with self.src_fs.open_input_file(f) as fh:
                t = pq.ParquetFile(fh).read_row_group(u["row_group"], columns=cols).slice(0, u["n"])
            images = t.column(self.image_column).to_pylist()
            labels = (np.asarray(t.column(self.label_column).to_numpy(zero_copy_only=False),
                                 dtype=np.int64) if self.label_column else None)
            ids = [parquet_row_id(f, u["row_in_file"] + k) for k in range(u["n"])]
            return images, labels, ids
        images = []
        for p in u["paths"]:
            with self.src_fs.open_input_stream(p) as fh:
                images.append(fh.read())
        labels = np.asarray(u["labels"], dtype=np.int64) if "labels" in u else None
        return images, labels, list(u["paths"])

    def run(self, u: dict) -> dict:
        from massl_ray.data.images import try_decode

        o = self.opts
        images, labels, ids = self._read(u)
        pos = np.asarray(u["pos"], dtype=np.int64)
        keep, out_images, bad, resized = [], [], [], 0
        for k, data in enumerate(images):
            if data is None:
                bad.append({"id": ids[k], "reason": "null image value"})
                continue
            t, reason = try_decode(data, max_side=o.max_side)
            if t is None:
                bad.append({"id": ids[k], "reason": reason})
                continue
            if o.max_side is not None and (_short_side(data) or 0) > o.max_side:
                data = _encode_jpeg(t, o.jpeg_quality)
                resized += 1
            keep.append(k)
            out_images.append(data)
        keep_a = np.asarray(keep, dtype=np.int64)
        kpos = pos[keep_a] if len(keep) else np.zeros(0, np.int64)
        order = np.argsort(kpos, kind="stable")
        cols = {"image": pa.array([out_images[j] for j in order], pa.binary()),
                "pos": pa.array(kpos[order], pa.int64()),
                "id": pa.array([ids[keep[j]] for j in order], pa.string())}
        if self.labeled:
            cols["label"] = pa.array(labels[keep_a][order] if len(keep) else [], pa.int64())
        table = pa.table(cols)
        shard_of = kpos[order] // o.rows_per_shard
        shards, starts, counts = np.unique(shard_of, return_index=True, return_counts=True)
        name = posixpath.join(self.work, f"unit-{u['index']:06d}")
        tmp = name + ".arrow.tmp"
        with self.fs.open_output_stream(tmp) as fh:
            with ipc.new_file(fh, table.schema) as w:
                for s0, c in zip(starts.tolist(), counts.tolist()):
                    w.write_batch(table.slice(s0, c).combine_chunks().to_batches()[0])
        self.fs.move(tmp, name + ".arrow")
        info = {"unit": u["index"], "rows": u["n"], "good": len(keep), "resized": resized,
                "bad": bad, "shards": [[int(s), b, int(c)] for b, (s, c)
                                       in enumerate(zip(shards.tolist(), counts.tolist()))]}
        _write_text(self.fs, name + ".json", json.dumps(info))
        return info

    def __call__(self, batch: dict) -> dict:
        return {"info": [json.dumps(self.run(json.loads(i))) for i in batch["item"]]}


class ShardFn:
    """Shard task: ``{"shard": s, "parts": [[unit, record batch], ...]}`` -> that batch of
    every unit file, in position order -> ``part-<s>.parquet`` (its manifest entry returned)."""

    def __init__(self, work: str, out: str, fs: pafs.FileSystem, opts: PrepareOptions,
                 classes: Optional[list[str]]):
        self.work, self.out, self.fs = work, out, fs
        self.opts, self.classes = opts, classes

    def run(self, spec: dict) -> dict:
        s = int(spec["shard"])
        batches = []
        for ui, b in spec["parts"]:
            with self.fs.open_input_file(posixpath.join(self.work, f"unit-{ui:06d}.arrow")) as fh:
                batches.append(ipc.open_file(fh).get_batch(b))
        table = pa.Table.from_batches(batches)
        table = table.take(pa.array(np.argsort(table.column("pos").to_numpy(), kind="stable")))
        names = ["image"] + (["label"] if "label" in table.column_names else []) + ["id"]
        table = table.select(names)
        md = {b"massl_ray.format": FORMAT.encode()}
        if self.classes is not None:
            md[CLASSES_KEY] = json.dumps(self.classes).encode()
        table = table.replace_schema_metadata(md)
        rel = shard_name(s)
        final = posixpath.join(self.out, rel)
        tmp = posixpath.join(self.out, "." + rel + ".tmp")
        with self.fs.open_output_stream(tmp) as fh:
            pq.write_table(table, fh, row_group_size=self.opts.row_group_size,
                           compression={"image": "NONE", "label": "SNAPPY", "id": "SNAPPY"},
                           use_dictionary=["label"], write_statistics=["label"])
        self.fs.move(tmp, final)
        return shard_entry(self.fs, self.out, rel)

    def __call__(self, batch: dict) -> dict:
        return {"info": [json.dumps(self.run(json.loads(i))) for i in batch["item"]]}


def shard_name(s: int) -> str:
    return f"part-{s:05d}.parquet"


def shard_index(rel: str) -> int:
    return int(rel[len("part-"):-len(".parquet")])


def shard_entry(fs: pafs.FileSystem, out: str, rel: str) -> dict:
    """A manifest ``files`` entry, from the written file's footer."""
    path = posixpath.join(out, rel)
    with fs.open_input_file(path) as fh:
        md = pq.ParquetFile(fh).metadata
    return {"path": rel, "rows": md.num_rows, "bytes": fs.get_file_info(path).size,
            "row_groups": [md.row_group(i).num_rows for i in range(md.num_row_groups)]}


def _write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as fh:
        fh.write(text.encode())
    fs.move(tmp, path)


def _read_json(fs: pafs.FileSystem, path: str) -> Optional[dict]:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())


# ---------------------------------------------------------------------------- OUT
def _place(uri: str) -> tuple[str, str]:
    """(filesystem kind, normalised absolute path) of a local path or URI, for comparing places:
    local paths with their symbolic links resolved, URIs as ``scheme://bucket/key``."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme.lower(), posixpath.normpath("/" + rest.split("?", 1)[0]).rstrip("/")
    return "file", os.path.realpath(os.path.abspath(uri))


def check_out(src_uri: str, out_uri: str, fs: pafs.FileSystem, out: str) -> None:
    """Refuse an OUT that is SRC or inside it, or a non-empty OUT that is not an earlier
    ``prepare`` (see the module docstring). Whether that earlier one was of the same SRC and
    options is checked against its ``manifest.json`` / ``state.json`` by :func:`prepare`."""
    (sk, sp), (ok, op) = _place(src_uri), _place(out_uri)
    if sk == ok and (op == sp or op.startswith(sp.rstrip("/") + "/")):
        raise DataSourceError(
            f"prepare: OUT {out_uri!r} is {'SRC' if op == sp else 'inside SRC'} ({src_uri!r}): "
            f"the shards would be written into the source; choose an OUT outside it")
    try:
        entries = fs.get_file_info(pafs.FileSelector(out, allow_not_found=True))
    except (OSError, pa.ArrowException) as e:
        info = fs.get_file_info(out)
        if info.type == pafs.FileType.File:
            raise DataSourceError(f"prepare: OUT {out_uri!r} is a file; OUT is a folder") from None
        raise DataSourceError(f"prepare: OUT {out_uri!r} cannot be listed: {e}") from None
    names = {posixpath.basename(e.path.rstrip("/")) for e in entries}
    if not names or MANIFEST in names:
        return
    if WORK_DIR in names:
        work = posixpath.join(out, WORK_DIR)
        inner = {posixpath.basename(e.path.rstrip("/")) for e in
                 fs.get_file_info(pafs.FileSelector(work, allow_not_found=True))}
        # state.json is the first file an unfinished prepare writes (state.json.tmp before it)
        if "state.json" in inner or inner <= {"state.json.tmp"}:
            return
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    raise DataSourceError(
        f"prepare: OUT {out_uri!r} is not empty ({shown}) and is not an earlier prepare (no "
        f"{MANIFEST} or {WORK_DIR}/state.json): prepare writes and deletes files there, so "
        f"choose an empty or new folder")


def _refuse_other_source(out_uri: str, prev: dict, state: dict) -> None:
    if prev.get("source") != state["source"]:
        raise DataSourceError(
            f"prepare: {out_uri!r} holds a prepare of another SRC ({prev.get('source')!r}); "
            f"use a new OUT for {state['source']!r}")


# ---------------------------------------------------------------------------- progress
class Progress:
    """A progress line on stderr: redrawn in place on a terminal, a line every ``every_s``
    otherwise (logs of a cluster job)."""

    def __init__(self, what: str, total: int, unit: str, every_s: float = 10.0,
                 stream=None):
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = 0.5 if self.tty else every_s
        self.done = self.images = 0
        self.t0 = self._last = time.monotonic()

    def update(self, tasks: int = 1, images: int = 0) -> None:
        self.done += tasks
        self.images += images
        now = time.monotonic()
        if now - self._last >= self.every_s or self.done == self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        el = max(now - self.t0, 1e-9)
        frac = self.done / max(self.total, 1)
        eta = el * (1 - frac) / frac if frac > 0 else float("nan")
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        msg = (f"prepare {self.what} [{bar}] {self.done}/{self.total} {self.unit}, "
               f"{self.images} images, {self.images / el:.0f} img/s, {el:.0f}s"
               + (f", eta {eta:.0f}s" if math.isfinite(eta) and frac < 1 else ""))
        if self.tty:
            self.stream.write("\r" + msg + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------- driver
def _map(fn, items: list[dict], local: bool, cpus: float) -> Iterable[dict]:
    """Run ``fn`` on every item: a loop here, or Ray Data tasks (results as they finish)."""
    if local:
        for i in items:
            yield fn.run(i)
        return
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours says how far the work is, in units and images
    ds = ray.data.from_items([{"item": json.dumps(i)} for i in items],
                             override_num_blocks=len(items))
    ds = ds.map_batches(fn, batch_size=1, num_cpus=cpus, batch_format="numpy")
    for row in ds.iter_rows():
        yield json.loads(row["info"])


def prepare(src_uri: str, out_uri: str, opts: PrepareOptions = PrepareOptions(),
            local: bool = False, task_cpus: float = 1.0,
            say: Callable[[str], None] = print, progress_every_s: float = 10.0) -> dict:
    """Prepare ``src_uri`` into ``out_uri`` (see the module docstring); returns the manifest.
    Ray must be initialised unless ``local``."""
    opts.check()
    t0 = time.monotonic()
    fs, out = _filesystem(out_uri)
    manifest_path = posixpath.join(out, MANIFEST)
    work = posixpath.join(out, WORK_DIR)
    state_path = posixpath.join(work, "state.json")
    src = open_source(src_uri, opts.format, opts.image_column, opts.label_column, what="prepare SRC")
    check_out(src_uri, out_uri, fs, out)
    n = src.num_rows if opts.limit is None else min(opts.limit, src.num_rows)
    src_name = src_uri if "://" in src_uri else os.path.abspath(src_uri)
    state = {"format": FORMAT, "source": src_name, "source_rows": n, "options": opts.result_keys()}
    done_manifest = _read_json(fs, manifest_path)
    if done_manifest is not None:
        prev = {k: done_manifest.get(k) for k in state}
        if prev != state:
            _refuse_other_source(out_uri, prev, state)
            raise DataSourceError(
                f"prepare: {out_uri!r} holds a prepared set made with other settings "
                f"({json.dumps(prev)}); use a new OUT or repeat those settings")
        if fs.get_file_info(work).type == pafs.FileType.Directory:
            fs.delete_dir(work)  # stopped after the manifest, before the clean-up
        say(f"prepare: {out_uri} is complete ({done_manifest['rows']} rows in "
            f"{len(done_manifest['files'])} files); nothing to do")
        return done_manifest
    fs.create_dir(work, recursive=True)
    prev = _read_json(fs, state_path)
    if prev is not None and prev != state:
        _refuse_other_source(out_uri, prev, state)
        raise DataSourceError(
            f"prepare: {out_uri!r} holds an unfinished run with other settings "
            f"({json.dumps(prev)}); rerun with those settings to finish it, or use a new OUT")
    if prev is None:
        _write_text(fs, state_path, json.dumps(state))
    labeled = src.labeled
    classes = source_classes(src)
    units = plan_units(src, n, opts.unit_rows)
    num_shards = -(-n // opts.rows_per_shard)
    shards_done = {s for s in range(num_shards)
                   if fs.get_file_info(posixpath.join(out, shard_name(s))).type == pafs.FileType.File}

    # Pass 1: validate (skipped units: their .json exists).
    infos: dict[int, dict] = {}
    for u in units:
        info = _read_json(fs, posixpath.join(work, f"unit-{u.index:06d}.json"))
        if info is not None:
            infos[u.index] = info
    todo = [u.index for u in units if u.index not in infos]
    if infos:
        say(f"prepare: resuming: {len(infos)}/{len(units)} source units already validated, skipped")
    if todo:
        fn = ValidateFn(src.filesystem, src.image_column, src.label_column, work, fs, opts,
                        labeled)
        pos = positions(n, opts.seed)
        class_index = {c: i for i, c in enumerate(src.classes)} if src.classes else None
        specs = [unit_spec(src, units[i], pos, class_index) for i in todo]
        bar = Progress("validate", len(units), "units", progress_every_s)
        bar.done = len(infos)
        for info in _map(fn, specs, local, task_cpus):
            infos[info["unit"]] = info
            bar.update(1, info["rows"])
    skipped = sorted((b for i in sorted(infos) for b in infos[i]["bad"]), key=lambda b: b["id"])
    # Pass 2: shards (skipped: the final file exists).
    parts: dict[int, list[tuple[int, int]]] = {}
    for ui in sorted(infos):
        for s, b, c in infos[ui]["shards"]:
            parts.setdefault(s, []).append((ui, b))
    if shards_done:
        say(f"prepare: resuming: {len(shards_done)}/{num_shards} shards already written, skipped")
    todo_s = [s for s in sorted(parts) if s not in shards_done]
    entries = {s: shard_entry(fs, out, shard_name(s)) for s in shards_done}
    if todo_s:
        fn = ShardFn(work, out, fs, opts, classes)
        bar = Progress("shards", len(parts), "shards", progress_every_s)
        bar.done = len(shards_done)
        for e in _map(fn, [{"shard": s, "parts": parts[s]} for s in todo_s], local, task_cpus):
            entries[shard_index(e["path"])] = e
            bar.update(1, e["rows"])
    files = [entries[s] for s in sorted(entries)]
    rows = sum(e["rows"] for e in files)
    manifest = dict(state)
    manifest.update({
        "rows": rows, "skipped": len(skipped), "skipped_report": SKIPPED,
        "resized": sum(infos[i]["resized"] for i in infos),
        "classes": classes, "num_classes": len(classes) if classes is not None else None,
        "image_column": "image", "label_column": "label" if labeled else None,
        "id_column": "id", "row_group_size": opts.row_group_size,
        "rows_per_shard": opts.rows_per_shard, "seed": opts.seed, "max_side": opts.max_side,
        "bytes": sum(e["bytes"] for e in files), "files": files})
    _write_text(fs, posixpath.join(out, SKIPPED), json.dumps(skipped, indent=1))
    _write_text(fs, manifest_path, json.dumps(manifest, indent=1))
    fs.delete_dir(work)
    say(f"prepare: wrote {rows} rows in {len(files)} files ({manifest['bytes'] / 2**20:.1f} MiB, "
        f"{manifest['resized']} downscaled), skipped {len(skipped)} undecodable "
        f"(named in {posixpath.join(out_uri, SKIPPED)}), {time.monotonic() - t0:.1f}s -> {out_uri}")
    return manifest
