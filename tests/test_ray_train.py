"""Ray integration tests on CPU: 1 and 2 workers, resume, failure recovery, corrupt rows.

Each training run proves several claims at once (a CI minute is a few runs): the restart tests
end bit for bit equal to an uninterrupted run, which implies every part of the state was
restored (memory bank rows and pointer included).

The shared Ray instance (``ray_instance`` in conftest.py: 4 logical CPUs on this 2-core machine,
so two train workers and a decode task fit), tiny models, a few hundred images, a timeout on
each test.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import bucket_jsonl  # noqa: E402
from massl_ray.method.checkpoint import load_checkpoint  # noqa: E402
from massl_ray.config import load_config  # noqa: E402
from massl_ray.train.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "jobs" / "data" / "cifar10-quick" / "train.parquet"

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_instance):  # every test here runs on the module's Ray instance (conftest.py)
    yield ray_instance


def tiny_overrides(tmp_path: Path, name: str, **extra) -> list[str]:
    o = {
        "model.arch": "vit_micro", "model.patch_size": 4, "model.depth": 2,
        "model.head_hidden_dim": 128, "model.head_out_dim": 32,
        "crops.global_size": 16, "crops.local_size": 8, "crops.num_local_crops": 2,
        "massl.memory_size": 2048, "massl.block_size": 512,
        "optim.batch_size_per_worker": 32, "optim.epochs": 2,
        "data.train": str(QUICK), "data.limit": 512, "data.decode_batch_size": 64,
        "run.name": name, "run.storage_path": str(tmp_path), "run.log_every_steps": 4,
        "run.checkpoint_every_steps": 4, "run.final_knn": False,
        "run.cpus_per_worker": 1, "data.decode_cpus": 1,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _assert_same(a, b, where: str) -> None:
    """Recursive bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), \
            f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_states_equal(a: dict, b: dict) -> None:
    """Student, teacher, memory bank (rows + pointer), optimizer (moments, step counts, param
    groups) and grad scaler, bit for bit. On CPU the grad scaler is disabled (fp16 needs a GPU):
    its state is then compared as the (empty) state both runs have."""
    assert a["global_step"] == b["global_step"]
    for part in ("student", "teacher", "memory", "optimizer", "scaler"):
        _assert_same(a[part], b[part], part)
    assert len(a["optimizer"]["state"]) > 0 and "ptr" in a["memory"]


