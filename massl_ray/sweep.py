"""Ray Tune sweeps over any config keys, each finished trial evaluated as a dependent Ray task.

``python -m massl_ray tune --config jobs/<sweep>.yaml [section.key=value ...]``

The YAML is a training config plus a ``sweep:`` section (see ``jobs/sweep_cpu.yaml``)::

    sweep:
      name: mem_blocks            # sweep directory: <storage_path>/<name>
      storage_path: runs/sweeps
      grid:                       # every combination (itertools.product, in this order)
        massl.memory_size: [2048, 4096]
        massl.num_blocks: [2, 4]
      random:                     # drawn per trial from sweep.seed (num_samples per grid point)
        optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
      num_samples: 1
      max_concurrent: null        # null: from the cluster's resources and each trial's needs
      asha: null                  # {metric: online_knn_top1, mode: max, grace_period: 20, ...}
      evaluation: {num_cpus: 1, num_gpus: 0, ...}   # + any EvalSettings key

Flow: every trial configuration is built and validated on the driver (``Config.validate`` and
the trainer's own ``prepare``), and any invalid one is refused, named with its reason, before
Ray Tune starts; the concurrency is derived from the cluster (trials that could never be placed
are refused). Each trial is a function trainable that calls :func:`massl_ray.train.trainer.train`
(a TorchTrainer) with Tune's report callback. When a trial completes, :class:`EvalScheduler`
(a ``tune.Callback``) launches its evaluation (:func:`massl_ray.evaluate.jobs.evaluate_checkpoint`)
as a Ray task with its own resources on the trial's final checkpoint, overlapping the trials
still training. Records in the sweep directory make it resumable: ``completed/<trial>.json``
(trial end), ``evaluations/<trial>.json`` (evaluation done, with start/end timestamps).
Running the same command again restores the Tune experiment (``Tuner.restore``): finished
trials are not re-run, recorded evaluations are not redone, missing ones are scheduled. The
sweep ends with ``results.csv``, ``results.md`` and ``knn_heatmap.png``.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml
from ray import tune

from massl_ray.config import Config, ConfigError, apply_overrides, config_from_dict, merge_dict
from massl_ray.evaluate.jobs import EvalSettings
from massl_ray.data.sources import DataSourceError, open_source

log = logging.getLogger("massl_ray")

SWEEP_FILE = "sweep.json"
TRIAL_CPU = 0.01  # the function trainable itself; its TorchTrainer reserves the real resources
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SWEEP_KEYS = ("name", "storage_path", "seed", "grid", "random", "num_samples", "max_concurrent",
              "asha", "evaluation")
PATH_KEYS = (("data", "train"), ("data", "eval_train"), ("data", "eval_test"),
             ("model", "init_from"))
ASHA_KEYS = ("metric", "mode", "grace_period", "reduction_factor", "max_t")


@dataclass
class SweepSpec:
    name: str = "sweep"
    storage_path: str = "runs/sweeps"
    seed: int = 0
    grid: dict[str, list] = field(default_factory=dict)
    random: dict[str, dict] = field(default_factory=dict)
    num_samples: int = 1
    max_concurrent: Optional[int] = None
    asha: Optional[dict] = None
    evaluation: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return Path(self.storage_path).absolute() / self.name


# ---- parsing and expansion ----------------------------------------------------------------

def _check_key(key: str, what: str) -> None:
    if not isinstance(key, str) or key.count(".") != 1:
        raise ConfigError(f"sweep.{what}: key {key!r} must look like section.key (e.g. massl.memory_size)")
    section, name = key.split(".")
    merge_dict(Config(), {section: {}})  # unknown section -> ConfigError
    if name not in getattr(Config(), section).__dataclass_fields__:
        raise ConfigError(f"sweep.{what}: unknown config key {key}")


def parse_sweep(data: dict) -> SweepSpec:
    if not isinstance(data, dict):
        raise ConfigError("the sweep: section must be a mapping")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {', '.join(unknown)}; known: {', '.join(SWEEP_KEYS)}")
    spec = SweepSpec(**{k: v for k, v in data.items() if v is not None})
    if "://" in str(spec.storage_path):
        raise ConfigError("sweep.storage_path must be a filesystem path (on a multi-node cluster, a "
                          "shared filesystem mounted on every node): the sweep's records live there")
    if not spec.name or "/" in str(spec.name):
        raise ConfigError(f"sweep.name ({spec.name!r}) must be a non-empty name without '/'")
    if not isinstance(spec.grid, dict) or not isinstance(spec.random, dict):
        raise ConfigError("sweep.grid and sweep.random must be mappings of section.key")
    for key, values in spec.grid.items():
        _check_key(key, "grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key} must be a non-empty list of values")
    for key, dist in spec.random.items():
        _check_key(key, "random")
        if key in spec.grid:
            raise ConfigError(f"sweep: {key} is in both grid and random")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"sweep.random.{key} must be one of "
                              f"{{{' | '.join(d + ': [...]' for d in DISTRIBUTIONS)}}}, got {dist!r}")
        kind, args = next(iter(dist.items()))
        if not isinstance(args, list) or (kind != "choice" and len(args) != 2) or not args:
            raise ConfigError(f"sweep.random.{key}.{kind} needs a list "
                              f"{'of choices' if kind == 'choice' else '[low, high]'}")
        if kind == "loguniform" and not (0 < args[0] < args[1]):
            raise ConfigError(f"sweep.random.{key}: loguniform needs 0 < low < high")
    if not isinstance(spec.num_samples, int) or spec.num_samples < 1:
        raise ConfigError(f"sweep.num_samples ({spec.num_samples}) must be a positive integer")
    if spec.max_concurrent is not None and spec.max_concurrent < 1:
        raise ConfigError("sweep.max_concurrent must be positive or null")
    if spec.asha is not None:
        if not isinstance(spec.asha, dict) or set(spec.asha) - set(ASHA_KEYS):
            raise ConfigError(f"sweep.asha must be a mapping with keys among {', '.join(ASHA_KEYS)}")
        if spec.asha.get("mode", "max") not in ("min", "max"):
            raise ConfigError("sweep.asha.mode must be min or max")
    return spec


def load_sweep(path: str | os.PathLike, overrides: Optional[list[str]] = None
               ) -> tuple[dict, SweepSpec]:
    """The base training config (a full dict, CLI overrides applied, not yet validated: each
    trial validates its own) and the sweep spec. ``sweep.key=value`` overrides go to the spec."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep config {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("sweep"), dict):
        raise ConfigError(f"{str(p)!r} has no sweep: section (see jobs/sweep_cpu.yaml)")
    sweep_data = dict(data.pop("sweep"))
    cfg_over = []
    for item in overrides or []:
        if item.startswith("sweep."):
            k, _, v = item[len("sweep."):].partition("=")
            sweep_data[k] = yaml.safe_load(v)
        else:
            cfg_over.append(item)
    # Relative paths are relative to where the command runs (the driver), resolved here: each
    # Tune trial runs in its own working directory.
    if sweep_data.get("storage_path") is None:
        sweep_data["storage_path"] = SweepSpec.storage_path
    sweep_data["storage_path"] = _abs_local(sweep_data["storage_path"])
    cfg = merge_dict(Config(), data)
    apply_overrides(cfg, cfg_over)
    for sec, key in PATH_KEYS:
        section = getattr(cfg, sec)
        setattr(section, key, _abs_local(getattr(section, key)))
    return cfg.to_dict(), parse_sweep(sweep_data)


