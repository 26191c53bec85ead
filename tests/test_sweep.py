"""Sweeps: Tune search spaces, searchers and schedulers by name, refusals (no Ray), concurrency
from what trials hold, and on one shared Ray instance: a too-large sweep refused, a 2 x 2 sweep
end to end (each trial's evaluation a separate Ray task, its metrics in Tune's ResultGrid), a
sampled invalid trial refused, and a sweep whose driver is SIGKILLed resumed without redoing
finished trials or their evaluations."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    with pytest.raises(ConfigError, match="now one sweep.space"):
        parse_sweep({"grid": {"massl.num_blocks": [2]}})
    with pytest.raises(ConfigError, match="sweep.search optuna proposes values itself"):
        parse_sweep({"search": "optuna", "space": {"massl.num_blocks": [2, 4]}})
    with pytest.raises(ConfigError, match="sweep.scheduler 'pbt'"):
        parse_sweep({"scheduler": "pbt"})


class FixedSearcher(tune.search.Searcher):
    """A Searcher registered in the test under a name, as optuna/hyperopt are."""

    def __init__(self, metric=None, mode=None, seed=None):
        super().__init__(metric=metric, mode=mode)
        self.seed = seed

    def suggest(self, trial_id):
        return {"overrides": {}}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


@pytest.mark.timeout(60)
def test_search_and_scheduler_by_name(monkeypatch):
    import importlib.util

    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from massl_ray import sweep
    from massl_ray.config import load_config

    cfgs = [load_config(None, ["run.online_knn_every_steps=5", "run.max_steps=40",
                               "data.eval_train=a.parquet", "data.eval_test=b.parquet"])]
    for name in ("grid", "random"):
        s = sweep.build_searcher(parse_sweep({"search": name, "seed": 7}), 3)
        assert isinstance(s, BasicVariantGenerator) and s.max_concurrent == 3
    # A named Searcher: metric/mode/seed from the sweep, in a ConcurrencyLimiter.
    monkeypatch.setitem(sweep.SEARCHERS, "optuna", (__name__, "FixedSearcher", "yaml", "seed"))
    s = sweep.build_searcher(parse_sweep({"search": "optuna", "seed": 5, "metric": "linear_top1",
                                          "mode": "min"}), 2)
    assert isinstance(s, ConcurrencyLimiter) and s.max_concurrent == 2
    assert isinstance(s.searcher, FixedSearcher) and s.searcher.seed == 5
    assert (s.searcher.metric, s.searcher.mode) == ("linear_top1", "min")
    # Its package missing: the extra named.
    monkeypatch.undo()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n in ("optuna", "hyperopt") else real(n, *a))
    for name in ("optuna", "hyperopt"):
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


@pytest.mark.timeout(60)
def test_real_optuna_and_hyperopt_searchers_when_installed():
    """With the tune-search extra installed (not in CI: skipped there), the real searchers."""
    from ray.tune.search import ConcurrencyLimiter

    from massl_ray.sweep import build_searcher

    space = {"massl.num_blocks": {"choice": [2, 4]}}
    for name, cls in (("optuna", "OptunaSearch"), ("hyperopt", "HyperOptSearch")):
        pytest.importorskip(name)
        s = build_searcher(parse_sweep({"search": name, "space": space}), 2)
        assert isinstance(s, ConcurrencyLimiter) and type(s.searcher).__name__ == cls
        assert (s.searcher.metric, s.searcher.mode) == ("knn_top1", "max")


def test_relative_paths_resolve_against_the_driver_not_the_trial_dir(tmp_path, monkeypatch):
    """Tune runs each trial in its own working directory: a relative data path of the sweep file
    (jobs/sweep_cpu.yaml has them) must be resolved where the command runs. (This broke the
    documented `tune --config jobs/sweep_cpu.yaml`: every trial failed on a missing file.)"""
    from massl_ray.sweep import trial_config

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "data": {"train": "data/train.parquet", "eval_test": "data/test.parquet",
                 "cache_encoded": True},
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
    # Training: one worker of 1 CPU + the trainable's 0.01, Ray Data 1 CPU beside it.
    # Evaluating: the task's 1 CPU + the trainable awaiting it.
    trial = {"CPU": 1.01, "data_CPU": 1.0}
    ev = {"CPU": 1.01, "GPU": 0.0}
    # (c - 1) x 1.01 + 2.01 <= cluster
    assert derive_concurrency({"CPU": 4}, [trial], ev, None, 10) == 2
    assert derive_concurrency({"CPU": 5.03}, [trial], ev, None, 10) == 3
    assert derive_concurrency({"CPU": 5.03}, [trial], ev, 1, 10) == 1
    assert derive_concurrency({"CPU": 64}, [trial], ev, None, 4) == 4  # no more than trials
    assert derive_concurrency({"CPU": 2.5}, [trial], ev, None, 4) == 1
    # An evaluation holding more than training counts as the hold of every trial.
    assert derive_concurrency({"CPU": 8}, [{"CPU": 0.51, "data_CPU": 1.0}], {"CPU": 2.01}, None,
                              9) == 3  # 2 x 2.01 + 2.01 <= 8
    # Features by Ray Data batch inference: the evaluation's pipeline needs more beside it.
    assert derive_concurrency({"CPU": 4}, [trial], {"CPU": 1.01, "data_CPU": 2.0}, None, 4) == 1
    # GPUs: an evaluation takes a GPU its trial's training released.
    gpu_trial = {"CPU": 5.01, "GPU": 2, "data_CPU": 1.0}
    assert derive_concurrency({"CPU": 64, "GPU": 8}, [gpu_trial], ev, None, 9) == 4
    assert derive_concurrency({"CPU": 64, "GPU": 8}, [gpu_trial], {"CPU": 4.01, "GPU": 1}, None,
                              9) == 4
    assert derive_concurrency({"CPU": 64, "GPU": 8}, [gpu_trial],
                              {"CPU": 4.01, "GPU": 1, "data_GPU": 2}, None, 9) == 3
    # Refused before launch, with the numbers.
    with pytest.raises(ConfigError, match="a trial needs 2 GPU .* the cluster has 1"):
        derive_concurrency({"CPU": 64, "GPU": 1}, [{"CPU": 2, "GPU": 2}], ev, None, 2)
    with pytest.raises(ConfigError, match=r"2\.01 CPU while it trains .* Ray Data 1 more .* "
                                          r"the cluster has 2 CPU: it could never run"):
        derive_concurrency({"CPU": 2}, [{"CPU": 2.01, "data_CPU": 1.0}], ev, None, 2)
    with pytest.raises(ConfigError, match="could never run"):
        derive_concurrency({"CPU": 2}, [{"CPU": 1.01, "data_CPU": 1.0}], ev, None, 2)
    with pytest.raises(ConfigError, match=r"evaluation needs 5\.01 CPU \(sweep.evaluation: the "
                                          r"task 5, the trainable awaiting it 0\.01\), but the "
                                          r"cluster has 4 CPU"):
        derive_concurrency({"CPU": 4}, [trial], {"CPU": 5.01}, None, 2)
    assert derive_concurrency({"CPU": 2}, [{"CPU": 0.91, "data_CPU": 1.0}], ev, None, 4) == 1
    # jobs/sweep_cpu.yaml (0.9 per worker) on 2 CPUs: 1 at a time (line above); with
    # run.cpus_per_worker=0.49 two trials at a time (0.5 + 0.5 + 1 <= 2).
    assert derive_concurrency({"CPU": 2}, [{"CPU": 0.5, "data_CPU": 1.0}], {"CPU": 0.46}, None,
                              4) == 2


def test_trial_and_evaluation_resources(tmp_path):
    from massl_ray.config import load_config
    from massl_ray.evaluate.jobs import EvalSettings
    from massl_ray.sweep import eval_resources, trial_resources

    cfg = load_config(None, ["run.num_workers=2", "run.cpus_per_worker=1.5",
                             "data.decode_cpus=0.5"])
    assert trial_resources(cfg) == {"CPU": 3.01, "data_CPU": 1.0}
    cfg = load_config(None, ["data.decode_cpus=2", "run.use_gpu=true", "run.num_workers=2"])
    assert trial_resources(cfg) == {"CPU": 2.01, "data_CPU": 2.0, "GPU": 2.0}
    res = {"num_cpus": 2.0, "num_gpus": 1.0}
    assert eval_resources(EvalSettings(local=True), res) == \
        {"CPU": 2.01, "GPU": 1.0, "data_CPU": 0.0, "data_GPU": 0.0}
    assert eval_resources(EvalSettings(local=False, concurrency=2, cpus_per_actor=1.0,
                                       gpus_per_actor=0.5, decode_cpus=0.5), res) == \
        {"CPU": 2.01, "GPU": 1.0, "data_CPU": 3.0, "data_GPU": 1.0}


def test_object_store_sweep_storage_is_still_refused(tmp_path):
    """Resolving local paths on the driver must leave URIs alone (and so refused)."""
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"sweep": {"name": "x", "storage_path": "s3://b/x",
                                           "space": {"massl.num_blocks": [2]}}}))
    with pytest.raises(ConfigError, match="sweep.storage_path must be a filesystem path"):
        load_sweep(p)


# ---- on Ray --------------------------------------------------------------------------------

def _records(sweep_dir: Path) -> dict:
    return {p.stem: json.loads(p.read_text())
            for p in sorted((sweep_dir / "evaluations").glob("*.json"))}


def _attempts(sweep_dir: Path) -> dict:
    return {p.parent.name: [json.loads(x) for x in p.read_text().splitlines()]
            for p in sorted((sweep_dir / "trials").glob("*/attempts.jsonl"))}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sweep_2x2_end_to_end(ray_instance, tmp_path):
    p = tiny_sweep(tmp_path, "grid2x2", {"massl.memory_size": [256, 512], "massl.num_blocks": [1, 2]})
    # Too large for the 4-CPU Ray: refused before launch, with the numbers.
    with pytest.raises(ConfigError, match=r"a trial needs 4\.01 CPU while it trains .* Ray Data 1 "
                                          r"more .* the cluster has 4 CPU: it could never run"):
        run_sweep(p, ["run.cpus_per_worker=4"])
    assert not (tmp_path / "sweeps" / "grid2x2" / "tune").exists()

    t_start = time.time()
    s = run_sweep(p)
    t_end = time.time()
    assert s["trials"] == 4 and s["finished"] == 4 and s["evaluated"] == 4
    assert not s["interrupted"] and not s["errors"] and not s["refused"]
    # (c - 1) x 0.51 (what a trial holds, training or evaluating) + 1.51 (a training one with
    # its Ray Data) <= 4 -> 5, so all 4 at once
    assert s["concurrency"] == 4
    sweep_dir = Path(s["sweep_dir"])
    evals, attempts = _records(sweep_dir), _attempts(sweep_dir)
    assert sorted(evals) == sorted(attempts) == sorted(r["trial"] for r in s["rows"])
    rows = {r["trial"]: r for r in s["rows"]}
    for name, e in evals.items():
        assert e["status"] == "ok"
        # Its own trial's final checkpoint, after that trial's training ended.
        assert e["result"]["checkpoint"].startswith(str(sweep_dir / "trials" / name))
        assert e["result"]["global_step"] == 4
        assert rows[name]["trial_ended_at"] <= e["eval_started_at"] <= e["eval_ended_at"] <= t_end
        assert attempts[name][0]["started_at"] >= t_start
        # A separate Ray task with its own resources (sweep.evaluation.num_cpus), outside the
        # trial's placement group, not the trainable that awaits it.
        assert e["pid"] != attempts[name][0]["pid"]
        assert e["resources"] == {"CPU": 0.5} and e["placement_group"] is None
        assert rows[name]["knn_top1"] == e["knn_top1"]

    # The evaluation's metrics are in Tune's ResultGrid (read back from the experiment).
    from ray.tune import ExperimentAnalysis, ResultGrid

    grid = ResultGrid(ExperimentAnalysis(str(sweep_dir / "tune")))
    assert len(grid) == 4 and not grid.errors
    best = grid.get_best_result(metric="knn_top1", mode="max")
    assert best.metrics["knn_top1"] == max(e["knn_top1"] for e in evals.values())
    assert s["best"]["knn_top1"] == best.metrics["knn_top1"]  # (ties broken either way)
    assert evals[s["best"]["trial"]]["knn_top1"] == best.metrics["knn_top1"]

    table = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert len(table) == 4
    assert {(int(r["memory_size"]), int(r["num_blocks"])) for r in table} == \
        {(256, 1), (256, 2), (512, 1), (512, 2)}
    for r in table:
        for col in ("final_loss", "knn_top1", "linear_top1", "train_wall_s"):
            float(r[col])  # a number in every cell
        assert r["status"] == "ok" and int(r["step"]) == 4
    assert len({r["knn_top1"] + r["linear_top1"] for r in table}) > 1 or \
        len({r["final_loss"] for r in table}) == 4
    md = (sweep_dir / "results.md").read_text().splitlines()
    assert len(md) == 2 + 4 and "knn_top1" in md[0]

    from PIL import Image

    with Image.open(sweep_dir / "knn_heatmap.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    # TensorBoard hparams: one run per trial.
    events = sorted((sweep_dir / "tb").glob("*/events.out.tfevents.*"))
    assert len(events) == 4 and all(b"hparams" in e.read_bytes() for e in events)


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


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_resume_after_the_driver_is_killed(ray_instance, tmp_path):
    """The sweep's driver (a separate process on the same Ray) gets SIGKILL once a trial and its
    evaluation are done and the next trial trains; the same sweep run again finishes without
    re-running that trial or its evaluation."""
    p = tiny_sweep(tmp_path, "resume", {"massl.memory_size": [256, 512]}, max_concurrent=1,
                   seed=1)
    sweep_dir = tmp_path / "sweeps" / "resume"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-c", "import sys; from massl_ray.sweep import run_sweep; "
         "run_sweep(sys.argv[1])", str(p)], cwd=str(ROOT), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and driver.poll() is None:
            evals, attempts = _records(sweep_dir), _attempts(sweep_dir)
            states = list((sweep_dir / "tune").glob("experiment_state*.json"))
            second = [n for n in attempts if n not in evals]
            # Tune saved its state after the second trial had started (so with the first done).
            if evals and second and states and max(s.stat().st_mtime for s in states) > \
                    attempts[second[0]][0]["started_at"]:
                break
            time.sleep(0.5)
        assert driver.poll() is None, "the driver ended before the test could kill it"
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    (first, rec), = _records(sweep_dir).items()
    assert rec["status"] == "ok"
    rec_text = (sweep_dir / "evaluations" / f"{first}.json").read_text()
    eval_json = sweep_dir / "eval" / first / "eval.json"
    eval_mtime = eval_json.stat().st_mtime_ns
    metrics = (sweep_dir / "trials" / first / "metrics.jsonl").read_text()

    s = run_sweep(p)  # the same command again: Tuner.restore
    assert not s["interrupted"] and s["finished"] == 2 and s["evaluated"] == 2
    assert len(_attempts(sweep_dir)[first]) == 1, "the finished trial ran again"
    assert (sweep_dir / "trials" / first / "metrics.jsonl").read_text() == metrics
    assert (sweep_dir / "evaluations" / f"{first}.json").read_text() == rec_text, \
        "its evaluation ran again"
    assert eval_json.stat().st_mtime_ns == eval_mtime
    assert [r["status"] for r in s["rows"]] == ["ok", "ok"]
    assert all(r["knn_top1"] is not None and r["final_loss"] is not None for r in s["rows"])
