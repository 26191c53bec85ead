"""Ray Tune sweeps over any config keys; each trial trains, then awaits its evaluation task.

``python -m massl_ray tune --config jobs/<sweep>.yaml [section.key=value | sweep.key=value ...]``:
a training config plus a ``sweep:`` section (its keys: :class:`SweepSpec`; docs/evaluation.md)::

    sweep:
      name: mem_blocks            # the sweep directory: <storage_path>/<name>
      space:                      # section.key: a Tune search space, expanded by Tune
        massl.memory_size: [2048, 4096]           # a list: tune.grid_search
        optim.lr: {loguniform: [1.0e-4, 1.0e-3]}  # tune.<fn>(*args) (a mapping: **kwargs)
      search: grid                # grid | random | optuna | hyperopt ({name: optuna, ...kwargs})
      scheduler: null             # fifo | {name: asha, metric: online_knn_top1, grace_period: 20}
      evaluation: {num_cpus: 1}   # the evaluation task's resources + any EvalSettings key

Grid points are validated before Ray starts (all invalid ones named at once), sampled values
when the searcher proposes them (:class:`TrialRefused`); the concurrency is derived from the
cluster and what a trial holds. Each trial (:func:`run_trial`) takes a training slot
(:class:`TrainingSlots`), trains, gives the slot back (the next trial starts training), evaluates
its final checkpoint in a Ray task with its own resources and reports the evaluation as its last
result:
``ResultGrid.get_best_result(metric="knn_top1")``. Running the command again restores the Tune
experiment; a recorded evaluation (``evaluations/<trial>.json``) of the same checkpoint is
reused. ``results.csv``/``.md`` and ``knn_heatmap.png`` come from the ResultGrid; Tune itself
writes each trial's TensorBoard hparams (``tensorboard --logdir <sweep>/tune``).

``sweep.storage_path`` may be an object-store URI (``s3://...``, through ``pyarrow.fs`` as a
training's ``run.storage_path``): the Tune experiment, the trials' runs and every record above
then live in the bucket (:func:`_at`, :func:`_write_bytes`); a restore reads them from there.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import io
import itertools
import json
import logging
import math
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pyarrow.fs as pafs
import yaml
from ray import tune

from massl_ray.config import (Config, ConfigError, apply_overrides, check_name, config_from_dict,
                              merge_dict)
from massl_ray.data.sources import DataSourceError, open_source
from massl_ray.evaluate.jobs import EvalSettings
from massl_ray.method.checkpoint import is_uri

log = logging.getLogger("massl_ray")

SWEEP_FILE = "sweep.json"
SLOTS = "massl_sweep_slots"  # the training slots' actor: name f"{SLOTS}:{sweep name}"
TRIAL_CPU = 0.01  # the function trainable itself; its TorchTrainer reserves the real resources
# tune.<fn> a sweep may name; grid_search and choice take the list itself.
DOMAINS = ("grid_search", "choice", "uniform", "quniform", "loguniform", "qloguniform", "randn",
           "qrandn", "randint", "qrandint", "lograndint", "qlograndint")
PATH_KEYS = (("data", "train"), ("data", "eval_train"), ("data", "eval_test"),
             ("model", "init_from"))
# Keys that decide what a trial holds: only a grid may sweep them (the concurrency is derived
# from them before launch).
RESOURCE_KEYS = ("run.num_workers", "run.cpus_per_worker", "run.gpus_per_worker", "run.use_gpu",
                 "data.decode_cpus")
# name -> (module, class, pip package, seed keyword)
SEARCHERS = {"optuna": ("ray.tune.search.optuna", "OptunaSearch", "optuna", "seed"),
             "hyperopt": ("ray.tune.search.hyperopt", "HyperOptSearch", "hyperopt",
                          "random_state_seed")}
SCHEDULERS = {"asha": "ASHAScheduler", "median_stopping": "MedianStoppingRule"}
EXTRA = "pip install 'massl_ray[tune-search]'"
EVAL_METRICS = ("knn_top1", "linear_top1")


class TrialRefused(ConfigError):
    """A sampled trial configuration that is invalid: the trial ends with this error."""


@dataclasses.dataclass
class SweepSpec:
    name: str = "sweep"
    storage_path: str = "runs/sweeps"
    seed: int = 0
    space: dict = dataclasses.field(default_factory=dict)
    num_samples: int = 1
    search: Union[str, dict] = "grid"
    scheduler: Union[None, str, dict] = None
    metric: str = "knn_top1"
    mode: str = "max"
    max_concurrent: Optional[int] = None
    evaluation: dict = dataclasses.field(default_factory=dict)

    @property
    def dir(self) -> Union[Path, str]:
        """The sweep directory: a :class:`Path`, or a URI string for an object store."""
        if is_uri(self.storage_path):
            return _at(self.storage_path, self.name)
        return Path(self.storage_path).absolute() / self.name


def _at(base: Union[Path, str], *parts: str) -> Union[Path, str]:
    """``base/parts...``: a :class:`Path` under a local directory, a URI under a URI."""
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return "/".join([base.rstrip("/"), *parts])


SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(SweepSpec))


# ---- parsing --------------------------------------------------------------------------------

def _check_key(key: str) -> None:
    if not isinstance(key, str) or key.count(".") != 1:
        raise ConfigError(f"sweep.space: key {key!r} must look like section.key (e.g. massl.memory_size)")
    section, name = key.split(".")
    merge_dict(Config(), {section: {}})  # unknown section -> ConfigError
    if name not in getattr(Config(), section).__dataclass_fields__:
        raise ConfigError(f"sweep.space: unknown config key {key}")


def _named(value: Union[None, str, dict], what: str) -> tuple[Optional[str], dict]:
    """``name`` or ``{name: ..., **kwargs}`` -> (name, kwargs)."""
    if value is None or isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        kw = dict(value)
        return kw.pop("name"), kw
    raise ConfigError(f"sweep.{what} must be a name or a mapping with a name: key, got {value!r}")


def domain(key: str, value: Any) -> tuple[str, Any]:
    """A sweep.space entry -> (Tune function name, the Tune object)."""
    if isinstance(value, list):
        value = {"grid_search": value}
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in DOMAINS:
        raise ConfigError(f"sweep.space.{key} must be a list (a grid) or one of "
                          f"{{{' | '.join(DOMAINS)}: [...]}}, got {value!r}")
    fn, args = next(iter(value.items()))
    if fn in ("grid_search", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"sweep.space.{key}.{fn} needs a non-empty list of values")
        return fn, getattr(tune, fn)(args)
    try:
        return fn, (getattr(tune, fn)(**args) if isinstance(args, dict) else
                    getattr(tune, fn)(*(args if isinstance(args, list) else [args])))
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"sweep.space.{key}: tune.{fn}({args!r}) is invalid: {e}") from None


def parse_sweep(data: dict) -> SweepSpec:
    if not isinstance(data, dict):
        raise ConfigError("the sweep: section must be a mapping")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {', '.join(unknown)}; known: {', '.join(SWEEP_KEYS)}")
    spec = SweepSpec(**{k: v for k, v in data.items() if v is not None})
    bad_name = check_name(spec.name, "sweep.name")
    if bad_name:
        raise ConfigError(bad_name)
    if not isinstance(spec.space, dict):
        raise ConfigError("sweep.space must be a mapping of section.key to a search space")
    for key, value in spec.space.items():
        _check_key(key)
        fn, _ = domain(key, value)
        if key in RESOURCE_KEYS and fn != "grid_search":
            raise ConfigError(f"sweep.space.{key} decides what a trial holds: sweep it with a "
                              f"list (a grid), so the concurrency can be derived before launch")
    if not isinstance(spec.num_samples, int) or spec.num_samples < 1:
        raise ConfigError(f"sweep.num_samples ({spec.num_samples}) must be a positive integer")
    if spec.max_concurrent is not None and (not isinstance(spec.max_concurrent, int)
                                            or spec.max_concurrent < 1):
        raise ConfigError("sweep.max_concurrent must be a positive integer or null")
    if spec.mode not in ("min", "max"):
        raise ConfigError(f"sweep.mode must be min or max, got {spec.mode!r}")
    search, _ = _named(spec.search, "search")
    if search not in ("grid", "random", *SEARCHERS):
        raise ConfigError(f"sweep.search {search!r}: known are grid, random, {', '.join(SEARCHERS)}")
    if search in SEARCHERS and any(domain(k, v)[0] == "grid_search" for k, v in spec.space.items()):
        raise ConfigError(f"sweep.search {search} proposes values itself: give it distributions "
                          f"(e.g. {{choice: [...]}}), not lists/grid_search, in sweep.space")
    sched, kw = _named(spec.scheduler, "scheduler")
    if sched not in (None, "fifo", *SCHEDULERS):
        raise ConfigError(f"sweep.scheduler {sched!r}: known are fifo, {', '.join(SCHEDULERS)}")
    if kw.get("mode", "max") not in ("min", "max"):
        raise ConfigError("sweep.scheduler.mode must be min or max")
    return spec


def load_sweep(path: Union[str, os.PathLike], overrides: Optional[list[str]] = None
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
    spec = parse_sweep(sweep_data)
    for key, value in spec.space.items():  # swept paths too (grid and choice values)
        if tuple(key.split(".")) in PATH_KEYS:
            fn, _ = domain(key, value)
            vals = value if isinstance(value, list) else value[fn]
            spec.space[key] = {fn: [_abs_local(v) for v in vals]}
    return cfg.to_dict(), spec


def _abs_local(v: Any) -> Any:
    """A local path made absolute against this process's working directory; URIs, empty and
    non-string values unchanged."""
    if isinstance(v, str) and v and "://" not in v:
        return os.path.abspath(v)
    return v


def param_space(spec: SweepSpec) -> dict:
    """Tune's param_space: ``{"overrides": {section.key: <Tune domain>}}``, expanded by Tune."""
    return {"overrides": {k: domain(k, v)[1] for k, v in spec.space.items()}}


