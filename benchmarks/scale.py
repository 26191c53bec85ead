"""The data plan at ImageNet scale, simulated: nothing is read or decoded.

For 1,281,167 rows in 1,024 shards (one Parquet row group each, ~1,251 rows), world sizes W in
{8, 64, 256} and global batches B in {1,024, 4,096}, the epoch plan of the exact data order
(massl_ray/data/plan.py, run on Ray by massl_ray/data/feed.py: one read task per row group of a
window, decode tasks of ``data.decode_rows`` positions). Figures per (W, B): storage reads per
row group per epoch, Ray tasks per global step, object-store bytes per epoch and the resident
bound, planner time and peak Python memory per rank per epoch, rows read and not used by a
resume at mid-epoch, and batch quality: mean classes per batch on class-sorted data (labels =
storage position x 1000 // rows) against a full shuffle (a uniform permutation), per global
batch and per rank's batch. A window-size sweep shows what the window trades.

Assumptions (in the JSON too): ~110 KB per encoded image; the object store holds the window
being consumed and the next, and two global steps of crops.

    python benchmarks/scale.py            # full size (seconds to a minute)
    python benchmarks/scale.py --quick    # CI: 40,000 rows, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks._shared import finite  # noqa: E402
from massl_ray.data.plan import (DEFAULT_DECODE_ROWS, DEFAULT_WINDOW_GROUPS,  # noqa: E402
                                 EpochPlan, classes_per_batch)

ENCODED_BYTES = 110_000  # per image, ImageNet-1k train JPEGs on average
CROP_BYTES = 2 * 224 * 224 * 3 + 10 * 96 * 96 * 3  # uint8 views of the recipe per image
CLASSES = 1000
PREFETCH_WINDOWS = 2  # the plan's object store: the window being consumed and the next


def group_sizes(rows: int, shards: int, groups_per_shard: int) -> np.ndarray:
    return np.diff(np.linspace(0, rows, shards * groups_per_shard + 1).astype(np.int64))


def planner_cost(sizes, seed: int, world: int, batch: int, k: int) -> dict:
    """Time, then tracemalloc peak, of one rank's rows of every step of an epoch."""
    def work():
        plan = EpochPlan(sizes, seed, 0, k)
        for s in range(plan.steps_per_epoch(batch)):
            plan.rank_rows(s, world - 1, world, batch)
    t0 = time.perf_counter()
    work()
    secs = time.perf_counter() - t0
    tracemalloc.start()
    work()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": secs, "peak_mib": peak / 2**20}


def quality(labels: np.ndarray, order_fn, spe: int, batch: int, b: int, samples: int) -> tuple:
    """Mean classes per global batch and per rank's batch over ``samples`` spaced steps."""
    g, r = [], []
    for s in np.unique(np.linspace(0, spe - 1, min(samples, spe)).astype(np.int64)).tolist():
        rows = order_fn(s)
        g.append(classes_per_batch(labels, rows, batch).mean())
        r.append(classes_per_batch(labels, rows, b).mean())
    return float(np.mean(g)), float(np.mean(r))


