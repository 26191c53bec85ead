"""Ray integration tests on CPU: 1 and 2 workers, resume, failure recovery, corrupt rows.

One Ray instance for the module (4 logical CPUs on this 2-core machine, so two train workers
and a decode task fit), tiny models, a few hundred images, a timeout on each test.
"""

from __future__ import annotations

import io
import json
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


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for part in ("student", "teacher", "memory"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys() and len(oa) > 0
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), f"optimizer state {i}.{k} differs"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkilled_run_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, workers):
    """Exact data order: a worker SIGKILLed mid-epoch (step 7; checkpoints at 4 and 8) restarts
    through FailureConfig from step 4, re-reads nothing it had not reached and ends - across an
    epoch boundary (256 rows = 8 steps of 32 per epoch with one worker, 4 with two) - with the
    student, teacher, memory bank and optimizer of the uninterrupted run, bit for bit (drop path
    is on: the randomness is keyed too). The reference for one worker is the local (no Ray) mode,
    so the Ray pipeline also delivers exactly the local mode's batches."""
    common = {"run.num_workers": workers, "run.max_steps": 12, "data.limit": 256,
              "optim.epochs": 3}
    ref_over = tiny_overrides(tmp_path, "ref", **common)
    ref = train(load_config(None, ref_over), local=workers == 1)
    kill_over = tiny_overrides(tmp_path, "killed", **common, **{
        "run.max_failures": 1, "run.fault_injection_step": 7, "run.fault_injection_mode": "kill"})
    res = train(load_config(None, kill_over))
    assert (tmp_path / "killed" / ".fault_injected_7").exists(), "the worker was not killed"
    assert res["metrics"]["start_step"] == 4 and res["metrics"]["step"] == 12
    a, b = load_checkpoint(ref["checkpoint"]), load_checkpoint(res["checkpoint"])
    assert a["global_step"] == 12
    _assert_states_equal(a, b)


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
def test_ray_data_pipeline_reads_class_folders(tmp_path):
    from PIL import Image

    from massl_ray.data.pipeline import build_train_dataset, get_report_actor
    from massl_ray.data.sources import open_source

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 30), (40 * i, 0, 200)).save(root / c / f"{i}.png")
    (root / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff truncated")
    cfg = load_config(None, tiny_overrides(tmp_path, "folder", **{"data.train": str(root),
                                                                  "data.limit": "null"}))
    src = open_source(str(root))
    reporter = get_report_actor("folder-test")
    try:
        rows = list(build_train_dataset(cfg, src, reporter).iter_rows())
        assert len(rows) == 12
        assert rows[0]["global_crops"].shape == (2, 3, 16, 16)
        assert rows[0]["local_crops"].shape == (2, 3, 8, 8)
        assert sorted(r["label"] for r in rows) == [0] * 6 + [1] * 6
        summary = ray.get(reporter.summary.remote())
        assert summary["skipped"] == 1 and str(root / "b" / "bad.jpg") in summary["rows"]
    finally:
        ray.kill(reporter)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("cache_encoded", [False, True])
def test_train_dataset_is_cut_into_blocks_and_keeps_every_row(tmp_path, cache_encoded):
    """A single Parquet file must not become one decode task: after the shuffle the rows are
    cut into blocks of data.rows_per_block, every row still arrives once per pass."""
    from collections import Counter

    from massl_ray.data.pipeline import build_train_dataset
    from massl_ray.data.sources import open_source

    cfg = load_config(None, tiny_overrides(tmp_path, "blocks", **{
        "data.cache_encoded": cache_encoded}))  # default rows_per_block: one decode batch (64)
    src = open_source(str(QUICK))
    want = Counter(pq.read_table(QUICK, columns=["label"]).column("label")
                   .to_numpy()[:512].tolist())
    ds = build_train_dataset(cfg, src)
    orders = []
    for _ in range(2):  # two passes, as two epochs
        mat = ds.materialize()
        assert mat.num_blocks() >= 8
        labels = [int(x) for b in mat.iter_batches(batch_size=None) for x in b["label"]]
        assert Counter(labels) == want
        orders.append(labels)
    assert orders[0] != orders[1]  # a fresh shuffle each pass


@pytest.mark.timeout(240)
def test_step_dataset_delivers_each_steps_batch_in_step_order(tmp_path):
    """The exact order's Ray Data path: one block per step, in step order, each block exactly
    the batch the in-process step_batch makes for (epoch, step, rank) - across an epoch end."""
    from massl_ray.data.pipeline import build_step_dataset
    from massl_ray.data.multicrop import MultiCrop
    from massl_ray.data.order import RowStore, epoch_order, step_batch
    from massl_ray.data.sources import open_source

    cfg = load_config(None, tiny_overrides(tmp_path, "steps", **{
        "run.num_workers": 2, "data.limit": 256, "optim.steps_per_epoch": 4}))
    src = open_source(str(QUICK))
    ds = build_step_dataset(cfg, src, rank=1, start_step=2, num_steps=5)  # epochs 0 and 1
    got = list(ds.iter_batches(batch_size=32, batch_format="numpy"))
    assert len(got) == 5
    store, mc = RowStore(src, 256), MultiCrop(cfg.crops)
    for k, b in enumerate(got):
        epoch, step = divmod(2 + k, 4)
        want, _ = step_batch(store, mc, epoch_order(256, 0, epoch), 0, epoch, step, 1, 2, 32)
        for col in ("global_crops", "local_crops", "label"):
            assert np.array_equal(b[col], want[col]), (k, col)


@pytest.mark.timeout(240)
def test_non_finite_loss_on_a_ray_worker_stops_the_run_naming_the_step(tmp_path, capsys):
    from massl_ray.cli import main as cli_main

    # An absurd learning rate (no clipping) blows the weights up after the first step.
    over = tiny_overrides(tmp_path, "nan", **{"optim.lr": 1e30, "optim.clip_grad": 0,
                                              "optim.warmup_epochs": 0})
    rc = cli_main(["train", *over])
    assert rc == 3
    err = capsys.readouterr().err
    assert "training stopped: non-finite loss (nan) at global step 1" in err
    assert not list((tmp_path / "nan").glob("checkpoint_*/meta.json"))  # nothing non-finite saved


def test_a_cpu_split_that_would_starve_ray_data_is_refused(tmp_path):
    """Ray Data's read/shuffle tasks take a whole CPU: a split leaving less would hang silently."""
    from massl_ray.data.pipeline import check_resources

    cfg = load_config(None, tiny_overrides(tmp_path, "cpus", **{"data.decode_cpus": 0.5}))
    check_resources(cfg, 2.0)  # 1 train CPU + 1 for Ray Data
    with pytest.raises(ValueError, match=r"Ray Data needs 1 more .* the cluster has 1\.5 CPUs"):
        check_resources(cfg, 1.5)
    two = load_config(None, tiny_overrides(tmp_path, "cpus2", **{"run.num_workers": 2}))
    with pytest.raises(ValueError, match="2 x run.cpus_per_worker=1"):
        check_resources(two, 2.0)
    check_resources(two, 3.0)
