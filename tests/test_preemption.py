"""A spot preemption on a two-node Ray cluster on one machine (``ray.cluster_utils.Cluster``).

One rank runs on a second node. Mid-run that node is drained with reason preemption and a
60 s deadline (the ``ray drain-node`` CLI: what Ray's autoscaler does on a spot reclaim
notice). The ranks see the notice at their next control point and checkpoint the next step;
a replacement node joins; at the deadline Ray Train ends the preempted worker group and
restarts it (a preemption, counted against run.max_preemption_failures, not max_failures)
on the head and the replacement. Rank 0 alone reads the checkpoint, rank 1 receives it over
the process group, and the run resumes from the preemption step and trains on. The driver is
``python -m massl_ray train`` in its own process, connected to the cluster by RAY_ADDRESS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from massl_ray.config import load_config  # noqa: E402
from massl_ray.method.checkpoint import STATE_FILE, list_checkpoints, read_meta  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "jobs" / "data" / "cifar10-quick" / "train.parquet"

pytestmark = pytest.mark.ray
# The drain's deadline. Ray Train needs one (it ends the preempted group at it). The notice and
# the checkpoint took 8.7-11 s after the drain on this loaded 2-core machine (steps of 2-5 s):
# 60 s leaves them 5x that, at the cost of the first attempt training on until it (the
# assertions count steps and order events; none measures a time against it).
DEADLINE_S = 60
MAX_STEPS = 5000  # never reached: the test ends the run after the resume
STEPS_AFTER = 5  # steps the resumed attempt trains before the test ends it


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _wait(cond, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.timeout(600)
def test_a_preempted_node_costs_one_step_and_the_run_resumes_from_it(tmp_path, monkeypatch):
    for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}.items():
        monkeypatch.setenv(k, v)  # inherited by every node's processes
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    t_start = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 256 * 2**20, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}})
    spot = cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)
    cluster.wait_for_nodes()
    try:
        run_dir = tmp_path / "pre"
        over = {
            "model.arch": "vit_micro", "model.patch_size": 4, "model.depth": 2,
            "model.head_hidden_dim": 128, "model.head_out_dim": 32,
            "crops.global_size": 16, "crops.local_size": 8, "crops.num_local_crops": 2,
            "massl.memory_size": 2048, "massl.block_size": 512,
            "optim.batch_size_per_worker": 16, "optim.epochs": 400,
            "data.train": str(QUICK), "data.limit": 512, "data.decode_batch_size": 64,
            "run.name": "pre", "run.storage_path": str(tmp_path), "run.log_every_steps": 1,
            "run.checkpoint_every_steps": 1000, "run.final_knn": False,
            "run.num_workers": 2, "run.placement_strategy": "STRICT_SPREAD",
            "run.cpus_per_worker": 1, "data.decode_cpus": 0.5, "run.max_steps": MAX_STEPS,
            "run.max_failures": 0, "run.max_preemption_failures": 1,
            "run.preemption_check_seconds": 0.2,
        }
        # The driver is a user's: `python -m massl_ray train` connecting to the running cluster
        # (RAY_ADDRESS), in its own process, so nothing it leaves behind on a failure (a Ray
        # driver whose cluster went away exits its process) can take pytest down with it.
        load_config(None, [f"{k}={v}" for k, v in over.items()])  # refused here, not there
        log_path = tmp_path / "driver.log"
        env = dict(os.environ, RAY_ADDRESS=cluster.address)
        env.pop("PYTHONPATH", None)
        with open(log_path, "w") as log_f:
            driver = subprocess.Popen(
                [sys.executable, "-m", "massl_ray", "train",
                 *[f"{k}={v}" for k, v in over.items()]],
                cwd=ROOT, env=env, stdout=log_f, stderr=subprocess.STDOUT)
        try:
            _preempt_and_check(cluster, spot, run_dir, driver, t_start)
        except BaseException:
            print(f"\n--- the driver's output (tail) ---\n{log_path.read_text()[-6000:]}")
            raise
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(30)
    finally:
        cluster.shutdown()


def _preempt_and_check(cluster, spot, run_dir: Path, driver: subprocess.Popen, t_start: float):
    metrics = run_dir / "metrics.jsonl"
    _wait(lambda: len(_lines(metrics)) >= 3 or driver.poll() is not None, 240, "3 training steps")
    assert driver.poll() is None, f"the driver ended early (exit {driver.returncode})"
    workers = {r: json.loads((run_dir / "workers" / f"rank_{r}.json").read_text())
               for r in (0, 1)}
    # one rank on each node (which rank lands on the spot node is Ray's choice)
    assert {w["node_id"] for w in workers.values()} == {spot.node_id, cluster.head_node.node_id}
    step_at_notice = _lines(metrics)[-1]["step"]
    t_drain = time.time()
    # DEADLINE_S leaves the notice, the checkpoint and a loaded machine room; the run is long
    # enough (run.max_steps) to still be training when the deadline ends the worker group.
    p = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "drain-node", "--address",
         cluster.address, "--node-id", spot.node_id, "--reason",
         "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
         "--deadline-remaining-seconds", str(DEADLINE_S)],
        capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert p.returncode == 0, p.stdout + p.stderr
    # A replacement node joins at once (an autoscaler launches one on the notice). The drained
    # node takes no new work; at its deadline Ray Train ends the preempted worker group (a
    # PreemptionError) and restarts it on the head and the replacement. (Killing the drained
    # node instead, gracefully or not, is recorded by this Ray as an ordinary node death, not a
    # preemption: the run then fails on run.max_failures=0. On a cloud the autoscaler
    # terminates the node.)
    cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)
    ckpts = run_dir / "checkpoints.jsonl"
    pre = _wait(lambda: [r for r in _lines(ckpts) if r["reason"] == "preemption"],
                DEADLINE_S + 60, "the preemption checkpoint")[0]
    t_ckpt = time.time()
    # The restarted attempt trains on from the preemption checkpoint. (The run is long,
    # run.max_steps=MAX_STEPS, so that it is still training at the deadline on any machine;
    # the test ends it once the resumed attempt has trained STEPS_AFTER steps.)
    resumed = _wait(lambda: [m for m in _lines(metrics) if m.get("start_step", 0) > 0
                             and m["step"] >= m["start_step"] + STEPS_AFTER]
                    or driver.poll() is not None, 300, "the resumed attempt's steps")
    assert driver.poll() is None, f"the driver ended (exit {driver.returncode}) before resuming"
    driver.kill()  # the records below are final: no attempt writes after this
    driver.wait(30)
    log = _lines(metrics)
    first = [m for m in log if m["start_step"] == 0]
    second = [m for m in log if m["start_step"] > 0]
    # run.log_every_steps=1: every step of each attempt has its record, in order
    assert [m["step"] for m in first] == list(range(1, len(first) + 1))
    assert [m["step"] for m in second] == list(range(second[0]["start_step"] + 1,
                                                     second[-1]["step"] + 1))
    # One notice, one checkpoint for it; no other checkpoint (run.checkpoint_every_steps=1000
    # is never reached), so the resumed attempt can only have started from it.
    assert [r["reason"] for r in _lines(ckpts)] == ["preemption"]
    # The notice costs one step: it is seen at a control point (the control-point count of the
    # step's record went up: ControlPoints.decide ran before that step), and the checkpoint is
    # that very step's: the ranks trained one step between the control point that saw the
    # notice and the checkpoint. The drain came after step step_at_notice.
    by_step = {m["step"]: m for m in first}
    assert step_at_notice < pre["step"] <= len(first)
    assert by_step[pre["step"]]["control_points"] == by_step[pre["step"] - 1]["control_points"] + 1
    # The run resumes from it: the second attempt starts at the checkpointed step.
    assert resumed[0]["start_step"] == second[0]["start_step"] == pre["step"]
    # The redone steps: the first attempt's steps after its checkpoint (it trains on until the
    # deadline), which the resumed attempt trains again from the step right after it; no step
    # up to the checkpoint is trained twice.
    redone = [m["step"] for m in first if m["step"] > pre["step"]]
    assert redone == list(range(pre["step"] + 1, len(first) + 1))
    assert second[0]["step"] == pre["step"] + 1
    restores = _lines(run_dir / "workers" / "restores.jsonl")
    after = [r for r in restores if r["step"] == pre["step"]]
    assert {r["rank"] for r in after} == {0, 1}, restores
    assert len(restores) == 3, restores  # the first attempt's rank 0 found nothing; then these
    size = read_meta(Path(after[0]["from"] or next(
        d for d in list_checkpoints(run_dir) if read_meta(d)["global_step"] == pre["step"])
    ))["bytes"]
    by_rank = {r["rank"]: r["bytes_read"] for r in after}
    assert by_rank == {0: size, 1: 0}, by_rank
    starts = _lines(run_dir / "workers" / "starts.jsonl")
    assert len(starts) == 4  # two attempts of two ranks
    # The order of events: the checkpoint was reported (rank 0's checkpoints.jsonl line comes
    # once its report returned) after the first attempt started and before the restarted
    # workers started, and they restored it after that.
    restarted = min(x["time"] for x in starts[2:])
    assert max(x["time"] for x in starts[:2]) < pre["time"] < restarted
    assert all(r["time"] > pre["time"] for r in after)
    nodes = {json.loads((run_dir / "workers" / f"rank_{r}.json").read_text())["node_id"]
             for r in (0, 1)}
    assert spot.node_id not in nodes  # the second attempt avoided the drained node
    print(f"\npreemption: notice after step {step_at_notice}, checkpoint at step "
          f"{pre['step']} {t_ckpt - t_drain:.1f} s after the drain (stall "
          f"{pre['stall_s']:.3f} s); {len(redone)} step(s) after it redone (trained until the "
          f"deadline), workers restarted {restarted - t_drain:.1f} s after the drain; restart "
          f"read {size} bytes on rank 0, 0 on rank 1; whole test {time.time() - t_start:.0f} s")
    assert (run_dir / list_checkpoints(run_dir)[0].name / STATE_FILE).is_file()
