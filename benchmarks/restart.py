#!/usr/bin/env python
"""What a restart reads: the checkpoint once, on rank 0, whatever the world size (Ray-free).

W = 1, 2, 4 processes form a gloo group (as a restarted Ray Train worker group does) and restore
one saved training state as ``RayLoopContext.latest_state`` does: rank 0 alone finds and loads
the newest valid checkpoint in one read (hashed and unpickled from the same bytes,
``load_latest_valid_checkpoint``), the others receive it over the process group
(``broadcast_state``). Bytes are counted per rank by the package's own counter of state.pt bytes
read (``massl_ray.method.checkpoint.READ_BYTES``) and by the kernel (``rchar`` of /proc/self/io
over the restore); wall seconds of the restore (slowest rank) too.

    python benchmarks/restart.py                    # a 150 MiB checkpoint, W = 1, 2, 4
    python benchmarks/restart.py --quick            # CI: 2 MiB, W = 1, 2
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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._shared import finite, proc_field  # noqa: E402


def _rchar() -> int:
    return proc_field("rchar", "/proc/self/io") or 0


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


def _restore_rank(rank: int, world: int, init_file: str, run_dir: str, out_dir: str) -> None:
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
        state = ck.load_latest_valid_checkpoint(Path(run_dir))[1] if rank == 0 else None
        state = broadcast_state(state, src=0)
        seconds = time.perf_counter() - t0
        rec = {"rank": rank, "bytes_counted": ck.READ_BYTES["state"] - c0,
               "rchar": _rchar() - r0, "seconds": seconds, "step": int(state["global_step"])}
        Path(out_dir, f"{world}_{rank}.json").write_text(json.dumps(rec))
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
        mp.start_processes(_restore_rank, args=(world, str(tmp / f"pg_{world}"), str(run_dir),
                                                str(tmp)),
                           nprocs=world, join=True, start_method="spawn")
        ranks = [json.loads((tmp / f"{world}_{r}.json").read_text()) for r in range(world)]
        assert all(r["step"] == 1234 for r in ranks)
        total = sum(r["bytes_counted"] for r in ranks)
        row = {"world_size": world, "bytes_read_total": total,
               "checkpoints_read": round(total / size, 3),
               "bytes_read_per_rank": [r["bytes_counted"] for r in ranks],
               "rchar_per_rank": [r["rchar"] for r in ranks],
               "seconds_slowest_rank": max(r["seconds"] for r in ranks)}
        out["runs"].append(row)
        print(f"restart W={world}: {total / 2**20:8.1f} MiB read ({row['checkpoints_read']:.2f} "
              f"checkpoints; per rank {[round(b / 2**20, 1) for b in row['bytes_read_per_rank']]}"
              f" MiB; rchar {[round(b / 2**20, 1) for b in row['rchar_per_rank']]} MiB), "
              f"{row['seconds_slowest_rank']:.2f} s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=None, help="checkpoint size in MiB (150; quick 2)")
    ap.add_argument("--worlds", default=None, help="world sizes (1,2,4; quick 1,2)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "restart.json"))
    a = ap.parse_args(argv)
    mb = a.mb if a.mb is not None else (2.0 if a.quick else 150.0)
    worlds = [int(x) for x in (a.worlds or ("1,2" if a.quick else "1,2,4")).split(",")]
    res: dict = {"quick": a.quick, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="massl_restart_") as t:
        res["restart"] = part_restart(mb, worlds, Path(t))
    res["loadavg_end"] = os.getloadavg()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(res), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
