"""Checkpoint directories: atomic, checksummed, strict; round trip of a Learner state."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest
import torch

from conftest import make_crops
from massl_ray.method.checkpoint import (META_FILE, STATE_FILE, CheckpointError, load_checkpoint,
                                  read_meta, save_checkpoint, verify_checkpoint)
from massl_ray.method.learner import Learner


@pytest.fixture(scope="module")
def trained_state():
    """The state of a tiny Learner after two steps (optimizer state populated)."""
    from conftest import make_tiny_config

    cfg = make_tiny_config()
    lr_ = Learner(cfg)
    for k in range(2):
        lr_.step(*make_crops(cfg, seed=k))
    return cfg, lr_.state_dict()


def _equal(a, b, path="state"):
    """Deep equality of nested dict/list/tuple/tensor structures (tensors bitwise)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_round_trip(tmp_path, trained_state):
    cfg, state = trained_state
    d = save_checkpoint(state, tmp_path / "ckpt_2")
    assert d == tmp_path / "ckpt_2" and d.is_dir()
    loaded = load_checkpoint(d)
    _equal(state, loaded)
    # plain torch.load with weights_only=True works too (no arbitrary unpickling needed)
    raw = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    assert raw["global_step"] == 2
    # and a fresh Learner accepts it and resumes at the right step
    other = Learner(cfg)
    other.load_state_dict(loaded)
    assert other.global_step == 2
    assert torch.equal(other.memory.rows, state["memory"]["rows"])
    assert int(other.memory.ptr) == 2 * cfg.optim.batch_size_per_worker


def test_meta_json(tmp_path, trained_state):
    cfg, state = trained_state
    d = save_checkpoint(state, tmp_path / "c")
    meta = json.loads((d / META_FILE).read_text())
    assert meta["global_step"] == 2
    assert meta["format"] == state["format"]
    assert meta["sha256"] == hashlib.sha256((d / STATE_FILE).read_bytes()).hexdigest()
    assert meta["bytes"] == (d / STATE_FILE).stat().st_size
    assert meta["config"] == cfg.to_dict()
    assert read_meta(d) == meta
    assert verify_checkpoint(d) == meta


def test_no_temp_files_left(tmp_path, trained_state):
    _, state = trained_state
    d = tmp_path / "c"
    save_checkpoint(state, d)
    save_checkpoint(state, d)  # overwriting an existing checkpoint is atomic too
    assert sorted(os.listdir(d)) == sorted([STATE_FILE, META_FILE])
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_failed_save_leaves_no_temp_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    d = tmp_path / "c"
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"global_step": 1, "x": Unpicklable()}, d)
    assert os.listdir(d) == []  # neither a temp file nor a meta.json