def grid_points(spec: SweepSpec) -> list[dict]:
    """Every combination of the grid keys (the sampled keys at the base config's values): what
    can be checked before launch."""
    grid = {k: domain(k, v)[1]["grid_search"] for k, v in spec.space.items()
            if domain(k, v)[0] == "grid_search"}
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def trial_config(base: dict, variant: dict, spec: SweepSpec, run_name: str,
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
    cfg.run.name = run_name
    cfg.run.storage_path = str(_at(spec.dir, "trials"))
    cfg.run.resume = "auto"  # a restarted trial continues from its latest checkpoint
    cfg.run.final_knn = False  # the dependent evaluation does it
    return cfg.validate() if validate else cfg


def _fmt_variant(v: dict) -> str:
    return "{" + ", ".join(f"{k}: {val}" for k, val in v.items()) + "}"


def _check_one(base: dict, variant: dict, spec: SweepSpec, run_name: str) -> Config:
    """Config.validate, then the trainer's ``prepare`` (data source, steps per epoch)."""
    from massl_ray.train.trainer import prepare

    cfg = trial_config(base, variant, spec, run_name)
    cfg.optim.steps_per_epoch = prepare(copy.deepcopy(cfg))[0].optim.steps_per_epoch
    return cfg


def check_grid(base: dict, spec: SweepSpec) -> list[Config]:
    """Every grid point's config checked (:func:`_check_one`); all invalid points are refused
    at once, each named with its reason."""
    points, cfgs, bad = grid_points(spec), [], []
    for i, v in enumerate(points):
        try:
            cfgs.append(_check_one(base, v, spec, f"{spec.name}-check"))
        except (ConfigError, DataSourceError) as e:
            bad.append(f"grid point {i} {_fmt_variant(v)}: {str(e).replace(chr(10), ' ')}")
    for d in [] if is_uri(spec.dir) else (spec.dir / "trials" / f"{spec.name}-check",
                                          spec.dir / "trials", spec.dir):
        try:  # what prepare's storage check made, if empty
            os.rmdir(d)
        except OSError:
            pass
    if bad:
        raise ConfigError(f"sweep {spec.name!r}: {len(bad)} of {len(points)} grid point(s) are "
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


# ---- search algorithm and scheduler ---------------------------------------------------------

def build_searcher(spec: SweepSpec, max_concurrent: int):
    """sweep.search -> a Tune search algorithm running at most ``max_concurrent`` trials.
    grid / random: Tune's BasicVariantGenerator (grid_search expanded, distributions drawn from
    sweep.seed); optuna / hyperopt: their Tune searchers (they need the tune-search extra) in a
    ConcurrencyLimiter. (Tune ignores TuneConfig.max_concurrent_trials for a generator.)"""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    name, kw = _named(spec.search, "search")
    if name in ("grid", "random"):
        try:
            return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent, **kw)
        except TypeError as e:
            raise ConfigError(f"sweep.search {name}: {e}") from None
    module, cls, package, seed_kw = SEARCHERS[name]
    try:
        importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"sweep.search {name} needs the {package} package, which is not "
                          f"installed: {EXTRA}") from None
    kw.setdefault(seed_kw, spec.seed)
    try:
        searcher = getattr(importlib.import_module(module), cls)
        return ConcurrencyLimiter(searcher(metric=spec.metric, mode=spec.mode, **kw),
                                  max_concurrent=max_concurrent)
    except TypeError as e:
        raise ConfigError(f"sweep.search {name}: {e}") from None


