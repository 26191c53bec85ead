"""Faults of the data feed on Ray (massl_ray/data/feed.py, massl_ray/data/pipeline.py): a
killed coordinator or decode report restarts and the ranks get exactly the uninterrupted
batches; a decode task that hangs ends the rank's wait at data.fetch_timeout_s with an error
naming the step, the rank and the decode task and row groups it waited for; a unit with no
readable row ends a training run at once (exit code 3, no retry)."""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from massl_ray.config import Config, CropConfig, apply_overrides
from massl_ray.data.groups import LocalFeed
from massl_ray.data.multicrop import MultiCrop
from massl_ray.data.plan import EpochPlan
from massl_ray.data.sources import open_source
from massl_ray.method.checkpoint import load_checkpoint

pytestmark = pytest.mark.ray

CROPS = CropConfig(global_size=8, local_size=4, num_local_crops=1)
GROUP_ROWS, GROUPS, SEED, WINDOW = 20, 6, 7, 2  # 120 rows in 6 row groups, windows of 2 groups
COLS = ("global_crops", "local_crops", "label", "row")


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _data(tmp_path: Path, bad=()):
    n = GROUP_ROWS * GROUPS
    imgs = [b"not an image %d" % i if i in bad else _png(i) for i in range(n)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()),
                             "label": pa.array(np.arange(n) // GROUP_ROWS, pa.int64())}),
                   path, row_group_size=GROUP_ROWS)
    return open_source(str(path))


def _plan(epoch: int = 0) -> EpochPlan:
    return EpochPlan([GROUP_ROWS] * GROUPS, SEED, epoch, WINDOW)


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.05)


def _cfg(src, world: int, decode_rows: int, fetch_timeout_s: float):
    """A run's config for start_feed: 12 rows a step (12 / world per rank), 10 steps. Its
    read and decode tasks take 2 of the test Ray's 4 CPUs: two at a time, so that few worker
    processes start (each imports torch: tens of seconds on a busy machine)."""
    cfg = apply_overrides(Config(), [
        f"data.train={src.files[0]}", "crops.global_size=8", "crops.local_size=4",
        "crops.num_local_crops=1", f"optim.batch_size_per_worker={12 // world}",
        f"run.num_workers={world}", "optim.steps_per_epoch=10", "optim.epochs=1",
        f"run.seed={SEED}", f"data.window_groups={WINDOW}", f"data.decode_rows={decode_rows}",
        "data.prefetch_tasks=2", "data.decode_cpus=2", "data.read_cpus=2",
        f"data.fetch_timeout_s={fetch_timeout_s}"])
    assert cfg.crops == CROPS and cfg.global_batch_size == 12 and cfg.total_steps() == 10
    return cfg