def _abs_local(v: Any) -> Any:
    """A local path made absolute against this process's working directory; URIs, empty and
    non-string values unchanged."""
    if isinstance(v, str) and v and "://" not in v:
        return os.path.abspath(v)
    return v


def _sample(rng: np.random.Generator, dist: dict) -> Any:
    kind, args = next(iter(dist.items()))
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    if kind == "randint":
        return int(rng.integers(args[0], args[1]))
    return args[int(rng.integers(len(args)))]


def expand(spec: SweepSpec) -> list[dict]:
    """Every trial's overrides ``{section.key: value}``: the grid's product, ``num_samples``
    times, with the random keys drawn in order from ``sweep.seed`` (reproducible)."""
    rng = np.random.default_rng(spec.seed)
    keys = list(spec.grid)
    out = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        for _ in range(spec.num_samples):
            v = dict(zip(keys, combo))
            for k, dist in spec.random.items():
                v[k] = _sample(rng, dist)
            for sec, key in PATH_KEYS:  # swept paths: relative to the driver, as in load_sweep
                if f"{sec}.{key}" in v:
                    v[f"{sec}.{key}"] = _abs_local(v[f"{sec}.{key}"])
            out.append(v)
    return out


def trial_name(index: int) -> str:
    return f"t{index:03d}"


