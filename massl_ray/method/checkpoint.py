"""Checkpoint files: atomic writes, a completeness marker written last, strict loading.

A checkpoint directory holds ``state.pt`` (the :meth:`Learner.state_dict`) and ``meta.json``
(global step, sha256 of state.pt, the resolved config), written last: a directory without a
valid ``meta.json`` or whose checksum fails is incomplete and is never loaded. Ray-free.

Reading (listing a run's checkpoints, meta.json, the sha256 check, the newest valid one with
the fallback past broken ones, loading) is one code for a local directory and an object-store
URI (``s3://``, ``gs://``, ``file://``...), through ``pyarrow.fs``: a local location is given
as a path (and returned as a :class:`~pathlib.Path`), a URI as a ``str`` (returned as one).
Writing is local (:func:`save_checkpoint`); :func:`copy_checkpoint` copies a written one to any
location, ``meta.json`` last.
"""

from __future__ import annotations

import hashlib
import io
import logging
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional, Union

import pyarrow as pa
import pyarrow.fs as pafs
import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_"  # a run's checkpoint directories: <run dir>/checkpoint_*/

log = logging.getLogger("massl_ray")

# Bytes of checkpoint files (state.pt) this process has read: for hashing or loading. A
# restart costs one checkpoint read on rank 0 and none elsewhere (benchmarks/restart.py).
READ_BYTES = {"state": 0}


# A checkpoint or run location: a local path, or an object-store URI (a str with "://").
Location = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def is_uri(location: Location) -> bool:
    """An object-store URI (``s3://...``), not a local path. A :class:`Path` never is one."""
    return not isinstance(location, Path) and "://" in os.fspath(location)


class _Loc:
    """A location resolved once: its filesystem, its path inside it, and how it is shown (and
    returned): the caller's :class:`Path` for a local one, the URI string for a URI."""

    __slots__ = ("fs", "path", "shown")

    def __init__(self, fs: pafs.FileSystem, path: str, shown):
        self.fs, self.path, self.shown = fs, path, shown

    @classmethod
    def of(cls, location: Location) -> "_Loc":
        if isinstance(location, _Loc):
            return location
        if is_uri(location):
            uri = os.fspath(location).rstrip("/")
            try:
                fs, path = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowException, OSError, ValueError) as e:
                raise CheckpointError(f"{uri} cannot be opened: {_one_line(e)}") from None
            return cls(fs, path.rstrip("/"), uri)
        return cls(pafs.LocalFileSystem(), os.path.abspath(location), Path(location))

    def child(self, name: str) -> "_Loc":
        shown = self.shown / name if isinstance(self.shown, Path) else f"{self.shown}/{name}"
        return _Loc(self.fs, f"{self.path}/{name}", shown)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _sha256(loc: _Loc) -> str:
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            if loc.name == STATE_FILE:
                READ_BYTES["state"] += len(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict, directory: str | os.PathLike) -> Path:
    """Write ``state`` into ``directory`` (created); meta.json goes last, atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state_path = d / STATE_FILE
    # Serialised once in memory: hashed there and written, never read back from the disk.
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    _atomic_write_bytes(state_path, lambda f: f.write(data))
    meta = {
        "format": state.get("format"),
        "global_step": int(state["global_step"]),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "config": state.get("config"),
    }
    _atomic_write_bytes(d / META_FILE, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return d


def read_meta(directory: Location) -> dict:
    d = _Loc.of(directory)
    try:
        with d.fs.open_input_stream(d.child(META_FILE).path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {d.shown} is incomplete: no {META_FILE} (written last)") from None
    except (OSError, ValueError, pa.ArrowException) as e:
        raise CheckpointError(f"checkpoint {d.shown} has an unreadable {META_FILE}: {e}") from None


def _complete_state_file(d: _Loc, meta: dict) -> _Loc:
    """``d``'s state file, present and of the size its meta records (else CheckpointError)."""
    state = d.child(STATE_FILE)
    info = state.info()
    if info.type != pafs.FileType.File:
        raise CheckpointError(f"checkpoint {d.shown} has no {STATE_FILE}")
    if info.size != meta.get("bytes"):
        raise CheckpointError(f"checkpoint {d.shown}: {STATE_FILE} is truncated "
                              f"({info.size} of {meta.get('bytes')} bytes)")
    return state


def verify_checkpoint(directory: Location) -> dict:
    """Check completeness and checksum; returns the meta dict or raises CheckpointError."""
    d = _Loc.of(directory)
    meta = read_meta(d)
    state = _complete_state_file(d, meta)
    if _sha256(state) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {d.shown}: {STATE_FILE} fails its sha256 check (corrupt)")
    return meta


