"""Ray pieces of the data path that are not the training feed: encoded rows as a Ray Dataset
(the evaluation and embedding jobs read through it), the run's decode report actor, and the
CPU check of a run against its cluster.

Shell module (imports ray). Training data goes through :mod:`massl_ray.data.feed`.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import ray

from massl_ray.config import Config, ConfigError
from massl_ray.data.sources import Source
from massl_ray.data.views import DecodeReport

log = logging.getLogger(__name__)

REPORT_ACTOR_PREFIX = "massl_decode_report:"

# How often the data feed's actors (the decode report here, the feed coordinator in
# massl_ray.data.feed) are restarted when their process dies, in one run. Calls to them are
# retried by Ray meanwhile (max_task_retries=-1: until they succeed or the restarts are used
# up), so none of them is lost to a restart; an actor that dies more often than this points at
# a cause worth failing the run for (e.g. the driver's node out of memory).
ACTOR_MAX_RESTARTS = 10

_KV_NAMESPACE = "massl_ray"


def restarted_actor() -> bool:
    """Whether the calling actor's process is a restart of it. (Ray's own
    ``was_current_actor_reconstructed`` reads a deprecated property of its runtime context,
    whose warning would reach the user's screen through the log forwarding.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


@ray.remote(num_cpus=0, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=-1)
class DecodeReportActor(DecodeReport):
    """The decode report as a (CPU-free) Ray actor shared by every decode task. It also carries
    a train worker's stop at a non-finite loss to the driver (a recipe error, not a failure for
    Ray Train to retry): the lowest step recorded, its loss and the ranks that recorded it.

    Restarts (its process died; see :data:`ACTOR_MAX_RESTARTS`): every call is idempotent, so
    Ray retries a call the death interrupted. The non-finite stop survives a restart (kept in
    Ray's GCS key-value store under this actor's id: a few bytes, written only at such a stop).
    The undecodable rows do not: a restarted report lists the rows recorded since its restart,
    and its summary says so (``complete: false``, ``restarted: true``): its count is then a
    lower bound, not the run's count. (A row is recorded each time it is decoded, and counted
    once: the pieces a restarted coordinator decodes again record their rows again, which
    changes no count.)"""

    def __init__(self, max_examples: int = 10000):
        super().__init__(max_examples)
        ctx = ray.get_runtime_context()
        self._key = "non_finite:" + ctx.get_actor_id()
        self._restarted = restarted_actor()
        self._non_finite = None
        if self._restarted:
            from ray.experimental.internal_kv import _internal_kv_get

            kept = _internal_kv_get(self._key, namespace=_KV_NAMESPACE)
            self._non_finite = json.loads(kept) if kept else None
            log.warning("the decode report restarted (its process died): undecodable rows "
                        "recorded before are not listed; the non-finite stop is kept")

    def summary(self) -> dict:
        out = super().summary()
        if self._restarted:
            out.update(complete=False, restarted=True, note=(
                "the decode report's process died and restarted during the run: rows recorded "
                "before its restart are missing, so 'skipped' is a lower bound"))
        return out

    def record_non_finite(self, step: int, value: float, rank: int) -> None:
        nf = self._non_finite
        if nf is None or step < nf["step"]:
            self._non_finite = {"step": int(step), "value": float(value), "ranks": [int(rank)]}
        elif step == nf["step"] and int(rank) not in nf["ranks"]:  # a retried call: once
            nf["ranks"].append(int(rank))
        else:
            return
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self._key, json.dumps(self._non_finite), namespace=_KV_NAMESPACE)

    def non_finite(self) -> Optional[dict]:
        return self._non_finite

    def node_id(self) -> str:
        """The node it lives on: its caller's (the driver's)."""
        return ray.get_runtime_context().get_node_id()

    def name(self) -> str:
        """Its actor name, by which the feed's coordinator finds it (see ``start_feed``)."""
        return ray.get_runtime_context().get_actor_name()


