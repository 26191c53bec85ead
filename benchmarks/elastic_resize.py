#!/usr/bin/env python
"""Elastic resize on one machine: does Ray 2.60 shrink an elastic group when a node is lost, and
grow it back when a node joins? Three Ray nodes (ray.cluster_utils.Cluster: a CPU-less head for
the driver and the feed, two 2-CPU nodes, one train worker each), run.num_workers=[1, 2],
run.elastic_resize_interval_s=5. Rank 1's node is removed once a checkpoint exists; a new node
is added once the group runs with one worker. Prints the events and the workers' starts (rank,
world size, seconds since the first start) and writes them as JSON.

Usage: python benchmarks/elastic_resize.py [--out elastic_resize.json]
"""
import argparse, json, shutil, sys, tempfile, threading, time
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import ray
from ray.cluster_utils import Cluster
from massl_ray.config import load_config
from massl_ray.train.trainer import train

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="elastic_resize.json")
args = ap.parse_args()
tmp = Path(tempfile.mkdtemp(prefix="massl_elastic_"))
QUICK = str(REPO / "jobs" / "data" / "cifar10-quick" / "train.parquet")
o = {"model.arch": "vit_micro", "model.patch_size": 4, "model.depth": 1,
     "model.head_hidden_dim": 64, "model.head_out_dim": 32,
     "crops.global_size": 16, "crops.local_size": 8, "crops.num_local_crops": 1,
     "massl.memory_size": 512, "massl.block_size": 128,
     "optim.batch_size_per_worker": 16, "optim.epochs": 10, "optim.steps_per_epoch": 12,
     "data.train": QUICK, "data.limit": 512, "data.decode_cpus": 0.5,
     "data.read_cpus": 0.5, "run.name": "grow", "run.storage_path": str(tmp),
     "run.log_every_steps": 4, "run.checkpoint_every_steps": 4, "run.final_knn": False,
     "run.cpus_per_worker": 1.5, "run.num_workers": "[1,2]", "run.max_failures": 3,
     "run.record_rows": True, "run.placement_strategy": "SPREAD",
     "run.elastic_resize_interval_s": 5}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 256 * 1024**2, "include_dashboard": False})
nodes = [cluster.add_node(num_cpus=2, object_store_memory=256 * 1024**2) for _ in range(2)]
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()
run_dir = tmp / "grow"
events = []
def driver():
    t0 = time.time()
    while time.time() - t0 < 400:
        info = run_dir / "workers" / "rank_1.json"
        if list(run_dir.glob("checkpoint_*")) and info.exists():
            nid = json.loads(info.read_text())["node_id"]
            for n in nodes:
                if n.node_id == nid:
                    cluster.remove_node(n); events.append(("removed", time.time() - t0)); break
            break
        time.sleep(0.05)
    while time.time() - t0 < 400:
        st = run_dir / "workers" / "starts.jsonl"
        if st.exists() and any(json.loads(l).get("world_size") == 1 for l in st.read_text().splitlines()):
            cluster.add_node(num_cpus=2, object_store_memory=256 * 1024**2); events.append(("added", time.time() - t0)); break
        time.sleep(0.2)
out = {}
def trainer():
    out["res"] = train(load_config(None, [f"{k}={v}" for k, v in o.items()]))
t0 = time.time()
th = threading.Thread(target=trainer, daemon=True)
th.start()
driver()
th.join()
res = out["res"]
starts = [json.loads(l) for l in (run_dir / "workers" / "starts.jsonl").read_text().splitlines()]
rows = [(s["rank"], s["world_size"], round(s["time"] - starts[0]["time"], 1)) for s in starts]
print("events (s since the run started):", events)
print("worker starts (rank, world size, s since the first start):", rows)
print("finished at step", res["metrics"]["step"], "in", round(time.time() - t0, 1), "s")
Path(args.out).write_text(json.dumps({"events": events, "starts": rows,
                                      "step": res["metrics"]["step"],
                                      "wall_s": time.time() - t0}, indent=1))
print("wrote", args.out)
ray.shutdown(); cluster.shutdown()
shutil.rmtree(tmp, ignore_errors=True)