@pytest.mark.timeout(600)
def test_killed_coordinator_and_report_restart_and_the_ranks_get_the_uninterrupted_batches(
        tmp_path, ray_instance):
    """Two ranks (12 rows a step, 10 steps, two steps per decode task) read the feed that
    start_feed makes for a run. After step 3 the coordinator and the decode report are killed
    with restarts allowed (``ray.kill(..., no_restart=False)``), while each rank holds the
    coordinator's answers for steps 4 and 5, whose decode task had not finished (a test hook
    holds it until the kill). Each rank finds those pieces gone (their owner died), requests
    step 4 once more and gets, like every other step, exactly the in-process feed's batch
    (bitwise, crops included). The restarted coordinator started at step 4 (position 48,
    inside window 1): it decoded nothing before it and read only the row groups of windows 1
    and 2, once each. The restarted report lists the undecodable row met after the restart,
    not the one before (its summary says it is incomplete), and kept the non-finite stop
    recorded before the kill."""
    import ray

    from massl_ray.data.feed import RankFeed, start_feed
    from massl_ray.data.pipeline import get_report_actor

    kill_at, batch, world, spe = 4, 12, 2, 10
    plan = _plan()
    bad_before, bad_after = int(plan.row_at(5)), int(plan.row_at(100))  # steps 0 and 8
    src = _data(tmp_path, bad={bad_before, bad_after})
    cfg = _cfg(src, world, decode_rows=24, fetch_timeout_s=600)
    local = LocalFeed(src, MultiCrop(CROPS), SEED, batch, spe, window_groups=WINDOW,
                      decode_rows=24)
    want = [list(local.batches(0, 0, r, world)) for r in range(world)]
    assert [len(w) for w in want] == [spe, spe]
    release = str(tmp_path / "released")

    def decode_held_until_the_kill(task, crops, seed, epoch, reporter, *parts):
        # Runs in a Ray worker (a local function: pickled by value).
        import os
        import time

        from massl_ray.data.feed import _decode_task

        deadline = time.monotonic() + 120
        while (task.start <= kill_at * batch < task.stop and not os.path.exists(release)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        return _decode_task(task, crops, seed, epoch, reporter, *parts)

    reporter = get_report_actor(f"faults-{tmp_path.name}")
    coord = start_feed(cfg, src, reporter, decode_fn=decode_held_until_the_kill)
    try:
        feeds = [RankFeed(coord, r, world, lookahead=2) for r in range(world)]
        its = [f.iter_steps(0, spe) for f in feeds]
        got: list = [[], []]
        for s in range(spe):
            if s == kill_at:
                # The ranks' requests so far (steps 4 and 5 included) were made from this
                # process before this call: the coordinator has answered them when it returns.
                before = ray.get(coord.stats.remote())
                summary = ray.get(reporter.summary.remote())
                assert set(summary["rows"]) == {f"{src.files[0]}#{bad_before}"}
                for r in range(world):  # a worker stopped at a NaN: recorded before the kill
                    ray.get(reporter.record_non_finite.remote(3, float("nan"), r))
                ray.kill(coord, no_restart=False)
                ray.kill(reporter, no_restart=False)
                Path(release).touch()
            for r in range(world):
                got[r].append(next(its[r]))
        for r in range(world):
            assert next(its[r], None) is None
            for s in range(spe):
                for k in COLS:
                    assert np.array_equal(want[r][s][k], got[r][s][k].numpy()), (r, s, k)
        assert [f.retries for f in feeds] == [1, 1]
        assert [f.fetch_timeout_s for f in feeds] == [600.0, 600.0]  # the run's, handed on

        assert before["restarted"] is False and before["resets"] == [[0, world]]
        after = ray.get(coord.stats.remote())
        assert after["restarted"] is True
        assert after["resets"] == [[kill_at, world]]
        pos = kill_at * batch
        assert after["decoded"] == [[0, pos, spe * batch, 0]]  # nothing before step 4
        assert plan.window_at(pos) == (1, 8)
        needed = set((plan.rows(pos, spe * batch) // GROUP_ROWS).tolist())
        assert needed == set(plan.window_groups_of(1).tolist() + plan.window_groups_of(2).tolist())
        assert after["reads_per_group"] == {0: [int(g in needed) for g in range(GROUPS)]}

        summary = ray.get(reporter.summary.remote())
        assert set(summary["rows"]) == {f"{src.files[0]}#{bad_after}"}
        assert summary["skipped"] == 1 and summary["complete"] is False
        assert summary["restarted"] is True
        ray.get(reporter.record_non_finite.remote(3, float("nan"), 1))  # a retried call: once
        nf = ray.get(reporter.non_finite.remote())
        assert nf["step"] == 3 and math.isnan(nf["value"]) and nf["ranks"] == [0, 1]
    finally:
        ray.kill(coord)
        ray.kill(reporter)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by the raylet) is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.timeout(600)
def test_a_hung_decode_task_fails_the_rank_at_the_fetch_timeout_naming_step_rank_and_row_groups(
        tmp_path, ray_instance):
    """The decode task of global step 3 (positions 36..47: one step per task) blocks forever
    (the coordinator's test hook replaces the decode function; the others decode as usual).
    The rank gets steps 0-2, then, once its wait for step 3 passes the fetch timeout (the run's
    data.fetch_timeout_s, 300 s, handed on by the coordinator; shortened to 5 s once that task
    runs), raises FeedTimeout naming global step 3, rank 0, the decode task's
    positions and the row groups that feed it, and saying Ray Train retries it; the hung task
    is cancelled (its worker process ends while the coordinator is still alive)."""
    import ray

    from massl_ray.data.feed import FeedTimeout, RankFeed, start_feed

    src = _data(tmp_path)
    batch, spe, hang_step = 12, 10, 3
    pid_file = str(tmp_path / "hung_pid")

    def decode_or_hang(task, crops, seed, epoch, reporter, *parts):
        # Runs in a Ray worker (pickled by value: a local function).
        import os
        import threading

        from massl_ray.data.feed import _decode_task

        if task.start == hang_step * batch:
            with open(pid_file, "w") as f:
                f.write(str(os.getpid()))
            threading.Event().wait()  # forever
        return _decode_task(task, crops, seed, epoch, reporter, *parts)

    coord = start_feed(_cfg(src, 1, decode_rows=batch, fetch_timeout_s=300), src,
                       decode_fn=decode_or_hang)
    try:
        feed = RankFeed(coord, 0, 1, lookahead=2)
        got = []
        with pytest.raises(FeedTimeout) as err:
            for b in feed.iter_steps(0, spe):
                got.append(b)
                if len(got) == hang_step:  # step 3's task runs (and hangs): a short wait
                    assert feed.fetch_timeout_s == 300.0  # the run's, handed on
                    _wait_until(lambda: Path(pid_file).exists(), 300, "step 3's decode task")
                    feed.fetch_timeout_s = 5.0
        assert len(got) == hang_step
        e = err.value
        assert (e.step, e.rank) == (hang_step, 0)
        msg = str(e)
        lo, hi = hang_step * batch, (hang_step + 1) * batch
        groups = sorted(set((_plan().rows(lo, hi) // GROUP_ROWS).tolist()))
        assert "rank 0 of 1 waited 5 s (data.fetch_timeout_s)" in msg
        assert "global step 3" in msg
        assert f"positions {lo}..{hi - 1}" in msg
        assert f"row group(s) {', '.join(map(str, groups))} of {GROUPS}" in msg
        assert f"{src.files[0]} row group {groups[0]}" in msg
        assert "Ray Train restarts the worker group from the last checkpoint" in msg
        assert e.waiting_for in msg
        # The hung task's worker is gone (cancelled by the rank), the coordinator still alive.
        pid = int(Path(pid_file).read_text())
        _wait_until(lambda: not _pid_alive(pid), 60, f"the hung decode task's worker {pid} "
                    "to end")
        assert ray.get(coord.stats.remote())["restarted"] is False
    finally:
        ray.kill(coord)


@pytest.mark.timeout(600)
def test_a_unit_with_no_readable_row_ends_the_run_at_once_on_ray_and_a_corrupt_row_group_is_skipped(
        tmp_path, ray_instance, capsys):
    """Deterministic data errors on Ray: 2 workers, 4 rows each a step, storage order, one
    decode unit per rank slice, Parquet row groups of 2 rows with corrupted pages (valid
    footer) in row group 1 (rows 2-3: half of step 0's rank-0 unit: skipped, named
    ``<file>#rg1``, the unit refilled with rows 0-1) and row groups 10-11 (rows 20-23: all of
    step 2's rank-1 unit, while rank 0 has its rows and waits in the step's all-reduce). With
    run.max_failures=2 the run ends after ONE attempt (one start per rank), exit code 3 naming
    the step, the unit and a row group; the step-2 checkpoint intact."""
    from massl_ray.cli import main as cli_main
    from massl_ray.method.checkpoint import latest_valid_checkpoint, list_checkpoints
    from test_bad_inputs import _corrupt_page

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image": pa.array([_png(i) for i in range(48)], pa.binary())}),
                   path, row_group_size=2)
    for g in (1, 10, 11):
        _corrupt_page(path, g)
    o = {"model.arch": "vit_micro", "model.patch_size": 4, "model.depth": 1,
         "model.head_hidden_dim": 32, "model.head_out_dim": 16, "crops.global_size": 16,
         "crops.local_size": 8, "crops.num_local_crops": 1, "massl.memory_size": 64,
         "massl.block_size": 16, "optim.batch_size_per_worker": 4, "optim.epochs": 1,
         "data.train": str(path), "data.shuffle": "none", "data.decode_rows": 4,
         "run.name": "bad", "run.storage_path": str(tmp_path), "run.log_every_steps": 1,
         "run.checkpoint_every_steps": 2, "run.final_knn": False, "run.num_workers": 2,
         "run.max_failures": 2, "run.cpus_per_worker": 1, "data.decode_cpus": 1,
         "run.record_rows": True}
    rc = cli_main(["train", *[f"{k}={v}" for k, v in o.items()]])
    err = capsys.readouterr().err
    assert rc == 3, err[-3000:]
    assert (f"training stopped: epoch 0 step 2: none of the 4 rows of its unit 1 (positions "
            f"20..23) could be decoded or read (e.g. {path}#rg10: unreadable: OSError: ") in err
    run_dir = tmp_path / "bad"
    starts = (run_dir / "workers" / "starts.jsonl").read_text().splitlines()
    assert sorted(json.loads(s)["rank"] for s in starts) == [0, 1], f"retried: {starts}"
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            ] == [1, 2]
    assert len(list_checkpoints(run_dir)) == 1
    assert load_checkpoint(latest_valid_checkpoint(run_dir))["global_step"] == 2
    skipped = json.loads((run_dir / "decode_errors.json").read_text())["rows"]
    assert skipped[f"{path}#rg1"].startswith("unreadable: OSError: ")
    rows0 = [json.loads(x) for x in (run_dir / "workers" / "rows_rank0.jsonl").read_text()
             .splitlines()]
    assert rows0[0]["step"] == 0 and rows0[0]["rows"] == [0, 1, 0, 1]  # refilled


@pytest.mark.timeout(300)
def test_a_rank_asking_first_for_a_step_whose_piece_is_in_a_later_task_gets_it(
        tmp_path, ray_instance):
    """With one rank's batch per decode task, step 0's pieces come from two tasks; with one
    task of prefetch, rank 1 asking first used to find only rank 0's piece submitted (a
    KeyError in the coordinator that failed a loaded CI run's first attempt)."""
    import ray

    from massl_ray.data.feed import RankFeed, start_feed

    src = _data(tmp_path)
    cfg = _cfg(src, 2, decode_rows=6, fetch_timeout_s=300)
    coord = start_feed(cfg, src, prefetch_tasks=1)
    try:
        one = next(RankFeed(coord, 1, 2, lookahead=1).iter_steps(0, 1))  # rank 1 asks first
        zero = next(RankFeed(coord, 0, 2, lookahead=1).iter_steps(0, 1))
        assert one["global_crops"].shape[0] == zero["global_crops"].shape[0] == 6
    finally:
        ray.kill(coord)
