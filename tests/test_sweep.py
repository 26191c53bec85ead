"""Sweeps: Tune search spaces, searchers and schedulers by name, refusals (no Ray), concurrency
from what trials hold, the results table of stopped/refused trials, and on one shared Ray
instance: a too-large sweep refused, a 3-trial Optuna search end to end (each trial's evaluation
a separate Ray task, its k-NN in Tune's ResultGrid and Optuna's study), a sampled invalid trial
refused; and the user's tune command (its own Ray) SIGKILLed at a point the test controls, then
run again: resumed without redoing a finished trial or its evaluation."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

from massl_ray.config import ConfigError  # noqa: E402
from massl_ray.sweep import (derive_concurrency, grid_points, load_sweep, param_space,  # noqa: E402
                             parse_sweep, run_sweep)

ROOT = Path(__file__).resolve().parents[1]
QUICK_TRAIN = ROOT / "jobs" / "data" / "cifar10-quick" / "train.parquet"
QUICK_TEST = ROOT / "jobs" / "data" / "cifar10-quick" / "test.parquet"


def tiny_sweep(tmp_path: Path, name: str, space: dict, **sweep_extra) -> Path:
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
        "sweep": {"name": name, "storage_path": str(tmp_path / "sweeps"), "space": space,
                  "evaluation": {"num_cpus": 0.5, "limit_train": 300, "limit_test": 100,
                                 "linear_epochs": 5, "few_shot": [1], "few_shot_draws": 2,
                                 "ks": [10, 20]},
                  **sweep_extra},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


# ---- no Ray --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_space_is_tunes_own():
    """Each swept key maps to Tune's API; a list is a grid. The grid points are what can be
    checked before launch."""
    from ray.tune.search.sample import Categorical, Float, Integer

    spec = parse_sweep({"name": "x", "num_samples": 2, "space": {
        "massl.memory_size": [256, 512], "massl.num_blocks": {"grid_search": [1, 2]},
        "optim.lr": {"loguniform": [1e-4, 1e-2]}, "crops.num_local_crops": {"choice": [2, 4]},
        "optim.weight_decay": {"quniform": [0.0, 0.1, 0.01]},
        "massl.teacher_temp": {"uniform": {"lower": 0.03, "upper": 0.05}},
        "optim.warmup_epochs": {"randint": [0, 3]}}})
    space = param_space(spec)["overrides"]
    assert space["massl.memory_size"] == {"grid_search": [256, 512]}
    assert space["massl.num_blocks"] == {"grid_search": [1, 2]}
    assert isinstance(space["optim.lr"], Float) and space["optim.lr"].lower == 1e-4
    assert isinstance(space["crops.num_local_crops"], Categorical)
    assert isinstance(space["optim.weight_decay"], Float)
    assert space["massl.teacher_temp"].upper == 0.05
    assert isinstance(space["optim.warmup_epochs"], Integer)
    assert grid_points(spec) == [{"massl.memory_size": m, "massl.num_blocks": b}
                                 for m in (256, 512) for b in (1, 2)]
    with pytest.raises(ConfigError, match="LogUniform requires a lower bound greater than 0"):
        parse_sweep({"space": {"optim.lr": {"loguniform": [0, 1]}}})
    with pytest.raises(ConfigError, match=r"sweep.space.optim.lr must be a list .* or one of"):
        parse_sweep({"space": {"optim.lr": {"gaussian": [0, 1]}}})
    with pytest.raises(ConfigError, match="run.num_workers decides what a trial holds"):
        parse_sweep({"space": {"run.num_workers": {"choice": [1, 2]}}})
    with pytest.raises(ConfigError, match="unknown sweep key.*grid; known: name, storage_path"):
        parse_sweep({"grid": {"massl.num_blocks": [2]}})
    with pytest.raises(ConfigError, match="sweep.search optuna proposes values itself"):
        parse_sweep({"search": "optuna", "space": {"massl.num_blocks": [2, 4]}})
    with pytest.raises(ConfigError, match="sweep.scheduler 'pbt'"):
        parse_sweep({"scheduler": "pbt"})


@pytest.mark.timeout(60)
def test_search_and_scheduler_by_name(monkeypatch):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from massl_ray import sweep
    from massl_ray.config import load_config

    cfgs = [load_config(None, ["run.online_knn_every_steps=5", "run.max_steps=40",
                               "data.eval_train=a.parquet", "data.eval_test=b.parquet"])]
    for name in ("grid", "random"):
        s = sweep.build_searcher(parse_sweep({"search": name, "seed": 7}), 3)
        assert isinstance(s, BasicVariantGenerator) and s.max_concurrent == 3
    # The real searchers (the tune-search extra is in requirements-test.txt): metric, mode and
    # seed from the sweep, in a ConcurrencyLimiter.
    space = {"massl.num_blocks": {"choice": [2, 4]}}
    s = sweep.build_searcher(parse_sweep({"search": "optuna", "seed": 5, "metric": "linear_top1",
                                          "mode": "min", "space": space}), 2)
    assert isinstance(s, ConcurrencyLimiter) and s.max_concurrent == 2
    assert type(s.searcher).__name__ == "OptunaSearch" and s.searcher._seed == 5
    assert (s.searcher.metric, s.searcher.mode) == ("linear_top1", "min")
    s = sweep.build_searcher(parse_sweep({"search": {"name": "hyperopt", "n_initial_points": 3},
                                          "seed": 5, "space": space}), 2)
    assert type(s.searcher).__name__ == "HyperOptSearch"
    assert s.searcher.algo.keywords["n_startup_jobs"] == 3  # a searcher keyword passed through
    assert s.searcher.rstate.randint(10**9) == np.random.RandomState(5).randint(10**9)
    assert (s.searcher.metric, s.searcher.mode) == ("knn_top1", "max")
    with pytest.raises(ConfigError, match="sweep.search optuna: .*unexpected keyword.*colour"):
        sweep.build_searcher(parse_sweep({"search": {"name": "optuna", "colour": 1}}), 1)
    # Its package missing (its import fails): the extra named.
    for name in ("optuna", "hyperopt"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
        with pytest.raises(ConfigError, match=rf"sweep.search {name} needs the {name} package, "
                                              r"which is not installed: pip install "
                                              r"'massl_ray\[tune-search\]'"):
            sweep.build_searcher(parse_sweep({"search": {"name": name}}), 1)
    a = sweep.build_scheduler(parse_sweep({"scheduler": {"name": "asha", "grace_period": 10}}), cfgs)
    assert isinstance(a, ASHAScheduler)
    # max_t past the last step (40): a trial that trains to its end is still evaluated
    assert (a._time_attr, a.metric, a._max_t) == ("step", "online_knn_top1", 41)
    with pytest.raises(ConfigError, match=r"sweep.scheduler.max_t \(40\) must exceed the trials' "
                                          r"last step \(40\)"):
        sweep.build_scheduler(parse_sweep({"scheduler": {"name": "asha", "max_t": 40}}), cfgs)
    m = sweep.build_scheduler(parse_sweep({"scheduler": {"name": "median_stopping",
                                                         "metric": "loss", "mode": "min"}}), cfgs)
    assert isinstance(m, MedianStoppingRule) and m.metric == "loss"
    assert sweep.build_scheduler(parse_sweep({"scheduler": "fifo"}), cfgs) is None
    with pytest.raises(ConfigError, match="online k-NN monitor is off"):
        sweep.build_scheduler(parse_sweep({"scheduler": "asha"}), [load_config(None, [])])
    with pytest.raises(ConfigError, match="sweep.scheduler asha: .*unexpected keyword.*colour"):
        sweep.build_scheduler(parse_sweep({"scheduler": {"name": "asha", "colour": 1}}), cfgs)


def test_relative_paths_resolve_against_the_driver_not_the_trial_dir(tmp_path, monkeypatch):
    """Tune runs each trial in its own working directory: a relative data path of the sweep file
    (jobs/sweep_cpu.yaml has them) must be resolved where the command runs. (This broke the
    documented `tune --config jobs/sweep_cpu.yaml`: every trial failed on a missing file.)"""
    from massl_ray.sweep import trial_config

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "data": {"train": "data/train.parquet", "eval_test": "data/test.parquet"},
        "sweep": {"name": "rel", "space": {"data.eval_train": ["data/a.parquet"]}}}))
    monkeypatch.chdir(tmp_path)
    base, spec = load_sweep("sweep.yaml")
    elsewhere = tmp_path / "trial_dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as inside a trial
    variant = grid_points(spec)[0]
    cfg = trial_config(base, variant, spec, "t", validate=False)
    assert cfg.data.train == str(tmp_path / "data" / "train.parquet")
    assert cfg.data.eval_test == str(tmp_path / "data" / "test.parquet")
    assert cfg.data.eval_train == str(tmp_path / "data" / "a.parquet")
    assert cfg.run.storage_path == str(tmp_path / "runs" / "sweeps" / "rel" / "trials")


@pytest.mark.timeout(60)
def test_sweep_file_errors_are_named(tmp_path):
    p = tiny_sweep(tmp_path, "bad", {"massl.memory_sise": [256]})
    with pytest.raises(ConfigError, match="unknown config key massl.memory_sise"):
        load_sweep(p)
    p = tiny_sweep(tmp_path, "bad2", {"massl.memory_size": [256]}, colour="red")
    with pytest.raises(ConfigError, match="unknown sweep key.*colour"):
        load_sweep(p)
    p = tmp_path / "plain.yaml"
    p.write_text("model: {arch: vit_micro}\n")
    with pytest.raises(ConfigError, match="no sweep: section"):
        load_sweep(p)


@pytest.mark.timeout(60)
def test_invalid_grid_points_refused_before_anything_launches(tmp_path, capsys):
    # 3 blocks do not divide 512; 496 is not a multiple of the global batch (32): only
    # (512, 2) is valid.
    p = tiny_sweep(tmp_path, "invalid", {"massl.memory_size": [512, 496], "massl.num_blocks": [2, 3]})
    with pytest.raises(ConfigError) as e:
        run_sweep(p)
    msg = str(e.value)
    assert "3 of 4 grid point(s) are invalid; nothing was launched" in msg
    assert "grid point 1 {massl.memory_size: 512, massl.num_blocks: 3}: " in msg
    assert "must be divisible by massl.num_blocks (3)" in msg
    assert "grid point 2 {massl.memory_size: 496, massl.num_blocks: 2}" in msg
    assert "global batch" in msg
    assert "grid point 0" not in msg  # the valid one is not named
    sweep_dir = tmp_path / "sweeps" / "invalid"
    assert not (sweep_dir / "tune").exists() and not (sweep_dir / "trials").exists()
    # The CLI says the same and exits 2.
    from massl_ray.cli import main

    assert main(["tune", "--config", str(p)]) == 2
    assert "grid point 1 {massl.memory_size: 512, massl.num_blocks: 3}" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_concurrency_counts_what_trials_hold_in_either_phase():
    from massl_ray.sweep import Concurrency as C

    # Training: one worker of 1 CPU + the trainable's 0.01, Ray Data 1 CPU beside it.
    # Evaluating: the task's 1 CPU + the trainable awaiting it.
    trial = {"CPU": 1.01, "data_CPU": 1.0}
    ev = {"CPU": 1.01, "GPU": 0.0}
    # training slots t: (t - 1) x 1.01 + 2.01 <= cluster; more trials only if an evaluation
    # fits beside t training ones
    assert derive_concurrency({"CPU": 4}, [trial], ev, None, 10) == C(2, 2)
    assert derive_concurrency({"CPU": 5.03}, [trial], ev, None, 10) == C(3, 3)
    assert derive_concurrency({"CPU": 5.03}, [trial], ev, 1, 10) == C(1, 1)
    assert derive_concurrency({"CPU": 64}, [trial], ev, None, 4) == C(4, 4)  # no more than trials
    assert derive_concurrency({"CPU": 2.5}, [trial], ev, None, 4) == C(1, 1)
    # One trial trains at a time (2.01 + 1 of 4 CPU), and its predecessor's evaluation (0.51)
    # fits beside it: two trials at once, the evaluation overlapping the next training.
    assert derive_concurrency({"CPU": 4}, [{"CPU": 2.01, "data_CPU": 1.0}], {"CPU": 0.51}, None,
                              4) == C(2, 1)
    assert derive_concurrency({"CPU": 4}, [{"CPU": 2.01, "data_CPU": 1.0}], {"CPU": 0.51}, 1,
                              4) == C(1, 1)  # sweep.max_concurrent caps both
    # An evaluation larger than a training trial: evaluations wait for CPUs holding nothing
    # (a self-contained task), so they do not limit the training slots.
    assert derive_concurrency({"CPU": 8}, [{"CPU": 0.51, "data_CPU": 1.0}], {"CPU": 2.01}, None,
                              9) == C(9, 9)
    # Features by Ray Data batch inference: the evaluation's actors hold CPUs while they wait
    # for more, so every trial counts as holding the most of either phase, and needing it.
    assert derive_concurrency({"CPU": 4}, [trial], {"CPU": 1.01, "data_CPU": 2.0}, None, 4) == \
        C(1, 1)
    # GPUs: 4 trials train on 8 GPUs; CPU-only evaluations fit beside them (up to the trials).
    gpu_trial = {"CPU": 5.01, "GPU": 2, "data_CPU": 1.0}
    assert derive_concurrency({"CPU": 64, "GPU": 8}, [gpu_trial], ev, None, 9) == C(9, 4)
    # a GPU evaluation does not fit beside 4 training trials: no extra trial
    assert derive_concurrency({"CPU": 64, "GPU": 8}, [gpu_trial], {"CPU": 4.01, "GPU": 1}, None,
                              9) == C(4, 4)
    assert derive_concurrency({"CPU": 64, "GPU": 8}, [gpu_trial],
                              {"CPU": 4.01, "GPU": 1, "data_GPU": 2}, None, 9) == C(3, 3)
    # Refused before launch, with the numbers.
    with pytest.raises(ConfigError, match="a trial needs 2 GPU .* the cluster has 1"):
        derive_concurrency({"CPU": 64, "GPU": 1}, [{"CPU": 2, "GPU": 2}], ev, None, 2)
    with pytest.raises(ConfigError, match=r"2\.01 CPU while it trains .* data feed 1 more .* "
                                          r"the cluster has 2 CPU: it could never run"):
        derive_concurrency({"CPU": 2}, [{"CPU": 2.01, "data_CPU": 1.0}], ev, None, 2)
    with pytest.raises(ConfigError, match="could never run"):
        derive_concurrency({"CPU": 2}, [{"CPU": 1.01, "data_CPU": 1.0}], ev, None, 2)
    with pytest.raises(ConfigError, match=r"evaluation needs 5\.01 CPU \(sweep.evaluation: the "
                                          r"task 5, the trainable awaiting it 0\.01\), but the "
                                          r"cluster has 4 CPU"):
        derive_concurrency({"CPU": 4}, [trial], {"CPU": 5.01}, None, 2)
    assert derive_concurrency({"CPU": 2}, [{"CPU": 0.91, "data_CPU": 1.0}], ev, None, 4) == C(1, 1)
    # jobs/sweep_cpu.yaml (0.9 per worker) on 2 CPUs: 1 at a time (line above); with
    # run.cpus_per_worker=0.49 two trials at a time (0.5 + 0.5 + 1 <= 2).
    assert derive_concurrency({"CPU": 2}, [{"CPU": 0.5, "data_CPU": 1.0}], {"CPU": 0.46}, None,
                              4) == C(2, 2)


@pytest.mark.timeout(60)
def test_training_slots_admit_n_and_take_back_a_trial_that_ended():
    """The semaphore (run in-process on an event loop, as Ray runs an async actor): n holders
    at a time, a re-take by a holder is its own slot, a give from anyone else changes nothing."""
    import asyncio

    from massl_ray.sweep import TrainingSlots

    async def scenario():
        slots = TrainingSlots(1)
        await slots.take("a")
        await slots.take("a")  # a restarted trial keeps its slot
        b = asyncio.ensure_future(slots.take("b"))
        await asyncio.sleep(0.05)
        assert not b.done()  # one slot, held by a
        await slots.give("c")  # not a holder: nothing
        await asyncio.sleep(0.05)
        assert not b.done()
        await slots.give("a")
        await asyncio.wait_for(b, 2)
        assert slots.holders == {"b"}
        return [(t, what) for _, t, what in slots.history()]

    assert asyncio.run(scenario()) == [("a", "take"), ("a", "take"), ("a", "give"), ("b", "take")]


def test_trial_and_evaluation_resources(tmp_path):
    from massl_ray.config import load_config
    from massl_ray.evaluate.jobs import EvalSettings
    from massl_ray.sweep import eval_resources, trial_resources

    cfg = load_config(None, ["run.num_workers=2", "run.cpus_per_worker=1.5",
                             "data.decode_cpus=0.5"])
    assert trial_resources(cfg) == {"CPU": 3.01, "data_CPU": 0.5}  # a 0.5-CPU read or decode
    cfg = load_config(None, ["data.decode_cpus=2", "run.use_gpu=true", "run.num_workers=2"])
    assert trial_resources(cfg) == {"CPU": 2.01, "data_CPU": 2.0, "GPU": 2.0}
    res = {"num_cpus": 2.0, "num_gpus": 1.0}
    assert eval_resources(EvalSettings(local=True), res) == \
        {"CPU": 2.01, "GPU": 1.0, "data_CPU": 0.0, "data_GPU": 0.0}
    assert eval_resources(EvalSettings(local=False, concurrency=2, cpus_per_actor=1.0,
                                       gpus_per_actor=0.5, decode_cpus=0.5), res) == \
        {"CPU": 2.01, "GPU": 1.0, "data_CPU": 3.0, "data_GPU": 1.0}


def test_an_object_store_sweep_lives_under_its_uri(tmp_path):
    """A URI storage path is left alone (not made absolute): the sweep directory, the trials'
    run storage and the Tune experiment are under it (the killed-and-rerun test runs one)."""
    from massl_ray.sweep import trial_config

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"sweep": {"name": "x", "storage_path": "s3://b/sweeps/",
                                           "space": {"massl.num_blocks": [2]}}}))
    base, spec = load_sweep(p)
    assert spec.dir == "s3://b/sweeps/x"
    assert trial_config(base, {}, spec, "t", validate=False).run.storage_path == \
        "s3://b/sweeps/x/trials"


def test_results_table_names_stopped_refused_and_unfinished_trials(tmp_path):
    """The table from the ResultGrid's results: a trial the scheduler stopped (Tune marks its
    last result done) is explicitly not evaluated and names its newest checkpoint (for an
    ``eval`` by hand); a refused and an unfinished trial say so; ints stay ints in the CSV."""
    from types import SimpleNamespace as Result

    from massl_ray.config import Config
    from massl_ray.method.checkpoint import save_checkpoint
    from massl_ray.sweep import TrialRefused, collect_rows, write_heatmap, write_table

    spec = parse_sweep({"name": "t", "storage_path": str(tmp_path), "space": {
        "massl.memory_size": [256, 512], "massl.num_blocks": [1, 2]}})
    stopped_ckpt = save_checkpoint({"global_step": 2}, spec.dir / "trials" / "b" / "checkpoint_2")
    nan = float("nan")

    def result(trial, mem, blocks, error=None, **m):
        return Result(metrics={"trial_id": trial, **m}, error=error, path=str(tmp_path / trial),
                      config={"overrides": {"massl.memory_size": mem, "massl.num_blocks": blocks}})

    grid = [result("a", 256, 1, step=4, training_done=True, final_loss=1.5, knn_top1=30.0,
                   linear_top1=40.0, eval_status="ok", checkpoint="/ck/a"),
            result("b", 256, 2, step=2, done=True, online_knn_top1=20.0, knn_top1=nan),
            result("c", 512, 3, error=TrialRefused("trial c {massl.num_blocks: 3} refused: ...")),
            result("d", 512, 2, step=2, done=False, knn_top1=nan)]
    rows = {r["trial"]: r for r in collect_rows(grid, Config().to_dict(), spec)}
    assert [(r["status"], r["eval_status"], r["knn_top1"]) for r in rows.values()] == [
        ("ok", "ok", 30.0), ("stopped early", "stopped early: not evaluated", None),
        ("refused", "not run", None), ("not finished", "not run", None)]
    assert rows["b"]["checkpoint"] == str(stopped_ckpt) and rows["b"]["online_knn_top1"] == 20.0
    assert (rows["b"]["memory_size"], rows["b"]["num_blocks"], rows["b"]["block_size"]) == (256, 2, 128)
    assert rows["c"]["num_blocks"] == 3 and "refused" in rows["c"]["error"]
    csv_path, md_path = write_table(list(rows.values()), tmp_path)
    table = {r["trial"]: r for r in csv.DictReader(open(csv_path))}
    assert table["a"]["step"] == "4" and table["c"]["step"] == "" and table["b"]["knn_top1"] == ""
    assert table["b"]["checkpoint"] == str(stopped_ckpt)
    md = md_path.read_text().splitlines()
    assert "checkpoint" not in md[0] and "eval_status" in md[0]
    assert "| stopped early | 2 |" in md[3] and "| stopped early: not evaluated |" in md[3]
    png = write_heatmap(list(rows.values()), tmp_path / "h.png", "t")
    assert png.stat().st_size > 1000  # one evaluated cell of four


# ---- on Ray --------------------------------------------------------------------------------

def _records(sweep_dir: Path) -> dict:
    return {p.stem: json.loads(p.read_text())
            for p in sorted((sweep_dir / "evaluations").glob("*.json"))}


def _attempts(sweep_dir: Path) -> dict:
    return {p.parent.name: [json.loads(x) for x in p.read_text().splitlines()]
            for p in sorted((sweep_dir / "trials").glob("*/attempts.jsonl"))}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_optuna_search_end_to_end(ray_instance, tmp_path):
    """A 3-trial Optuna search over memory size x blocks: each trial evaluated as a dependent
    Ray task, the evaluation's k-NN in Tune's ResultGrid (get_best_result) and in Optuna's own
    study, the table, heatmap and TensorBoard hparams from the ResultGrid."""
    space = {"massl.memory_size": {"choice": [256, 512]}, "massl.num_blocks": {"choice": [1, 2]}}
    # Three trials: three at once (the derived concurrency, below), and two hand-overs of the
    # training slot, each evaluation overlapping the next training.
    p = tiny_sweep(tmp_path, "optuna", space, search="optuna", num_samples=3, seed=5)
    # Too large for the 4-CPU Ray: refused before launch, with the numbers.
    with pytest.raises(ConfigError, match=r"a trial needs 4\.01 CPU while it trains .* data "
                                          r"feed 0\.5 more .* the cluster has 4 CPU: it could "
                                          r"never run"):
        run_sweep(p, ["run.cpus_per_worker=4"])
    assert not (tmp_path / "sweeps" / "optuna" / "tune").exists()

    t_start = time.time()
    # One 2-CPU worker: a training trial holds 2.01 CPU and its data feed needs 0.5 more, so
    # one trains at a time on the 4-CPU Ray; two evaluations (0.51 each) fit beside it: three
    # trials at once.
    s = run_sweep(p, ["run.cpus_per_worker=2"])
    t_end = time.time()
    assert s["trials"] == 3 and s["finished"] == 3 and s["evaluated"] == 3
    assert not s["interrupted"] and not s["errors"] and not s["refused"]
    assert (s["concurrency"], s["training_slots"]) == (3, 1)
    # The trainings ran one at a time, each in the slot the one before gave back; each
    # evaluation but the last ran while the next trial trained.
    order = sorted(s["rows"], key=lambda r: r["train_started_at"])
    for prev, nxt in zip(order, order[1:]):
        assert prev["train_ended_at"] <= nxt["train_started_at"]
        assert nxt["train_started_at"] < prev["eval_ended_at"] and \
            prev["eval_started_at"] < nxt["train_ended_at"], (prev, nxt)
    assert [what for _, _, what in s["slot_log"]] == ["take", "give"] * 3
    sweep_dir = Path(s["sweep_dir"])
    evals, attempts = _records(sweep_dir), _attempts(sweep_dir)
    assert sorted(evals) == sorted(attempts) == sorted(r["trial"] for r in s["rows"])
    rows = {r["trial"]: r for r in s["rows"]}
    for name, e in evals.items():
        assert e["status"] == "ok"
        # Its own trial's final checkpoint, trained with what Optuna proposed, evaluated after
        # that trial's training ended.
        assert e["result"]["checkpoint"].startswith(str(sweep_dir / "trials" / name))
        assert e["result"]["global_step"] == 4
        trained = json.loads((Path(e["checkpoint"]) / "meta.json").read_text())["config"]["massl"]
        assert (trained["memory_size"], trained["num_blocks"]) == \
            (rows[name]["memory_size"], rows[name]["num_blocks"])
        assert rows[name]["trial_ended_at"] <= e["eval_started_at"] <= e["eval_ended_at"] <= t_end
        assert attempts[name][0]["started_at"] >= t_start
        # A separate Ray task with its own resources (sweep.evaluation.num_cpus), outside the
        # trial's placement group, not the trainable that awaits it.
        assert e["pid"] != attempts[name][0]["pid"]
        assert e["resources"] == {"CPU": 0.5} and e["placement_group"] is None
        assert rows[name]["knn_top1"] == e["knn_top1"]

    # Tune's ResultGrid, read back from the experiment: the best trial by the evaluation's k-NN.
    from ray.tune import ExperimentAnalysis, ResultGrid
    from ray.tune.search.optuna import OptunaSearch

    grid = ResultGrid(ExperimentAnalysis(str(sweep_dir / "tune")))
    assert len(grid) == 3 and not grid.errors
    best = grid.get_best_result(metric="knn_top1", mode="max")
    top = max(e["knn_top1"] for e in evals.values())
    tied = {t for t, e in evals.items() if e["knn_top1"] == top}  # 100 test images: ties happen
    for name, chosen, overrides in (
            (best.metrics["trial_id"], best.metrics, best.config["overrides"]),
            (s["best"]["trial"], s["best"], s["best"]["overrides"])):  # the summary's
        assert name in tied and chosen["knn_top1"] == top
        assert chosen["checkpoint"] == evals[name]["checkpoint"]
        assert overrides == {"massl.memory_size": rows[name]["memory_size"],
                             "massl.num_blocks": rows[name]["num_blocks"]}
    # Optuna proposed every trial (all values from its space) and was told each evaluation's k-NN.
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(sweep_dir / "tune"))
    study = searcher._ot_study
    assert study.direction.name == "MAXIMIZE"
    assert sorted(t.value for t in study.trials) == sorted(e["knn_top1"] for e in evals.values())
    assert sorted(tuple(t.params.values()) for t in study.trials) == sorted(
        (r["memory_size"], r["num_blocks"]) for r in rows.values())

    table = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert len(table) == 3
    for r in table:
        for col in ("final_loss", "knn_top1", "linear_top1", "train_wall_s"):
            float(r[col])  # a number in every cell
        assert r["status"] == "ok" and int(r["step"]) == 4 and r["eval_status"] == "ok"
        assert (int(r["memory_size"]), int(r["num_blocks"])) in {(256, 1), (256, 2), (512, 1),
                                                                  (512, 2)}
    md = (sweep_dir / "results.md").read_text().splitlines()
    assert len(md) == 2 + 3 and "knn_top1" in md[0]

    from PIL import Image

    with Image.open(sweep_dir / "knn_heatmap.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    # TensorBoard hparams (Tune's own logger): one run per trial, with the evaluation's k-NN
    # and the memory as trained (the block size derived from the swept block count).
    events = sorted(Path(s["tensorboard"]).glob("*/events.out.tfevents.*"))
    assert len(events) == 3
    for e in events:
        data = e.read_bytes()
        assert b"_hparams_/session_start_info" in data
        for tag in (b"ray/tune/knn_top1", b"ray/tune/block_size", b"ray/tune/num_blocks"):
            assert tag in data, (e, tag)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_sampled_invalid_trial_refused_with_its_reason(ray_instance, tmp_path):
    """A value the searcher proposes is validated in the trial: refused, named, not trained."""
    p = tiny_sweep(tmp_path, "sampled", {"massl.num_blocks": {"choice": [3]}})
    s = run_sweep(p)
    assert s["trials"] == 1 and len(s["refused"]) == 1 and not s["errors"]
    row = s["rows"][0]
    assert row["status"] == "refused" and row["eval_status"] == "not run"
    assert "{massl.num_blocks: 3} refused" in row["error"]
    assert "must be divisible by massl.num_blocks (3)" in row["error"]
    assert not list((Path(s["sweep_dir"]) / "trials").glob("*/attempts.jsonl"))


ATTEMPTS, RECORDS = r"trials/([^/]+)/attempts\.jsonl", r"evaluations/([^/]+)\.json"


class _SweepInBucket:
    """A sweep directory on the S3 test server (``s3://<bucket>/<prefix>``), read with boto3 as
    the tests read a local one: ``objects`` maps a relative key to (bytes' ETag, LastModified)."""

    def __init__(self, s3, bucket: str, prefix: str):
        self.s3, self.bucket, self.prefix = s3, bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}"

    def objects(self, sub: str = "") -> dict[str, tuple]:
        out = {}
        for page in self.s3.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/{sub}"):
            out.update({o["Key"][len(self.prefix) + 1:]: (o["ETag"], o["LastModified"])
                        for o in page.get("Contents", [])})
        return out

    def read(self, rel: str) -> bytes:
        return self.s3.get(self.bucket, f"{self.prefix}/{rel}")

    def jsons(self, pattern: str) -> dict:
        """{the first group of ``pattern``: the parsed JSON (or JSON lines)} of each match."""
        out = {}
        for rel in sorted(self.objects()):
            m = re.fullmatch(pattern, rel)
            if m:
                text = self.read(rel).decode()
                out[m.group(1)] = json.loads(text) if rel.endswith(".json") else \
                    [json.loads(x) for x in text.splitlines()]
        return out

    def tune_status(self) -> dict:
        """Trial id -> status in the newest experiment state Tune saved (what a restore reads)."""
        states = sorted((t, k) for k, (_, t) in self.objects("tune/").items()
                        if re.fullmatch(r"tune/experiment_state[^/]*\.json", k))
        if not states:
            return {}
        data = json.loads(self.read(states[-1][1]))
        return {t["trial_id"]: t["status"]
                for t in (json.loads(js) for js, _ in data["trial_data"])}


def _processes() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (parent pid, process group, state, start time) of every process on the machine."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path("/proc", d, "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            f = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            out[int(d)] = (int(f[1]), int(f[2]), f[0], int(f[19]))
    return out


def _kill_command(leader: int) -> dict[int, int]:
    """SIGKILL a command started in a session of its own (``start_new_session``) and the local
    Ray it started: its process group (the driver, GCS, raylet, agents) and every process
    descended from it (Ray 2.60's raylet starts each worker in a process group of its own; they
    would exit once the raylet is gone, but a frozen one cannot). Returns {pid: start time} of
    what was killed."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in procs.items():
        children.setdefault(ppid, []).append(pid)
    doomed, todo = set(), [leader]
    while todo:
        pid = todo.pop()
        if pid not in doomed:
            doomed.add(pid)
            todo += children.get(pid, [])
    doomed |= {pid for pid, (_, group, *_) in procs.items() if group == leader}
    try:
        os.killpg(leader, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {pid: procs[pid][3] for pid in doomed if pid in procs}


def _alive(killed: dict[int, int]) -> list[int]:
    """Those of ``killed`` still running (a zombie, or a new process with a reused pid, is not)."""
    procs = _processes()
    return [pid for pid, start in killed.items()
            if pid in procs and procs[pid][3] == start and procs[pid][2] not in "ZX"]


@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_tune_killed_and_run_again_resumes_without_redoing_finished_work(tmp_path, s3_server):
    """The user's ``tune --config jobs/sweep_cpu.yaml`` (shrunk to 2 trials of 4 steps through
    documented overrides, from a copy of the repository, the user's environment, its own local
    Ray) with its storage on the S3 test server (``sweep.storage_path=s3://...``: the Tune
    experiment, the trials' runs, the sweep's records and results all in the bucket) killed with
    SIGKILL, its whole process group and local Ray with it, then the same command again: it
    restores the Tune experiment from the bucket (``Tuner.restore``) and finishes the grid
    without training a finished trial again or redoing a recorded evaluation, exits 0, prints no
    traceback and nothing on stderr but our own log lines, and writes results.csv / results.md.

    The kill point is the test's, not the machine speed's. Trial A is the one that took a
    training slot first (its config.yaml in its local run directory under ``~/massl_runs``,
    written once it holds one; on 2 CPUs there is one slot and both trials start at once); the
    other, B, is frozen (SIGSTOP of its trainable process, the pid it records in
    attempts.jsonl) as soon as it has started: it can then neither report a result nor launch
    its evaluation, while A, which needs nothing from it, trains, is evaluated and ends. The
    command is killed once Tune's saved experiment state in the bucket (what a restore reads)
    shows A TERMINATED and A's evaluation record exists there. So at every
    kill one trial is finished and evaluated and one has started and not finished: the two
    cases a restore must tell apart (keep A and its evaluation; run B again). Two trials are
    therefore enough; a larger grid would only add trials waiting in Tune's queue, which a
    restore starts like any new one. Whether B was frozen waiting for the slot or already
    training changes only what its second attempt resumes from, not what is asserted. (B would
    have to train and be evaluated within one 0.2 s poll to escape the freeze; the test then
    fails, "B was evaluated before the kill", rather than passing.)"""
    from test_user_paths import (_NOT_IN_A_CLONE, QUICK, TINY, run, succeeded, unexpected_lines,
                                 user_env)

    clone = tmp_path / "massl_ray"
    shutil.copytree(ROOT, clone, ignore=_NOT_IN_A_CLONE)
    knn = []  # smaller k-NN sets than the quick start's (the same code, seconds)
    for key, split, rows in (("eval_train", "train", 500), ("eval_test", "test", 200)):
        dst = tmp_path / f"knn_{split}.parquet"
        pq.write_table(pq.read_table(QUICK / f"{split}.parquet").slice(0, rows), dst)
        knn.append(f"data.{key}={dst}")
    bucket = s3_server.bucket("massl-tune-resume")
    sweep = _SweepInBucket(s3_server, bucket, "sweeps/mem_blocks_cpu")
    env = {**user_env(), "HOME": str(tmp_path / "home")}  # the trials' local logs: ~/massl_runs
    cmd = [sys.executable, "-m", "massl_ray", "tune", "--config", "jobs/sweep_cpu.yaml",
           *[o for o in TINY if not o.startswith("massl.")], "optim.epochs=1",
           "optim.warmup_epochs=0", *knn, f"sweep.storage_path=s3://{bucket}/sweeps",
           "sweep.space={massl.memory_size: [512, 1024]}",
           "sweep.evaluation={num_cpus: 0.45, limit_train: 300, limit_test: 100, "
           "linear_epochs: 3, few_shot: [1], few_shot_draws: 2, ks: [20]}"]
    local_runs = tmp_path / "home" / "massl_runs"

    first_out = tmp_path / "first_run.txt"
    with open(first_out, "w") as out:
        driver = subprocess.Popen(cmd, cwd=clone, env=env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    killed: dict[int, int] = {}
    frozen: dict[int, int] = {}  # B's trainable: {pid: start time}
    try:
        a = b = None
        deadline = time.monotonic() + 540
        while True:
            assert driver.poll() is None, \
                f"the command ended (exit {driver.returncode}) before the kill point:\n" \
                + first_out.read_text()[-4000:]
            assert time.monotonic() < deadline, \
                f"no kill point in 540 s (A={a}, B={b}, saved state {sweep.tune_status()}):\n" \
                + first_out.read_text()[-4000:]
            if b is None:
                attempts = sweep.jsons(ATTEMPTS)  # an object appears whole
                # config.yaml is written by the training, after the trial took the slot
                slotted = sorted(local_runs.glob("*/config.yaml"), key=lambda f: f.stat().st_mtime)
                others = [t for t in attempts if slotted and t != slotted[0].parent.name]
                if others:
                    a, b = slotted[0].parent.name, others[0]
                    pid = attempts[b][0]["pid"]
                    frozen = {pid: _processes()[pid][3]}
                    os.kill(pid, signal.SIGSTOP)
            elif sweep.tune_status().get(a) == "TERMINATED" and \
                    f"evaluations/{a}.json" in sweep.objects("evaluations/"):
                break
            time.sleep(0.2)
        killed = _kill_command(driver.pid)
        driver.wait(30)
        deadline = time.monotonic() + 60
        while _alive(killed):  # the local Ray it started: gone before the rerun starts its own
            assert time.monotonic() < deadline, f"still running after SIGKILL: {_alive(killed)}"
            time.sleep(0.2)
    finally:  # whatever failed: nothing of the first run outlives the test, frozen or not
        if driver.poll() is None:
            _kill_command(driver.pid)
        for pid in _alive({**killed, **frozen}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    status, attempts = sweep.tune_status(), sweep.jsons(ATTEMPTS)
    assert status.get(a) == "TERMINATED" and status.get(b) not in (None, "TERMINATED"), status
    assert sorted(attempts) == sorted([a, b]) and len(attempts[a]) == len(attempts[b]) == 1
    assert sorted(sweep.jsons(RECORDS)) == [a], "B was evaluated before the kill"
    # A's evaluation (record, eval.json), metrics (its run's logs) and checkpoints in the bucket
    kept = {rel: (sweep.read(rel), sweep.objects(rel)[rel]) for rel in (
        f"evaluations/{a}.json", f"eval/{a}/eval.json", f"trials/{a}/logs/metrics.jsonl")}
    assert any(re.fullmatch(rf"trials/{a}/checkpoint_[^/]+/meta\.json", k)
               for k in sweep.objects(f"trials/{a}/")), sweep.objects(f"trials/{a}/")

    p = run(cmd, cwd=clone, timeout=540, env=env)  # the same command again
    assert p.returncode == 0, f"exit {p.returncode}:\n{(p.stdout + p.stderr)[-6000:]}"
    assert f"sweep 'mem_blocks_cpu': resuming the Tune experiment in {sweep.uri}/tune" \
        in p.stderr, p.stderr[-3000:]
    m = re.search(r"^sweep: 2/2 trials finished, 2 evaluated, \d+s -> (\S+)$", p.stdout, re.M)
    assert m, p.stdout[-3000:]
    assert m.group(1) == f"{sweep.uri}/results.md"
    attempts = sweep.jsons(ATTEMPTS)
    assert len(attempts[a]) == 1, f"the finished trial {a} trained again: {attempts[a]}"
    assert len(attempts[b]) == 2, f"the interrupted trial {b} ran other than twice: {attempts[b]}"
    for rel, (content, version) in kept.items():  # A's evaluation and training records untouched
        assert (sweep.read(rel), sweep.objects(rel)[rel]) == (content, version), rel
    assert sweep.jsons(RECORDS)[b]["status"] == "ok"
    rows = list(csv.DictReader(io.StringIO(sweep.read("results.csv").decode())))
    assert sorted(r["trial"] for r in rows) == sorted([a, b])
    assert sorted(int(r["memory_size"]) for r in rows) == [512, 1024], rows
    for r in rows:  # each trial trained its 4 steps, then its dependent evaluation ran
        assert r["status"] == "ok" and int(r["step"]) == 4 and r["eval_status"] == "ok", r
        assert float(r["trial_ended_at"]) <= float(r["eval_started_at"]), r
        assert 0 <= float(r["knn_top1"]) <= 100 and 0 <= float(r["linear_top1"]) <= 100, r
        float(r["final_loss"])  # a number
    md = sweep.read("results.md").decode().splitlines()
    assert len(md) == 2 + 2 and "knn_top1" in md[0], md
    # The screens last (every claim above holds when one of these fails): no traceback in the
    # rerun, nor before the kill (A trained and was evaluated there), and nothing on the rerun's
    # stderr but our own log lines.
    succeeded(p)
    first = first_out.read_text()
    assert "Traceback" not in first, first[-6000:]
    bad = unexpected_lines(p.stderr)
    assert not bad, "noise on the screen of the resumed sweep:\n" + "\n".join(bad[:40])