def trial_config(base: dict, variant: dict, spec: SweepSpec, index: int,
                 validate: bool = True) -> Config:
    """The base config with the trial's overrides; run name/storage inside the sweep dir."""
    cfg = config_from_dict(copy.deepcopy(base), validate=False)
    nested: dict[str, dict] = {}
    for key, value in variant.items():
        section, k = key.split(".")
        nested.setdefault(section, {})[k] = value
    # block_size and num_blocks are alternatives: sweeping one of them clears the other.
    m = nested.get("massl", {})
    if "num_blocks" in m and "block_size" not in m:
        cfg.massl.block_size = None
    if "block_size" in m and "num_blocks" not in m:
        cfg.massl.num_blocks = None
    merge_dict(cfg, nested)
    cfg.run.name = f"{spec.name}-{trial_name(index)}"
    cfg.run.storage_path = str(spec.dir / "trials")
    cfg.run.resume = "auto"  # an interrupted trial continues from its latest checkpoint
    cfg.run.final_knn = False  # the dependent evaluation job does it
    # Inside a Tune trial Ray Data may only use the trial's own resources (0.01 CPU here):
    # materialising the encoded rows up front would wait forever for a read task. The lazy
    # dataset handed to Ray Train does not have that problem.
    cfg.data.cache_encoded = False
    return cfg.validate() if validate else cfg


def _fmt_variant(v: dict) -> str:
    return "{" + ", ".join(f"{k}: {val}" for k, val in v.items()) + "}"


def check_variants(base: dict, spec: SweepSpec, variants: list[dict]) -> list[Config]:
    """Build and validate every trial config, then let the trainer's ``prepare`` check the data
    and derive the steps per epoch; all invalid trials are refused at once, each named."""
    from massl_ray.train.trainer import prepare

    cfgs, bad = [], []
    for i, v in enumerate(variants):
        try:
            cfgs.append(trial_config(base, v, spec, i))
        except ConfigError as e:
            bad.append(f"{trial_name(i)} {_fmt_variant(v)}: {str(e).replace(chr(10), ' ')}")
    if not bad:
        for i, (v, cfg) in enumerate(zip(variants, cfgs)):
            try:
                prepared, _ = prepare(copy.deepcopy(cfg))  # data source, steps per epoch
                cfg.optim.steps_per_epoch = prepared.optim.steps_per_epoch
            except (ConfigError, DataSourceError) as e:
                bad.append(f"{trial_name(i)} {_fmt_variant(v)}: {str(e).replace(chr(10), ' ')}")
    if bad:
        raise ConfigError(
            f"sweep {spec.name!r}: {len(bad)} of {len(variants)} trial configuration(s) are "
            f"invalid; nothing was launched:\n  - " + "\n  - ".join(bad))
    return cfgs


