"""Reading row groups once and decoding by the epoch plan: the exact data order's work. Ray-free.

The exact data order (``data.order=exact``, the default) is :class:`~massl_ray.data.plan.EpochPlan`:
the row at global position ``p`` of epoch ``e`` is a pure function of (run.seed, e, p), never of
the number of workers. This module does the work that order needs, in plain functions that the
local mode calls in-process (:class:`LocalFeed`) and Ray tasks call on the cluster
(:mod:`massl_ray.data.feed`):

- :func:`source_groups`: the source as *row groups* in storage order (a Parquet row group, or a
  run of :data:`FOLDER_GROUP_ROWS` image files of a folder), the unit a read task reads, once
  per epoch, sequentially;
- :func:`route`: for the decode tasks of a window, which rows of each row group go to which
  task, at which positions (the map side of a within-window shuffle);
- :func:`read_group` + :func:`split_rows`: one row group read whole and cut into the parts of
  the decode tasks its rows feed; a row before a resume position goes nowhere (read, not
  decoded);
- :func:`decode_task`: the parts of one decode task -> its units decoded (one generator per
  unit, keyed by (seed, epoch, step, unit): the crops do not depend on the world size or on
  where a run resumed) -> the pieces that go to each (step, rank).

Undecodable rows are skipped, named (``<file>#<row>`` or the image path) and reported; a unit
keeps its size by repeating its decodable rows, so the step-to-rows map never shifts. An
unreadable image file (vanished, a dangling link, unreadable) or Parquet row group (a corrupt
page; its file gone) takes the same path: its rows are skipped, named by the file or
``<file>#rg<i>`` (once per row group) with the read error. A unit with no decodable row at all
is a :class:`~massl_ray.data.sources.DataError` that names it: the run ends at once.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from massl_ray.config import Config
from massl_ray.data.multicrop import MultiCrop
from massl_ray.data.plan import DEFAULT_WINDOW_GROUPS, DecodeTask, EpochPlan, decode_tasks
from massl_ray.data.sources import DataError, Source, parquet_row_id
from massl_ray.data.views import DecodeReport, batch_generator, make_views

# Image folders: this many consecutive files (in the source's sorted order) form a row group.
FOLDER_GROUP_ROWS = 1024


@dataclass(frozen=True)
class Group:
    """One row group: ``rows`` rows from global row ``start``. Parquet: row group ``index`` of
    file ``file`` (its first row is row ``file_row`` of the file); folder: files
    ``start .. start + rows - 1`` of the source (``file`` is -1)."""
    file: int
    index: int
    start: int
    rows: int
    file_row: int = 0


@dataclass(frozen=True)
class GroupRead:
    """Everything a read task needs for one row group, and nothing else: one Parquet file or
    the group's image paths, never the source's full file list."""
    kind: str
    filesystem: object
    files: tuple
    group: Group
    image_column: str = "image"
    label_column: Optional[str] = None
    classes: Optional[tuple] = None


def window_groups_of(cfg: Config) -> Optional[int]:
    """Row groups per window: all of them (None) for data.shuffle=full (one window: a full
    shuffle, each group still read once), data.window_groups (default 128) for window/blocks;
    none keeps storage order (the window size does not matter then: 1)."""
    s = cfg.data.shuffle
    if s == "full":
        return None
    if s == "none":
        return 1
    return cfg.data.window_groups or DEFAULT_WINDOW_GROUPS


def source_groups(src: Source, limit: Optional[int] = None) -> list[Group]:
    """The source's row groups in storage order, the last cut at ``limit`` rows."""
    n = src.num_rows if limit is None else min(limit, src.num_rows)
    out: list[Group] = []
    if src.kind == "parquet":
        sizes = src.row_groups or [_footer_groups(src, f) for f in src.files]
        start = 0
        for fi, groups in enumerate(sizes):
            file_row = 0
            for gi, rows in enumerate(groups):
                take = min(int(rows), n - start)
                if take <= 0:
                    return out
                out.append(Group(fi, gi, start, take, file_row))
                start += take
                file_row += int(rows)
        return out
    for gi, s in enumerate(range(0, n, FOLDER_GROUP_ROWS)):
        out.append(Group(-1, gi, s, min(FOLDER_GROUP_ROWS, n - s)))
    return out