def build_scheduler(spec: SweepSpec, cfgs: list[Config]):
    """sweep.scheduler -> a Tune trial scheduler on the trials' reported ``step``s (None: FIFO)."""
    name, kw = _named(spec.scheduler, "scheduler")
    if name in (None, "fifo"):
        return None
    kw.setdefault("metric", "online_knn_top1")
    kw.setdefault("mode", "max")
    if kw["metric"].startswith("online_knn") and any(c.run.online_knn_every_steps <= 0 for c in cfgs):
        raise ConfigError(f"sweep.scheduler uses {kw['metric']}, but the online k-NN monitor is "
                          f"off (run.online_knn_every_steps)")
    if name == "asha":
        # ASHA stops a trial whose step reaches max_t: past the last step, so that a trial that
        # trains to its end is still evaluated (its final report repeats the last step).
        last = max(c.run.max_steps or c.total_steps() for c in cfgs)
        kw.setdefault("max_t", last + 1)
        if kw["max_t"] <= last:
            raise ConfigError(f"sweep.scheduler.max_t ({kw['max_t']}) must exceed the trials' last "
                              f"step ({last}): ASHA would stop them there, before their "
                              f"evaluation (train less with run.max_steps)")
    from ray.tune import schedulers

    try:
        return getattr(schedulers, SCHEDULERS[name])(time_attr="step", **kw)
    except TypeError as e:
        raise ConfigError(f"sweep.scheduler {name}: {e}") from None


# ---- resources ------------------------------------------------------------------------------

def trial_resources(cfg: Config) -> dict:
    """What a training trial holds: ``CPU``/``GPU`` (its workers and the trainable), and
    ``data_CPU``, what its data feed needs beside them to make progress (one read or decode
    task at a time: :func:`massl_ray.data.pipeline.feed_cpus`)."""
    from massl_ray.data.pipeline import feed_cpus

    r = cfg.run
    workers = cfg.world_size  # an elastic trial holds at most its maximum
    out = {"CPU": workers * r.cpus_per_worker + TRIAL_CPU,
           "data_CPU": feed_cpus(cfg)}
    if r.use_gpu:
        out["GPU"] = workers * r.gpus_per_worker
    return out


def eval_resources(settings: EvalSettings, res: dict) -> dict:
    """What an evaluating trial holds: the task and the trainable awaiting it, plus (features by
    Ray Data batch inference, ``local: false``) the feature actors and a decode task beside it."""
    out = {"CPU": res["num_cpus"] + TRIAL_CPU, "GPU": res["num_gpus"], "data_CPU": 0.0,
           "data_GPU": 0.0}
    if not settings.local:
        n = settings.concurrency or 1
        out["data_CPU"] = n * settings.cpus_per_actor + max(1.0, settings.decode_cpus)
        out["data_GPU"] = n * settings.gpus_per_actor
    return out