def eval_settings(spec: SweepSpec, base_cfg: Config) -> tuple[EvalSettings, dict]:
    """The evaluation settings (defaults: the config's data.eval_train / eval_test, features
    in-process inside the evaluation task) and the task's resources."""
    ev = dict(spec.evaluation or {})
    res = {"num_cpus": float(ev.pop("num_cpus", 1.0)), "num_gpus": float(ev.pop("num_gpus", 0.0))}
    ev.setdefault("train_data", base_cfg.data.eval_train)
    ev.setdefault("test_data", base_cfg.data.eval_test)
    for k in ("train_data", "test_data", "cache_dir"):
        if ev.get(k):
            ev[k] = _abs_local(str(ev[k]))
    ev.setdefault("local", True)
    ev.setdefault("threads", max(1, int(res["num_cpus"])))
    if res["num_gpus"] > 0:
        ev.setdefault("device", "cuda")
    s = EvalSettings.from_dict(ev, what="sweep.evaluation")
    if not s.train_data or not s.test_data:
        raise ConfigError("sweep.evaluation needs train_data and test_data (or set data.eval_train "
                          "and data.eval_test in the config)")
    if res["num_cpus"] <= 0:
        raise ConfigError("sweep.evaluation.num_cpus must be positive")
    for what, uri in (("train_data", s.train_data), ("test_data", s.test_data)):
        open_source(uri, s.format, s.image_column, s.label_column, require_labels=True,
                    what=f"sweep.evaluation.{what}")
    return s, res


# ---- resources -----------------------------------------------------------------------------

def trial_resources(cfg: Config) -> dict:
    """What one trial holds: ``CPU``/``GPU`` for as long as it trains (its workers and the
    trainable), and ``data_CPU``, what Ray Data needs beside them to make progress (a decode
    task of data.decode_cpus; Ray Data's read/shuffle tasks take a whole CPU)."""
    r = cfg.run
    workers = max(1, r.num_workers)
    out = {"CPU": workers * r.cpus_per_worker + TRIAL_CPU,
           "data_CPU": max(1.0, cfg.data.decode_cpus)}
    if r.use_gpu:
        out["GPU"] = workers * r.gpus_per_worker
    return out


