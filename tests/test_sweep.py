"""Sweeps: search-space expansion and refusals (no Ray), concurrency from resources, and on one
shared Ray instance a 2 x 2 sweep end to end with dependent evaluations and an interrupted
sweep resumed without redoing finished trials or their evaluations."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

from massl_ray.config import ConfigError  # noqa: E402
from massl_ray.sweep import derive_concurrency, expand, load_sweep, parse_sweep, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK_TRAIN = ROOT / "jobs" / "data" / "cifar10-quick" / "train.parquet"
QUICK_TEST = ROOT / "jobs" / "data" / "cifar10-quick" / "test.parquet"


def tiny_sweep(tmp_path: Path, name: str, grid: dict, **sweep_extra) -> Path:
    """A tiny training config (as tests/test_ray_train.py) plus a sweep section, as YAML."""
    doc = {
        "model": {"arch": "vit_micro", "patch_size": 4, "depth": 2, "head_hidden_dim": 128,
                  "head_out_dim": 32},
        "crops": {"global_size": 16, "local_size": 8, "num_local_crops": 2},
        # A fast teacher EMA: after 4 steps the trials' teachers differ visibly.
        "massl": {"memory_size": 512, "block_size": 256, "momentum_teacher": 0.5},
        "optim": {"batch_size_per_worker": 32, "epochs": 1},
        "data": {"train": str(QUICK_TRAIN), "limit": 256, "shuffle": "none",
                 "decode_batch_size": 64, "decode_cpus": 0.5,
                 "eval_train": str(QUICK_TRAIN), "eval_test": str(QUICK_TEST)},
        "run": {"cpus_per_worker": 0.5, "log_every_steps": 2, "checkpoint_every_steps": 4,
                "max_steps": 4},
        "sweep": {"name": name, "storage_path": str(tmp_path / "sweeps"), "grid": grid,
                  "evaluation": {"num_cpus": 1, "limit_train": 300, "limit_test": 100,
                                 "linear_epochs": 5, "few_shot": [1], "few_shot_draws": 2,
                                 "ks": [10, 20]},
                  **sweep_extra},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


# ---- no Ray --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_expand_grid_and_random_is_reproducible(tmp_path):
    spec = parse_sweep({"name": "x", "seed": 3, "num_samples": 2,
                        "grid": {"massl.memory_size": [256, 512], "massl.num_blocks": [1, 2]},
                        "random": {"optim.lr": {"loguniform": [1e-4, 1e-2]},
                                   "crops.num_local_crops": {"choice": [2, 4]}}})
    v = expand(spec)
    assert len(v) == 8
    assert [(x["massl.memory_size"], x["massl.num_blocks"]) for x in v[::2]] == \
        [(256, 1), (256, 2), (512, 1), (512, 2)]
    assert all(1e-4 <= x["optim.lr"] <= 1e-2 and x["crops.num_local_crops"] in (2, 4) for x in v)
    assert expand(spec) == v
    assert expand(parse_sweep({"name": "x", "seed": 4, "num_samples": 2, "grid": spec.grid,
                               "random": spec.random})) != v


def test_relative_paths_resolve_against_the_driver_not_the_trial_dir(tmp_path, monkeypatch):
    """Tune runs each trial in its own working directory: a relative data path of the sweep file
    (jobs/sweep_cpu.yaml has them) must be resolved where the command runs. (This broke the
    documented `tune --config jobs/sweep_cpu.yaml`: every trial failed on a missing file.)"""
    from massl_ray.sweep import trial_config

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "data": {"train": "data/train.parquet", "eval_test": "data/test.parquet",
                 "cache_encoded": True},
        "sweep": {"name": "rel", "grid": {"data.eval_train": ["data/a.parquet"]}}}))
    monkeypatch.chdir(tmp_path)
    base, spec = load_sweep("sweep.yaml")
    variant = expand(spec)[0]
    elsewhere = tmp_path / "trial_dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as inside a trial
    cfg = trial_config(base, variant, spec, 0, validate=False)
    assert cfg.data.train == str(tmp_path / "data" / "train.parquet")
    assert cfg.data.eval_test == str(tmp_path / "data" / "test.parquet")
    assert cfg.data.eval_train == str(tmp_path / "data" / "a.parquet")
    assert cfg.run.storage_path == str(tmp_path / "runs" / "sweeps" / "rel" / "trials")
    # materialising inside a trial would wait forever for a CPU the trial does not hold
    assert base["data"]["cache_encoded"] is True and cfg.data.cache_encoded is False


@pytest.mark.timeout(60)
def test_sweep_file_errors_are_named(tmp_path):
    p = tiny_sweep(tmp_path, "bad", {"massl.memory_sise": [256]})
    with pytest.raises(ConfigError, match="unknown config key massl.memory_sise"):
        load_sweep(p)
    p = tiny_sweep(tmp_path, "bad2", {"massl.memory_size": [256]}, colour="red")
    with pytest.raises(ConfigError, match="unknown sweep key.*colour"):
        load_sweep(p)
    with pytest.raises(ConfigError, match="loguniform needs 0 < low < high"):
        parse_sweep({"random": {"optim.lr": {"loguniform": [0, 1]}}})
    p = tmp_path / "plain.yaml"
    p.write_text("model: {arch: vit_micro}\n")
    with pytest.raises(ConfigError, match="no sweep: section"):
        load_sweep(p)


@pytest.mark.timeout(60)
def test_invalid_combinations_refused_before_anything_launches(tmp_path, capsys):
    # 3 blocks do not divide 512; 496 is not a multiple of the global batch (32): only
    # (512, 2) is valid.
    p = tiny_sweep(tmp_path, "invalid", {"massl.memory_size": [512, 496], "massl.num_blocks": [2, 3]})
    with pytest.raises(ConfigError) as e:
        run_sweep(p)
    msg = str(e.value)
    assert "3 of 4 trial configuration(s) are invalid; nothing was launched" in msg
    assert "t001 {massl.memory_size: 512, massl.num_blocks: 3}: " in msg
    assert "must be divisible by massl.num_blocks (3)" in msg
    assert "t002 {massl.memory_size: 496, massl.num_blocks: 2}" in msg
    assert "global batch" in msg
    assert "t000" not in msg  # the valid one is not named
    sweep_dir = tmp_path / "sweeps" / "invalid"
    assert not (sweep_dir / "tune").exists() and not (sweep_dir / "trials").exists()
    # The CLI says the same and exits 2.
    from massl_ray.cli import main

    assert main(["tune", "--config", str(p)]) == 2
    assert "t001 {massl.memory_size: 512, massl.num_blocks: 3}" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_concurrency_from_resources():
    # One worker of 1 CPU + the trainable's 0.01, and Ray Data's 1 CPU beside the trials.
    trial = {"CPU": 1.01, "data_CPU": 1.0}
    ev = {"num_cpus": 1.0, "num_gpus": 0.0}
    assert derive_concurrency({"CPU": 4}, [trial], ev, None, 10) == 1  # 2 x 1.01 + 1 + 1 > 4
    assert derive_concurrency({"CPU": 5.03}, [trial], ev, None, 10) == 3
    assert derive_concurrency({"CPU": 5.03}, [trial], ev, 1, 10) == 1
    assert derive_concurrency({"CPU": 64}, [trial], ev, None, 4) == 4  # no more than trials
    assert derive_concurrency({"CPU": 2.5}, [trial], ev, None, 4) == 1  # evals wait for a trial
    gpu_trial = {"CPU": 5.01, "GPU": 2, "data_CPU": 1.0}
    assert derive_concurrency({"CPU": 64, "GPU": 8}, [gpu_trial], ev, None, 9) == 4
    assert derive_concurrency({"CPU": 64, "GPU": 8}, [gpu_trial],
                              {"num_cpus": 4, "num_gpus": 1}, None, 9) == 3
    with pytest.raises(ConfigError, match="a trial needs 2 GPU .* the cluster has 1"):
        derive_concurrency({"CPU": 64, "GPU": 1}, [{"CPU": 2, "GPU": 2}], ev, None, 2)
    # A trial whose workers leave Ray Data less than its CPU would hang: refused.
    with pytest.raises(ConfigError, match=r"2\.01 CPU while it trains .* Ray Data 1 more .* "
                                          r"the cluster has 2 CPU: it could never run"):
        derive_concurrency({"CPU": 2}, [{"CPU": 2.01, "data_CPU": 1.0}], ev, None, 2)
    with pytest.raises(ConfigError, match="could never run"):
        derive_concurrency({"CPU": 2}, [{"CPU": 1.01, "data_CPU": 1.0}], ev, None, 2)
    assert derive_concurrency({"CPU": 2}, [{"CPU": 0.91, "data_CPU": 1.0}], ev, None, 4) == 1


def test_trial_resources_count_the_data_cpu_apart(tmp_path):
    from massl_ray.config import load_config
    from massl_ray.sweep import trial_resources

    cfg = load_config(None, ["run.num_workers=2", "run.cpus_per_worker=1.5",
                             "data.decode_cpus=0.5"])
    assert trial_resources(cfg) == {"CPU": 3.01, "data_CPU": 1.0}
    cfg = load_config(None, ["data.decode_cpus=2", "run.use_gpu=true", "run.num_workers=2"])
    assert trial_resources(cfg) == {"CPU": 2.01, "data_CPU": 2.0, "GPU": 2.0}


# ---- on Ray --------------------------------------------------------------------------------

def _records(sweep_dir: Path, kind: str) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((sweep_dir / kind).glob("*.json"))}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sweep_2x2_end_to_end(ray_instance, tmp_path):
    p = tiny_sweep(tmp_path, "grid2x2", {"massl.memory_size": [256, 512], "massl.num_blocks": [1, 2]})
    t_start = time.time()
    s = run_sweep(p)
    t_end = time.time()
    assert s["trials"] == 4 and s["finished"] == 4 and s["evaluated"] == 4
    assert not s["interrupted"] and not s["errors"]
    # (4 CPUs - 1 for an evaluation - 1 for the trials' Ray Data tasks) // (0.5 + 0.01) -> 3
    assert s["concurrency"] == 3
    sweep_dir = Path(s["sweep_dir"])
    done, evals = _records(sweep_dir, "completed"), _records(sweep_dir, "evaluations")
    assert sorted(done) == sorted(evals) == ["t000", "t001", "t002", "t003"]
    last_trial_end = max(r["trial_ended_at"] for r in done.values())
    for name, e in evals.items():
        assert e["status"] == "ok"
        # Its own trial's final checkpoint.
        assert e["result"]["checkpoint"].startswith(str(sweep_dir / "trials" / f"grid2x2-{name}"))
        assert e["result"]["global_step"] == 4
        # Started after its own trial ended, submitted as soon as the trial's end was seen ...
        assert e["eval_started_at"] >= done[name]["trial_ended_at"]
        assert 0 <= e["eval_submitted_at"] - done[name]["completion_seen_at"] < 5.0
        assert t_start <= e["eval_started_at"] <= e["eval_ended_at"] <= t_end
        # ... so for a trial that ended before the last one, while other trials still trained
        # (the task's own start-up, a new worker process, may take a while on a busy machine).
        if done[name]["trial_ended_at"] < last_trial_end - 1.0:
            assert e["eval_submitted_at"] < last_trial_end, name
    # With 3 trials at a time the first to end frees the place of the fourth, which then trains
    # from its start: that first trial's evaluation ran entirely while a trial still trained.
    first = min(done, key=lambda n: done[n]["trial_ended_at"])
    assert evals[first]["eval_ended_at"] < last_trial_end, first

    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert len(rows) == 4
    assert {(int(r["memory_size"]), int(r["num_blocks"])) for r in rows} == \
        {(256, 1), (256, 2), (512, 1), (512, 2)}
    for r in rows:
        for col in ("final_loss", "knn_top1", "linear_top1", "train_wall_s"):
            float(r[col])  # a number in every cell
        assert r["status"] == "ok" and int(r["step"]) == 4
    assert len({r["knn_top1"] + r["linear_top1"] for r in rows}) > 1 or \
        len({r["final_loss"] for r in rows}) == 4
    md = (sweep_dir / "results.md").read_text().splitlines()
    assert len(md) == 2 + 4 and "knn_top1" in md[0]

    from PIL import Image

    with Image.open(sweep_dir / "knn_heatmap.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


class InterruptAfterFirstEvaluation(tune.Callback):
    """Test hook (a Tune callback): as soon as t000's evaluation has written its result and
    t001's trainable has started (t001 then has most of its training ahead), send SIGUSR1 (Tune's
    graceful stop, as Ctrl+C), so t001 is interrupted mid-flight. Once only: Tune unpickles this
    callback again on restore."""

    def __init__(self, sweep_dir: str):
        self.sweep_dir = Path(sweep_dir)

    def on_step_end(self, iteration, trials, **info):
        marker = self.sweep_dir / ".interrupted_once"
        if marker.exists():
            return
        if ((self.sweep_dir / "eval" / "t000" / "eval.json").exists()
                and (self.sweep_dir / "trials" / "resume-t001" / "attempts.jsonl").exists()):
            marker.touch()
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_resume_does_not_rerun_finished_trials_or_evaluations(ray_instance, tmp_path):
    p = tiny_sweep(tmp_path, "resume", {"massl.memory_size": [256, 512]}, max_concurrent=1)
    sweep_dir = tmp_path / "sweeps" / "resume"
    first = run_sweep(p, extra_callbacks=[InterruptAfterFirstEvaluation(str(sweep_dir))])
    assert (sweep_dir / ".interrupted_once").exists(), "the test hook never fired"
    assert first["interrupted"] and first["finished"] == 1
    t0_eval = (sweep_dir / "evaluations" / "t000.json").read_text()
    assert json.loads(t0_eval)["status"] == "ok"  # recorded before the sweep returned
    eval_json_mtime = (sweep_dir / "eval" / "t000" / "eval.json").stat().st_mtime_ns
    attempts = sweep_dir / "trials" / "resume-t000" / "attempts.jsonl"
    assert len(attempts.read_text().splitlines()) == 1

    second = run_sweep(p)  # the same command again: Tuner.restore
    assert not second["interrupted"] and second["finished"] == 2 and second["evaluated"] == 2
    assert len(attempts.read_text().splitlines()) == 1, "the finished trial ran again"
    assert (sweep_dir / "evaluations" / "t000.json").read_text() == t0_eval, "its evaluation ran again"
    assert (sweep_dir / "eval" / "t000" / "eval.json").stat().st_mtime_ns == eval_json_mtime
    t1 = sweep_dir / "trials" / "resume-t001" / "attempts.jsonl"
    assert len(t1.read_text().splitlines()) == 2  # the interrupted trial was resumed
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["knn_top1"] and r["final_loss"] for r in rows)


def test_object_store_sweep_storage_is_still_refused(tmp_path):
    """Resolving local paths on the driver must leave URIs alone (and so refused)."""
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"sweep": {"name": "x", "storage_path": "s3://b/x",
                                           "grid": {"massl.num_blocks": [2]}}}))
    with pytest.raises(ConfigError, match="sweep.storage_path must be a filesystem path"):
        load_sweep(p)
