#!/usr/bin/env python
"""What a restart reads, and what a checkpoint stalls (issue 15, items 3 and 4).

**Restart reads** (``--part restart``; Ray-free): W = 1, 2, 4 processes form a gloo group (as
a restarted Ray Train worker group does) and restore one saved training state, two ways:

* ``per_rank`` (the code before issue 15): every rank finds the newest valid checkpoint
  (``latest_valid_checkpoint``: a sha256 pass over state.pt), then loads it
  (``load_checkpoint`` then verified it again and ``torch.load``-ed the file): 3 reads of the
  checkpoint per rank, 3 W per restart.
* ``rank0_broadcast`` (now, ``RayLoopContext.latest_state``): rank 0 alone finds and loads
  the newest valid checkpoint in one read (hashed and unpickled from the same bytes,
  ``load_latest_valid_checkpoint``); the others receive it over the process group
  (``broadcast_state``).

Bytes are counted two ways per rank: the package's own counter of state.pt bytes read
(``massl_ray.method.checkpoint.READ_BYTES``, which sees hashing and loading through the
package; the ``per_rank`` path's ``torch.load(file)`` is added as the file's size), and the
kernel's ``rchar`` (/proc/self/io: every byte this process read through read-type system
calls, files or not, over the restore only). Wall seconds of the restore (slowest rank) too.

**Checkpoint stalls** (``--part stall``; Ray): one Ray Train worker trains with a checkpoint
every ``--every`` steps, once with ``run.checkpoint_upload=sync`` and once with ``async``; the
stall of each checkpoint is the loop's own record (``<run dir>/checkpoints.jsonl``:
``stall_s``, the time from the state dict to the report's return: the local write, plus the
copy to run.storage_path when it is synchronous). The final checkpoint is left out (the worker
waits for every upload before it ends, whatever the mode).

Usage::

    python benchmarks/restart.py                       # both parts, ~150 MB checkpoint
    python benchmarks/restart.py --part restart --mb 20 --out /tmp/restart.json
    python benchmarks/restart.py --quick               # CI: tiny state, W = 1, 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _shared import finite  # noqa: E402


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return -1


def _make_state(mb: float) -> dict:
    """A training-state-shaped dict of about ``mb`` MiB: OrderedDict state dicts of float32
    tensors, an int64 pointer, a bool flag, RNG bytes and plain values."""
    from collections import OrderedDict

    import torch

    g = torch.Generator().manual_seed(0)
    n = int(mb * 2**20 / 4)
    sizes = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
    student = OrderedDict((f"w{i}", torch.randn(s, generator=g)) for i, s in enumerate(sizes[:2]))
    return {"format": "massl_ray/state/1", "global_step": 1234,
            "student": student,
            "optimizer": {"state": {0: {"exp_avg": torch.randn(sizes[2], generator=g),
                                        "step": torch.tensor(1234.0)}},
                          "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "memory": {"rows": torch.randn(sizes[3], generator=g), "ptr": torch.tensor(512),
                       "full": torch.tensor(True)},
            "rng": {"torch": torch.get_rng_state(), "python": (3, tuple(range(5)), None)},
            "config": {"run": {"seed": 0}}}


def _restore_rank(rank: int, world: int, init_file: str, run_dir: str, mode: str,
                  out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from massl_ray.method import checkpoint as ck
    from massl_ray.method.distributed import broadcast_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        dist.barrier()
        c0, r0, t0 = ck.READ_BYTES["state"], _rchar(), time.perf_counter()
        extra = 0
        if mode == "per_rank":
            found = ck.latest_valid_checkpoint(Path(run_dir))
            ck.verify_checkpoint(found)
            state = torch.load(found / ck.STATE_FILE, map_location="cpu", weights_only=True)
            extra = (found / ck.STATE_FILE).stat().st_size  # the torch.load of the file
        else:
            state = None
            if rank == 0:
                _, state = ck.load_latest_valid_checkpoint(Path(run_dir))
            state = broadcast_state(state, src=0)
        seconds = time.perf_counter() - t0
        rec = {"rank": rank, "bytes_counted": ck.READ_BYTES["state"] - c0 + extra,
               "rchar": _rchar() - r0, "seconds": seconds,
               "step": int(state["global_step"])}
        Path(out_dir, f"{mode}_{world}_{rank}.json").write_text(json.dumps(rec))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def part_restart(mb: float, worlds: list[int], tmp: Path) -> dict:
    import torch
    import torch.multiprocessing as mp

    from massl_ray.method.checkpoint import save_checkpoint

    run_dir = tmp / "run"
    d = run_dir / "checkpoint_000001234"
    save_checkpoint(_make_state(mb), d)
    size = (d / "state.pt").stat().st_size
    torch.set_num_threads(1)
    out: dict = {"checkpoint_bytes": size, "runs": []}
    for world in worlds:
        for mode in ("per_rank", "rank0_broadcast"):
            init = tmp / f"pg_{mode}_{world}"
            mp.start_processes(_restore_rank, args=(world, str(init), str(run_dir), mode,
                                                    str(tmp)),
                               nprocs=world, join=True, start_method="spawn")
            ranks = [json.loads((tmp / f"{mode}_{world}_{r}.json").read_text())
                     for r in range(world)]
            assert all(r["step"] == 1234 for r in ranks)
            total = sum(r["bytes_counted"] for r in ranks)
            row = {"world_size": world, "mode": mode,
                   "bytes_read_total": total,
                   "checkpoints_read": round(total / size, 3),
                   "bytes_read_per_rank": [r["bytes_counted"] for r in ranks],
                   "rchar_per_rank": [r["rchar"] for r in ranks],
                   "seconds_slowest_rank": max(r["seconds"] for r in ranks)}
            out["runs"].append(row)
            print(f"restart W={world} {mode:>15}: {total / 2**20:8.1f} MiB read "
                  f"({row['checkpoints_read']:.2f} checkpoints; per rank "
                  f"{[round(b / 2**20, 1) for b in row['bytes_read_per_rank']]} MiB; rchar "
                  f"{[round(b / 2**20, 1) for b in row['rchar_per_rank']]} MiB), "
                  f"{row['seconds_slowest_rank']:.2f} s", flush=True)
    return out


def part_stall(steps: int, every: int, tmp: Path, quick: bool) -> dict:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from massl_ray.config import load_config
    from massl_ray.method.checkpoint import list_checkpoints
    from massl_ray.train.trainer import train

    quick_data = REPO / "jobs" / "data" / "cifar10-quick" / "train.parquet"
    big = not quick
    over = {
        "model.arch": "vit_tiny" if big else "vit_micro", "model.patch_size": 4,
        "model.head_hidden_dim": 256 if big else 64, "model.head_out_dim": 256 if big else 32,
        "crops.global_size": 16, "crops.local_size": 8, "crops.num_local_crops": 2,
        "massl.memory_size": 65536 if big else 1024, "massl.block_size": 16384 if big else 256,
        "optim.batch_size_per_worker": 16, "optim.epochs": 100,
        "data.train": str(quick_data), "data.limit": 512, "data.decode_batch_size": 32,
        "run.log_every_steps": every, "run.checkpoint_every_steps": every,
        "run.num_checkpoints_to_keep": 2, "run.final_knn": False, "run.max_steps": steps,
        "run.cpus_per_worker": 1, "data.decode_cpus": 1, "run.preemption_check_seconds": 5,
    }
    ray.init(address="local", num_cpus=3, object_store_memory=512 * 2**20,
             include_dashboard=False, log_to_driver=False)
    out: dict = {"steps": steps, "every": every, "model": over["model.arch"],
                 "memory_size": over["massl.memory_size"], "modes": {}}
    try:
        for mode in ("sync", "async"):
            name = f"stall_{mode}"
            o = dict(over, **{"run.name": name, "run.storage_path": str(tmp),
                              "run.checkpoint_upload": mode})
            t0 = time.time()
            train(load_config(None, [f"{k}={v}" for k, v in o.items()]))
            recs = [json.loads(x) for x in (tmp / name / "checkpoints.jsonl").read_text()
                    .splitlines()]
            mid = [r["stall_s"] for r in recs if r["reason"] != "final"]
            ckpt = list_checkpoints(tmp / name)[0] / "state.pt"
            last = json.loads((tmp / name / "metrics.jsonl").read_text().splitlines()[-1])
            steps_s = [json.loads(x)["step_time"] for x in
                       (tmp / name / "metrics.jsonl").read_text().splitlines()]
            out["modes"][mode] = {"stalls_s": mid, "median_s": sorted(mid)[len(mid) // 2],
                                  "mean_s": sum(mid) / len(mid),
                                  "checkpoint_bytes": ckpt.stat().st_size,
                                  "step_time_s_median": sorted(steps_s)[len(steps_s) // 2],
                                  # the preemption polls: Ray Train's barrier + our broadcast
                                  "control_points": last.get("control_points"),
                                  "control_s_per_point": (last["control_s"]
                                                          / max(1, last["control_points"])),
                                  "run_wall_s": time.time() - t0}
            m = out["modes"][mode]
            print(f"checkpoint stall {mode:>5}: median {m['median_s']:.3f} s, mean "
                  f"{m['mean_s']:.3f} s over {len(mid)} checkpoints of "
                  f"{m['checkpoint_bytes'] / 2**20:.1f} MiB (step {m['step_time_s_median']:.3f}"
                  f" s; {m['control_points']} preemption polls, "
                  f"{1000 * m['control_s_per_point']:.1f} ms each)", flush=True)
    finally:
        ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--part", choices=["restart", "stall", "both"], default="both")
    ap.add_argument("--mb", type=float, default=None, help="restart: checkpoint size in MiB")
    ap.add_argument("--worlds", default=None, help="restart: world sizes, e.g. 1,2,4")
    ap.add_argument("--steps", type=int, default=None, help="stall: training steps per mode")
    ap.add_argument("--every", type=int, default=None, help="stall: checkpoint interval")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "restart.json"))
    a = ap.parse_args()
    mb = a.mb if a.mb is not None else (2.0 if a.quick else 150.0)
    worlds = [int(x) for x in (a.worlds or ("1,2" if a.quick else "1,2,4")).split(",")]
    steps = a.steps or (8 if a.quick else 60)
    every = a.every or (4 if a.quick else 10)
    res: dict = {"argv": sys.argv[1:], "cpus": os.cpu_count(),
                 "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="massl_restart_") as t:
        tmp = Path(t)
        if a.part in ("restart", "both"):
            (tmp / "r").mkdir()
            res["restart"] = part_restart(mb, worlds, tmp / "r")
        if a.part in ("stall", "both"):
            (tmp / "s").mkdir()
            res["stall"] = part_stall(steps, every, tmp / "s", a.quick)
    res["loadavg_end"] = os.getloadavg()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(res), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
