"""Spot-ready training without Ray: the control points (preemption polls and time-based
checkpoints agreed by all ranks), restarts that read a checkpoint once (rank 0 reads, the
others receive it over a real gloo group), log copies on an object-store URI, and resource
checks that leave room for an autoscaler."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import make_crops, make_tiny_config
from massl_ray.config import ConfigError
from massl_ray.method.checkpoint import (READ_BYTES, STATE_FILE, load_checkpoint,
                                        load_latest_valid_checkpoint, save_checkpoint)
from massl_ray.method.learner import Learner
from massl_ray.train.loop import ControlPoints, LoopContext, run_loop


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Rank0Ctx(LoopContext):
    """What the control points see on rank 0: notices from a script, agree = identity."""

    def __init__(self, notices=None, rank=0, rank0_values=None):
        self.rank = rank
        self.notices = notices or {}
        self.polls = []
        self.agreed = []
        self.rank0_values = rank0_values  # what "rank 0" broadcasts, for a non-zero rank

    def batches(self, epoch, skip):  # pragma: no cover - not used here
        raise NotImplementedError

    def latest_state(self):  # pragma: no cover
        return None

    def report(self, metrics, state):  # pragma: no cover
        pass

    def preemption_notice(self):
        self.polls.append(self.step)
        return self.notices.get(self.step)

    def agree(self, values):
        self.agreed.append(list(values))
        return list(values) if self.rank0_values is None else self.rank0_values.pop(0)


def _drive(cp: ControlPoints, ctx: Rank0Ctx, clock: FakeClock, steps: int, step_s: float):
    reasons = {}
    for step in range(steps):
        ctx.step = step
        if cp.due(step):
            r = cp.decide(step, ctx)
            if r:
                reasons[step] = r
                cp.checkpointed()
        clock.t += step_s
    return reasons


def test_control_points_poll_about_every_interval_whatever_the_step_time():
    for step_s, expect_gap in ((0.01, 500), (0.5, 10), (7.0, 1)):
        clock = FakeClock()
        cp = ControlPoints(0, every_s=5.0, poll=True, checkpoint_every_s=0, clock=clock)
        ctx = Rank0Ctx()
        _drive(cp, ctx, clock, 2000, step_s)
        gaps = [b - a for a, b in zip(ctx.polls[1:], ctx.polls[2:])]
        assert gaps and set(gaps) == {expect_gap}, (step_s, gaps[:5])
        assert len(ctx.polls) == len(ctx.agreed)  # one broadcast per poll
    # capped at max_gap steps for very fast steps
    clock = FakeClock()
    cp = ControlPoints(0, every_s=5.0, poll=True, checkpoint_every_s=0, max_gap=100, clock=clock)
    ctx = Rank0Ctx()
    _drive(cp, ctx, clock, 1000, 1e-4)
    assert max(b - a for a, b in zip(ctx.polls, ctx.polls[1:])) == 100


def test_a_notice_checkpoints_the_step_at_which_it_is_seen_once_per_notice():
    clock = FakeClock()
    cp = ControlPoints(0, every_s=1.0, poll=True, checkpoint_every_s=0, clock=clock)
    notice = {"node": "a"}
    # the notice stays up (as Ray's does) from step 40 until the run restarts
    ctx = Rank0Ctx(notices={s: notice for s in range(40, 200)})
    reasons = _drive(cp, ctx, clock, 200, 0.1)
    first_poll_after = min(s for s in ctx.polls if s >= 40)
    assert reasons == {first_poll_after: "preemption"}
    assert first_poll_after - 40 <= 10  # within one control interval (1 s of 0.1 s steps)
    ctx2 = Rank0Ctx(notices={**{s: notice for s in range(40, 100)},
                             **{s: {"node": "b"} for s in range(100, 200)}})
    cp2 = ControlPoints(0, every_s=1.0, poll=True, checkpoint_every_s=0, clock=(c := FakeClock()))
    assert list(_drive(cp2, ctx2, c, 200, 0.1).values()) == ["preemption", "preemption"]


def test_time_based_checkpoints_follow_rank_0_and_need_no_polling():
    clock = FakeClock()
    cp = ControlPoints(0, every_s=6.0, poll=False, checkpoint_every_s=60.0, clock=clock)
    ctx = Rank0Ctx()
    reasons = _drive(cp, ctx, clock, 1000, 1.0)
    assert not ctx.polls  # polling off: no barrier at all
    steps = sorted(reasons)
    assert all(r == "time" for r in reasons.values())
    assert [b - a for a, b in zip(steps, steps[1:])] == [60] * (len(steps) - 1)
    # a non-zero rank takes rank 0's decisions, whatever its own clock says
    clock = FakeClock()
    cp = ControlPoints(0, every_s=6.0, poll=False, checkpoint_every_s=60.0, clock=clock)
    told = [[3, 0], [3, 1], [2, 0]]
    ctx = Rank0Ctx(rank=1, rank0_values=list(told))
    reasons = _drive(cp, ctx, clock, 8, 100.0)  # its own clock would checkpoint every time
    assert reasons == {3: "time"} and [len(ctx.agreed)] == [3]


def test_control_points_are_off_without_polling_or_a_time_interval():
    cp = ControlPoints.from_config(make_tiny_config("run.preemption_check_seconds=0"), 0)
    assert not cp.due(0) and not cp.due(10**6)
    cp = ControlPoints.from_config(make_tiny_config("run.preemption_check_seconds=0",
                                                    "run.checkpoint_every_minutes=2"), 0)
    assert cp.due(0) and not cp.poll and cp.every_s == 12.0


class SyntheticCtx(LoopContext):
    """One process; batches of random crops; a preemption notice from ``notice_from`` on."""

    def __init__(self, cfg, run_dir, notice_from):
        self.cfg, self.run_dir, self.notice_from = cfg, run_dir, notice_from
        self.step = 0
        self.saved = []
        self.polled = []

    def batches(self, epoch, skip):
        for s in range(skip, self.cfg.optim.steps_per_epoch):
            g, loc = make_crops(self.cfg, seed=epoch * 100 + s)
            self.step = epoch * self.cfg.optim.steps_per_epoch + s
            yield {"global_crops": g, "local_crops": loc}

    def latest_state(self):
        return None

    def report(self, metrics, state):
        if state is not None:
            self.saved.append(int(state["global_step"]))

    def preemption_notice(self):
        self.polled.append(self.step)
        return "node-1" if self.step >= self.notice_from else None


def test_the_loop_checkpoints_the_step_after_a_notice_and_logs_why(tmp_path):
    cfg = make_tiny_config("run.checkpoint_every_steps=15", "run.preemption_check_seconds=1e-9",
                           "optim.epochs=2", "run.final_knn=false")
    ctx = SyntheticCtx(cfg, tmp_path, notice_from=7)
    run_loop(cfg, ctx)
    # polled before every step (the interval is below one step); the notice seen before step
    # 7 makes step 7 a checkpoint (state after 8 steps); then the interval one and the final
    assert ctx.polled == list(range(20))
    assert ctx.saved == [8, 15, 20]
    recs = [json.loads(line) for line in (tmp_path / "checkpoints.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reason"]) for r in recs] == [(8, "preemption"), (15, "interval"),
                                                       (20, "final")]
    assert all(r["stall_s"] >= 0 for r in recs)


# ---- restarts that read the checkpoint once ----------------------------------------------

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    cfg = make_tiny_config()
    learner = Learner(cfg)
    root = tmp_path_factory.mktemp("run")
    dirs = []
    for step in (1, 2):
        learner.step(*make_crops(cfg, seed=step))
        d = root / f"checkpoint_{step:09d}"
        save_checkpoint(learner.state_dict(), d)
        dirs.append(d)
    return root, dirs


def test_a_checkpoint_is_verified_and_loaded_in_one_read(saved_run):
    root, (old, new) = saved_run
    size = (new / STATE_FILE).stat().st_size
    before = READ_BYTES["state"]
    found, state = load_latest_valid_checkpoint(root)
    assert found == new and state["global_step"] == 2
    assert READ_BYTES["state"] - before == size  # one read: hashed and unpickled from memory
    before = READ_BYTES["state"]
    assert load_checkpoint(old)["global_step"] == 1
    assert READ_BYTES["state"] - before == (old / STATE_FILE).stat().st_size


def test_the_newest_good_checkpoint_wins_and_a_broken_newer_one_is_skipped(tmp_path, saved_run,
                                                                          caplog):
    import shutil

    root, (old, new) = saved_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    data = bytearray((run / new.name / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / new.name / STATE_FILE).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="massl_ray"):
        found, state = load_latest_valid_checkpoint(run)
    assert found == run / old.name and state["global_step"] == 1
    assert "sha256" in caplog.text
    # the driver's run.resume path is taken when it is at least as new as the run's own
    found, state = load_latest_valid_checkpoint(run, newer_than=new)
    assert found == new and state["global_step"] == 2
    found, _ = load_latest_valid_checkpoint(run / "nothing", newer_than=None)
    assert found is None


def _restore_rank(rank: int, init_file: str, ckpt_root: str, out_dir: str) -> None:
    """A rank of the restore test: rank 0 reads, every rank receives (the Ray worker's path)."""
    import datetime

    import torch.distributed as dist

    from massl_ray.method import checkpoint as ck
    from massl_ray.method.distributed import broadcast_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        before = ck.READ_BYTES["state"]
        state = None
        if rank == 0:
            _, state = ck.load_latest_valid_checkpoint(Path(ckpt_root))
        state = broadcast_state(state, src=0)
        read = ck.READ_BYTES["state"] - before
        none = broadcast_state(None, src=0)
        torch.save(state, Path(out_dir, f"state{rank}.pt"))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"read": read,
                                                                  "none": none is None}))
    finally:
        dist.destroy_process_group()