def _footer_groups(src: Source, f: str) -> list[int]:
    with src.filesystem.open_input_file(f) as fh:
        md = pq.ParquetFile(fh).metadata
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


def group_read(src: Source, g: Group) -> GroupRead:
    files = (src.files[g.file],) if src.kind == "parquet" else \
        tuple(src.files[g.start:g.start + g.rows])
    return GroupRead(src.kind, src.filesystem, files, g, src.image_column, src.label_column,
                     tuple(src.classes) if src.classes else None)


_READ_ERRORS = (OSError, pa.ArrowException)
# An object store's passing trouble (pyarrow's S3 errors name the AWS error code): not the
# data's fault, so raised (the task fails, Ray Train restarts from the checkpoint) rather
# than skipped like a missing file or a corrupt page.
_TRANSIENT = re.compile(r"AWS Error (NETWORK_CONNECTION|SLOW_DOWN|THROTTLING|SERVICE_UNAVAILABLE"
                        r"|INTERNAL_FAILURE|REQUEST_TIMEOUT)|curlCode")


def _unreadable(e: BaseException) -> str:
    if _TRANSIENT.search(str(e)):
        raise e
    lines = str(e).strip().splitlines()
    return f"unreadable: {type(e).__name__}: {lines[0] if lines else ''}"


def read_group(gr: GroupRead) -> dict:
    """One row group, read whole and in storage order: ``{"image": list[bytes], "label":
    int64 array or None, "id": list[str], "unreadable": {id: reason}}``. A row group (an image
    file) that cannot be read gives empty rows named ``<file>#rg<i>`` (the file's path) in
    ``unreadable``: skipped like undecodable images."""
    g = gr.group
    if gr.kind == "parquet":
        cols = [gr.image_column] + ([gr.label_column] if gr.label_column else [])
        try:
            with gr.filesystem.open_input_file(gr.files[0]) as fh:
                t = pq.ParquetFile(fh).read_row_group(g.index, columns=cols).slice(0, g.rows)
        except _READ_ERRORS as e:
            name = f"{gr.files[0]}#rg{g.index}"
            return {"image": [b""] * g.rows, "id": [name] * g.rows, "unreadable":
                    {name: _unreadable(e)}, "label": np.zeros(g.rows, np.int64)
                    if gr.label_column else None}
        images = [v if v is not None else b"" for v in t.column(gr.image_column).to_pylist()]
        labels = (np.asarray(t.column(gr.label_column).to_numpy(), dtype=np.int64)
                  if gr.label_column else None)
        ids = [parquet_row_id(gr.files[0], g.file_row + i) for i in range(g.rows)]
        return {"image": images, "label": labels, "id": ids, "unreadable": {}}
    images, bad = [], {}
    for p in gr.files:
        try:
            with gr.filesystem.open_input_stream(p) as fh:
                images.append(fh.read())
        except _READ_ERRORS as e:
            images.append(b"")
            bad[p] = _unreadable(e)
    labels = None
    if gr.classes:
        labels = np.asarray([gr.classes.index(p.rsplit("/", 2)[-2]) for p in gr.files], np.int64)
    return {"image": images, "label": labels, "id": list(gr.files), "unreadable": bad}


# -- routing: which rows of which group go to which decode task ---------------------------------

@dataclass
class Route:
    """Rows of one row group that decode tasks need: ``offsets`` (row within the group),
    ``dest`` (index into ``tasks``: the decode tasks it feeds, ascending) and ``positions``
    (global positions in the epoch). Rows the tasks do not need are absent."""
    group: int
    offsets: np.ndarray
    dest: np.ndarray
    positions: np.ndarray
    tasks: list


