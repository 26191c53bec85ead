"""Elastic worker count (run.num_workers: [min, max]): the global batch stays fixed at every
size, a checkpoint resumes on any size that splits it, and on a several-node Ray a node lost
mid-run shrinks the group, which goes on from the last checkpoint feeding every global step the
images of an uninterrupted run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from massl_ray.config import ConfigError, apply_overrides, Config
from massl_ray.data.pipeline import check_resources
from massl_ray.method.learner import Learner
from conftest import bucket_jsonl, make_tiny_config

QUICK = Path(__file__).resolve().parents[1] / "jobs" / "data" / "cifar10-quick" / "train.parquet"


def test_a_range_keeps_the_global_batch_and_each_size_takes_its_share():
    cfg = make_tiny_config("run.num_workers=[2,4]", "optim.batch_size_per_worker=3",
                           "massl.memory_size=192", "massl.block_size=48")
    assert cfg.elastic and (cfg.min_workers, cfg.world_size) == (2, 4)
    assert cfg.global_batch_size == 12
    for w, per in ((2, 6), (3, 4), (4, 3)):
        c = cfg.at_world_size(w).validate()
        assert (c.run.num_workers, c.optim.batch_size_per_worker, c.global_batch_size) == (w, per, 12)
    fixed = make_tiny_config("run.num_workers=2")
    assert not fixed.elastic and fixed.min_workers == fixed.world_size == 2


def test_a_range_with_a_size_that_cannot_split_the_global_batch_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"not at \[3\]: make the global batch a multiple of 12"):
        make_tiny_config("run.num_workers=[2,4]", "optim.batch_size_per_worker=4",
                         "massl.memory_size=256")
    for bad in ("[3,2]", "[0,2]", "[1,2,3]"):
        with pytest.raises(ConfigError, match="num_workers"):
            make_tiny_config(f"run.num_workers={bad}")


def test_the_cli_and_yaml_spell_a_range_as_a_list():
    cfg = apply_overrides(Config(), ["run.num_workers=[1, 2]"])
    assert cfg.run.num_workers == [1, 2]
    cfg = apply_overrides(Config(), ["run.num_workers=3"])
    assert cfg.run.num_workers == 3


def test_a_checkpoint_resumes_on_another_world_size_with_the_same_global_batch():
    base = make_tiny_config("run.num_workers=[1,2]", "optim.batch_size_per_worker=8")
    two = Learner(base.at_world_size(2), "cpu")
    state = two.state_dict()
    one = Learner(base.at_world_size(1), "cpu")
    one.load_state_dict(state)  # world size and per-worker batch are not structural
    assert torch.equal(one.memory.rows, two.memory.rows)
    other = make_tiny_config("run.num_workers=1", "optim.batch_size_per_worker=8")  # global 8
    with pytest.raises(Exception, match="global_batch"):
        Learner(other, "cpu").load_state_dict(state)


def test_resources_are_checked_against_the_minimum_of_a_range():
    small = ("massl.memory_size=192", "massl.block_size=48", "optim.batch_size_per_worker=3")
    cfg = make_tiny_config("run.num_workers=[1,4]", "run.cpus_per_worker=1", *small)
    # One worker and a decode CPU fit 2 CPUs: the run starts (the rest waits for nodes).
    assert check_resources(cfg, 2.0) is None
    with pytest.raises(ConfigError, match="CPUs"):
        check_resources(make_tiny_config("run.num_workers=[3,4]", "run.cpus_per_worker=1",
                                         *small), 2.0)


def test_rank_0_on_a_node_with_no_or_a_stale_copy_of_the_logs_continues_the_stored_history(
        tmp_path):
    """Rank 0's node changes A -> B -> A (the storage path an object store, here ``file://``):
    B starts with no metrics.jsonl, A again with its own stale one, lacking B's lines, plus a
    line of its own it never copied. Each restart's copies hold every line: none lost, none
    overwritten (before: a stale local file was kept as it was and replaced the stored one)."""
    from massl_ray.train.log_sync import APPEND_FILES, WORKER_FILES, log_sync_for

    store = f"file://{tmp_path / 'bucket'}"
    a, b = tmp_path / "nodeA", tmp_path / "nodeB"

    def attempt(node: Path, lines: list[str]) -> None:
        sync = log_sync_for(store, "r", node, WORKER_FILES)
        sync.restore(APPEND_FILES)
        node.mkdir(exist_ok=True)
        with open(node / "metrics.jsonl", "a") as f:
            f.writelines(f"{ln}\n" for ln in lines)
        sync.sync()

    attempt(a, ['{"a": 1}', '{"a": 2}'])
    with open(a / "metrics.jsonl", "a") as f:  # logged after A's last copy: never copied
        f.write('{"a": 3}\n')
    attempt(b, ['{"b": 1}'])
    stored = tmp_path / "bucket" / "r" / "logs" / "metrics.jsonl"
    assert stored.read_text().splitlines() == ['{"a": 1}', '{"a": 2}', '{"b": 1}']
    attempt(a, ['{"a2": 1}'])
    assert stored.read_text().splitlines() == [
        '{"a": 1}', '{"a": 2}', '{"b": 1}', '{"a": 3}', '{"a2": 1}']
    assert (a / "metrics.jsonl").read_text() == stored.read_text()


def _rows_by_step(run_dir: Path) -> dict:
    """step -> the global batch's rows (ranks in order), as the last attempt that ran the step
    fed them (rank 0's log is in time order: its last record of a step names that attempt's
    world size)."""
    recs, world = {}, {}
    for f in sorted((run_dir / "workers").glob("rows_rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            recs[(r["step"], r["world"], r["rank"])] = r["rows"]  # later lines win
            if r["rank"] == 0:
                world[r["step"]] = r["world"]
    return {s: [x for r in range(w) for x in recs[(s, w, r)]] for s, w in world.items()}


def _registered_checkpoints(run_dir: Path) -> list[dict]:
    """The metrics of the checkpoints Ray Train has registered for the run in ``run_dir`` (its
    record of the kept ones, read with the public ``ray.train.Result.from_path``), by step."""
    from ray.train import Result

    return sorted((m for _, m in Result.from_path(str(run_dir)).best_checkpoints or []),
                  key=lambda m: m["step"])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped) is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.1)


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_a_node_lost_mid_run_shrinks_the_group_and_the_run_feeds_the_same_images(
        tmp_path, s3_server, monkeypatch):
    """Three Ray nodes on this machine (ray.cluster_utils.Cluster): a head without CPUs (the
    driver, the feed coordinator) and two 2-CPU nodes, one train worker each (1.5 CPUs), with
    run.num_workers=[1, 2], data read from and checkpoints and logs written to the S3 test
    server (``s3://``). The node of rank 0 is removed once a checkpoint exists (with its disk:
    the local logs rank 0 wrote there are moved away, as a spot reclaim loses them): Ray Train
    restarts the group with one worker, on the other node, from the last checkpoint; the run
    finishes; for every global step the rows fed equal an uninterrupted run's (the exact order
    does not depend on the world size); the memory banks of both ranks agreed at the
    checkpoints the two-worker group took before the removal (two per-rank checksums, equal:
    Ray Train's record of every checkpoint's metrics, all of them kept), and the checkpoints
    after the shrink carry one. The bucket's metrics.jsonl holds the run's whole history: the
    first attempt's lines as its rank 0 copied them (every logged step up to the checkpoint),
    then every logged step of the second attempt (the new rank 0 fetched the file before
    appending to it): none lost, none overwritten."""
    import ray
    from ray.cluster_utils import Cluster

    from massl_ray.config import load_config
    from massl_ray.data.groups import LocalFeed, window_groups_of
    from massl_ray.data.multicrop import MultiCrop
    from massl_ray.data.sources import open_source
    from massl_ray.train.log_sync import WORKER_FILES
    from massl_ray.train.trainer import checkpoint_root, run_dir_of, train

    def over(name, **extra):
        o = {"model.arch": "vit_micro", "model.patch_size": 4, "model.depth": 1,
             "model.head_hidden_dim": 64, "model.head_out_dim": 32,
             "crops.global_size": 16, "crops.local_size": 8, "crops.num_local_crops": 1,
             "massl.memory_size": 512, "massl.block_size": 128,
             "optim.batch_size_per_worker": 16, "optim.epochs": 2, "optim.steps_per_epoch": 12,
             "data.train": str(QUICK), "data.limit": 512, "data.decode_cpus": 0.5,
             "data.read_cpus": 0.5, "run.name": name, "run.storage_path": str(tmp_path),
             "run.log_every_steps": 2, "run.checkpoint_every_steps": 4, "run.final_knn": False,
             "run.cpus_per_worker": 1.5, "run.num_workers": "[1,2]", "run.max_failures": 2,
             "run.record_rows": True, "run.placement_strategy": "SPREAD",
             "run.elastic_resize_interval_s": 3600,
             # Ray Train keeps every checkpoint's metrics (6 interval/final checkpoints and
             # the redone ones): the two-worker checkpoints before the removal among them
             "run.num_checkpoints_to_keep": 20}
        o.update(extra)
        return [f"{k}={v}" for k, v in o.items()]

    bucket = s3_server.bucket("elastic")
    s3_server.put(bucket, "data/train.parquet", QUICK.read_bytes())
    s3 = {"data.train": f"s3://{bucket}/data/train.parquet", "run.storage_path": f"s3://{bucket}/runs"}
    monkeypatch.setenv("HOME", str(tmp_path))  # an object-store run logs to ~/massl_runs/<name>
    # Ray Train sizes the restarted group from the resources it sees at once, before the removed
    # node is declared dead: 2 workers, whose placement group then waits for the lost node until
    # this timeout (default 60 s: most of this test's time), and the group restarts with one.
    # The wait is for the placement group only (a GCS reservation, no process start).
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    if ray.is_initialized():
        ray.shutdown()
    # the nodes' processes inherit the S3 server's variables (set by s3_server)
    # a removed node is declared dead after ~5 s of missed health checks (default: ~30 s)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 256 * 1024**2, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}})
    nodes = [cluster.add_node(num_cpus=2, object_store_memory=256 * 1024**2) for _ in range(2)]
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        # The run's driver-side actors live on the driver's (CPU-less) head, not on a worker
        # node the run may lose (a soft node affinity put them there: this test then failed
        # when rank 1's node went, taking the decode report with it).
        from massl_ray.data.pipeline import get_report_actor

        probes = [get_report_actor(f"probe{i}") for i in range(4)]
        assert set(ray.get([p.node_id.remote() for p in probes])) == {cluster.head_node.node_id}
        for p in probes:
            ray.kill(p)
        # The uninterrupted run's rows: the exact order is a pure function of (seed, epoch,
        # position), computed here in-process (tests/test_ray_train.py shows a Ray run feeds
        # exactly the local feed's batches).
        ref_cfg = load_config(None, over("ref"))
        src = open_source(ref_cfg.data.train)
        feed = LocalFeed(src, MultiCrop(ref_cfg.crops), 0, 32, 12, limit=512,
                         window_groups=window_groups_of(ref_cfg), decode_rows=256)
        ref_rows = {e * 12 + s: b["row"].tolist()
                    for e in (0, 1) for s, b in enumerate(feed.batches(e))}
        assert sorted(ref_rows) == list(range(24))

        cfg = load_config(None, over("elastic", **s3))
        run_dir, root = run_dir_of(cfg), checkpoint_root(cfg)
        assert run_dir == tmp_path / "massl_runs" / "elastic" and root.startswith("s3://")
        aside = tmp_path / "lost_disk"  # the local logs of the removed node's rank 0
        removed = {}

        def remove_rank0_node():
            deadline = time.time() + 300
            while time.time() < deadline:
                # a checkpoint Ray Train has registered (in its own record, which the final
                # check reads), not one only written (a node removed before the controller
                # took the report leaves it out of that record: seen here), and the metrics up
                # to it copied to the bucket (rank 0 copies its logs after each checkpoint)
                try:
                    reg = _registered_checkpoints(root)
                except Exception:  # no record yet, or one being rewritten
                    reg = []
                info = run_dir / "workers" / "rank_0.json"
                if reg and info.exists() and any(
                        m["step"] >= reg[-1]["step"]
                        for m in bucket_jsonl(f"{root}/logs/metrics.jsonl")):
                    rank0 = json.loads(info.read_text())
                    for n in nodes:
                        if n.node_id == rank0["node_id"]:
                            removed["ckpt_step"] = reg[-1]["step"]
                            cluster.remove_node(n)
                            removed["node"] = rank0["node_id"]
                            # its disk goes with it: once its rank 0 is gone, the logs it
                            # wrote are moved away before a new rank 0 starts
                            pid = json.loads((run_dir / "workers" / "starts.jsonl")
                                             .read_text().splitlines()[0])["pid"]
                            _wait_for(lambda: not _alive(pid), 60,
                                      "the removed node's rank 0 to exit")
                            aside.mkdir()
                            for name in WORKER_FILES:
                                if (run_dir / name.rstrip("/")).exists():
                                    (run_dir / name.rstrip("/")).rename(aside / name.rstrip("/"))
                            removed["moved"] = True
                            return
                    return
                time.sleep(0.5)

        t = threading.Thread(target=remove_rank0_node, daemon=True)
        t.start()
        res = train(cfg)
        t.join(timeout=60)
        assert removed.get("moved"), f"rank 0's node was never removed: {removed}"
        assert res["metrics"]["step"] == 24
        starts = [json.loads(x) for x in (run_dir / "workers" / "starts.jsonl").read_text().splitlines()]
        worlds = [s.get("world_size") for s in starts]
        assert worlds[:2] == [2, 2] and 1 in worlds[2:], starts  # shrunk to one worker
        assert res["metrics"]["start_step"] > 0  # resumed from a checkpoint, not from scratch
        # The replica check at checkpoints the two-worker group took: rank 0 reports every
        # rank's memory-bank checksum with each checkpoint (RayLoopContext.report), and Ray
        # Train records those metrics per checkpoint.
        reported = _registered_checkpoints(root)
        before = [m for m in reported if m["step"] <= removed["ckpt_step"]]
        assert [m["step"] for m in before if m["step"] == removed["ckpt_step"]] == \
            [removed["ckpt_step"]], reported  # the checkpoint registered before the removal
        for m in before:
            sums = m["memory_checksums"]
            assert len(sums) == 2 and sums[0] == sums[1], (m["step"], sums)
            assert m["memory_replicas_identical"] is True
        # after the shrink: one rank's checksum (the final checkpoint is the one-worker group's)
        assert len(res["metrics"]["memory_checksums"]) == 1
        assert reported[-1]["step"] == 24 and len(reported[-1]["memory_checksums"]) == 1
        # the checksum follows the bank: it moved between the two-worker checkpoint and the end
        assert before[-1]["memory_checksums"][0] != reported[-1]["memory_checksums"][0]
        got = _rows_by_step(run_dir)
        assert sorted(got) == list(range(24))
        for s in range(24):
            assert got[s] == ref_rows[s], f"step {s}: other images than the uninterrupted run"
        feed = json.loads((run_dir / "data_feed.json").read_text())
        assert [w for _, w in feed["resets"]][:1] == [2] and feed["resets"][-1][1] == 1
        # rank 0 moved: the last attempt's rank 0 ran on the node that was rank 1's
        last_rank0 = json.loads((run_dir / "workers" / "rank_0.json").read_text())["node_id"]
        assert last_rank0 != removed["node"] and last_rank0 in {n.node_id for n in nodes}
        # the bucket's metrics.jsonl: the first attempt's lines (those its rank 0 had copied, up
        # to the checkpoint at least), then every logged step of the second, in order
        lost = _jsonl(aside / "metrics.jsonl")
        assert lost and all(m["start_step"] == 0 for m in lost), lost  # moved before attempt 2
        logged = bucket_jsonl(f"{root}/logs/metrics.jsonl")
        first = [m for m in logged if m["start_step"] == 0]
        assert logged[:len(first)] == lost[:len(first)], (logged, lost)
        assert [m["step"] for m in first][-1] >= removed["ckpt_step"], (first, removed)
        start = res["metrics"]["start_step"]
        assert [(m["start_step"], m["step"]) for m in logged[len(first):]] == [
            (start, s) for s in range(2, 25, 2) if s > start], logged  # run.log_every_steps=2
        assert {m["step"] for m in logged} == set(range(2, 25, 2))  # none lost
        # the new rank 0 continued the fetched file on its disk
        assert _jsonl(run_dir / "metrics.jsonl") == logged
    finally:
        ray.shutdown()
        cluster.shutdown()
