"""Ray integration tests on CPU: 1 and 2 workers, resume, failure recovery, corrupt rows.

One Ray instance for the module (4 logical CPUs on this 2-core machine, so two train workers
and a decode task fit), tiny models, a few hundred images, a timeout on each test.
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

from massl_ray.method.checkpoint import load_checkpoint  # noqa: E402
from massl_ray.config import load_config  # noqa: E402
from massl_ray.method.memory import MemoryBank  # noqa: E402
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


def initial_rows(cfg) -> torch.Tensor:
    return MemoryBank(cfg.massl.memory_size, cfg.model.head_out_dim, seed=cfg.run.seed).rows


@pytest.mark.timeout(300)
def test_one_worker_trains_and_checkpoints(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "w1", **{"run.max_steps": 8}))
    res = train(cfg)
    assert res["mode"] == "ray"
    assert res["metrics"]["step"] == 8
    assert np.isfinite(res["metrics"]["loss"])
    state = load_checkpoint(res["checkpoint"])
    assert state["global_step"] == 8
    assert int(state["memory"]["ptr"]) == (8 * 32) % 2048
    run_dir = tmp_path / "w1"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [4, 8]
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


@pytest.mark.timeout(480)
def test_two_workers_identical_memory_then_resume(tmp_path):
    # 512 rows / (2 x 32) = 8 steps per epoch; stop at 8, then resume to 12 in a second fit().
    over = tiny_overrides(tmp_path, "w2", **{"run.num_workers": 2, "run.max_steps": 8})
    cfg = load_config(None, over)
    res = train(cfg)
    m = res["metrics"]
    assert m["step"] == 8
    assert m["memory_replicas_identical"] is True
    assert len(m["memory_checksums"]) == 2 and m["memory_checksums"][0] == m["memory_checksums"][1]
    first = load_checkpoint(res["checkpoint"])
    assert int(first["memory"]["ptr"]) == 8 * 64 % 2048

    cfg2 = load_config(None, tiny_overrides(tmp_path, "w2", **{"run.num_workers": 2,
                                                               "run.max_steps": 12}))
    res2 = train(cfg2)
    m2 = res2["metrics"]
    assert m2["start_step"] == 8, "the second fit() must resume at the saved global step"
    assert m2["step"] == 12
    assert m2["memory_replicas_identical"] is True
    second = load_checkpoint(res2["checkpoint"])
    # The saved bank was restored: rows written before the resume are still there ...
    torch.testing.assert_close(second["memory"]["rows"][:512], first["memory"]["rows"][:512],
                               rtol=0, atol=0)
    # ... steps 8..11 wrote rows 512..767, and the untouched tail is still the initial noise.
    assert not torch.equal(second["memory"]["rows"][512:768], first["memory"]["rows"][512:768])
    torch.testing.assert_close(second["memory"]["rows"][768:], initial_rows(cfg2)[768:],
                               rtol=0, atol=0)
    assert int(second["memory"]["ptr"]) == 12 * 64


@pytest.mark.timeout(480)
@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_failure_is_recovered_from_checkpoint(tmp_path, mode):
    # Checkpoints at 4 and 8; the worker fails at step 10 on its first attempt only: an
    # exception, or SIGKILL of the worker process (no Python cleanup at all).
    over = tiny_overrides(tmp_path, "fail", **{"run.max_steps": 12, "run.max_failures": 1,
                                               "run.fault_injection_step": 10,
                                               "run.fault_injection_mode": mode})
    cfg = load_config(None, over)
    res = train(cfg)
    m = res["metrics"]
    assert m["step"] == 12
    assert m["start_step"] == 8, "the restarted worker group must resume from the step-8 checkpoint"
    assert (tmp_path / "fail" / ".fault_injected_10").exists()
    state = load_checkpoint(res["checkpoint"])
    assert state["global_step"] == 12
    rows = state["memory"]["rows"]
    init = initial_rows(cfg)
    # 12 steps x 32 keys = rows 0..383 written. Had the bank been re-initialised at the restart,
    # rows 0..255 (written before step 8) would be initial noise again.
    assert not torch.isclose(rows[:256], init[:256]).all(dim=1).any()
    torch.testing.assert_close(rows[384:], init[384:], rtol=0, atol=0)
    assert int(state["memory"]["ptr"]) == 12 * 32
    # Nothing written before the checkpoint was lost: rows 0..255 are exactly the step-8
    # checkpoint's (steps 8..11 wrote rows 256..383 only).
    step8 = [p for p in (tmp_path / "fail").glob("checkpoint_*") if (p / "meta.json").is_file()
             and json.loads((p / "meta.json").read_text())["global_step"] == 8]
    assert step8, "the step-8 checkpoint is kept (num_checkpoints_to_keep=2)"
    at8 = load_checkpoint(step8[0])
    torch.testing.assert_close(rows[:256], at8["memory"]["rows"][:256], rtol=0, atol=0)
    assert int(at8["memory"]["ptr"]) == 8 * 32


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


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The uninterrupted reference of the 1-worker SIGKILL tests: 12 steps in local mode (a
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


KILL_COMMON = {"run.max_steps": 12, "data.limit": 256, "optim.epochs": 3}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkilled_run_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, workers,
                                                                  local_reference):
    """Exact data order: a worker SIGKILLed at step 7 (checkpoints every 3 steps) restarts
    through FailureConfig from the step-6 checkpoint - mid-epoch for both worker counts (256
    rows = 8 steps of 32 per epoch with one worker, 4 steps of 2 x 32 with two: step 6 is
    epoch 0 position 6, or epoch 1 position 2) - re-reads nothing it had not reached and ends,
    across an epoch boundary, with the student, teacher, memory bank, optimizer and grad scaler
    of the uninterrupted run, bit for bit (drop path is on: the randomness is keyed too). The
    reference for one worker is the local (no Ray) mode, so the Ray pipeline also delivers
    exactly the local mode's batches; for two workers an uninterrupted 2-worker Ray run."""
    common = dict(KILL_COMMON, **{"run.num_workers": workers, "run.checkpoint_every_steps": 3})
    if workers == 1:
        ref_ckpt = local_reference[12]
    else:
        ref_ckpt = train(load_config(None, tiny_overrides(tmp_path, "ref", **common)))["checkpoint"]
    kill_over = tiny_overrides(tmp_path, "killed", **common, **{
        "run.max_failures": 1, "run.fault_injection_step": 7, "run.fault_injection_mode": "kill"})
    cfg = load_config(None, kill_over)
    res = train(cfg)
    assert (tmp_path / "killed" / ".fault_injected_7").exists(), "the worker was not killed"
    spe = cfg.optim.steps_per_epoch
    assert spe == 8 // workers
    assert res["metrics"]["start_step"] == 6 and 6 % spe != 0, "the resume point is mid-epoch"
    assert res["metrics"]["step"] == 12
    # The data feed restarted at step 6 with the same world size and decoded nothing of the
    # steps consumed before the checkpoint (positions are of the epoch: step 6 is epoch
    # 6 // spe, position (6 % spe) x the global batch).
    feed = json.loads((tmp_path / "killed" / "data_feed.json").read_text())
    assert feed["resets"] == [[0, workers], [6, workers]]
    epoch, pos = divmod(6, spe)[0], (6 % spe) * 32 * workers
    after = [d for d in feed["decoded"] if d[3] == 1]
    assert after[0][:2] == [epoch, pos], after
    assert all((e, lo) >= (epoch, pos) for e, lo, _, _ in after)
    a, b = load_checkpoint(ref_ckpt), load_checkpoint(res["checkpoint"])
    assert a["global_step"] == 12
    _assert_states_equal(a, b)