def route(plan: EpochPlan, groups: Sequence[Group], tasks: Sequence[DecodeTask],
          window: int, task_index: int = 0) -> list[Route]:
    """Routes of window ``window``'s row groups to the decode tasks ``tasks`` (consecutive,
    ascending positions; ``task_index`` is the first one's index, so that ``Route.tasks`` holds
    task indices) for the positions of ``tasks`` that fall in the window. One route per group
    of the window that holds a needed row (every group, unless a resume skips them)."""
    if not tasks:
        return []
    ws, we = int(plan.window_starts[window]), int(plan.window_starts[window + 1])
    lo, hi = max(ws, tasks[0].start), min(we, tasks[-1].stop)
    if lo >= hi:
        return []
    positions = np.arange(lo, hi, dtype=np.int64)
    rows = plan.window_rows(window)[lo - ws:hi - ws]
    starts = np.asarray([t.start for t in tasks], dtype=np.int64)
    dest = np.searchsorted(starts, positions, side="right") - 1 + task_index
    gstarts = np.asarray([g.start for g in groups], dtype=np.int64)
    gidx = np.searchsorted(gstarts, rows, side="right") - 1
    out = []
    order = np.argsort(gidx, kind="stable")
    gsorted = gidx[order]
    cuts = np.flatnonzero(np.diff(gsorted)) + 1
    for sel in np.split(order, cuts):
        if not len(sel):
            continue
        gi = int(gidx[sel[0]])
        d = dest[sel]
        out.append(Route(group=gi, offsets=rows[sel] - gstarts[gi], dest=d, positions=positions[sel],
                         tasks=sorted(set(d.tolist()))))
    return out


def split_rows(rows: dict, r: Route, start: int) -> list[dict]:
    """Cut a read row group (its first row is global row ``start``) into one part per task of
    ``r.tasks``: ``{"pos", "row", "image", "label", "id"}`` (``row``: the global row index)."""
    out = []
    for t in r.tasks:
        sel = np.flatnonzero(r.dest == t)
        offs = r.offsets[sel]
        part = {"pos": r.positions[sel], "row": offs + start,
                "image": [rows["image"][i] for i in offs],
                "label": rows["label"][offs] if rows["label"] is not None else None,
                "id": [rows["id"][i] for i in offs], "unreadable": rows["unreadable"]}
        out.append(part)
    return out


def read_and_split(gr: GroupRead, r: Route) -> list[dict]:
    """A read task's work: the group read once, then cut into its decode tasks' parts."""
    return split_rows(read_group(gr), r, gr.group.start)


# -- decoding ----------------------------------------------------------------------------------