KILL_COMMON = {"run.max_steps": 12, "data.limit": 256, "optim.epochs": 3}


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The uninterrupted reference of the 1-worker restart tests: 12 steps in local mode (a
    one-worker Ray run equals it bit for bit), 256 rows = 8 steps per epoch, a checkpoint every
    3 steps, all kept: {global step: checkpoint dir} for 3, 6, 9 and 12."""
    from massl_ray.method.checkpoint import list_checkpoints, read_meta

    tmp = tmp_path_factory.mktemp("ref")
    train(load_config(None, tiny_overrides(tmp, "ref", **KILL_COMMON, **{
        "run.num_workers": 1, "run.checkpoint_every_steps": 3,
        "run.num_checkpoints_to_keep": 5})), local=True)
    ckpts = {int(read_meta(d)["global_step"]): d for d in list_checkpoints(tmp / "ref")}
    assert sorted(ckpts) == [3, 6, 9, 12]
    return ckpts


@pytest.fixture(scope="module")
def two_worker_reference(tmp_path_factory):
    """The uninterrupted reference of the 2-worker restart tests: 12 steps of a 2-worker Ray
    run (256 rows = 4 steps of 2 x 32 per epoch), a checkpoint every 3 steps. Its two memory
    bank replicas are identical at every checkpoint. Returns the step-12 checkpoint dir."""
    tmp = tmp_path_factory.mktemp("ref2")
    res = train(load_config(None, tiny_overrides(tmp, "ref2", **KILL_COMMON, **{
        "run.num_workers": 2, "run.checkpoint_every_steps": 3})))
    m = res["metrics"]
    assert m["step"] == 12
    assert m["memory_replicas_identical"] is True
    assert len(m["memory_checksums"]) == 2 and m["memory_checksums"][0] == m["memory_checksums"][1]
    return res["checkpoint"]


def _assert_feed_resumed_at(run_dir: Path, step: int, workers: int, spe: int) -> None:
    """The data feed restarted at ``step`` with the same world size and decoded nothing of the
    steps consumed before it (positions are of the epoch: step s is epoch s // spe, position
    (s % spe) x the global batch)."""
    feed = json.loads((run_dir / "data_feed.json").read_text())
    assert feed["resets"] == [[0, workers], [step, workers]]
    epoch, pos = step // spe, (step % spe) * 32 * workers
    after = [d for d in feed["decoded"] if d[3] == 1]
    assert after[0][:2] == [epoch, pos], after
    assert all((e, lo) >= (epoch, pos) for e, lo, _, _ in after)


@pytest.fixture(scope="module")
def s3_data(s3_server) -> str:
    """The quick start's training Parquet, byte for byte, in a bucket of the S3 test server
    (conftest.py; the shared Ray has its variables): the URI a run reads as ``data.train``.
    The bucket's ``runs/`` prefix is for the runs' storage paths."""
    bucket = s3_server.bucket("ray-train")
    s3_server.put(bucket, "data/train.parquet", QUICK.read_bytes())
    return f"s3://{bucket}/data/train.parquet"


def _first_attempt_gone(run_dir: Path, workers: int, root, out: dict) -> None:
    """Once the first attempt's ``workers`` processes have all exited (starts.jsonl names
    them), the newest valid checkpoint under ``root`` into ``out["newest"]``: nothing writes
    to the storage until the restarted group resumes and trains 3 steps, so this is the
    checkpoint the restart must resume from."""
    from massl_ray.method.checkpoint import latest_valid_checkpoint, read_meta

    def pids():
        f = run_dir / "workers" / "starts.jsonl"
        got = [json.loads(x)["pid"] for x in f.read_text().splitlines()] if f.is_file() else []
        return got[:workers] if len(got) >= workers else None

    try:
        _wait_until(pids, 60, "the first attempt's worker starts")
        _wait_until(lambda: not any(_pid_alive(p) for p in pids()), 120,
                    "the first attempt's workers to exit")
        out["newest"] = latest_valid_checkpoint(root)
        out["step"] = int(read_meta(out["newest"])["global_step"])  # retention may delete it
    except BaseException as e:  # in the marker's thread: the test reports it
        out["error"] = repr(e)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkilled_run_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, workers, request,
                                                                   monkeypatch):
    """Exact data order: a worker SIGKILLed at step 7 (checkpoints every 3 steps) restarts
    through FailureConfig from the newest complete checkpoint - mid-epoch for both worker
    counts (256 rows = 8 steps of 32 per epoch with one worker, 4 steps of 2 x 32 with two:
    step 6 is epoch 0 position 6, or epoch 1 position 2; step 3 is epoch 0 position 3) -
    re-reads nothing it had not reached and ends, across an epoch boundary, with the student,
    teacher, memory bank, optimizer and grad scaler of the uninterrupted run, bit for bit (drop
    path is on: the randomness is keyed too), and with identical memory bank replicas.

    One worker: local storage and data; the checkpoint upload is synchronous there, so the
    restart resumes from the step-6 checkpoint; the reference is the local (no Ray) mode, so
    the Ray pipeline also delivers exactly the local mode's batches. Two workers: data read
    from and checkpoints and logs written to the S3 test server (``s3://``), the reference an
    uninterrupted 2-worker Ray run on local storage. The upload to an object store is
    asynchronous: the kill may cut the step-6 upload short, so the restart resumes from the
    newest checkpoint complete in the bucket once the first attempt's workers are gone (6, or
    3), and the test names it: the restarted rank 0 read exactly that one."""
    from massl_ray.method.checkpoint import latest_valid_checkpoint
    from massl_ray.train.trainer import checkpoint_root, run_dir_of

    common = dict(KILL_COMMON, **{"run.num_workers": workers, "run.checkpoint_every_steps": 3})
    if workers == 1:
        ref_ckpt = request.getfixturevalue("local_reference")[12]
    else:
        ref_ckpt = request.getfixturevalue("two_worker_reference")
        data = request.getfixturevalue("s3_data")
        monkeypatch.setenv("HOME", str(tmp_path))  # an object-store run logs to ~/massl_runs
        common.update({"data.train": data,
                       "run.storage_path": data.split("/data/")[0] + "/runs/sigkill"})
    kill_over = tiny_overrides(tmp_path, "killed", **common, **{
        "run.max_failures": 1, "run.fault_injection_step": 7, "run.fault_injection_mode": "kill"})
    cfg = load_config(None, kill_over)
    run_dir, root = run_dir_of(cfg), checkpoint_root(cfg)
    assert str(root).startswith("s3://") == (workers == 2)
    seen: dict = {}
    done = _on_marker(run_dir / ".fault_injected_7",
                      lambda: _first_attempt_gone(run_dir, workers, root, seen))
    res = train(cfg)
    assert done.is_set(), "the worker was not killed"
    assert seen.get("newest") is not None, seen
    spe = cfg.optim.steps_per_epoch
    assert spe == 8 // workers
    m = res["metrics"]
    resumed = seen["step"]
    assert resumed == 6 if workers == 1 else resumed in (3, 6), seen
    assert m["start_step"] == resumed and resumed % spe != 0, "the resume point is mid-epoch"
    # who read what: the first attempt's rank 0 found nothing, the restarted one the newest
    restores = [json.loads(x) for x in (run_dir / "workers" / "restores.jsonl").read_text()
                .splitlines()]
    assert [(r["from"], r["step"]) for r in restores if r["rank"] == 0] == [
        (None, None), (str(seen["newest"]), resumed)], restores
    assert str(seen["newest"]).startswith(f"{root}/checkpoint_")
    assert m["step"] == 12
    assert m["memory_replicas_identical"] is True and len(m["memory_checksums"]) == workers
    _assert_feed_resumed_at(run_dir, resumed, workers, spe)
    final = latest_valid_checkpoint(root)  # the end state as the storage (the bucket) holds it
    assert str(final).startswith(f"{root}/checkpoint_")
    a, b = load_checkpoint(ref_ckpt), load_checkpoint(final)
    assert a["global_step"] == 12
    _assert_states_equal(a, b)
    print(f"\n{workers} worker(s): resumed from {seen['newest']} (step {resumed})")


def _on_marker(marker: Path, action, timeout: float = 400.0):
    """Run ``action`` in a thread as soon as ``marker`` exists (the fault-injection marker is
    touched just before the worker raises or kills itself; Ray needs seconds to restart the
    group)."""
    import threading
    import time

    done = threading.Event()

    def watch():
        deadline = time.time() + timeout
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.01)
        if marker.exists():
            action()
            done.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return done


def _checkpoint_of_step(run_dir: Path, step: int) -> Path:
    from massl_ray.method.checkpoint import list_checkpoints, read_meta

    found = [d for d in list_checkpoints(run_dir) if int(read_meta(d)["global_step"]) == step]
    assert len(found) == 1, (step, list(run_dir.glob("checkpoint_*")))
    return found[0]


def _ray_registered(run_dir: Path) -> dict[str, int]:
    """The checkpoints Ray Train's controller registered for this run (its checkpoint manager's
    snapshot in the run directory): {checkpoint dir name: reported step}."""
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    return {r["checkpoint_dir_name"]: int(r["metrics"]["step"]) for r in snap["checkpoint_results"]}


@pytest.mark.timeout(600)
def test_exception_restart_skips_a_corrupt_checkpoint_and_resumes_mid_epoch_from_an_unregistered_one(
        tmp_path, local_reference):
    """The worker raises at step 10 (run.max_failures=1: Ray Train restarts the worker group
    once). Ray Train registered the checkpoints of steps 4 and 8 (a checkpoint every 4 steps).
    While the group restarts, two things happen to the run directory:

    - one byte of the step-8 checkpoint's state.pt (the newest, registered by Ray) is flipped;
    - a complete checkpoint of step 6 appears that Ray Train never registered (as when
      ``ray.train.report`` had persisted it and the worker died before the controller
      registered it; here the uninterrupted run's own step-6 checkpoint).

    The restarted group skips the corrupt 8 (sha256 in meta.json), prefers the unregistered 6
    to Ray's registered 4, resumes there - mid-epoch (8 steps per epoch) - with its data feed at
    step 6, and ends with the student, teacher, memory bank (rows and pointer: restored, not
    re-initialised), optimizer and grad scaler of the uninterrupted run, bit for bit."""
    from massl_ray.method.checkpoint import CheckpointError, STATE_FILE, verify_checkpoint

    run_dir = tmp_path / "fail"
    planted = run_dir / "checkpoint_unregistered_step6"
    corrupted = []

    def corrupt_and_plant():
        d = _checkpoint_of_step(run_dir, 8)
        data = bytearray((d / STATE_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / STATE_FILE).write_bytes(bytes(data))
        corrupted.append(d)
        tmp = run_dir / ".planting"  # copied aside, then published at once (a rename)
        shutil.copytree(local_reference[6], tmp)
        tmp.rename(planted)

    done = _on_marker(run_dir / ".fault_injected_10", corrupt_and_plant)
    cfg = load_config(None, tiny_overrides(tmp_path, "fail", **KILL_COMMON, **{
        "run.checkpoint_every_steps": 4, "run.num_checkpoints_to_keep": 5,
        "run.max_failures": 1, "run.fault_injection_step": 10,
        "run.fault_injection_mode": "raise"}))
    res = train(cfg)
    assert done.is_set(), "the worker did not fail (no fault-injection marker)"
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(corrupted[0])  # the corruption is still there (5 are kept)
    spe = cfg.optim.steps_per_epoch
    m = res["metrics"]
    assert m["start_step"] == 6 and 6 % spe != 0, "must resume mid-epoch from the planted 6"
    assert m["step"] == 12
    # Who read what: the first attempt started fresh, the restarted one read the planted dir.
    restores = [json.loads(x) for x in
                (run_dir / "workers" / "restores.jsonl").read_text().splitlines()]
    assert [(r["from"], r["step"]) for r in restores] == [(None, None), (str(planted), 6)]
    # Ray Train registered 4 and the (then corrupted) 8 of the first attempt, never the planted
    # directory (the failure may come before the controller registers the 8: it does so then).
    registered = _ray_registered(run_dir)
    assert registered[corrupted[0].name] == 8 and 4 in registered.values(), registered
    assert planted.name not in registered
    assert Path(res["checkpoint"]) not in (planted, corrupted[0])
    _assert_feed_resumed_at(run_dir, 6, 1, spe)
    _assert_states_equal(load_checkpoint(local_reference[12]), load_checkpoint(res["checkpoint"]))


def _wait_until(condition, timeout: float, what: str) -> None:
    import time

    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent, the raylet) is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.timeout(900)
def test_killed_driver_rerun_resumes_and_ends_bitwise_equal_to_an_uninterrupted_run(
        tmp_path, two_worker_reference, s3_data):
    """Driver restart with two workers, data and storage on the S3 test server (``s3://``):
    the training command is SIGKILLed (the driver process: its Ray Train controller and
    workers go with it) once a first checkpoint is complete in the bucket, then the same
    command runs again with the same run name, as a new fit() on a machine without the first
    run's local logs (another HOME). It resumes from the newest valid checkpoint in the bucket
    (run.resume=auto; named in its log) - mid-epoch (4 steps of 2 x 32 per epoch, a checkpoint
    every 3 steps) - and ends with identical memory replicas and exactly the state of an
    uninterrupted 2-worker run on local storage. The bucket's metrics.jsonl keeps the lines
    the first run had copied there, then the rerun's."""
    import os
    import signal
    import subprocess
    import sys

    from massl_ray.method.checkpoint import latest_valid_checkpoint, list_checkpoints, read_meta
    from massl_ray.train.trainer import checkpoint_root, prepare

    runs = s3_data.split("/data/")[0] + "/runs/drv"
    common = dict(KILL_COMMON, **{"run.num_workers": 2, "run.checkpoint_every_steps": 3,
                                  "data.train": s3_data, "run.storage_path": runs})
    over = tiny_overrides(tmp_path, "drv", **common)
    cfg = prepare(load_config(None, over))[0]
    spe, root = cfg.optim.steps_per_epoch, checkpoint_root(cfg)
    assert spe == 4 and root == f"{runs}/drv"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               PYTHONPATH=str(ROOT), HOME=str(tmp_path / "home1"))
    assert env["AWS_ENDPOINT_URL"]  # the S3 test server's (conftest.py)
    cmd = [sys.executable, "-m", "massl_ray", "train", *over]
    run_dir = tmp_path / "home1" / "massl_runs" / "drv"  # the first run's local logs
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # checkpoints.jsonl: rank 0's line once a checkpoint's report returned; the upload
        # to the bucket is asynchronous: then wait for it to be complete there
        _wait_until(lambda: (run_dir / "checkpoints.jsonl").is_file() or proc.poll() is not None,
                    360, "a first checkpoint")
        _wait_until(lambda: proc.poll() is not None or (
            list_checkpoints(root) and latest_valid_checkpoint(root) is not None),
            120, "a first checkpoint complete in the bucket")
        assert proc.poll() is None, "the first run ended before it was killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The driver's death ends its job, and Ray then kills the actors it owned: the Train
    # controller and the worker processes. Until they are gone, the old workers may still
    # write checkpoints into the bucket and hold the CPUs the rerun needs.
    pids = [json.loads(x)["pid"] for x in
            (run_dir / "workers" / "starts.jsonl").read_text().splitlines()]
    assert len(pids) == 2
    _wait_until(lambda: not any(_pid_alive(p) for p in pids), 120,
                f"the killed driver's train workers {pids} to exit")
    newest = latest_valid_checkpoint(root)
    resume = int(read_meta(newest)["global_step"])
    assert resume < 12, "the first run must not have finished"
    assert resume % spe != 0, f"the resume step {resume} must be mid-epoch ({spe} steps/epoch)"
    kept = bucket_jsonl(f"{root}/logs/metrics.jsonl")  # what the first run's rank 0 copied
    assert all(x["start_step"] == 0 for x in kept), kept
    env["HOME"] = str(tmp_path / "home2")
    second = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True,
                            timeout=360)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming run 'drv' from {newest}" in second.stderr
    summary = json.loads((tmp_path / "home2" / "massl_runs" / "drv" / "summary.json").read_text())
    m = summary["metrics"]
    assert m["start_step"] == resume and m["step"] == 12
    assert m["memory_replicas_identical"] is True and len(m["memory_checksums"]) == 2
    final = latest_valid_checkpoint(root)  # the end state as the bucket holds it
    assert final.startswith(f"{root}/checkpoint_") and read_meta(final)["global_step"] == 12
    _assert_states_equal(load_checkpoint(two_worker_reference), load_checkpoint(final))
    logged = bucket_jsonl(f"{root}/logs/metrics.jsonl")
    assert logged[:len(kept)] == kept, (kept, logged)  # the first run's lines stay, in front
    assert [(x["start_step"], x["step"]) for x in logged[len(kept):]] == [
        (resume, s) for s in (3, 4, 6, 8, 9, 12) if s > resume], logged  # logs: 4s; ckpts: 3s