def _read_state_bytes(loc: _Loc) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        data = f.read()
    READ_BYTES["state"] += len(data)
    return data


def load_checkpoint(directory: Location, map_location="cpu") -> dict:
    """Verify, then load with ``weights_only=True`` (never unpickles arbitrary objects).

    One read of ``state.pt``: the bytes read once are checked (size, sha256) and then
    unpickled from memory, so a restart reads each checkpoint once, not once to hash and
    again to load."""
    d = _Loc.of(directory)
    if d.info().type != pafs.FileType.Directory:
        raise CheckpointError(f"checkpoint {d.shown} does not exist")
    meta = read_meta(d)
    state = _complete_state_file(d, meta)
    data = _read_state_bytes(state)
    if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {d.shown}: {STATE_FILE} fails its sha256 check (corrupt)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {d.shown}: {STATE_FILE} cannot be loaded: {e}") from e


def copy_checkpoint(src: Location, dest: Location) -> None:
    """Copy the checkpoint ``src`` to ``dest`` (any location, e.g. a URI): state.pt first,
    meta.json last, so a copy cut short is incomplete (never loaded), as a local write is."""
    s, d = _Loc.of(src), _Loc.of(dest)
    for name in (STATE_FILE, META_FILE):
        with s.fs.open_input_stream(s.child(name).path) as f, \
                d.fs.open_output_stream(d.child(name).path) as out:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                out.write(chunk)


def delete_checkpoint(location: Location) -> None:
    """Remove a checkpoint directory (or prefix) and everything in it."""
    d = _Loc.of(location)
    d.fs.delete_dir(d.path)


def probe_writable(location: Location) -> None:
    """Write and delete one small object under ``location`` (a directory or URI prefix, which
    need not exist yet): raises OSError (or pyarrow's error) if it cannot be done, e.g. a
    bucket that does not exist or credentials that may not write there."""
    d = _Loc.of(location)
    probe = d.child(f".write_probe_{uuid.uuid4().hex}")
    if isinstance(d.fs, pafs.LocalFileSystem):  # a path or file://; an object store needs none
        d.fs.create_dir(d.path, recursive=True)
    with d.fs.open_output_stream(probe.path) as out:
        out.write(b"x" * 4096)
    d.fs.delete_file(probe.path)


# ---- discovery: a run directory's checkpoints ------------------------------------------------

