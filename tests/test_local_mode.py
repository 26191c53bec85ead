"""Local mode: the same config and loop in this process, no Ray; exact resume of data position."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from massl_ray.method.checkpoint import load_checkpoint
from massl_ray.cli import main as cli_main
from massl_ray.config import load_config
from massl_ray.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "jobs" / "data" / "cifar10-quick" / "train.parquet"


def overrides(tmp_path: Path, name: str, **extra) -> list[str]:
    o = {
        "model.arch": "vit_micro", "model.patch_size": 4, "model.depth": 2,
        "model.head_hidden_dim": 64, "model.head_out_dim": 32,
        "crops.global_size": 16, "crops.local_size": 8, "crops.num_local_crops": 2,
        "massl.memory_size": 512, "massl.block_size": 128,
        "optim.batch_size_per_worker": 16, "optim.epochs": 2,
        "data.train": str(QUICK), "data.limit": 96,  # 6 steps per epoch
        "run.name": name, "run.storage_path": str(tmp_path), "run.log_every_steps": 2,
        "run.checkpoint_every_steps": 4, "run.final_knn": False, "run.num_workers": 0,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "stat").read_text().split(") ", 1)[1].split()[1] == me:
                    out.add(int(d.name))
            except (OSError, IndexError):
                pass
    return out


@pytest.mark.timeout(300)
def test_local_mode_runs_in_process_without_ray(tmp_path):
    import ray

    was_initialized = ray.is_initialized()
    before = _children()
    res = train(load_config(None, overrides(tmp_path, "loc", **{"run.max_steps": 6})), local=True)
    assert res["mode"] == "local"
    assert res["metrics"]["step"] == 6
    assert ray.is_initialized() == was_initialized, "local mode must not start Ray"
    assert not (_children() - before), "local mode must not start any worker process"
    state = load_checkpoint(res["checkpoint"])
    assert state["global_step"] == 6 and int(state["memory"]["ptr"]) == 6 * 16 % 512


@pytest.mark.timeout(300)
def test_local_resume_is_exact_including_data_position(tmp_path):
    """8 steps in one go == 5 steps, stop, resume to 8 (mid-epoch: 6 steps per epoch)."""
    full = train(load_config(None, overrides(tmp_path, "full", **{"run.max_steps": 8})),
                 local=True)
    # Stop at 5 (a checkpoint is written at the stop step), then a new driver resumes.
    train(load_config(None, overrides(tmp_path, "split", **{"run.max_steps": 5})), local=True)
    resumed = train(load_config(None, overrides(tmp_path, "split", **{"run.max_steps": 8})),
                    local=True)
    assert resumed["metrics"]["start_step"] == 5
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert a["global_step"] == b["global_step"] == 8
    for part in ("student", "teacher"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert torch.equal(a["memory"]["rows"], b["memory"]["rows"])
    assert torch.equal(a["memory"]["ptr"], b["memory"]["ptr"])
    la = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert la[-1] == lb[-1]


@pytest.mark.timeout(120)
def test_resume_never_refuses_existing_run(tmp_path, capsys):
    train(load_config(None, overrides(tmp_path, "again", **{"run.max_steps": 2})), local=True)
    rc = cli_main(["train", "--local", *overrides(tmp_path, "again", **{"run.resume": "never"})])
    assert rc == 2
    assert "run.resume=never" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_cli_refuses_bad_config_and_bad_data_before_training(tmp_path, capsys):
    rc = cli_main(["train", "--local", *overrides(tmp_path, "bad", **{"massl.memory_size": 500})])
    assert rc == 2
    err = capsys.readouterr().err
    assert "massl.memory_size (500)" in err
    rc = cli_main(["train", "--local", *overrides(tmp_path, "bad2",
                                                  **{"data.train": str(tmp_path / "nope")})])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.timeout(180)
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    from massl_ray.method.checkpoint import verify_checkpoint
    from massl_ray.method.learner import Learner
    from massl_ray.method.checkpoint import latest_valid_checkpoint

    real_step = Learner.step

    def poisoned(self, *a, **kw):  # the inputs of global step 6 become NaN
        if self.global_step == 6:
            self.mean = torch.full((3,), float("nan"))
        return real_step(self, *a, **kw)

    monkeypatch.setattr(Learner, "step", poisoned)
    rc = cli_main(["train", "--local", *overrides(tmp_path, "nan")])
    assert rc == 3
    err = capsys.readouterr().err
    assert "training stopped: non-finite loss (nan) at global step 6" in err
    # The checkpoint of step 4 is the newest, intact and finite; nothing was written after it.
    last = latest_valid_checkpoint(tmp_path / "nan")
    verify_checkpoint(last)
    state = load_checkpoint(last)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert torch.isfinite(state["memory"]["rows"]).all()
    # Fixed (the poison removed), the same command resumes from step 4 and finishes.
    monkeypatch.setattr(Learner, "step", real_step)
    res = train(load_config(None, overrides(tmp_path, "nan")), local=True)
    assert res["metrics"]["start_step"] == 4 and res["metrics"]["step"] == 12


@pytest.mark.timeout(60)
def test_unwritable_or_full_storage_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import collections

    import massl_ray.train.trainer as trainer_mod

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc = cli_main(["train", "--local", *overrides(tmp_path, "w", **{
        "run.storage_path": str(blocker / "runs")})])
    assert rc == 2
    assert "is not writable" in capsys.readouterr().err

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(trainer_mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    rc = cli_main(["train", "--local", *overrides(tmp_path, "full")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has 1 MiB free" in err and "run.num_checkpoints_to_keep" in err
    assert not list((tmp_path / "full").glob("checkpoint_*")) and not (tmp_path / "full" / "metrics.jsonl").exists()


@pytest.mark.timeout(300)
def test_broken_newest_checkpoints_fall_back_to_the_last_good_one_saying_so(tmp_path, capsys):
    """The newest checkpoint corrupt (one flipped byte in state.pt) and the one before it
    incomplete (meta.json never written, as when a writer dies): the same command resumes from
    the last good checkpoint, names each one it skipped and why, and ends bitwise equal to an
    uninterrupted run (nothing lost but the recomputed steps)."""
    from massl_ray.method.checkpoint import META_FILE, STATE_FILE, verify_checkpoint

    full = train(load_config(None, overrides(tmp_path, "full")), local=True)  # 12 steps
    over = overrides(tmp_path, "split", **{"run.num_checkpoints_to_keep": 3})
    assert cli_main(["train", "--local", *over, "run.max_steps=10"]) == 0  # checkpoints 4, 8, 10
    ckpts = {int(p.name.split("_")[1]): p for p in (tmp_path / "split").glob("checkpoint_*")}
    assert sorted(ckpts) == [4, 8, 10]
    data = bytearray((ckpts[10] / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpts[10] / STATE_FILE).write_bytes(bytes(data))
    (ckpts[8] / META_FILE).unlink()
    (tmp_path / "split" / ".tmp_ckpt_killed").mkdir()  # a writer killed mid-checkpoint
    capsys.readouterr()

    assert cli_main(["train", "--local", *over]) == 0
    err = capsys.readouterr().err
    assert f"skipping broken checkpoint: checkpoint {ckpts[10]}: {STATE_FILE} fails its sha256" in err
    assert f"skipping broken checkpoint: checkpoint {ckpts[8]} is incomplete" in err
    assert f"resuming run 'split' from {ckpts[4]}" in err
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["metrics"]["start_step"] == 4 and summary["metrics"]["step"] == 12
    # Step 8 was rewritten by the resumed run; the corrupt step 10 was deleted once the good
    # step 12 existed (it must not hold one of the 3 kept places); every one left verifies.
    assert f"deleting broken checkpoint {ckpts[10]}, superseded by the good checkpoint of step 12" in err
    left = sorted((tmp_path / "split").glob("checkpoint_*"))
    assert [p.name for p in left] == [f"checkpoint_{s:09d}" for s in (4, 8, 12)]
    for p in left:
        verify_checkpoint(p)
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(summary["checkpoint"])
    assert a["global_step"] == b["global_step"] == 12
    assert not (tmp_path / "split" / ".tmp_ckpt_killed").exists()
    for part in ("student", "teacher"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after the fallback"
    assert torch.equal(a["memory"]["rows"], b["memory"]["rows"])
    assert torch.equal(a["memory"]["ptr"], b["memory"]["ptr"])


def _nan_on_one_rank(rank: int, init_file: str, out_dir: str) -> None:
    """A worker of the 2-process test below: rank 1's inputs of global step 1 become NaN."""
    import datetime
    import sys

    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import make_crops, make_tiny_config
    from massl_ray.method.learner import Learner, NonFiniteLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        cfg = make_tiny_config("run.num_workers=2")
        learner = Learner(cfg)
        result = {"rank": rank, "stopped_at": None}
        for step in range(3):
            if rank == 1 and step == 1:
                learner.mean = torch.full((3,), float("nan"))
            try:
                learner.step(*make_crops(cfg, seed=10 * rank + step), check_finite=True)
            except NonFiniteLoss as e:
                result.update(stopped_at=e.step, value=repr(e.value),
                              global_step=learner.global_step)
                break
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """The finite check is collective: rank 1 alone gets a NaN loss at global step 1, and both
    ranks raise NonFiniteLoss at step 1, before the step changes anything (a rank that stopped
    alone would leave the other in the next all-gather or gradient all-reduce)."""
    import torch.multiprocessing as mp

    mp.start_processes(_nan_on_one_rank, args=(str(tmp_path / "pg_init"), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in got:
        assert r["stopped_at"] == 1, got
        assert r["value"] == "nan" and r["global_step"] == 1, got
