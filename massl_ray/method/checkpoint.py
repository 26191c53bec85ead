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
import tempfile
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