@dataclasses.dataclass(frozen=True)
class Concurrency:
    """``trials``: Tune's concurrency (trials running at once, training, waiting for a training
    slot, or evaluating); ``training``: how many of them may train at once (the slots of
    :class:`TrainingSlots`)."""
    trials: int
    training: int


def derive_concurrency(cluster: dict, trials: list[dict], evaluation: dict,
                       max_concurrent: Optional[int], n_trials: int) -> Concurrency:
    """How many trials may run, and train, at once.

    Training: a trial holds ``CPU``/``GPU`` and its data feed needs ``data_CPU`` more to
    progress. ``t`` training trials never all wait if ``(t - 1) x hold + need <= cluster`` per
    resource (``hold`` what one holds, ``need`` that plus its data feed), so ``t = floor((cluster
    - need) / hold) + 1``: the training slots, taken before a trial's TorchTrainer starts and
    given back when its training ends. An evaluation (a self-contained Ray task, ``local``
    features) then runs beside the trials training in the freed slot, so ``e`` more trials may
    run with ``e = floor((cluster - (t - 1) x hold - need) / eval)``: their evaluations overlap
    the next trials' training. Evaluations by Ray Data batch inference (``data_CPU`` in
    ``evaluation``) hold actors while they wait for more, so they get no extra slots: every
    trial counts as holding the most of either phase. A trial whose ``need`` exceeds the
    cluster would hang, not fail: refused before launch, with the numbers."""
    have = {k: float(cluster.get(k, 0.0)) for k in ("CPU", "GPU")}
    train = {k: max(t.get(k, 0.0) for t in trials) for k in ("CPU", "GPU")}
    data = max(t.get("data_CPU", 0.0) for t in trials)
    ev = {"CPU": evaluation["CPU"], "GPU": evaluation.get("GPU", 0.0)}
    ev_data = {"CPU": evaluation.get("data_CPU", 0.0), "GPU": evaluation.get("data_GPU", 0.0)}
    pipelined = not any(ev_data.values())
    n = min(n_trials, max_concurrent or n_trials)
    t_slots, extra = n, n
    for k in ("CPU", "GPU"):
        need_train, need_eval = train[k] + (data if k == "CPU" else 0.0), ev[k] + ev_data[k]
        if need_train > have[k] + 1e-9:
            what = (f"{train[k]:g} CPU while it trains (workers x run.cpus_per_worker + the "
                    f"trainable) and its data feed {data:g} more (a read task data.read_cpus "
                    f"or a decode task data.decode_cpus at a time)" if k == "CPU"
                    else f"{train[k]:g} GPU (workers x run.gpus_per_worker)")
            raise ConfigError(
                f"a trial needs {what}, but the cluster has {have[k]:g} {k}: it could never "
                f"run (lower run.cpus_per_worker / run.num_workers, or add {k}s)")
        if need_eval > have[k] + 1e-9:
            raise ConfigError(
                f"a trial's evaluation needs {need_eval:g} {k} (sweep.evaluation: the task "
                f"{ev[k] - (TRIAL_CPU if k == 'CPU' else 0):g}"
                + (f", the trainable awaiting it {TRIAL_CPU:g}" if k == "CPU" else "")
                + (f", its Ray Data {ev_data[k]:g}" if ev_data[k] else "")
                + f"), but the cluster has {have[k]:g} {k}: it could never run")
        hold, need = ((train[k], need_train) if pipelined
                      else (max(train[k], ev[k]), max(need_train, need_eval)))
        if hold > 0:
            t_slots = min(t_slots, int((have[k] - need + 1e-9) // hold) + 1)
    t_slots = max(1, min(t_slots, n))
    if pipelined:
        for k in ("CPU", "GPU"):
            if ev[k] > 0:
                free = have[k] - t_slots * train[k] - (data if k == "CPU" else 0)
                extra = min(extra, max(0, int((free + 1e-9) // ev[k])))
        return Concurrency(trials=max(1, min(n, t_slots + extra)), training=t_slots)
    return Concurrency(trials=t_slots, training=t_slots)


class TrainingSlots:
    """A counting semaphore over the sweep's training slots, a CPU-free async actor the driver
    owns: a trial takes one before its TorchTrainer starts and gives it back when its training
    ends, before its evaluation. A trial that ends any other way (stopped by a scheduler,
    failed, killed) has its slot given back by Tune's callback on the driver
    (:func:`_slot_keeper`); a trial that asks again (Tune restarting it) keeps its own."""

    def __init__(self, n: int):
        import asyncio

        self.n, self.holders, self.cond = n, set(), asyncio.Condition()
        self.log: list[tuple] = []  # (time, trial, "take" | "give")

    async def take(self, trial: str) -> float:
        async with self.cond:
            await self.cond.wait_for(lambda: trial in self.holders or len(self.holders) < self.n)
            self.holders.add(trial)
            self.log.append((time.time(), trial, "take"))
            return time.time()

    async def give(self, trial: str) -> None:
        async with self.cond:
            if trial in self.holders:
                self.holders.discard(trial)
                self.log.append((time.time(), trial, "give"))
                self.cond.notify_all()

    def history(self) -> list[tuple]:
        return list(self.log)


def _slots(sweep: str):
    import ray

    return ray.get_actor(f"{SLOTS}:{sweep}", namespace=SLOTS)


def _slot_keeper(sweep: str):
    """Tune callback (driver): a trial that ended, however, gives its training slot back. (It
    finds the slots by name: a restored experiment's callback is this one, unpickled.)"""

    class SlotKeeper(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            _slots(sweep).give.remote(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            _slots(sweep).give.remote(trial.trial_id)

    return SlotKeeper()


# ---- the trial ------------------------------------------------------------------------------

def _write_bytes(path: Union[Path, str], data: bytes) -> None:
    """Whole or not at all: a local file through a rename, an object in one upload."""
    if is_uri(path):
        fs, key = pafs.FileSystem.from_uri(path)
        with fs.open_output_stream(key) as out:
            out.write(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_bytes(path: Union[Path, str]) -> bytes:
    """The file's bytes; OSError (FileNotFoundError if missing) when it cannot be read."""
    if not is_uri(path):
        return path.read_bytes()
    fs, key = pafs.FileSystem.from_uri(path)
    with fs.open_input_stream(key) as f:
        return f.read()


def _write_json(path: Union[Path, str], obj: Any) -> None:
    _write_bytes(path, json.dumps(obj, indent=1, default=str).encode())


def _read(path: Union[Path, str]) -> dict:
    try:
        return json.loads(_read_bytes(path))
    except (OSError, ValueError):
        return {}


def _report_callback():
    """Tune's TuneReportCallback, every report also carrying the evaluation's metrics as NaN
    (not evaluated yet): Tune requires a searcher's metric in every result."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = {**{k: float("nan") for k in EVAL_METRICS}, **metrics[0]}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ReportToTune()


def run_trial(config: dict, base: dict, spec: dict, settings: dict, eval_res: dict) -> None:
    """The function trainable: build and check the trial's config (an invalid proposal is
    refused), train it (a TorchTrainer whose reports reach Tune), evaluate its final checkpoint
    in a Ray task with its own resources, report the evaluation as the trial's last result."""
    from massl_ray.method.checkpoint import latest_valid_checkpoint
    from massl_ray.train.trainer import checkpoint_root, run_dir_of, setup_logging, train

    setup_logging(0)
    sp = SweepSpec(**spec)
    trial = tune.get_context().get_trial_id()
    variant = dict(config["overrides"])
    try:
        cfg = _check_one(base, variant, sp, trial)
    except (ConfigError, DataSourceError) as e:
        raise TrialRefused(f"trial {trial} {_fmt_variant(variant)} refused: "
                           f"{str(e).replace(chr(10), ' ')}") from None
    started, run_dir = time.time(), run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    attempts = _at(sp.dir, "trials", trial, "attempts.jsonl")  # a line per attempt of the trial
    try:  # an object store has no append: the trial (its only writer) rewrites it whole
        before = _read_bytes(attempts)
    except FileNotFoundError:
        before = b""
    _write_bytes(attempts, before + json.dumps({"started_at": started, "pid": os.getpid()}
                                               ).encode() + b"\n")
    import ray

    slots = _slots(sp.name)
    log.info("sweep: %s waits for a training slot", trial)
    train_started = ray.get(slots.take.remote(trial))
    try:
        result = train(cfg, callbacks=[_report_callback()], lock=False)
    finally:  # the workers are gone: the next trial trains while this one evaluates
        train_ended = time.time()
        ray.get(slots.give.remote(trial))
    m = dict(result.get("metrics") or {})
    if "loss" not in m:  # resumed after the last step: nothing trained now, take the logged end
        m.update(_last_logged(run_dir / "metrics.jsonl"))
    if is_uri(sp.dir):  # the bucket's checkpoint, not the local copy: any node can evaluate it
        ckpt = latest_valid_checkpoint(checkpoint_root(cfg))
    else:
        ckpt = result.get("checkpoint") or latest_valid_checkpoint(run_dir)
    out = {"final_loss": m.get("loss"), "step": m.get("step"), "train_wall_s": result.get("wall_s"),
           "checkpoint": str(ckpt) if ckpt else None, "trial_started_at": started,
           "train_started_at": train_started, "train_ended_at": train_ended,
           "trial_ended_at": time.time(), "training_done": True,
           # the memory as trained, derived values included (the block size when only the
           # block count is swept): TensorBoard's hparams view shows them beside the metrics
           "memory_size": cfg.massl.memory_size, "num_blocks": cfg.num_blocks,
           "block_size": cfg.block_size,
           **{k: m[k] for k in ("online_knn_top1", "online_knn_step") if k in m}}
    ev = evaluate(trial, out["checkpoint"], settings, eval_res, sp.dir) if ckpt else {}
    out.update({k: ev.get(k, float("nan")) for k in EVAL_METRICS})
    out.update({k: ev.get(k) for k in ("eval_s", "eval_started_at", "eval_ended_at")})
    out["eval_status"] = ev.get("status", "no checkpoint")
    tune.report(out)


def _last_logged(path: Path) -> dict:
    try:
        lines = path.read_text().strip().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def evaluate(trial: str, checkpoint: str, settings: dict, res: dict,
             sweep_dir: Union[Path, str]) -> dict:
    """The trial's evaluation: a recorded one of this checkpoint, else a Ray task with its own
    resources (outside the trial's placement group), awaited."""
    import ray

    record = _at(sweep_dir, "evaluations", f"{trial}.json")
    old = _read(record)
    if old.get("status") == "ok" and old.get("checkpoint") == checkpoint:
        log.info("sweep: %s already evaluated (%s)", trial, record)
        return old
    task = ray.remote(_evaluate_task).options(
        num_cpus=res["num_cpus"], num_gpus=res["num_gpus"] or None, scheduling_strategy="DEFAULT",
        name=f"evaluate:{trial}", max_retries=1)
    try:
        return ray.get(task.remote(trial, checkpoint, settings, str(_at(sweep_dir, "eval", trial)),
                                   str(record)))
    except ray.exceptions.RayTaskError as e:  # not fatal: the trial keeps its training
        log.error("sweep: evaluation of %s failed: %s", trial, e.cause)
        return {"status": f"error: {type(e.cause).__name__}: {e.cause}"[:500]}


def _evaluate_task(trial: str, checkpoint: str, settings: dict, out_dir: str, record: str) -> dict:
    """Body of the evaluation Ray task: evaluate, record (so a restarted trial reuses it)."""
    from massl_ray.evaluate.jobs import RESULT_FILE, SUMMARY_FILE, evaluate_checkpoint
    from massl_ray.method.checkpoint import copy_checkpoint
    from massl_ray.train.trainer import setup_logging

    import ray

    setup_logging(0)
    started = time.time()
    if is_uri(out_dir):  # evaluated from a local copy, eval.json / eval.md copied to the store
        with tempfile.TemporaryDirectory(prefix="massl_eval_") as tmp:
            local = os.path.join(tmp, checkpoint.rstrip("/").rsplit("/", 1)[-1])
            os.makedirs(local)
            copy_checkpoint(checkpoint, local)
            res = evaluate_checkpoint(local, EvalSettings.from_dict(settings), f"{tmp}/out")
            res["checkpoint"] = checkpoint
            _write_json(f"{out_dir}/{RESULT_FILE}", res)
            _write_bytes(f"{out_dir}/{SUMMARY_FILE}", Path(tmp, "out", SUMMARY_FILE).read_bytes())
    else:
        res = evaluate_checkpoint(checkpoint, EvalSettings.from_dict(settings), out_dir)
    ctx, ended = ray.get_runtime_context(), time.time()
    rec = {"trial": trial, "status": "ok", "checkpoint": checkpoint, "pid": os.getpid(),
           "resources": ctx.get_assigned_resources(), "placement_group": ctx.get_placement_group_id(),
           "eval_started_at": started, "eval_ended_at": ended, "eval_s": ended - started,
           "knn_top1": res["knn_top1"], "linear_top1": res["linear_top1"], "result": res}
    _write_json(record if is_uri(record) else Path(record), rec)
    return rec


# ---- results --------------------------------------------------------------------------------

def collect_rows(grid, base: dict, spec: SweepSpec) -> list[dict]:
    """One row per trial of the ResultGrid: swept values, memory size / blocks, status, loss,
    the evaluation's metrics. A trial the scheduler stopped (Tune marked its last result done)
    is not evaluated, and says so; its newest checkpoint is named for an ``eval`` by hand."""
    from massl_ray.method.checkpoint import latest_valid_checkpoint

    rows = []
    for r in grid:
        m, conf = dict(r.metrics or {}), dict((r.config or {}).get("overrides", {}))
        trial = m.get("trial_id") or Path(r.path).name
        cfg = trial_config(base, conf, spec, trial, validate=False)
        try:
            blocks, bsize = cfg.num_blocks, cfg.block_size
        except Exception:  # noqa: BLE001 - a refused trial's values need not divide
            blocks, bsize = cfg.massl.num_blocks, cfg.massl.block_size
        status, evaluated, ckpt = "not finished", m.get("eval_status", "not run"), m.get("checkpoint")
        if r.error is not None:
            status = "refused" if "refused:" in str(r.error) else "error"
        elif m.get("training_done"):
            status = "ok"
        elif m.get("done"):
            status, evaluated = "stopped early", "stopped early: not evaluated"
            ckpt = latest_valid_checkpoint(_at(spec.dir, "trials", trial))
        num = (lambda k: m[k] if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])
               else None)
        rows.append({
            "trial": trial, **{k: v for k, v in conf.items() if k not in DERIVED_COLUMNS},
            "memory_size": cfg.massl.memory_size, "num_blocks": blocks, "block_size": bsize,
            "status": status, "step": m.get("step"), "final_loss": num("final_loss"),
            "online_knn_top1": num("online_knn_top1"), "knn_top1": num("knn_top1"),
            "linear_top1": num("linear_top1"), "eval_status": evaluated,
            "train_wall_s": num("train_wall_s"), "eval_s": num("eval_s"),
            "train_started_at": m.get("train_started_at"), "train_ended_at": m.get("train_ended_at"),
            "trial_ended_at": m.get("trial_ended_at"), "eval_started_at": m.get("eval_started_at"),
            "eval_ended_at": m.get("eval_ended_at"), "checkpoint": str(ckpt) if ckpt else None,
            "error": str(r.error).strip().splitlines()[-1][:500] if r.error is not None else None,
        })
    return sorted(rows, key=lambda row: row["trial"])


# Swept keys shown through the derived columns memory_size / num_blocks / block_size.
DERIVED_COLUMNS = ("massl.memory_size", "massl.num_blocks", "massl.block_size")
HIDDEN_MD = ("train_started_at", "train_ended_at", "trial_ended_at", "eval_started_at",
             "eval_ended_at", "checkpoint", "error")


def write_table(rows: list[dict], sweep_dir: Union[Path, str]) -> tuple:
    import pandas as pd

    csv_path, md_path = _at(sweep_dir, "results.csv"), _at(sweep_dir, "results.md")
    table = pd.DataFrame(rows, dtype=object)  # objects: ints stay ints beside empty cells
    _write_bytes(csv_path, table.to_csv(index=False).encode())
    shown = [c for c in table.columns if c not in HIDDEN_MD]

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in shown) + " |" for r in rows]
    _write_bytes(md_path, ("\n".join(lines) + "\n").encode())
    return csv_path, md_path


def write_heatmap(rows: list[dict], path: Union[Path, str], title: str):
    """k-NN top-1 over (memory size, number of blocks): the mean where several trials share a
    cell, blank where none was evaluated."""
    import pandas as pd

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no heatmap (pip install matplotlib)")
        return None
    rows = [r for r in rows if isinstance(r["num_blocks"], int)]
    if not rows:
        return None
    cells = pd.DataFrame(rows, columns=["memory_size", "num_blocks", "knn_top1"])
    grid = cells.astype({"knn_top1": float}).groupby(["memory_size", "num_blocks"]).knn_top1.mean()
    grid = grid.unstack()  # memory sizes x block counts, NaN where no trial was evaluated
    values = grid.to_numpy()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * values.shape[1], 1.4 + 0.8 * values.shape[0]),
                           dpi=100)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(grid.columns)), [str(b) for b in grid.columns])
    ax.set_yticks(range(len(grid.index)), [str(m) for m in grid.index])
    ax.set(xlabel="number of memory blocks", ylabel="memory size K")
    ax.set_title(title, fontsize=9)
    mid = np.nanmean(values) if np.isfinite(values).any() else 0.0
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center",
                    color="black" if v > mid else "white", fontsize=9)
    fig.colorbar(im, ax=ax, label="k-NN top-1 (%)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _write_bytes(path, buf.getvalue())
    return path


# ---- the driver -----------------------------------------------------------------------------

def _check_same_sweep(sweep_dir: Union[Path, str], record: dict) -> None:
    old = _read(_at(sweep_dir, SWEEP_FILE))
    if not old:
        return
    same = json.loads(json.dumps(record, default=str))
    diffs = [k for k in ("space", "base") if old.get(k) != same.get(k)]
    if diffs:
        raise ConfigError(
            f"sweep {record['name']!r} in {sweep_dir} was started with a different "
            f"{' and '.join('search space' if d == 'space' else 'base config' for d in diffs)}; "
            f"a resume must use the same sweep file: choose another sweep.name for a new sweep")


def check_sweep_dir(sweep_dir: Union[Path, str]) -> None:
    """Refuse a sweep directory another user could have written to, before anything in it is
    read: a resume hands ``tune/`` to ``Tuner.restore``, which unpickles what it finds there.
    Refused: the directory or anything under ``tune/`` writable by group or others, or owned by
    another user; its parent writable by others without the sticky bit (they could replace
    the directory). The message says how to fix it. A bucket's access is its own policy's."""
    if is_uri(sweep_dir) or not sweep_dir.exists():
        return
    uid = os.getuid() if hasattr(os, "getuid") else None
    problems: list[str] = []

    def check(path: Path, owned: bool = True) -> None:
        st = path.lstat()
        if uid is not None and owned and st.st_uid != uid:
            problems.append(f"{path} is owned by uid {st.st_uid}, not by you (uid {uid})")
        elif stat.S_ISLNK(st.st_mode):
            return
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            who = " and ".join(w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH))
                               if st.st_mode & bit)
            problems.append(f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})")

    parent = sweep_dir.parent.lstat()
    if parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        problems.append(f"{sweep_dir.parent} is writable by others without the sticky bit "
                        f"(mode {stat.S_IMODE(parent.st_mode):o}): anyone can replace {sweep_dir.name}")
    check(sweep_dir)
    tune_dir = sweep_dir / "tune"
    if tune_dir.is_dir() and not tune_dir.is_symlink():
        check(tune_dir)
        for dirpath, dirnames, filenames in os.walk(tune_dir):
            for n in dirnames + filenames:
                check(Path(dirpath) / n)
                if len(problems) > 5:
                    break
    if problems:
        raise ConfigError(
            f"sweep directory {sweep_dir} is not safe to resume from (Tune unpickles the state "
            f"in it):\n  - " + "\n  - ".join(problems[:5]) + ("\n  - ..." if len(problems) > 5
                                                             else "")
            + f"\nIf you trust its content: chmod -R go-w {sweep_dir} (and chmod +t or go-w its "
            f"parent); otherwise choose another sweep.name")


