"""Copies of a run's logs on its storage path, for runs whose storage is an object store.

With ``run.storage_path`` a URI (``s3://``, ``gs://``, ``file://`` ...), checkpoints live on
the store but the logs are written to a local run directory (``trainer.run_dir_of``) on rank
0's node and on the driver's: lost with either machine. :class:`LogSync` copies them to
``<storage_path>/<run name>/logs/`` through ``pyarrow.fs``: every file it owns whose size or
modification time changed since its last copy, whole (object stores have no append). Rank 0
syncs its metrics (``metrics.jsonl``, ``checkpoints.jsonl``, the TensorBoard event files) after
each checkpoint and when its loop ends; the driver syncs the config and the summaries. A run
resumed on another machine (a new rank-0 node, a new driver, or one it left and came back to)
first brings the files it appends to up to date with their copies (:meth:`LogSync.restore`),
so its copies continue the run's logs instead of replacing them.
Ray-free.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger("massl_ray")

LOGS_DIR = "logs"
# What rank 0 writes (relative to the run directory; a trailing "/" is a whole folder).
WORKER_FILES = ("metrics.jsonl", "checkpoints.jsonl", "tb/")
# What the driver writes.
DRIVER_FILES = ("config.yaml", "summary.json", "decode_errors.json")
# What a run appends to over all its attempts (rank 0's): fetched before a resume writes there.
APPEND_FILES = ("metrics.jsonl", "checkpoints.jsonl")


def logs_uri(storage_path: str, run_name: str) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}/{LOGS_DIR}"


class LogSync:
    """Mirror of chosen files of ``local_dir`` under the URI ``dest`` (see the module doc)."""

    def __init__(self, local_dir: Path, dest: str, files: Iterable[str], filesystem=None):
        import pyarrow.fs as pafs

        self.local_dir = Path(local_dir)
        self.files = tuple(files)
        if filesystem is None:
            self.fs, self.root = pafs.FileSystem.from_uri(dest)
        else:
            self.fs, self.root = filesystem, dest
        self.root = self.root.rstrip("/")
        self._seen: dict[str, tuple[int, int]] = {}
        self._held: set[str] = set()  # never copied: their copy could not be fetched first
        self.bytes_copied = 0

    def restore(self, names: Iterable[str]) -> int:
        """Bring each of ``names`` (relative to the run directory, line files) up to date with
        its copy on the storage path before the run writes it, so the run appends to the whole
        history; returns how many local files changed. The local file becomes the stored copy's
        lines, then its own lines the copy lacks: a machine without the file (a new rank-0
        node) gets the copy; one with a stale file (rank 0 back on a node it left, whose file
        lacks what ran elsewhere since) gets the copy plus anything of its own never copied.
        A file whose copy exists but cannot be fetched is never copied by this LogSync (the
        copy keeps its earlier lines; the new ones stay in the local file), with a warning."""
        import pyarrow
        import pyarrow.fs as pafs

        n = 0
        for name in names:
            p = self.local_dir / name
            src = f"{self.root}/{name}"
            try:
                if self.fs.get_file_info(src).type != pafs.FileType.File:
                    continue
                with self.fs.open_input_stream(src) as f:
                    stored = f.read()
                local = p.read_bytes() if p.is_file() else b""
                merged = _merge_lines(stored, local)
                if merged != local:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(merged)
                    n += 1
                if merged == stored:  # the copy is this file: nothing to copy back
                    st = p.stat()
                    self._seen[name] = (st.st_size, st.st_mtime_ns)
            except (OSError, pyarrow.ArrowException) as e:
                self._held.add(name)
                log.warning("could not fetch %s to continue it (it will not be copied there "
                            "by this run; its new lines stay in %s): %s", src, p, e)
        if n:
            log.info("continuing %d log file(s) of this run from %s", n, self.root)
        return n

    def _local_files(self) -> list[Path]:
        out = []
        for name in self.files:
            p = self.local_dir / name.rstrip("/")
            if name.endswith("/"):
                if p.is_dir():
                    out += sorted(f for f in p.rglob("*") if f.is_file())
            elif p.is_file():
                out.append(p)
        return out

    def sync(self) -> int:
        """Copy every changed file; returns how many were copied. A failure is logged, never
        raised: a log copy must not stop training (the next sync retries)."""
        import pyarrow

        n = 0
        for p in self._local_files():
            rel = p.relative_to(self.local_dir).as_posix()
            if rel in self._held:
                continue
            try:
                st = p.stat()
                key = (st.st_size, st.st_mtime_ns)
                if self._seen.get(rel) == key:
                    continue
                target = f"{self.root}/{rel}"
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                data = p.read_bytes()
                with self.fs.open_output_stream(target) as out:
                    out.write(data)
                self._seen[rel] = key
                self.bytes_copied += len(data)
                n += 1
            except (OSError, pyarrow.ArrowException) as e:
                log.warning("could not copy log file %s to %s: %s", p, self.root, e)
        return n


def _merge_lines(stored: bytes, local: bytes) -> bytes:
    """``stored``'s lines, then those of ``local`` that ``stored`` lacks, in their order."""
    have = set(stored.splitlines())
    if stored and not stored.endswith(b"\n"):
        stored += b"\n"
    extra = [ln + b"\n" for ln in local.splitlines() if ln not in have]
    return stored + b"".join(extra)


def log_sync_for(storage_path: str, run_name: str, run_dir: Optional[Path],
                 files: Iterable[str]) -> Optional[LogSync]:
    """A :class:`LogSync` when the storage path is a URI (object store), else None (local
    storage: the run directory already is on the storage path)."""
    if run_dir is None or "://" not in storage_path:
        return None
    return LogSync(run_dir, logs_uri(storage_path, run_name), files)