def run(a) -> dict:
    sizes = group_sizes(a.rows, a.shards, a.groups_per_shard)
    G, n = len(sizes), int(sizes.sum())
    labels = (np.arange(n) * CLASSES) // n  # class-sorted storage
    full = np.random.default_rng([a.seed, 0]).permutation(n)  # a full shuffle, the reference
    k = a.window_groups
    plan = EpochPlan(sizes, a.seed, 0, k)
    configs = []
    for world in a.worlds:
        for batch in a.batches:
            b, spe = batch // world, n // batch
            q_full = quality(labels, lambda s: full[s * batch:(s + 1) * batch], spe, batch, b,
                             a.quality_steps)
            t0 = time.perf_counter()
            tp = plan.task_plan(batch, world, decode_rows=a.decode_rows)
            driver_s = time.perf_counter() - t0
            reads = np.zeros(G, np.int64)
            for t in tp.read:
                reads[list(t.groups)] += 1
            rows_read = int(sum(t.stop - t.start for t in tp.read))
            mid = plan.resume(spe // 2, batch)
            offs = np.arange(spe) * batch
            w_of = np.searchsorted(plan.window_starts, offs, side="right") - 1
            q = quality(labels, lambda s: plan.step_rows(s, batch), spe, batch, b, a.quality_steps)
            cost = planner_cost(sizes, a.seed, world, batch, k)
            max_window = int(np.diff(plan.window_starts).max())
            configs.append({
                "world": world, "global_batch": batch, "rank_batch": b, "steps": spe,
                "reads_per_row_group": float(reads.mean()),
                "reads_per_row_group_max": int(reads.max()),
                "storage_bytes": float(reads.sum() * float(sizes.mean()) * ENCODED_BYTES),
                "read_tasks": int(reads.sum()),  # one per row group of each window (feed.py)
                "decode_tasks": len(tp.decode),
                "tasks_per_step": (int(reads.sum()) + len(tp.decode)) / spe,
                "object_store_bytes": float(rows_read * ENCODED_BYTES + spe * batch * CROP_BYTES),
                "object_store_resident_bound_bytes": float(
                    PREFETCH_WINDOWS * (max_window * ENCODED_BYTES + batch * CROP_BYTES)),
                "planner_s_per_rank_epoch": cost["seconds"],
                "planner_peak_mib_per_rank": cost["peak_mib"],
                "driver_task_plan_s": driver_s,
                "resume_step": mid.step,
                "resume_rows_read_unused": mid.unused_rows,
                "resume_rows_read_unused_worst": int((offs - plan.window_starts[w_of]).max()),
                "resume_window_rows": mid.window_rows,
                "resume_windows_not_wholly_used": 1 if mid.unused_rows else 0,
                "resume_rows_decoded_before": 0,  # rows before the position: read, not decoded
                "classes_per_global_batch": q[0], "classes_per_rank_batch": q[1],
                "full_shuffle_classes": {"global_batch": q_full[0], "rank_batch": q_full[1]},
                "quality_global": q[0] / q_full[0], "quality_rank": q[1] / q_full[1]})
            print(f"  W={world} B={batch} done", file=sys.stderr, flush=True)
    sweep, cols = [], [(b, bb) for b in a.batches for bb in sorted({b} | {b // w for w in a.worlds})]
    fq = {c: quality(labels, lambda s: full[s * c[0]:(s + 1) * c[0]], n // c[0], c[0], c[1],
                     a.quality_steps)[1] for c in cols}  # a full shuffle's, per (B, batch)
    for kk in a.sweep:
        p2 = EpochPlan(sizes, a.seed, 0, kk)
        ent = {"window_groups": kk, "windows": p2.num_windows,
               "window_encoded_bytes": float(np.diff(p2.window_starts).max() * ENCODED_BYTES),
               "quality": {str(b): {} for b in a.batches}}
        for b, bb in cols:
            ent["quality"][str(b)][str(bb)] = quality(
                labels, lambda s: p2.step_rows(s, b), n // b, b, bb, a.quality_steps)[1] / fq[b, bb]
        sweep.append(ent)
    return {
        "params": {"rows": n, "shards": a.shards, "row_groups": G,
                   "rows_per_group_mean": float(sizes.mean()), "worlds": a.worlds,
                   "global_batches": a.batches, "window_groups": k, "decode_rows": a.decode_rows,
                   "encoded_bytes_per_image": ENCODED_BYTES, "crop_bytes_per_image": CROP_BYTES,
                   "classes": CLASSES, "seed": a.seed, "quality_steps": a.quality_steps,
                   "quick": a.quick},
        "assumptions": [
            f"{ENCODED_BYTES} bytes per encoded image",
            "one read task per row group of a window puts the window's encoded rows in the object "
            "store (once), decode tasks of decode_rows positions put crops in it (once); it holds "
            f"at most {PREFETCH_WINDOWS} windows of encoded rows and {PREFETCH_WINDOWS} global "
            "steps of crops",
            "quality: class-sorted storage, labels = position * classes // rows; a full shuffle "
            "is a uniform permutation of the rows; batches at evenly spaced steps"],
        "configs": configs, "window_sweep": sweep}


def table(res: dict) -> str:
    p = res["params"]
    out = [f"rows {p['rows']:,} in {p['row_groups']:,} row groups (~{p['rows_per_group_mean']:.0f}"
           f" rows), window {p['window_groups']} groups, decode tasks of {p['decode_rows']} rows",
           "", "| W | B | reads / row group (max) | tasks / step | object store / epoch | planner "
           "s, MiB / rank / epoch | resume: rows read, not used | classes / global batch (vs "
           "full) | classes / rank batch (vs full) |", "|---|---|---|---|---|---|---|---|---|"]
    for x in res["configs"]:
        out.append(
            f"| {x['world']} | {x['global_batch']:,} | {x['reads_per_row_group']:,.2f} "
            f"({x['reads_per_row_group_max']:,}) | {x['tasks_per_step']:.2f} | "
            f"{x['object_store_bytes'] / 1e9:,.0f} GB (resident <= "
            f"{x['object_store_resident_bound_bytes'] / 1e9:,.1f} GB) | "
            f"{x['planner_s_per_rank_epoch']:.3f} s, {x['planner_peak_mib_per_rank']:.1f} | "
            f"{x['resume_rows_read_unused']:,} (worst {x['resume_rows_read_unused_worst']:,}; 1 "
            f"window of {x['resume_window_rows']:,}) | {x['classes_per_global_batch']:.0f} "
            f"({100 * x['quality_global']:.0f} %) | {x['classes_per_rank_batch']:.1f} "
            f"({100 * x['quality_rank']:.0f} %) |")
    cols = [(str(b), bb) for b in p["global_batches"]
            for bb in res["window_sweep"][0]["quality"][str(b)]]
    out += ["", "Window sweep: classes per batch vs a full shuffle, class-sorted data", "",
            "| window groups | windows | window encoded | "
            + " | ".join(f"B={b} batch {bb}" for b, bb in cols) + " |",
            "|---|---|---|" + "---|" * len(cols)]
    for e in res["window_sweep"]:
        out.append(f"| {e['window_groups']} | {e['windows']} | "
                   f"{e['window_encoded_bytes'] / 1e9:.1f} GB | "
                   + " | ".join(f"{100 * e['quality'][b][bb]:.0f} %" for b, bb in cols) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small version (seconds)")
    p.add_argument("--rows", type=int, default=None, help="default 1,281,167 (quick: 40,000)")
    p.add_argument("--shards", type=int, default=None, help="default 1,024 (quick: 64)")
    p.add_argument("--groups-per-shard", type=int, default=1)
    p.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--window-groups", type=int, default=None,
                   help=f"plan window (default {DEFAULT_WINDOW_GROUPS}; quick: 16)")
    p.add_argument("--decode-rows", type=int, default=DEFAULT_DECODE_ROWS)
    p.add_argument("--quality-steps", type=int, default=None,
                   help="batches sampled per quality figure (default 100; quick: 10)")
    p.add_argument("--sweep", type=int, nargs="+", default=None,
                   help="window sizes of the sweep (default 8 32 128 512 1024; quick: 4 16 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    a = p.parse_args(argv)
    for k, quick, full in (("rows", 40_000, 1_281_167), ("shards", 64, 1024),
                           ("window_groups", 16, DEFAULT_WINDOW_GROUPS), ("quality_steps", 10, 100),
                           ("sweep", [4, 16, 64], [8, 32, 128, 512, 1024])):
        setattr(a, k, getattr(a, k) or (quick if a.quick else full))
    bad = [(w, b) for b in a.batches for w in a.worlds if b % w]
    if bad:
        p.error(f"world size {bad[0][0]} does not divide global batch {bad[0][1]}")
    t0 = time.perf_counter()
    res = run(a)
    res["seconds"] = time.perf_counter() - t0
    print(table(res))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(res), indent=1, allow_nan=False))
    print(f"\nwrote {out} ({res['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