def run_sweep(config_path: Union[str, os.PathLike], overrides: Optional[list[str]] = None,
              retry_errored: bool = False) -> dict:
    """Validate, launch (or resume) the sweep, write the results from Tune's ResultGrid.

    The sweep's files are written with group and others' write permission removed from the
    umask (a later resume refuses a directory they could write: :func:`check_sweep_dir`)."""
    old_umask = os.umask(0o077)
    os.umask(old_umask | 0o022)
    try:
        return _run_sweep(config_path, overrides, retry_errored)
    finally:
        os.umask(old_umask)


def _run_sweep(config_path: Union[str, os.PathLike], overrides: Optional[list[str]],
               retry_errored: bool) -> dict:
    base, spec = load_sweep(config_path, overrides)
    check_sweep_dir(spec.dir)  # before anything in it is read
    cfgs = check_grid(base, spec)  # nothing launched yet
    settings, eval_res = eval_settings(spec, cfgs[0])
    build_searcher(spec, 1)  # a missing package / bad argument refused before Ray starts
    scheduler = build_scheduler(spec, cfgs)
    sweep_dir, spec_dict = spec.dir, dataclasses.asdict(spec)
    record = {"name": spec.name, "space": spec.space, "base": base, "spec": spec_dict}
    _check_same_sweep(sweep_dir, record)

    import ray

    from massl_ray.runtime import init_ray

    init_ray()
    cluster = ray.cluster_resources()
    per_eval = eval_resources(settings, eval_res)
    grid_like = _named(spec.search, "search")[0] in ("grid", "random")
    n_trials = len(cfgs) * spec.num_samples if grid_like else spec.num_samples
    conc = derive_concurrency(cluster, [trial_resources(c) for c in cfgs], per_eval,
                              spec.max_concurrent, n_trials)
    log.info("sweep %r: %d trial(s), %d at a time, %d training at a time (cluster %g CPU / %g "
             "GPU; a training trial holds %s, an evaluating one %s) -> %s", spec.name, n_trials,
             conc.trials, conc.training, cluster.get("CPU", 0), cluster.get("GPU", 0),
             trial_resources(cfgs[0]), per_eval, sweep_dir)
    _write_json(_at(sweep_dir, SWEEP_FILE), record)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, spec=spec_dict, settings=settings.to_dict(),
                             eval_res=eval_res),
        {"CPU": TRIAL_CPU})
    tune_path = _at(sweep_dir, "tune")
    t0 = time.time()
    slots = ray.remote(num_cpus=0)(TrainingSlots).options(
        name=f"{SLOTS}:{spec.name}", namespace=SLOTS).remote(conc.training)
    if tune.Tuner.can_restore(str(tune_path)):
        log.info("sweep %r: resuming the Tune experiment in %s", spec.name, tune_path)
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                   restart_errored=retry_errored)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec),
            tune_config=tune.TuneConfig(search_alg=build_searcher(spec, conc.trials),
                                        scheduler=scheduler, num_samples=spec.num_samples,
                                        reuse_actors=False),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=1,
                                      callbacks=[_slot_keeper(spec.name)]))
    try:
        grid = tuner.fit()
        slot_log = ray.get(slots.history.remote())
    finally:
        ray.kill(slots)
    return _results(grid, base, spec, settings, n_trials, conc, slot_log, t0, tune_path)