def _jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_rows_are_skipped_and_counted(tmp_path, workers):
    """189 good + 3 bad rows = 192 = 6 steps of 32 (one worker) or 3 global steps of 2 x 32:
    the epoch visits every row. With two workers the bad rows fall on the ranks unevenly; every
    rank still makes every step (a rank that ran short would hang the other in the all-reduce)
    and the memory replicas stay identical. The run's outputs: a checkpoint every 4 steps and
    at the end (the last loadable, its step and memory pointer those of the run), one metrics
    line per logged step (every 4 and the last), config.yaml and TensorBoard event files."""
    good = pq.read_table(QUICK, columns=["image", "label"]).slice(0, 189)
    rng = np.random.default_rng(0)
    jpg = _jpeg(rng)
    bad = [b"", jpg[: len(jpg) // 2], rng.integers(0, 255, 500, dtype=np.uint8).tobytes()]
    images = good.column("image").to_pylist()
    for i, b in enumerate(bad):
        images.insert(50 * (i + 1), b)
    labels = good.column("label").to_pylist() + [0] * len(bad)
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()),
                             "label": pa.array(labels, pa.int16())}), path)
    over = tiny_overrides(tmp_path, "corrupt", **{"data.train": str(path), "data.limit": "null",
                                                  "optim.epochs": 1, "run.num_workers": workers})
    res = train(load_config(None, over))
    steps = 6 // workers
    assert res["mode"] == "ray"
    assert res["metrics"]["step"] == steps
    assert np.isfinite(res["metrics"]["loss"])
    assert res["metrics"]["memory_replicas_identical"] is True
    assert res["skipped_images"] == 3
    run_dir = tmp_path / "corrupt"
    report = json.loads((run_dir / "decode_errors.json").read_text())
    assert report["skipped"] == 3 and len(report["rows"]) == 3
    expected = [4, 6] if workers == 1 else [3]  # every 4 steps and the last
    state = load_checkpoint(res["checkpoint"])
    assert state["global_step"] == steps
    assert int(state["memory"]["ptr"]) == steps * 32 * workers
    ckpts = [json.loads(x) for x in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
    assert [c["step"] for c in ckpts] == expected
    logged = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == expected
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


@pytest.mark.timeout(240)
def test_the_feed_reads_class_folders_on_ray_skipping_an_undecodable_file(tmp_path):
    """An image folder through the feed's read and decode tasks: labels from the class
    sub-folders, the undecodable file skipped, named and counted, every batch full."""
    from PIL import Image

    from massl_ray.data.feed import iter_batches
    from massl_ray.data.pipeline import get_report_actor
    from massl_ray.data.sources import open_source

    root = tmp_path / "imgs"
    for c, n in (("a", 8), ("b", 7)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 30), (30 * i, 0, 200 if c == "a" else 50)).save(root / c / f"{i}.png")
    (root / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff truncated")  # row 15 in sorted order
    cfg = load_config(None, tiny_overrides(tmp_path, "folder", **{
        "data.train": str(root), "data.limit": "null", "optim.batch_size_per_worker": 8,
        "optim.steps_per_epoch": 2, "optim.epochs": 1}))
    src = open_source(str(root))
    reporter = get_report_actor("folder-test")
    try:
        batches = list(iter_batches(cfg, src, reporter=reporter))
        assert len(batches) == 2
        rows = torch.cat([b["row"] for b in batches]).tolist()
        labels = torch.cat([b["label"] for b in batches]).tolist()
        assert batches[0]["global_crops"].shape == (8, 2, 3, 16, 16)
        assert batches[0]["local_crops"].shape == (8, 2, 3, 8, 8)
        assert set(rows) == set(range(15))  # the bad row's place taken by a repeat
        assert labels == [0 if r < 8 else 1 for r in rows]
        summary = ray.get(reporter.summary.remote())
        assert summary["skipped"] == 1 and str(root / "b" / "bad.jpg") in summary["rows"]
    finally:
        ray.kill(reporter)


@pytest.mark.timeout(300)
def test_non_finite_loss_on_ray_ends_the_run_at_once_and_is_not_retried(tmp_path, capsys):
    """A recipe NaN: the teacher temperature ramps from 0.07 to 1e-40 over 0.75 epochs (8 steps
    of 2 x 32 per epoch), so global step 6 divides the teacher logits by 1e-40 (inf -> nan) on
    every rank. With run.max_failures=2 a retry from the step-4 checkpoint would repeat it: the
    run ends after ONE attempt, exit code 3 naming the step, the step-4 checkpoint intact."""
    from massl_ray.cli import main as cli_main
    from massl_ray.method.checkpoint import latest_valid_checkpoint, list_checkpoints

    run_dir = tmp_path / "nan"
    over = tiny_overrides(tmp_path, "nan", **{
        "run.num_workers": 2, "run.max_failures": 2, "run.log_every_steps": 2,
        "run.checkpoint_every_steps": 4, "massl.warmup_teacher_temp": 0.07,
        "massl.teacher_temp": 1e-40, "massl.warmup_teacher_temp_epochs": 0.75})
    rc = cli_main(["train", *over])
    err = capsys.readouterr().err
    assert rc == 3, err[-3000:]
    assert "training stopped: non-finite loss (nan) at global step 6" in err
    starts = [json.loads(x) for x in (run_dir / "workers" / "starts.jsonl").read_text().splitlines()]
    assert sorted(s["rank"] for s in starts) == [0, 1], f"retried: {starts}"
    # Logged: 2, 4, 6 steps done (the NaN step, index 6, would have been the 7th), each once;
    # the newest checkpoint is step 4's, intact (sha256), loadable and finite.
    logged = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6]
    assert len(list_checkpoints(run_dir)) == 1
    last = latest_valid_checkpoint(run_dir)
    state = load_checkpoint(last)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert torch.isfinite(state["memory"]["rows"]).all()


def test_a_cpu_split_that_would_starve_the_data_feed_is_refused(tmp_path):
    """The feed needs one read or decode task at a time beside the workers: a split leaving
    less would hang silently."""
    from massl_ray.data.pipeline import check_resources

    cfg = load_config(None, tiny_overrides(tmp_path, "cpus", **{"data.decode_cpus": 0.5,
                                                                 "data.read_cpus": 0.25}))
    check_resources(cfg, 1.5)  # 1 train CPU + 0.5 for a decode task
    with pytest.raises(ValueError, match=r"the data feed needs 0\.5 more \(a read task "
                                         r"data\.read_cpus=0\.25 or a decode task "
                                         r"data\.decode_cpus=0\.5 at a time\), but the "
                                         r"cluster has 1\.4 CPUs"):
        check_resources(cfg, 1.4)
    two = load_config(None, tiny_overrides(tmp_path, "cpus2", **{"run.num_workers": 2}))
    with pytest.raises(ValueError, match="2 x run.cpus_per_worker=1"):
        check_resources(two, 2.0)
    check_resources(two, 3.0)
