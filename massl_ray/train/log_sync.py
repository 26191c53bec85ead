"""Copies of a run's logs on its storage path, for runs whose storage is an object store.

With ``run.storage_path`` a URI (``s3://``, ``gs://``, ``file://`` ...), checkpoints live on
the store but the logs are written to a local run directory (``trainer.run_dir_of``) on rank
0's node and on the driver's: lost with either machine. :class:`LogSync` copies them to
``<storage_path>/<run name>/logs/`` through ``pyarrow.fs``: every file it owns whose size or
modification time changed since its last copy, whole (object stores have no append). Rank 0
syncs its metrics (``metrics.jsonl``, ``checkpoints.jsonl``, the TensorBoard event files) after
each checkpoint and when its loop ends; the driver syncs the config and the summaries. Ray-free.
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
        self.bytes_copied = 0

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


def log_sync_for(storage_path: str, run_name: str, run_dir: Optional[Path],
                 files: Iterable[str]) -> Optional[LogSync]:
    """A :class:`LogSync` when the storage path is a URI (object store), else None (local
    storage: the run directory already is on the storage path)."""
    if run_dir is None or "://" not in storage_path:
        return None
    return LogSync(run_dir, logs_uri(storage_path, run_name), files)