def _results(grid, base: dict, spec: SweepSpec, settings: EvalSettings, n_trials: int, conc,
             slot_log: list, t0: float, tune_path: Union[Path, str]) -> dict:
    """The table, heatmap and summary.json from the ResultGrid; the best trial logged."""
    sweep_dir = spec.dir
    rows = collect_rows(grid, base, spec)
    csv_path, md_path = write_table(rows, sweep_dir)
    png = write_heatmap(rows, _at(sweep_dir, "knn_heatmap.png"),
                        f"{spec.name}: k-NN top-1 (k={20 if 20 in settings.ks else settings.ks[0]})")
    best = None
    if any(r.get(spec.metric) is not None for r in rows):
        b = grid.get_best_result(metric=spec.metric, mode=spec.mode)
        best = {"trial": b.metrics.get("trial_id"), spec.metric: b.metrics.get(spec.metric),
                "overrides": (b.config or {}).get("overrides"), "checkpoint": b.metrics.get("checkpoint")}
    finished = [r for r in rows if r["status"] in ("ok", "stopped early")]
    stopped = [r for r in rows if r["status"] == "stopped early"]
    interrupted = any(r["status"] == "not finished" for r in rows) or len(rows) < n_trials
    summary = {"sweep_dir": str(sweep_dir), "trials": len(rows), "finished": len(finished),
               "evaluated": sum(r["eval_status"] == "ok" for r in rows),
               "stopped_early": [r["trial"] for r in stopped],
               "errors": [r["trial"] for r in rows if r["status"] == "error"],
               "refused": [r["trial"] for r in rows if r["status"] == "refused"],
               "interrupted": interrupted, "concurrency": conc.trials,
               "training_slots": conc.training, "slot_log": slot_log, "wall_s": time.time() - t0,
               "best": best, "results_csv": str(csv_path), "results_md": str(md_path),
               "heatmap": str(png) if png else None, "tensorboard": str(tune_path), "rows": rows}
    _write_json(_at(sweep_dir, "summary.json"), summary)
    if best:
        log.info("sweep %r: best %s = %s: %s %s", spec.name, spec.metric, best[spec.metric],
                 best["trial"], best["overrides"])
    if stopped:
        log.info("sweep %r: %d trial(s) stopped early by the scheduler, not evaluated (to "
                 "evaluate one: python -m massl_ray eval --checkpoint <its results.csv "
                 "checkpoint>)", spec.name, len(stopped))
    if interrupted:
        log.warning("sweep %r interrupted (%d of %d trials finished): run the same command to "
                    "resume", spec.name, len(finished), n_trials)
    return summary
