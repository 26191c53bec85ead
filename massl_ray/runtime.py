"""Starting or joining Ray, with this package shipped to every Ray process.

Every Ray process that runs our code (the Train controller's setup hook, train workers, Ray
Data tasks, evaluation tasks) must import ``massl_ray``. A fresh clone run with
``python -m massl_ray`` has the package on the driver's path only (it is not installed), and
on a multi-node cluster the other machines may have no copy at all. So :func:`init_ray` ships
the package the driver imported through Ray's runtime environment (``py_modules``): Ray zips
the package directory once, stores it in the cluster's object store (GCS) and unpacks it on
every node before a worker starts, whatever the node and however the driver was started (fresh
clone, ``pip install .``, another working directory). ``py_modules`` rather than
``working_dir``: it ships the package and nothing else (no data, runs or virtual environment
from the user's current directory), and it works from any directory. Inside a
``ray job submit --working-dir .`` job the job's working directory already carries the package
to every worker, so nothing is added there.

The module also decides the local CPU count before Ray starts (:func:`planned_cluster_cpus`),
so that impossible resource splits are refused before any Ray process exists.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger("massl_ray")

# Files of the package directory that never need to travel.
_EXCLUDES = ["__pycache__", "*.pyc", "*.egg-info"]
# Set by Ray's job manager for the driver of a submitted job (ray.job_submission).
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def package_dir() -> Path:
    """The directory of the ``massl_ray`` package this process imported."""
    import massl_ray

    return Path(massl_ray.__file__).resolve().parent


def local_cpus() -> int:
    """CPUs this process may use (its affinity mask): what a local Ray is started with."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def planned_cluster_cpus() -> Optional[float]:
    """The CPUs of the Ray that :func:`init_ray` will start (None when it joins a cluster,
    whose size is only known after connecting)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("CPU", 0.0))
    if os.environ.get("RAY_ADDRESS"):
        return None
    return float(local_cpus())


def cluster_capacity() -> tuple[dict, Optional[dict]]:
    """The connected cluster's resources now, and the most it can grow to: from its
    autoscaler's configuration (the node types' ``max_workers`` x their resources, as Ray
    Train's own start-up check reads it), or None when it has no autoscaler."""
    import ray

    now = dict(ray.cluster_resources())
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception as e:  # noqa: BLE001 - a private API: without it, assume no autoscaler
        log.debug("no autoscaler configuration readable: %s", e)
        most = None
    return now, (dict(most) if most else None)


def _job_working_dir() -> Optional[str]:
    """The working_dir of the submitted job this driver runs in, if any."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None


def runtime_env(local: bool) -> dict:
    """The runtime environment every job of ours gets (see the module docstring). ``local``:
    a Ray started by :func:`init_ray` on this machine (quiet, no preemption watcher)."""
    env: dict = {}
    if _job_working_dir() is None:
        env["py_modules"] = [str(package_dir())]
        env["excludes"] = list(_EXCLUDES)
    if local:
        env["worker_process_setup_hook"] = "massl_ray.runtime.local_worker_setup"
        # Ray Train's preemption watcher polls node drains; one machine is not preempted node
        # by node, and the watcher's actor logs a core-worker error line at every start.
        env["env_vars"] = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", _LOCAL_ENV: "1"}
    return env


# Ray's messages that say nothing to the user of a local run: Ray Data's INFO lines (dataset
# plans, "execution finished"; Ray Train's own INFO lines are lowered through its
# RunConfig(logging_config=...), see :func:`train_log_level`), the notice that progress bars
# are off (the loop prints its own progress line), and two warnings that are harmless there: Ray Train's placement-group cleaner and its autoscaling
# request both need services a dashboard-less single-machine Ray does not run (the State API,
# an autoscaler) and warn every few seconds, or with a traceback when the machine is busy.
_LOCAL_QUIET = {
    "ray.data._internal.progress": logging.ERROR,  # "Progress bars disabled": we disable them
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client":
        logging.ERROR,
}


class _AtLeast(logging.Filter):
    """Drops a logger's records below ``level``. A logger's level alone does not last: Ray
    Train configures its ``ray.train`` logger with ``logging.config.dictConfig``, which resets
    every existing child logger to NOTSET (filters are kept)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def quiet_local_ray() -> None:
    """Worker-process setup hook of a local Ray (see ``_LOCAL_QUIET``). Warnings and errors
    that concern the run still print; every message still reaches the session's log files."""
    for name, level in _LOCAL_QUIET.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(f, _AtLeast) for f in logger.filters):
            logger.addFilter(_AtLeast(level))
    # Ray Data configures its own console handler when it is imported; raise that handler
    # only, so its log file (``<session>/logs/ray-data``) keeps the INFO lines.
    import ray.data  # noqa: F401  (configures ray.data's logging)

    for h in logging.getLogger("ray.data").handlers:
        if type(h).__name__ == "PlainRayHandler":
            h.setLevel(logging.WARNING)


_started_here = False
# Set in every process of a Ray that init_ray started (runtime_env env_vars): a Tune trial's
# process trains on that Ray without having started it.
_LOCAL_ENV = "MASSL_RAY_LOCAL"


def train_log_level() -> str:
    """Ray Train's console log level (``RunConfig.logging_config``): WARNING on a Ray this
    command started (its INFO lines are about worker groups and checkpoint paths), INFO on a
    cluster, where they say what the run waits for."""
    return "WARNING" if _started_here or os.environ.get(_LOCAL_ENV) == "1" else "INFO"


def local_worker_setup() -> None:
    """Worker-process setup hook of a local Ray: :func:`quiet_local_ray`, and this process
    pointed at its own cluster. Ray Train's placement-group cleaner queries the State API with
    no address; with a second Ray running on the same machine (another user's, a test's) that
    lookup fails with a "Found multiple active Ray instances" traceback instead of the
    harmless, silenced warning. The driver is left alone (its next run may start a new Ray)."""
    import ray

    quiet_local_ray()
    if ray.is_initialized():
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def init_ray(num_cpus: Optional[float] = None) -> None:
    """Join ``RAY_ADDRESS`` if set, else start a local Ray on this machine's CPUs (or
    ``num_cpus``), without the dashboard; either way with :func:`runtime_env`. No-op when Ray
    is already initialised (a test's or a sweep trial's Ray)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True,
                 runtime_env=runtime_env(local=False))
        return
    # Ray 2.60 turns token authentication on for a new local cluster (creating a token under
    # ~/.ray when there is none) and warns at every start that it did so. The default is what
    # we want; only that one notice is silenced. A user's own RAY_AUTH_MODE wins as usual.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    global _started_here
    # address="local": always a Ray of our own, sized here, never a cluster that happens to
    # run on this machine (`ray start`, a test's ray.cluster_utils.Cluster): ray.init() would
    # join that one and refuse num_cpus. Joining a cluster is RAY_ADDRESS's job.
    ray.init(address="local", num_cpus=num_cpus if num_cpus is not None else local_cpus(),
             include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING,
             runtime_env=runtime_env(local=True))
    _started_here = True
    quiet_local_ray()  # the driver's own Ray Data / Train loggers likewise
