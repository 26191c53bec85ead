"""Checkpoint files: atomic writes, a completeness marker written last, strict loading.

A checkpoint directory holds ``state.pt`` (the :meth:`Learner.state_dict`) and ``meta.json``
(global step, sha256 of state.pt, the resolved config), written last: a directory without a
valid ``meta.json`` or whose checksum fails is incomplete and is never loaded. Ray-free.
"""

from __future__ import annotations

import hashlib
import io
import logging
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_"  # a run's checkpoint directories: <run dir>/checkpoint_*/

log = logging.getLogger("massl_ray")

# Bytes of checkpoint files (state.pt) this process has read: for hashing or loading. A
# restart costs one checkpoint read on rank 0 and none elsewhere (benchmarks/restart.py).
READ_BYTES = {"state": 0}


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            if path.name == STATE_FILE:
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


def read_meta(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    try:
        return json.loads((d / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {d} is incomplete: no {META_FILE} (written last)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {d} has an unreadable {META_FILE}: {e}") from None


def _complete_state_file(d: Path, meta: dict) -> Path:
    """``d``'s state file, present and of the size its meta records (else CheckpointError)."""
    state_path = d / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {d} has no {STATE_FILE}")
    if state_path.stat().st_size != meta.get("bytes"):
        raise CheckpointError(f"checkpoint {d}: {STATE_FILE} is truncated "
                              f"({state_path.stat().st_size} of {meta.get('bytes')} bytes)")
    return state_path


def verify_checkpoint(directory: str | os.PathLike) -> dict:
    """Check completeness and checksum; returns the meta dict or raises CheckpointError."""
    d = Path(directory)
    meta = read_meta(d)
    state_path = _complete_state_file(d, meta)
    if _sha256(state_path) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {d}: {STATE_FILE} fails its sha256 check (corrupt)")
    return meta


def _read_state_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    READ_BYTES["state"] += len(data)
    return data


def load_checkpoint(directory: str | os.PathLike, map_location="cpu") -> dict:
    """Verify, then load with ``weights_only=True`` (never unpickles arbitrary objects).

    One read of ``state.pt``: the bytes read once are checked (size, sha256) and then
    unpickled from memory, so a restart reads each checkpoint once, not once to hash and
    again to load."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} does not exist")
    meta = read_meta(d)
    state_path = _complete_state_file(d, meta)
    data = _read_state_bytes(state_path)
    if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {d}: {STATE_FILE} fails its sha256 check (corrupt)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {d}: {STATE_FILE} cannot be loaded: {e}") from e


# ---- discovery: a run directory's checkpoints ------------------------------------------------

def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, newest (highest global step) first."""
    if not run_dir.is_dir():
        return []
    out = []
    for d in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if d.is_dir():
            try:
                step = int(read_meta(d)["global_step"])
            except (CheckpointError, KeyError, ValueError, TypeError):
                step = -1  # incomplete: sorted last, skipped by latest_valid_checkpoint
            out.append((step, d.stat().st_mtime, d))
    return [d for _, _, d in sorted(out, key=lambda t: (t[0], t[1]), reverse=True)]


def latest_valid_checkpoint(run_dir: Path) -> Optional[Path]:
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


def load_latest_valid_checkpoint(run_dir: Path, newer_than: Optional[Path] = None,
                                 map_location="cpu") -> tuple[Optional[Path], Optional[dict]]:
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
        candidates.insert(at, Path(newer_than))
    for d in candidates:
        try:
            read_meta(d)
            return d, load_checkpoint(d, map_location)
        except CheckpointError as e:
            log.warning("skipping broken checkpoint: %s", e)
    return None, None