def get_report_actor(run_name: str):
    """The run's decode report actor, owned by the calling process (the driver or the Tune
    trial): it dies with its owner, so a killed driver or a trial stopped by a scheduler leaks
    nothing. Named per run so that it shows up by name in the dashboard."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the caller's node, so that losing a worker node (an elastic run) loses no report
    # (hard affinity: see massl_ray.data.feed.start_feed).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return DecodeReportActor.options(name=REPORT_ACTOR_PREFIX + run_name, get_if_exists=True,
                                     scheduling_strategy=here).remote()


def read_source(src: Source, limit: Optional[int] = None) -> "ray.data.Dataset":
    """Encoded rows of a source as a Ray Dataset (image bytes column + optional label/path)."""
    if src.kind == "parquet":
        cols = [src.image_column] + ([src.label_column] if src.label_column else [])
        ds = ray.data.read_parquet(src.files, filesystem=src.filesystem).select_columns(cols)
    else:
        ds = ray.data.read_binary_files(src.files, include_paths=True, filesystem=src.filesystem)
        ds = ds.rename_columns({"bytes": src.image_column})
    if limit is not None and limit < src.num_rows:
        ds = ds.limit(limit)
    return ds


def feed_cpus(cfg: Config) -> float:
    """CPUs the data feed needs beside the train workers to make progress: one of its tasks at
    a time (a read task of data.read_cpus, or a decode task of data.decode_cpus; its
    coordinator actor takes none)."""
    return max(cfg.data.read_cpus, cfg.data.decode_cpus)


def check_resources(cfg: Config, cluster_cpus: float, max_cpus: Optional[float] = None,
                    cluster_gpus: Optional[float] = None,
                    max_gpus: Optional[float] = None) -> Optional[str]:
    """Refuse only what can never run: a CPU split that would leave the data feed no CPU (a silent
    deadlock otherwise), or more GPUs than the cluster can ever have. ``max_*``: the most the
    cluster can grow to (its autoscaler's configuration); None: it cannot grow, its size now
    is its maximum. Returns None when the run fits the cluster now, else a message saying
    what it waits for (an autoscaling cluster adds the nodes; Ray Train waits for them)."""
    r = cfg.run
    workers = cfg.min_workers  # an elastic run starts once its minimum fits
    train_cpus = workers * r.cpus_per_worker
    data_cpus = feed_cpus(cfg)
    most = cluster_cpus if max_cpus is None else max(max_cpus, cluster_cpus)
    grows = max_cpus is not None and most > cluster_cpus
    if train_cpus + data_cpus > most + 1e-9:
        has = (f"the cluster can grow to at most {most:g} CPUs (it has {cluster_cpus:g} now)"
               if grows else f"the cluster has {cluster_cpus:g} CPUs")
        raise ConfigError(
            f"the train workers reserve {train_cpus:g} CPUs ({workers} x "
            f"run.cpus_per_worker={r.cpus_per_worker:g}) and the data feed needs {data_cpus:g} "
            f"more (a read task data.read_cpus={cfg.data.read_cpus:g} or a decode task "
            f"data.decode_cpus={cfg.data.decode_cpus:g} at a time), but {has}: lower "
            f"run.cpus_per_worker or data.decode_cpus, or add CPUs")
    waits = []
    if train_cpus + data_cpus > cluster_cpus + 1e-9:
        waits.append(f"{train_cpus + data_cpus:g} CPUs (the cluster has {cluster_cpus:g} now, "
                     f"at most {most:g})")
    if r.use_gpu and cluster_gpus is not None:
        need_gpus = workers * r.gpus_per_worker
        most_gpus = cluster_gpus if max_gpus is None else max(max_gpus, cluster_gpus)
        if need_gpus > most_gpus + 1e-9:
            raise ConfigError(
                f"the train workers need {need_gpus:g} GPUs ({workers} x "
                f"run.gpus_per_worker={r.gpus_per_worker:g}) but the cluster "
                + (f"can grow to at most {most_gpus:g}" if most_gpus > cluster_gpus
                   else f"has {cluster_gpus:g}")
                + ": lower run.num_workers or run.gpus_per_worker, or add GPU nodes")
        if need_gpus > cluster_gpus + 1e-9:
            waits.append(f"{need_gpus:g} GPUs (the cluster has {cluster_gpus:g} now, at most "
                         f"{most_gpus:g})")
    if not waits:
        return None
    return ("the run waits for nodes: it needs " + " and ".join(waits)
            + "; the autoscaler adds them, and training starts once the workers fit")