def decode_task(parts: Sequence[dict], task: DecodeTask, multicrop: MultiCrop, seed: int,
                epoch: int, report: Optional[DecodeReport] = None
                ) -> tuple[list[dict], list[tuple[str, str]]]:
    """Decode one task's positions from its parts (any order): returns (its pieces in
    ``task.pieces`` order, each a dict of numpy columns ``global_crops``, ``local_crops``,
    ``row`` and ``label`` if labeled; undecodable rows as (id, reason))."""
    pos = np.concatenate([p["pos"] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(pos, kind="stable")
    if not np.array_equal(pos[order], np.arange(task.start, task.stop)):
        raise ValueError(f"decode task {task.start}..{task.stop - 1} got positions that are not "
                         f"exactly its own ({len(pos)} rows)")
    images = [im for p in parts for im in p["image"]]
    ids = [i for p in parts for i in p["id"]]
    rows = np.concatenate([p["row"] for p in parts])[order]
    labeled = parts[0]["label"] is not None
    labels = np.concatenate([p["label"] for p in parts])[order] if labeled else None
    images = [images[i] for i in order]
    ids = [ids[i] for i in order]
    unreadable = {k: v for p in parts for k, v in p.get("unreadable", {}).items()}
    cols: dict[str, list] = {}
    all_bad: list[tuple[str, str]] = []
    for step, j, lo, hi in task.units:
        a, b = lo - task.start, hi - task.start
        out, bad = make_views(images[a:b], ids[a:b], multicrop,
                              batch_generator(seed, epoch, step, j),
                              labels[a:b] if labeled else None)
        if unreadable:  # their empty rows failed to decode: the read error is the reason
            bad = [(i, unreadable.get(i, r)) for i, r in dict(bad).items()]
        if bad:
            badset = {x for x, _ in bad}
            good = np.asarray([k for k in range(a, b) if ids[k] not in badset], dtype=np.int64)
        else:
            good = np.arange(a, b)
        n = len(out["global_crops"])
        if n == 0:
            raise DataError(
                f"epoch {epoch} step {step}: none of the {b - a} rows of its unit {j} "
                f"(positions {lo}..{hi - 1}) could be decoded or read (e.g. {bad[0][0]}: "
                f"{bad[0][1]}): the step cannot be made; fix or remove these rows")
        out["row"] = rows[good]
        if n < b - a:  # keep the unit full: repeat its decodable rows
            sel = np.arange(b - a) % n
            out = {k: v[sel] for k, v in out.items()}
        for k, v in out.items():
            cols.setdefault(k, []).append(v)
        all_bad += bad
    if all_bad and report is not None:
        report.record(all_bad)
    full = {k: np.concatenate(v) for k, v in cols.items()}
    pieces = [{k: v[lo - task.start:hi - task.start] for k, v in full.items()}
              for (_, _, lo, hi) in task.pieces]
    return pieces, all_bad


def concat_pieces(pieces: Sequence[dict]) -> dict:
    if len(pieces) == 1:
        return pieces[0]
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


# -- in-process -----------------------------------------------------------------------------

class LocalFeed:
    """The exact order in this process (the local mode, and tests): the same routes, reads and
    decode tasks as on Ray, row groups kept in an LRU cache of ``cache_bytes`` (a window's
    worth is read once)."""

    def __init__(self, src: Source, multicrop: MultiCrop, seed: int, batch: int,
                 steps_per_epoch: int, limit: Optional[int] = None,
                 window_groups: Optional[int] = None, decode_rows: int = 256,
                 cache_bytes: int = 1 << 30, report: Optional[DecodeReport] = None,
                 shuffle: bool = True):
        self.src, self.mc, self.seed, self.batch = src, multicrop, seed, batch
        self.spe, self.window_groups, self.decode_rows = steps_per_epoch, window_groups, decode_rows
        self.groups = source_groups(src, limit)
        self.shuffle = shuffle
        self.report = report
        self.cache_bytes = cache_bytes
        self._cache: "OrderedDict[int, tuple[dict, int]]" = OrderedDict()
        self._cached = 0
        self.reads = 0      # row groups read
        self.decoded = 0    # rows decoded

    def plan(self, epoch: int) -> EpochPlan:
        k = len(self.groups) if self.window_groups is None else self.window_groups
        return EpochPlan([g.rows for g in self.groups], self.seed, epoch, k, shuffle=self.shuffle)

    def _group(self, gi: int) -> dict:
        hit = self._cache.get(gi)
        if hit is not None:
            self._cache.move_to_end(gi)
            return hit[0]
        rows = read_group(group_read(self.src, self.groups[gi]))
        size = sum(len(x) for x in rows["image"])
        self.reads += 1
        self._cache[gi] = (rows, size)
        self._cached += size
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, (_, old) = self._cache.popitem(last=False)
            self._cached -= old
        return rows

    def batches(self, epoch: int, from_step: int = 0, rank: int = 0, world: int = 1,
                to_step: Optional[int] = None) -> Iterator[dict]:
        """Rank ``rank`` of ``world``'s batches of epoch ``epoch``, steps ``from_step ..``."""
        plan = self.plan(epoch)
        tasks = decode_tasks(self.spe, self.batch, world, from_step, to_step, self.decode_rows)
        b = self.batch // world
        pending: list = []
        have = 0
        for ti, t in enumerate(tasks):
            parts = []
            w0, _ = plan.window_at(t.start)
            w1, _ = plan.window_at(t.stop - 1)
            for w in range(w0, w1 + 1):
                for r in route(plan, self.groups, [t], w, ti):
                    parts += split_rows(self._group(r.group), r, self.groups[r.group].start)
            pieces, _ = decode_task(parts, t, self.mc, self.seed, epoch, self.report)
            self.decoded += t.stop - t.start
            for (s, rk, _, _), p in zip(t.pieces, pieces):
                if rk != rank:
                    continue
                pending.append(p)
                have += len(p["row"])
                if have == b:  # the rank's slice of step s is complete
                    yield concat_pieces(pending)
                    pending, have = [], 0
