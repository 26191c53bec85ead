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


def joins_existing_cluster() -> bool:
    """True when :func:`init_ray` connects to a running cluster instead of starting one."""
    import ray

    return bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()


def planned_cluster_cpus() -> Optional[float]:
    """The CPUs of the Ray that :func:`init_ray` will start (None when it joins a cluster,
    whose size is only known after connecting)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("CPU", 0.0))
    if os.environ.get("RAY_ADDRESS"):
        return None
    return float(local_cpus())


def _job_working_dir() -> Optional[str]:
    """The working_dir of the submitted job this driver runs in, if any."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None


def runtime_env() -> dict:
    """The runtime environment every job of ours gets (see the module docstring)."""
    env: dict = {"worker_process_setup_hook": "massl_ray.runtime.quiet_worker_logs"}
    if _job_working_dir() is None:
        env["py_modules"] = [str(package_dir())]
        env["excludes"] = list(_EXCLUDES)
    return env


def quiet_worker_logs() -> None:
    """Worker-process setup hook: without the dashboard's State API (a local Ray started
    without it), Ray Train's placement-group cleaner warns "Failed to query Ray Train
    Controller actor state" every second or two for the whole run; it is harmless and drowned
    the progress lines."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)


def init_ray(num_cpus: Optional[float] = None) -> None:
    """Join ``RAY_ADDRESS`` if set, else start a local Ray on this machine's CPUs (or
    ``num_cpus``), without the dashboard; either way with :func:`runtime_env`. No-op when Ray
    is already initialised (a test's or a sweep trial's Ray)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, runtime_env=runtime_env())
        return
    # Ray 2.60 turns token authentication on for a new local cluster and warns that it did so
    # on every start; saying so explicitly keeps it on and the first screen clean. A user's
    # own RAY_AUTH_MODE wins.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(num_cpus=num_cpus if num_cpus is not None else local_cpus(),
             include_dashboard=False, log_to_driver=True, runtime_env=runtime_env())