def derive_concurrency(cluster: dict, trials: list[dict], eval_res: dict,
                       max_concurrent: Optional[int], n_trials: int) -> int:
    """How many trials may train at once. ``c`` concurrent trials hold ``c x CPU`` for as long
    as they train, and their data pipelines need ``data_CPU`` more to make progress, so ``c``
    is the largest with ``c x CPU + data_CPU + evaluation <= cluster`` (and likewise for GPUs),
    at least 1 (an evaluation then waits for a trial to end). A trial whose own CPU plus its data
    CPU exceeds the cluster would hang, not fail: it is refused before launch."""
    need = {k: max(t.get(k, 0.0) for t in trials) for k in ("CPU", "GPU")}
    data = max(t.get("data_CPU", 0.0) for t in trials)
    ev = {"CPU": eval_res["num_cpus"], "GPU": eval_res["num_gpus"]}
    have = {k: float(cluster.get(k, 0.0)) for k in ("CPU", "GPU")}
    extra = {"CPU": data, "GPU": 0.0}
    for k in ("CPU", "GPU"):
        if need[k] + extra[k] > have[k] + 1e-9:
            what = (f"{need[k]:g} CPU while it trains (workers x run.cpus_per_worker + the "
                    f"trainable) and Ray Data {data:g} more (data.decode_cpus, at least one "
                    f"whole CPU for its read and shuffle tasks)" if k == "CPU"
                    else f"{need[k]:g} GPU (workers x run.gpus_per_worker)")
            raise ConfigError(
                f"a trial needs {what}, but the cluster has {have[k]:g} {k}: it could never "
                f"run (lower run.cpus_per_worker / run.num_workers, or add {k}s)")
        if ev[k] > have[k] + 1e-9:
            raise ConfigError(f"sweep.evaluation needs {ev[k]:g} {k}, the cluster has {have[k]:g}")
    n = n_trials
    for k in ("CPU", "GPU"):
        if need[k] > 0:
            n = min(n, max(1, int((have[k] - ev[k] - extra[k] + 1e-9) // need[k])))
    if max_concurrent is not None:
        n = min(n, max_concurrent)
    return max(1, n)


# ---- the trial -----------------------------------------------------------------------------

def _append_jsonl(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def run_trial(config: dict, base: dict, spec: dict) -> dict:
    """The function trainable: build the trial's config, train it with the project's trainer
    (a TorchTrainer whose reports reach Tune), return the final summary as the last result."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from massl_ray.train.trainer import run_dir_of, setup_logging, train

    setup_logging(0)
    sp = SweepSpec(**spec)
    index, variant = config["trial"]["index"], config["trial"]["overrides"]
    cfg = trial_config(base, variant, sp, index)
    started = time.time()
    _append_jsonl(run_dir_of(cfg) / "attempts.jsonl", {"started_at": started, "pid": os.getpid()})
    result = train(cfg, callbacks=[TuneReportCallback()])
    m = dict(result.get("metrics") or {})
    if "loss" not in m:  # resumed after the last step: nothing trained now, take the logged end
        m.update(_last_logged(run_dir_of(cfg) / "metrics.jsonl"))
    out = {
        "trial": trial_name(index),
        "final_loss": m.get("loss"),
        "step": m.get("step"),
        "train_wall_s": result.get("wall_s"),
        "checkpoint": result.get("checkpoint"),
        "skipped_images": result.get("skipped_images"),
        "trial_started_at": started,
        "trial_ended_at": time.time(),
        "training_done": True,
    }
    for k in ("online_knn_top1", "online_knn_step"):
        if k in m:
            out[k] = m[k]
    return out


def _last_logged(path: Path) -> dict:
    try:
        lines = path.read_text().strip().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


# ---- dependent evaluations -----------------------------------------------------------------

def _evaluate_trial(trial: str, checkpoint: str, settings: dict, out_dir: str) -> dict:
    """Body of the evaluation Ray task (see :class:`EvalScheduler`)."""
    from massl_ray.evaluate.jobs import evaluate_checkpoint
    from massl_ray.train.trainer import setup_logging

    setup_logging(0)
    started = time.time()
    res = evaluate_checkpoint(checkpoint, EvalSettings.from_dict(settings), out_dir)
    return {"trial": trial, "status": "ok", "eval_started_at": started, "eval_ended_at": time.time(),
            "eval_s": time.time() - started, "knn_top1": res["knn_top1"],
            "linear_top1": res["linear_top1"], "result": res}


class EvalScheduler(tune.Callback):
    """Launches each completed trial's evaluation as a Ray task, records results on the driver.

    State lives in files under the sweep directory, so a restored experiment (whose callbacks
    Tune unpickles from the original Tuner) picks up where the last one stopped: on ``setup``
    it schedules the evaluations of trials completed earlier but not evaluated yet.
    """

    def __init__(self, sweep_dir: str, sweep_name: str, settings: dict, resources: dict):
        self.sweep_dir = sweep_dir
        self.sweep_name = sweep_name
        self.settings = settings
        self.resources = resources
        self._inflight: dict = {}

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_inflight"] = {}
        return d

    # -- files
    @property
    def _dir(self) -> Path:
        return Path(self.sweep_dir)

    def completed_path(self, trial: str) -> Path:
        return self._dir / "completed" / f"{trial}.json"

    def eval_path(self, trial: str) -> Path:
        return self._dir / "evaluations" / f"{trial}.json"

    def evaluated(self, trial: str) -> bool:
        p = self.eval_path(trial)
        if not p.is_file():
            return False
        try:
            return json.loads(p.read_text()).get("status") == "ok"
        except ValueError:
            return False

    # -- Tune hooks
    def setup(self, **info) -> None:
        self._inflight = {}
        d = self._dir / "completed"
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            rec = json.loads(p.read_text())
            if rec.get("status") == "ok" and not self.evaluated(rec["trial"]):
                log.info("sweep: scheduling the missing evaluation of %s", rec["trial"])
                self._submit(rec)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        rec = self._trial_record(trial, "ok")
        _write_json(self.completed_path(rec["trial"]), rec)
        if self.evaluated(rec["trial"]):
            return
        if rec.get("checkpoint"):
            self._submit(rec)
        else:
            log.warning("sweep: trial %s finished without a checkpoint; not evaluated", rec["trial"])

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        rec = self._trial_record(trial, "error")
        rec["error"] = str(getattr(trial, "error_file", "") or "")
        _write_json(self.completed_path(rec["trial"]), rec)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self.harvest(timeout=0)

    def on_experiment_end(self, trials: list, **info) -> None:
        if self._inflight:
            log.info("sweep: waiting for %d evaluation(s) still running", len(self._inflight))
        self.harvest(timeout=None)

    # -- internals
    def _trial_record(self, trial, status: str) -> dict:
        from massl_ray.method.checkpoint import latest_valid_checkpoint

        cfg = trial.config["trial"]
        name = trial_name(cfg["index"])
        last = dict(trial.last_result or {})
        ckpt = last.get("checkpoint") or last.get("checkpoint_path")
        if not ckpt:  # stopped early (ASHA) or no final report: its newest valid checkpoint
            found = latest_valid_checkpoint(self._dir / "trials" / f"{self.sweep_name}-{name}")
            ckpt = str(found) if found else None
        return {
            "trial": name, "index": cfg["index"], "overrides": cfg["overrides"], "status": status,
            "tune_trial_id": trial.trial_id, "checkpoint": ckpt,
            "final_loss": last.get("final_loss", last.get("loss")),
            "step": last.get("step"), "train_wall_s": last.get("train_wall_s", last.get("wall_s")),
            "stopped_early": not last.get("training_done", False),
            "online_knn_top1": last.get("online_knn_top1"),
            "trial_started_at": last.get("trial_started_at"),
            "trial_ended_at": last.get("trial_ended_at") or time.time(),
            "completion_seen_at": time.time(),
        }

    def _submit(self, rec: dict) -> None:
        import ray

        task = ray.remote(_evaluate_trial).options(
            num_cpus=self.resources["num_cpus"], num_gpus=self.resources["num_gpus"] or None,
            name=f"evaluate:{self.sweep_name}-{rec['trial']}", max_retries=1)
        out_dir = str(self._dir / "eval" / rec["trial"])
        ref = task.remote(rec["trial"], rec["checkpoint"], self.settings, out_dir)
        self._inflight[ref] = {"trial": rec["trial"], "submitted_at": time.time(),
                               "trial_ended_at": rec.get("trial_ended_at")}
        log.info("sweep: evaluation of %s submitted (checkpoint %s)", rec["trial"], rec["checkpoint"])

    def harvest(self, timeout: Optional[float]) -> int:
        """Record finished evaluations; ``timeout=None`` waits for all. Returns how many."""
        import ray

        if not self._inflight:
            return 0
        refs = list(self._inflight)
        if timeout is None:
            done = refs
        else:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in done:
            meta = self._inflight.pop(ref)
            try:
                rec = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - an evaluation failure is recorded, not fatal
                rec = {"trial": meta["trial"], "status": "error", "error": f"{type(e).__name__}: {e}"}
                log.error("sweep: evaluation of %s failed: %s", meta["trial"], e)
            rec["eval_submitted_at"] = meta["submitted_at"]
            rec["trial_ended_at"] = meta["trial_ended_at"]
            _write_json(self.eval_path(meta["trial"]), rec)
            if rec.get("status") == "ok":
                log.info("sweep: %s evaluated: k-NN top-1 %.2f%%, linear top-1 %s (%.0fs)",
                         meta["trial"], rec["knn_top1"],
                         "-" if rec["linear_top1"] is None else f"{rec['linear_top1']:.2f}%",
                         rec["eval_s"])
        return len(done)


# ---- results -------------------------------------------------------------------------------

# Swept keys shown through the derived columns memory_size / num_blocks / block_size.
DERIVED_COLUMNS = ("massl.memory_size", "massl.num_blocks", "massl.block_size")


def collect_rows(sweep_dir: Path, variants: list[dict], cfgs: list[Config]) -> list[dict]:
    rows = []
    for i, (v, cfg) in enumerate(zip(variants, cfgs)):
        name = trial_name(i)
        c = _read(sweep_dir / "completed" / f"{name}.json")
        e = _read(sweep_dir / "evaluations" / f"{name}.json")
        status = c.get("status", "not run") if c else "not run"
        stop = cfg.run.max_steps or cfg.total_steps()
        if c and c.get("stopped_early") and status == "ok" and (c.get("step") or 0) < stop:
            status = "stopped early"  # by the scheduler (ASHA), before the end of its schedule
        rows.append({
            "trial": name, **{k: v[k] for k in v if k not in DERIVED_COLUMNS},
            "memory_size": cfg.massl.memory_size, "num_blocks": cfg.num_blocks,
            "block_size": cfg.block_size, "status": status,
            "step": c.get("step") if c else None,
            "final_loss": c.get("final_loss") if c else None,
            "knn_top1": e.get("knn_top1") if e.get("status") == "ok" else None,
            "linear_top1": e.get("linear_top1") if e.get("status") == "ok" else None,
            "train_wall_s": c.get("train_wall_s") if c else None,
            "eval_s": e.get("eval_s"),
            "trial_ended_at": c.get("trial_ended_at") if c else None,
            "eval_started_at": e.get("eval_started_at"),
            "eval_ended_at": e.get("eval_ended_at"),
            "eval_status": e.get("status", "not run"),
        })
    return rows


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_table(rows: list[dict], sweep_dir: Path) -> tuple[Path, Path]:
    cols = list(rows[0]) if rows else []
    csv_path, md_path = sweep_dir / "results.csv", sweep_dir / "results.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in cols})
    shown = [c for c in cols if c not in ("trial_ended_at", "eval_started_at", "eval_ended_at",
                                           "eval_status")]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(r[c]) for c in shown) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_heatmap(rows: list[dict], path: Path, title: str) -> Optional[Path]:
    """k-NN top-1 over (memory size, number of blocks): the mean where several trials share a
    cell, blank where none was evaluated."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no heatmap (pip install matplotlib)")
        return None
    mems = sorted({r["memory_size"] for r in rows})
    blocks = sorted({r["num_blocks"] for r in rows})
    grid = np.full((len(mems), len(blocks)), np.nan)
    for i, m in enumerate(mems):
        for j, b in enumerate(blocks):
            vals = [r["knn_top1"] for r in rows if r["memory_size"] == m and r["num_blocks"] == b
                    and r["knn_top1"] is not None]
            if vals:
                grid[i, j] = float(np.mean(vals))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(blocks), 1.4 + 0.8 * len(mems)), dpi=100)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_yticks(range(len(mems)), [str(m) for m in mems])
    ax.set_xlabel("number of memory blocks")
    ax.set_ylabel("memory size K")
    ax.set_title(title, fontsize=9)
    finite = grid[np.isfinite(grid)]
    mid = float(finite.mean()) if finite.size else 0.0
    for i in range(len(mems)):
        for j in range(len(blocks)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center",
                        color="black" if grid[i, j] > mid else "white", fontsize=9)
    fig.colorbar(im, ax=ax, label="k-NN top-1 (%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- the driver ----------------------------------------------------------------------------

def _sweep_record(base: dict, spec: SweepSpec, variants: list[dict]) -> dict:
    return {"name": spec.name, "variants": variants, "base": base,
            "spec": {k: getattr(spec, k) for k in SWEEP_KEYS}}


def _check_same_sweep(sweep_dir: Path, record: dict) -> None:
    p = sweep_dir / SWEEP_FILE
    if not p.is_file():
        return
    old = json.loads(p.read_text())
    same = json.loads(json.dumps(record, default=str))
    diffs = [k for k in ("variants", "base") if old.get(k) != same.get(k)]
    if diffs:
        raise ConfigError(
            f"sweep {record['name']!r} in {sweep_dir} was started with a different "
            f"{' and '.join('search space' if d == 'variants' else 'base config' for d in diffs)}; "
            f"a resume must use the same sweep file: choose another sweep.name for a new sweep")


def run_sweep(config_path: str | os.PathLike, overrides: Optional[list[str]] = None,
              retry_errored: bool = False, extra_callbacks: Optional[list] = None) -> dict:
    """Validate, launch (or resume) the sweep, wait for the evaluations, write the results."""
    base, spec = load_sweep(config_path, overrides)
    variants = expand(spec)
    cfgs = check_variants(base, spec, variants)  # nothing launched yet
    settings, eval_res = eval_settings(spec, cfgs[0])
    asha_metric = (spec.asha or {}).get("metric", "online_knn_top1")
    if spec.asha is not None and asha_metric.startswith("online_knn"):
        off = [trial_name(i) for i, c in enumerate(cfgs)
               if c.run.online_knn_every_steps <= 0]
        if off:
            raise ConfigError(f"sweep.asha uses {asha_metric}, but the online k-NN monitor is off "
                              f"(run.online_knn_every_steps) for {', '.join(off)}")
    sweep_dir = spec.dir
    record = _sweep_record(base, spec, variants)
    _check_same_sweep(sweep_dir, record)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_json(sweep_dir / SWEEP_FILE, record)

    import ray

    from massl_ray.runtime import init_ray

    init_ray()
    cluster = ray.cluster_resources()
    conc = derive_concurrency(cluster, [trial_resources(c) for c in cfgs], eval_res,
                              spec.max_concurrent, len(cfgs))
    log.info("sweep %r: %d trial(s), %d at a time (cluster %g CPU / %g GPU; a trial holds %s; "
             "an evaluation %s) -> %s", spec.name, len(cfgs), conc, cluster.get("CPU", 0),
             cluster.get("GPU", 0), trial_resources(cfgs[0]), eval_res, sweep_dir)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, spec={k: getattr(spec, k) for k in SWEEP_KEYS}),
        {"CPU": TRIAL_CPU})
    tune_path = sweep_dir / "tune"
    t0 = time.time()
    if tune.Tuner.can_restore(str(tune_path)):
        log.info("sweep %r: resuming the Tune experiment in %s", spec.name, tune_path)
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                   restart_errored=retry_errored)
    else:
        scheduler, metric, mode = None, None, None
        if spec.asha is not None:
            from ray.tune.schedulers import ASHAScheduler

            metric, mode = asha_metric, spec.asha.get("mode", "max")
            max_t = spec.asha.get("max_t") or max(c.run.max_steps or c.total_steps() for c in cfgs)
            scheduler = ASHAScheduler(time_attr="step", max_t=max_t,
                                      grace_period=spec.asha.get("grace_period", 1),
                                      reduction_factor=spec.asha.get("reduction_factor", 2))
        callback = EvalScheduler(str(sweep_dir), spec.name, settings.to_dict(), eval_res)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(
                [{"index": i, "overrides": v} for i, v in enumerate(variants)])},
            tune_config=tune.TuneConfig(max_concurrent_trials=conc, scheduler=scheduler,
                                        metric=metric, mode=mode),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir),
                                      callbacks=[callback, *(extra_callbacks or [])], verbose=1),
        )
    tuner.fit()
    rows = collect_rows(sweep_dir, variants, cfgs)
    csv_path, md_path = write_table(rows, sweep_dir)
    png = write_heatmap(rows, sweep_dir / "knn_heatmap.png",
                        f"{spec.name}: k-NN top-1 (k={settings.ks[0] if 20 not in settings.ks else 20})")
    finished = [r for r in rows if r["status"] in ("ok", "stopped early")]
    interrupted = len(finished) + sum(r["status"] == "error" for r in rows) < len(rows)
    summary = {"sweep_dir": str(sweep_dir), "trials": len(rows), "finished": len(finished),
               "evaluated": sum(r["eval_status"] == "ok" for r in rows),
               "errors": [r["trial"] for r in rows if r["status"] == "error"],
               "interrupted": interrupted, "concurrency": conc, "wall_s": time.time() - t0,
               "results_csv": str(csv_path), "results_md": str(md_path),
               "heatmap": str(png) if png else None, "rows": rows}
    _write_json(sweep_dir / "summary.json", summary)
    if interrupted:
        log.warning("sweep %r interrupted (%d of %d trials finished): run the same command to "
                    "resume", spec.name, len(finished), len(rows))
    return summary