def test_truncated_state(tmp_path, trained_state):
    _, state = trained_state
    d = save_checkpoint(state, tmp_path / "c")
    data = (d / STATE_FILE).read_bytes()
    (d / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as ei:
        load_checkpoint(d)
    assert str(d) in str(ei.value) and str(len(data)) in str(ei.value)


def test_flipped_byte(tmp_path, trained_state):
    _, state = trained_state
    d = save_checkpoint(state, tmp_path / "c")
    data = bytearray((d / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256") as ei:
        load_checkpoint(d)
    assert str(d) in str(ei.value)


def test_missing_meta(tmp_path, trained_state):
    _, state = trained_state
    d = save_checkpoint(state, tmp_path / "c")
    (d / META_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete: no {META_FILE}"):
        load_checkpoint(d)


def test_unreadable_meta(tmp_path, trained_state):
    _, state = trained_state
    d = save_checkpoint(state, tmp_path / "c")
    (d / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"unreadable {META_FILE}"):
        load_checkpoint(d)


def test_missing_state_file(tmp_path, trained_state):
    _, state = trained_state
    d = save_checkpoint(state, tmp_path / "c")
    (d / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"no {STATE_FILE}"):
        load_checkpoint(d)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as ei:
        load_checkpoint(tmp_path / "never_written")
    assert "never_written" in str(ei.value)


def _real_state_bytes(cfg, tmp_path) -> int:
    learner = Learner(cfg)
    learner.step(*make_crops(cfg))  # AdamW's moments exist from the first step on
    d = save_checkpoint(learner.state_dict(), tmp_path / "ckpt")
    return (d / STATE_FILE).stat().st_size


@pytest.mark.parametrize("over", [(), ("massl.memory_size=65536", "massl.block_size=4096"),
                                  ("model.depth=1",)], ids=["tiny", "large_memory", "depth1"])
def test_estimated_checkpoint_size_is_within_1_percent_and_never_below_the_real_file(
        tmp_path, over):
    from conftest import make_tiny_config
    from massl_ray.train.trainer import estimate_checkpoint_bytes

    cfg = make_tiny_config(*over)
    real = _real_state_bytes(cfg, tmp_path)
    est = estimate_checkpoint_bytes(cfg)
    assert real <= est <= 1.01 * real, (real, est, est / real - 1)


def test_storage_just_below_the_real_need_is_refused_and_just_above_accepted(tmp_path,
                                                                           monkeypatch):
    """The real need: run.num_checkpoints_to_keep + 1 real checkpoints + 64 MiB of logs."""
    import collections

    import massl_ray.train.trainer as trainer_mod
    from conftest import make_tiny_config
    from massl_ray.config import ConfigError

    cfg = make_tiny_config(f"run.storage_path={tmp_path / 'runs'}", "run.name=disk",
                           "run.num_checkpoints_to_keep=3")
    real = _real_state_bytes(cfg, tmp_path)
    need = 4 * real + 64 * 2**20
    usage = collections.namedtuple("usage", "total used free")
    free = {"bytes": need - 1}
    monkeypatch.setattr(trainer_mod.shutil, "disk_usage",
                        lambda p: usage(10**12, 10**12 - free["bytes"], free["bytes"]))
    with pytest.raises(ConfigError, match=r"needs about .* \(3 \+ 1 checkpoints of"):
        trainer_mod.check_storage(cfg)
    free["bytes"] = int(need * 1.01)  # the estimate's margin above the real need
    trainer_mod.check_storage(cfg)


# ---- one driver per run (RunLock) ----------------------------------------------------------

_HOLDER = ("import sys; from massl_ray.method.checkpoint import RunLock; "
           "RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()")


def _hold_in_another_process(location: str):
    """A second driver's process holding the lock of ``location`` until its stdin closes."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _HOLDER, location], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"  # the lock exists from here on
    return p


def _locations(kind: str, tmp_path, request) -> str:
    if kind == "local":
        return str(tmp_path / "run")
    s3 = request.getfixturevalue("s3_server")
    return f"s3://{s3.bucket('lock-' + uuid.uuid4().hex[:12])}/runs/run"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_second_driver_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(
        kind, tmp_path, request, caplog):
    import socket

    from massl_ray.method.checkpoint import RunInUse, RunLock

    run = _locations(kind, tmp_path, request)
    holder = _hold_in_another_process(run)
    try:
        with pytest.raises(RunInUse) as e:
            RunLock(run).acquire()
        assert f"host {socket.gethostname()}, pid {holder.pid}" in str(e.value)
    finally:
        holder.kill()  # SIGKILL: the lock stays behind, as after a crashed driver
        holder.wait()
    with caplog.at_level("WARNING", logger="massl_ray"):
        lock = RunLock(run).acquire()
    assert f"pid {holder.pid}: its process {holder.pid} on this host is gone" in caplog.text
    lock.release()
    RunLock(run).acquire().release()  # released: free again, nothing left behind


def test_a_lock_from_another_host_is_refused_while_renewed_and_taken_over_when_stale(
        tmp_path, monkeypatch):
    import time

    from massl_ray.method import checkpoint as ck

    run = tmp_path / "run"
    run.mkdir()
    lock_file = run / ck.LOCK_FILE
    other = {"host": "gpu-node-7", "pid": 4242, "since": time.time() - 3600, "token": "x"}
    lock_file.write_text(json.dumps({**other, "refreshed": time.time() - ck.LOCK_STALE_S + 60}))
    with pytest.raises(ck.RunInUse, match="host gpu-node-7, pid 4242"):
        ck.RunLock(run).acquire()
    lock_file.write_text(json.dumps({**other, "refreshed": time.time() - ck.LOCK_STALE_S - 1}))
    lock = ck.RunLock(run).acquire()
    assert json.loads(lock_file.read_text())["token"] == lock.record["token"]
    # the holder renews its lock while it runs ...
    monkeypatch.setattr(ck, "LOCK_REFRESH_S", 0.05)
    lock2 = ck.RunLock(tmp_path / "run2").acquire()
    first = json.loads((tmp_path / "run2" / ck.LOCK_FILE).read_text())["refreshed"]
    deadline = time.time() + 30
    while json.loads((tmp_path / "run2" / ck.LOCK_FILE).read_text())["refreshed"] == first:
        assert time.time() < deadline, "the lock was not renewed"
        time.sleep(0.05)
    lock2.release()
    # ... and a release removes only its own lock (not one a later driver took over)
    lock_file.write_text(json.dumps({**other, "refreshed": time.time()}))
    lock.release()
    assert json.loads(lock_file.read_text())["host"] == "gpu-node-7"


def test_the_train_command_on_a_run_another_driver_holds_is_refused_before_ray(tmp_path):
    import subprocess
    import sys

    from pathlib import Path

    run = tmp_path / "runs" / "quickstart"
    holder = _hold_in_another_process(str(run))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["RAY_TMPDIR"] = str(tmp_path / "ray")  # a Ray started would leave its session here
        r = subprocess.run([sys.executable, "-m", "massl_ray", "train", "--config",
                            "jobs/quickstart.yaml", f"run.storage_path={tmp_path / 'runs'}",
                            "data.limit=256", "optim.batch_size_per_worker=32"],
                           cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, r.stderr
    assert "in use by another driver: host" in r.stderr and f"pid {holder.pid}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "ray").exists() and not (run / "config.yaml").exists()