def _equal(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.timeout(120)
def test_two_ranks_restore_from_one_read_and_get_identical_states(tmp_path, saved_run):
    import torch.multiprocessing as mp

    root, (_, new) = saved_run
    mp.start_processes(_restore_rank, args=(str(tmp_path / "pg"), str(root), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["read"] == (new / STATE_FILE).stat().st_size
    assert got[1]["read"] == 0  # rank 1 read nothing from storage
    assert got[0]["none"] and got[1]["none"]  # "no state" travels as None
    s0 = torch.load(tmp_path / "state0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "state1.pt", weights_only=True)
    _equal(s0, s1)
    _equal(s0, load_checkpoint(new))
    cfg = make_tiny_config()
    Learner(cfg).load_state_dict(s1)  # a complete, loadable training state


# ---- logs on an object-store storage path -------------------------------------------------

def test_logs_are_copied_under_the_storage_uri_and_only_when_changed(tmp_path):
    from massl_ray.train.log_sync import WORKER_FILES, log_sync_for

    local = tmp_path / "local"
    (local / "tb").mkdir(parents=True)
    (local / "metrics.jsonl").write_text('{"step": 1}\n')
    (local / "tb" / "events.out.1").write_bytes(b"x" * 100)
    (local / "state.pt").write_bytes(b"not a log")
    store = tmp_path / "bucket"
    assert log_sync_for(str(tmp_path), "r", local, WORKER_FILES) is None  # local storage
    sync = log_sync_for(f"file://{store}", "r", local, WORKER_FILES)
    assert sync.sync() == 2
    logs = store / "r" / "logs"
    assert (logs / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (logs / "tb" / "events.out.1").read_bytes() == b"x" * 100
    assert not (logs / "state.pt").exists()
    assert sync.sync() == 0  # nothing changed
    with open(local / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    assert sync.sync() == 1
    assert (logs / "metrics.jsonl").read_text().splitlines()[-1] == '{"step": 2}'


def test_a_failing_log_copy_is_logged_and_training_goes_on(tmp_path, caplog):
    from massl_ray.train.log_sync import LogSync

    local = tmp_path / "local"
    local.mkdir()
    (local / "metrics.jsonl").write_text("{}\n")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the logs folder should be")
    sync = LogSync(local, f"file://{blocker}/logs", ["metrics.jsonl"])
    with caplog.at_level(logging.WARNING, logger="massl_ray"):
        assert sync.sync() == 0
    assert "could not copy log file" in caplog.text


# ---- resource checks that fit autoscaling -------------------------------------------------

def test_resources_refuse_only_what_the_largest_cluster_cannot_hold():
    from massl_ray.data.pipeline import check_resources

    four = make_tiny_config("run.num_workers=4")  # 4 train CPUs + a 1-CPU decode task
    with pytest.raises(ConfigError, match="the cluster has 2 CPUs"):
        check_resources(four, 2.0)  # no autoscaler: now is the maximum
    with pytest.raises(ConfigError, match="can grow to at most 4 CPUs"):
        check_resources(four, 2.0, max_cpus=4.0)
    msg = check_resources(four, 2.0, max_cpus=64.0)
    assert msg.startswith("the run waits for nodes") and "5 CPUs" in msg and "64" in msg
    assert check_resources(four, 8.0, max_cpus=64.0) is None
    gpu = make_tiny_config("run.num_workers=8", "run.use_gpu=true", "run.cpus_per_worker=1")
    with pytest.raises(ConfigError, match="need 8 GPUs .* can grow to at most 4"):
        check_resources(gpu, 64.0, 64.0, cluster_gpus=0.0, max_gpus=4.0)
    with pytest.raises(ConfigError, match="need 8 GPUs .* has 4"):
        check_resources(gpu, 64.0, None, cluster_gpus=4.0)
    msg = check_resources(gpu, 64.0, 64.0, cluster_gpus=0.0, max_gpus=16.0)
    assert "8 GPUs (the cluster has 0 now, at most 16)" in msg


def test_a_slow_poll_does_not_shrink_the_interval_between_polls():
    clock = FakeClock()

    class SlowPoll(Rank0Ctx):
        def preemption_notice(self):
            clock.t += 4.0  # a barrier that takes 4 s (a busy cluster)
            return super().preemption_notice()

    cp = ControlPoints(0, every_s=5.0, poll=True, checkpoint_every_s=0, clock=clock)
    ctx = SlowPoll()
    _drive(cp, ctx, clock, 200, 0.5)
    gaps = {b - a for a, b in zip(ctx.polls[1:], ctx.polls[2:])}
    assert gaps == {10}, gaps  # 5 s of 0.5 s steps, the poll's own 4 s not counted