def list_checkpoints(run_dir: Location) -> list:
    """Checkpoint directories of a run (a local directory or a URI prefix), newest (highest
    global step) first: :class:`Path` objects for a local run, URI strings for a URI. Ties
    on the step: the newest modification time, then the last name (Ray Train names them by
    their time)."""
    root = _Loc.of(run_dir)
    if root.info().type != pafs.FileType.Directory:
        return []
    out = []
    for info in root.fs.get_file_info(pafs.FileSelector(root.path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX):
            d = root.child(info.base_name)
            try:
                step = int(read_meta(d)["global_step"])
            except (CheckpointError, KeyError, ValueError, TypeError):
                step = -1  # incomplete: sorted last, skipped by latest_valid_checkpoint
            out.append((step, info.mtime_ns or 0, info.base_name, d.shown))
    return [t[3] for t in sorted(out, key=lambda t: t[:3], reverse=True)]


def latest_valid_checkpoint(run_dir: Location):
    """The newest complete checkpoint (meta.json present, checksum good). Warns, naming each
    one and why, on every newer checkpoint it skips and on every incomplete directory (one
    without a readable meta.json: its step is unknown, so it may have been the newest)."""
    found = None
    for d in list_checkpoints(run_dir):
        try:
            read_meta(d)
        except CheckpointError as e:
            log.warning("skipping broken checkpoint: %s", e)
            continue
        if found is None:
            try:
                verify_checkpoint(d)
                found = d
            except CheckpointError as e:
                log.warning("skipping broken checkpoint: %s", e)
    return found


def load_latest_valid_checkpoint(run_dir: Location, newer_than: Optional[Location] = None,
                                 map_location="cpu") -> tuple[Optional[Location], Optional[dict]]:
    """The newest complete checkpoint of ``run_dir`` and its state, verified while loaded: one
    read of the winner (:func:`latest_valid_checkpoint` then :func:`load_checkpoint` would read
    it twice). ``newer_than``: another candidate (e.g. the driver's ``run.resume`` path), taken
    when its step is at least that of every checkpoint here. Warns on each broken checkpoint it
    skips, like :func:`latest_valid_checkpoint`."""
    candidates = list_checkpoints(run_dir)
    if newer_than is not None:
        try:
            step = int(read_meta(newer_than)["global_step"])
        except (CheckpointError, KeyError, ValueError, TypeError):
            step = -1
        steps = []
        for d in candidates:
            try:
                steps.append(int(read_meta(d)["global_step"]))
            except (CheckpointError, KeyError, ValueError, TypeError):
                steps.append(-1)
        at = next((i for i, s in enumerate(steps) if s <= step), len(candidates))
        candidates.insert(at, newer_than if is_uri(newer_than) else Path(newer_than))
    for d in candidates:
        try:
            read_meta(d)
            return d, load_checkpoint(d, map_location)
        except CheckpointError as e:
            log.warning("skipping broken checkpoint: %s", e)
    return None, None


# ---- one driver per run ----------------------------------------------------------------------

LOCK_FILE = "driver.lock"
LOCK_REFRESH_S = 30.0  # the holder rewrites its lock this often
LOCK_STALE_S = 300.0   # a lock not rewritten for this long is a dead driver's, whatever its host


class RunInUse(CheckpointError):
    """Another live driver holds the run's lock."""


def _process_identity(pid: int) -> Optional[str]:
    """What tells process ``pid`` of this host from a later one given the same pid (Linux: its
    start time since boot; '' where ``/proc`` is absent), or None if no such process runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's live process
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return None if fields[0] in "ZX" else fields[19]  # a zombie is a dead driver


class RunLock:
    """One driver per run: ``<run>/driver.lock`` names its holder (host, pid, start time) and is
    rewritten every :data:`LOCK_REFRESH_S` while held. A second driver is refused, naming the
    holder, unless the lock is stale: its process is gone (same host), or it was not rewritten
    for :data:`LOCK_STALE_S` (a driver on another host cannot be asked); a stale lock is taken
    over, saying so. On a local path the lock is created atomically (a hard link, which fails
    if it exists). On an object store it is read, then written: pyarrow exposes no conditional
    write, so two drivers started within the same second can both pass."""

    def __init__(self, run: Location):
        self.loc = _Loc.of(run).child(LOCK_FILE)
        pid = os.getpid()
        self.record = {"host": socket.gethostname(), "pid": pid,
                       "process": _process_identity(pid), "since": time.time(),
                       "token": uuid.uuid4().hex}
        self._stop = threading.Event()

    def _read(self) -> Optional[dict]:
        try:
            with self.loc.fs.open_input_stream(self.loc.path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (ValueError, OSError, pa.ArrowException):  # unreadable: only its age counts
            info = self.loc.info()
            return None if info.type == pafs.FileType.NotFound else {
                "host": "?", "refreshed": info.mtime.timestamp() if info.mtime else 0.0}

    def _stale(self, held: dict) -> Optional[str]:
        if held.get("host") == self.record["host"] and "pid" in held:
            now = _process_identity(int(held["pid"]))
            if now is None or now != held.get("process", now):
                return f"its process {held['pid']} on this host is gone"
            return None
        age = time.time() - float(held.get("refreshed", 0.0))
        return f"it was last renewed {age:.0f} s ago" if age > LOCK_STALE_S else None

    def _write(self, exclusive: bool) -> bool:
        data = json.dumps({**self.record, "refreshed": time.time()}).encode()
        if not isinstance(self.loc.fs, pafs.LocalFileSystem):
            with self.loc.fs.open_output_stream(self.loc.path) as out:
                out.write(data)
            return True
        path = Path(self.loc.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{LOCK_FILE}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if not exclusive:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def acquire(self) -> "RunLock":
        for _ in range(3):
            held = self._read()
            if held is not None:
                why = self._stale(held)
                if why is None:
                    since = time.strftime("%Y-%m-%d %H:%M:%S",
                                          time.localtime(float(held.get("since", 0.0))))
                    raise RunInUse(
                        f"this run is in use by another driver: host {held.get('host')}, pid "
                        f"{held.get('pid')}, started {since} (its lock: {self.loc.shown}). Stop "
                        f"that driver first; a lock not renewed for {LOCK_STALE_S:.0f} s is "
                        f"taken over")
                log.warning("taking over the lock of run %s from host %s pid %s: %s",
                            self.loc.shown, held.get("host"), held.get("pid"), why)
                try:
                    self.loc.fs.delete_file(self.loc.path)
                except FileNotFoundError:
                    pass
            if self._write(exclusive=True):
                threading.Thread(target=self._renew, daemon=True, name="run-lock").start()
                return self
        raise RunInUse(f"{self.loc.shown}: another driver took the lock at the same time")

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                self._write(exclusive=False)
            except (OSError, pa.ArrowException) as e:  # the next renewal may succeed
                log.warning("could not renew the run lock %s: %s", self.loc.shown, _one_line(e))

    def release(self) -> None:
        self._stop.set()
        held = self._read()
        if held is not None and held.get("token") == self.record["token"]:
            self.loc.fs.delete_file(self.loc.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