def _on_marker(marker: Path, action, timeout: float = 400.0):
    """Run ``action`` in a thread as soon as ``marker`` exists (the fault-injection marker is
    touched just before the worker kills itself; Ray needs seconds to restart the group)."""
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


@pytest.mark.timeout(600)
def test_ray_restart_skips_a_corrupt_newest_checkpoint_and_uses_the_previous(
        tmp_path, local_reference):
    """Checkpoints at 3, 6 and 9, the worker SIGKILLed at step 10, and - while Ray restarts the
    worker group - one byte of the newest checkpoint's state.pt (the one Ray Train registered
    last) flipped: the restarted group skips it (sha256 in meta.json) and resumes from step 6,
    ending bit for bit equal to the uninterrupted run."""
    from massl_ray.method.checkpoint import CheckpointError, STATE_FILE, verify_checkpoint

    run_dir = tmp_path / "corrupt"
    corrupted = []

    def corrupt_newest():
        d = _checkpoint_of_step(run_dir, 9)
        data = bytearray((d / STATE_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / STATE_FILE).write_bytes(bytes(data))
        corrupted.append(d)

    done = _on_marker(run_dir / ".fault_injected_10", corrupt_newest)
    res = train(load_config(None, tiny_overrides(tmp_path, "corrupt", **KILL_COMMON, **{
        "run.checkpoint_every_steps": 3, "run.num_checkpoints_to_keep": 5,
        "run.max_failures": 1, "run.fault_injection_step": 10,
        "run.fault_injection_mode": "kill"})))
    assert done.is_set(), "the worker was not killed (no marker)"
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(corrupted[0])  # the corruption is still there (5 are kept)
    assert res["metrics"]["start_step"] == 6, "must fall back from the corrupt 9 to 6"
    assert Path(res["checkpoint"]) != corrupted[0]
    assert res["metrics"]["step"] == 12
    _assert_states_equal(load_checkpoint(local_reference[12]), load_checkpoint(res["checkpoint"]))


@pytest.mark.timeout(600)
def test_ray_restart_uses_the_newest_checkpoint_on_disk_even_if_ray_train_never_registered_it(
        tmp_path, local_reference):
    """Ray Train registers the checkpoints of steps 4 and 8; the worker is SIGKILLed at step 10.
    While the group restarts, a complete checkpoint of step 9 appears in the run directory that
    Ray Train never registered (as when ``ray.train.report`` had persisted it and the worker
    died before the controller registered it; here the uninterrupted run's own step-9
    checkpoint). The restarted group resumes from step 9, not from Ray's step 8, and ends bit
    for bit equal to the uninterrupted run."""
    run_dir = tmp_path / "unreg"
    planted = run_dir / "checkpoint_unregistered_step9"

    def plant():
        shutil.copytree(local_reference[9], planted)

    done = _on_marker(run_dir / ".fault_injected_10", plant)
    res = train(load_config(None, tiny_overrides(tmp_path, "unreg", **KILL_COMMON, **{
        "run.checkpoint_every_steps": 4, "run.max_failures": 1,
        "run.fault_injection_step": 10, "run.fault_injection_mode": "kill"})))
    assert done.is_set(), "the worker was not killed (no marker)"
    assert res["metrics"]["start_step"] == 9, "must resume from the unregistered step-9 checkpoint"
    assert res["metrics"]["step"] == 12
    assert Path(res["checkpoint"]) != planted
    _assert_states_equal(load_checkpoint(local_reference[12]), load_checkpoint(res["checkpoint"]))


@pytest.mark.timeout(600)
def test_killed_driver_rerun_resumes_and_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    """Driver restart: the training command is SIGKILLed (the driver process: its Ray Train
    controller and workers go with it) once its first checkpoint exists, then the same command
    runs again with the same run name. It resumes from the newest checkpoint (run.resume=auto)
    and ends with exactly the state of an uninterrupted run (here the --local one)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    common = {"run.max_steps": 40, "data.limit": 256, "optim.epochs": 5,
              "run.checkpoint_every_steps": 8, "run.log_every_steps": 8}
    ref = train(load_config(None, tiny_overrides(tmp_path, "ref", **common)), local=True)
    over = tiny_overrides(tmp_path, "drv", **common)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "massl_ray", "train", *over]
    run_dir = tmp_path / "drv"
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(run_dir.glob("checkpoint_*/meta.json")):
            assert proc.poll() is None, "the first run ended before it was killed"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = [json.loads(p.read_text())["global_step"] for p in run_dir.glob("checkpoint_*/meta.json")]
    assert max(done) < 40, "the first run must not have finished"
    time.sleep(2)  # let Ray reap the dead driver's actors
    second = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming run 'drv' from" in second.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["start_step"] == max(done) and summary["metrics"]["step"] == 40
    _assert_states_equal(load_checkpoint(ref["checkpoint"]), load_checkpoint(summary["checkpoint"]))


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
    and the memory replicas stay identical."""
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
                                                  "optim.epochs": 1, "run.num_workers": workers,
                                                  "run.checkpoint_every_steps": 100})
    res = train(load_config(None, over))
    assert res["metrics"]["step"] == 6 // workers
    assert res["metrics"]["memory_replicas_identical"] is True
    assert res["skipped_images"] == 3
    report = json.loads((tmp_path / "corrupt" / "decode_errors.json").read_text())
    assert report["skipped"] == 3 and len(report["rows"]) == 3


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
