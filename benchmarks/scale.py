"""The data plan at ImageNet scale, simulated: nothing is read or decoded.

For 1,281,167 rows in 1,024 shards (one Parquet row group per shard, ~1,251 rows), world sizes
W in {8, 64, 256} and global batches B in {1,024, 4,096}, three data orders:

- ``today_full``: today's exact order (massl_ray/data/order.py) with ``data.shuffle=full``: one
  Ray task per rank per step (``build_step_dataset``), each fetching its rows through the
  row-group LRU cache of its decode process (``RowStore``);
- ``today_blocks``: the same with ``data.shuffle=blocks`` (permutation within windows of 4 row
  groups);
- ``plan``: the two-level, world-size-independent plan (massl_ray/data/plan.py, not yet wired
  into training): one read task per window of row groups, decode tasks of
  ``DEFAULT_DECODE_ROWS`` positions.

Figures per (W, B): storage reads per row group per epoch, Ray tasks per global step, bytes
through the object store per epoch (and the plan's resident bound), planner time and peak
Python memory per rank per epoch, rows read and not used by a resume at mid-epoch, and batch
quality: mean classes per batch on the class-sorted data set (labels = storage position x 1000
// rows) against a full shuffle, per global batch and per rank's batch. A window-size sweep
shows what the plan's window trades.

Assumptions of the cache model (stated in the JSON too): ~110 KB per encoded image, so a row
group is ~138 MB and a decode process's ``data.row_cache_mb=1024`` MiB cache holds 7 of them
(RowStore evicts beyond the byte budget); W decode processes (one CPU per train worker, the
fewest that keep each rank's decoding in parallel; more processes only add reads); Ray places
each step task in any idle decode process (it does not schedule by cache contents): modelled as
a seeded uniform choice; within a task RowStore reads the task's row groups once each, in
ascending order.

    python benchmarks/scale.py            # full size (a minute or two on 2 cores)
    python benchmarks/scale.py --quick    # a small version, seconds
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

from benchmarks._shared import finite  # noqa: E402

import numpy as np  # noqa: E402



# -- the order the epoch plan replaced (massl_ray/data/order.py up to commit c95e937), kept
# here as the baseline of the simulation: one seeded permutation per epoch ("full"), or chunk
# order then rows within windows of BLOCK_WINDOW_CHUNKS chunks ("blocks"); rank r of W took
# the r-th slice of each step, fetched by index (a row-group read per cache miss).
BLOCK_WINDOW_CHUNKS = 4


def epoch_order(n: int, seed: int, epoch: int, shuffle: str = "full", chunks=None) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch])
    if shuffle == "full" or not chunks:
        return rng.permutation(n)
    starts = np.concatenate([[0], np.cumsum(chunks)[:-1]])
    parts = [np.arange(s, min(s + c, n)) for s, c in zip(starts, chunks) if s < n]
    parts = [parts[i] for i in rng.permutation(len(parts))]
    out = []
    for w in range(0, len(parts), BLOCK_WINDOW_CHUNKS):
        window = np.concatenate(parts[w:w + BLOCK_WINDOW_CHUNKS])
        out.append(window[rng.permutation(len(window))])
    return np.concatenate(out)


def step_rows(order: np.ndarray, step: int, rank: int, world: int, batch: int) -> np.ndarray:
    start = (step * world + rank) * batch
    return order[start:start + batch]
from massl_ray.data.plan import (DEFAULT_DECODE_ROWS, DEFAULT_WINDOW_GROUPS,  # noqa: E402
                                 EpochPlan, classes_per_batch)

ENCODED_BYTES = 110_000  # per image, ImageNet-1k train JPEGs on average
CROP_BYTES = 2 * 224 * 224 * 3 + 10 * 96 * 96 * 3  # uint8 views of the recipe per image
CLASSES = 1000
PREFETCH_WINDOWS = 2  # the plan's object store: the window being consumed and the next


def group_sizes(rows: int, shards: int, groups_per_shard: int) -> np.ndarray:
    g = shards * groups_per_shard
    return np.diff(np.linspace(0, rows, g + 1).astype(np.int64))


def simulate_today(order: np.ndarray, starts: np.ndarray, world: int, batch: int,
                   cache_groups: int, procs: int, seed: int) -> dict:
    """Row-group reads of today's one-task-per-rank-per-step path with per-process LRU caches."""
    spe = len(order) // batch
    b = batch // world
    used = order[:spe * batch]
    gidx = np.searchsorted(starts, used, side="right") - 1
    task = np.arange(len(used)) // b  # task id = step * world + rank, in step order
    key = np.unique(task * (len(starts)) + gidx)  # distinct (task, group), by task then group
    t_of, g_of = key // len(starts), key % len(starts)
    proc = np.random.default_rng([seed, 17]).integers(0, procs, spe * world)[t_of]
    reads = np.zeros(len(starts) - 1, np.int64)
    caches = [dict() for _ in range(procs)]
    for p, g in zip(proc.tolist(), g_of.tolist()):
        c = caches[p]
        if g in c:
            del c[g]
            c[g] = None
            continue
        reads[g] += 1
        c[g] = None
        if len(c) > cache_groups:
            del c[next(iter(c))]
    # The first step after a resume (cold caches): rows its tasks read, against rows it uses.
    first = key[t_of // world == spe // 2]
    g_first = first % len(starts)
    rows_read_first = int(np.diff(starts)[g_first].sum())
    return {"reads": reads, "tasks": spe * world, "steps": spe,
            "resume_rows_read_first_step": rows_read_first}


def planner_today(n: int, seed: int, shuffle: str, chunks, world: int, batch: int) -> dict:
    def work():
        order = epoch_order(n, seed, 0, shuffle, chunks)
        for s in range(n // batch):
            step_rows(order, s, 0, world, batch // world)
    return _measure(work)


def planner_plan(sizes, seed: int, world: int, batch: int, k: int) -> dict:
    def work():
        plan = EpochPlan(sizes, seed, 0, k)
        for s in range(plan.steps_per_epoch(batch)):
            plan.rank_rows(s, world - 1, world, batch)
    return _measure(work)


def _measure(fn) -> dict:
    t0 = time.perf_counter()
    fn()
    secs = time.perf_counter() - t0
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": secs, "peak_mib": peak / 2**20}


def quality(labels: np.ndarray, order_fn, spe: int, batch: int, b: int, samples: int) -> tuple:
    """Mean classes per global batch and per rank's batch over ``samples`` spaced steps."""
    steps = np.unique(np.linspace(0, spe - 1, min(samples, spe)).astype(np.int64))
    g, r = [], []
    for s in steps.tolist():
        rows = order_fn(s)
        g.append(classes_per_batch(labels, rows, batch).mean())
        r.append(classes_per_batch(labels, rows, b).mean())
    return float(np.mean(g)), float(np.mean(r))


def run(a) -> dict:
    sizes = group_sizes(a.rows, a.shards, a.groups_per_shard)
    G, n = len(sizes), int(sizes.sum())
    starts = np.concatenate([[0], np.cumsum(sizes)])
    group_bytes = float(sizes.mean()) * ENCODED_BYTES
    cache_groups = max(1, int((a.row_cache_mb << 20) // group_bytes))
    labels = (np.arange(n) * CLASSES) // n  # class-sorted storage
    k = a.window_groups
    orders = {
        "full": epoch_order(n, a.seed, 0, "full"),
        "blocks": epoch_order(n, a.seed, 0, "blocks", [int(x) for x in sizes]),
    }
    full_order = orders["full"]
    plan = EpochPlan(sizes, a.seed, 0, k)
    configs = []
    for world in a.worlds:
        for batch in a.batches:
            b = batch // world
            spe = n // batch
            row = {"world": world, "global_batch": batch, "rank_batch": b, "steps": spe}
            q_full = quality(labels, lambda s: full_order[s * batch:(s + 1) * batch], spe,
                             batch, b, a.quality_steps)
            for name in ("full", "blocks"):
                t0 = time.perf_counter()
                sim = simulate_today(orders[name], starts, world, batch, cache_groups, world,
                                     a.seed)
                q = quality(labels, lambda s, o=orders[name]: o[s * batch:(s + 1) * batch], spe,
                            batch, b, a.quality_steps)
                plan_cost = planner_today(n, a.seed, name, [int(x) for x in sizes]
                                          if name == "blocks" else None, world, batch)
                reads = sim["reads"]
                row["today_" + name] = {
                    "reads_per_row_group": float(reads.mean()),
                    "reads_per_row_group_max": int(reads.max()),
                    "storage_bytes": float(reads.sum() * group_bytes),
                    "tasks_per_step": sim["tasks"] / spe,
                    "object_store_bytes": float(spe * batch * CROP_BYTES),
                    "planner_s_per_rank_epoch": plan_cost["seconds"],
                    "planner_peak_mib_per_rank": plan_cost["peak_mib"],
                    "resume_rows_read_first_step": sim["resume_rows_read_first_step"],
                    "resume_rows_used_first_step": batch,
                    "resume_rows_decoded_before": 0,
                    "classes_per_global_batch": q[0],
                    "classes_per_rank_batch": q[1],
                    "quality_global": q[0] / q_full[0],
                    "quality_rank": q[1] / q_full[1],
                    "simulated_s": time.perf_counter() - t0,
                }
            tp = plan.task_plan(batch, world, decode_rows=a.decode_rows)
            reads = np.zeros(G, np.int64)
            for t in tp.read:
                reads[list(t.groups)] += 1
            rows_read = int(sum(t.stop - t.start for t in tp.read))
            mid = plan.resume(spe // 2, batch)
            offs = np.arange(spe) * batch
            w_of = np.searchsorted(plan.window_starts, offs, side="right") - 1
            worst = int((offs - plan.window_starts[w_of]).max())
            q = quality(labels, lambda s: plan.step_rows(s, batch), spe, batch, b,
                        a.quality_steps)
            cost = planner_plan(sizes, a.seed, world, batch, k)
            t0 = time.perf_counter()
            EpochPlan(sizes, a.seed, 0, k).task_plan(batch, world, decode_rows=a.decode_rows)
            driver_s = time.perf_counter() - t0
            max_window = int(np.diff(plan.window_starts).max())
            row["plan"] = {
                "reads_per_row_group": float(reads.mean()),
                "reads_per_row_group_max": int(reads.max()),
                "storage_bytes": float(reads.sum() * group_bytes),
                # one read task per row group of each window (massl_ray/data/feed.py)
                "read_tasks": int(reads.sum()),
                "decode_tasks": len(tp.decode),
                "tasks_per_step": (int(reads.sum()) + len(tp.decode)) / spe,
                "object_store_bytes": float(rows_read * ENCODED_BYTES + spe * batch * CROP_BYTES),
                "object_store_resident_bound_bytes": float(
                    PREFETCH_WINDOWS * max_window * ENCODED_BYTES
                    + PREFETCH_WINDOWS * batch * CROP_BYTES),
                "planner_s_per_rank_epoch": cost["seconds"],
                "planner_peak_mib_per_rank": cost["peak_mib"],
                "driver_task_plan_s": driver_s,
                "resume_step": mid.step,
                "resume_rows_read_unused": mid.unused_rows,
                "resume_rows_read_unused_worst": worst,
                "resume_window_rows": mid.window_rows,
                "resume_windows_not_wholly_used": 1 if mid.unused_rows else 0,
                "resume_rows_decoded_before": 0,
                "classes_per_global_batch": q[0],
                "classes_per_rank_batch": q[1],
                "quality_global": q[0] / q_full[0],
                "quality_rank": q[1] / q_full[1],
            }
            row["full_shuffle_classes"] = {"global_batch": q_full[0], "rank_batch": q_full[1]}
            configs.append(row)
            print(f"  W={world} B={batch} done", file=sys.stderr, flush=True)
    sweep = []
    for kk in a.sweep:
        p2 = EpochPlan(sizes, a.seed, 0, kk)
        ent = {"window_groups": kk, "windows": p2.num_windows,
               "window_encoded_bytes": float(np.diff(p2.window_starts).max() * ENCODED_BYTES),
               "quality": {}}
        for batch in a.batches:
            spe = n // batch
            q_full = {}
            for bb in sorted({batch} | {batch // w for w in a.worlds}):
                fq = quality(labels, lambda s: full_order[s * batch:(s + 1) * batch], spe,
                             batch, bb, a.quality_steps)[1]
                pq_ = quality(labels, lambda s: p2.step_rows(s, batch), spe, batch, bb,
                              a.quality_steps)[1]
                q_full[str(bb)] = pq_ / fq
            ent["quality"][str(batch)] = q_full
        sweep.append(ent)
    return {
        "params": {"rows": n, "shards": a.shards, "row_groups": G,
                   "rows_per_group_mean": float(sizes.mean()), "worlds": a.worlds,
                   "global_batches": a.batches, "window_groups": k,
                   "decode_rows": a.decode_rows, "encoded_bytes_per_image": ENCODED_BYTES,
                   "crop_bytes_per_image": CROP_BYTES, "row_cache_mb": a.row_cache_mb,
                   "cache_groups_per_process": cache_groups, "classes": CLASSES,
                   "blocks_window_groups": BLOCK_WINDOW_CHUNKS, "seed": a.seed,
                   "quality_steps": a.quality_steps, "quick": a.quick},
        "assumptions": [
            f"{ENCODED_BYTES} bytes per encoded image: a row group is "
            f"{group_bytes / 1e6:.1f} MB and a {a.row_cache_mb} MiB RowStore cache holds "
            f"{cache_groups} groups",
            "today: W decode processes, each step task placed in a uniformly chosen process "
            "(Ray does not schedule by cache contents); per-process LRU over row groups; a "
            "task reads each of its row groups once",
            "today: encoded rows are read inside the step task (not through the object store); "
            "the crops of every used row go through it once",
            "plan: one read task per window puts the window's encoded rows in the object store "
            "(once), decode tasks of decode_rows positions put crops in it (once); it holds at "
            f"most {PREFETCH_WINDOWS} windows of encoded rows and {PREFETCH_WINDOWS} global "
            "steps of crops",
            "quality: class-sorted storage, labels = position * classes // rows; a full shuffle "
            "is a uniform permutation of the rows; batches at evenly spaced steps",
        ],
        "configs": configs,
        "window_sweep": sweep,
    }


def table(res: dict) -> str:
    p = res["params"]
    out = [f"rows {p['rows']:,} in {p['row_groups']:,} row groups (~{p['rows_per_group_mean']:.0f}"
           f" rows), plan window {p['window_groups']} groups, decode tasks of "
           f"{p['decode_rows']} rows, cache {p['cache_groups_per_process']} groups/process",
           "",
           "| W | B | order | reads / row group (max) | tasks / step | object store / epoch "
           "| planner s, MiB / rank / epoch | resume: rows read, not used | classes / global "
           "batch (vs full) | classes / rank batch (vs full) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["configs"]:
        for name in ("today_full", "today_blocks", "plan"):
            x = c[name]
            if name == "plan":
                resume = (f"{x['resume_rows_read_unused']:,} (worst "
                          f"{x['resume_rows_read_unused_worst']:,}; 1 window of "
                          f"{x['resume_window_rows']:,})")
                store = (f"{x['object_store_bytes'] / 1e9:,.0f} GB (resident <= "
                         f"{x['object_store_resident_bound_bytes'] / 1e9:,.1f} GB)")
            else:
                resume = (f"{x['resume_rows_read_first_step'] - x['resume_rows_used_first_step']:,}"
                          f" in its first step")
                store = f"{x['object_store_bytes'] / 1e9:,.0f} GB"
            out.append(
                f"| {c['world']} | {c['global_batch']:,} | {name} | "
                f"{x['reads_per_row_group']:,.2f} ({x['reads_per_row_group_max']:,}) | "
                f"{x['tasks_per_step']:.2f} | {store} | "
                f"{x['planner_s_per_rank_epoch']:.3f} s, {x['planner_peak_mib_per_rank']:.1f} | "
                f"{resume} | {x['classes_per_global_batch']:.0f} "
                f"({100 * x['quality_global']:.0f} %) | {x['classes_per_rank_batch']:.1f} "
                f"({100 * x['quality_rank']:.0f} %) |")
    out += ["", "Window sweep (plan): classes per batch vs a full shuffle, class-sorted data",
            "", "| window groups | windows | window encoded | " + " | ".join(
                f"B={b} batch {bb}" for b in p["global_batches"]
                for bb in res["window_sweep"][0]["quality"][str(b)]) + " |",
            "|---|---|---|" + "---|" * sum(len(res["window_sweep"][0]["quality"][str(b)])
                                            for b in p["global_batches"])]
    for e in res["window_sweep"]:
        cells = [f"{100 * v:.0f} %" for b in p["global_batches"]
                 for v in e["quality"][str(b)].values()]
        out.append(f"| {e['window_groups']} | {e['windows']} | "
                   f"{e['window_encoded_bytes'] / 1e9:.1f} GB | " + " | ".join(cells) + " |")
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
    p.add_argument("--row-cache-mb", type=int, default=1024)
    p.add_argument("--quality-steps", type=int, default=None,
                   help="batches sampled per quality figure (default 100; quick: 10)")
    p.add_argument("--sweep", type=int, nargs="+", default=None,
                   help="window sizes of the sweep (default 8 32 128 512 1024; quick: 4 16 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    a = p.parse_args(argv)
    q = a.quick
    a.rows = a.rows or (40_000 if q else 1_281_167)
    a.shards = a.shards or (64 if q else 1024)
    a.window_groups = a.window_groups or (16 if q else DEFAULT_WINDOW_GROUPS)
    a.quality_steps = a.quality_steps or (10 if q else 100)
    a.sweep = a.sweep or ([4, 16, 64] if q else [8, 32, 128, 512, 1024])
    for b in a.batches:
        for w in a.worlds:
            if b % w:
                p.error(f"world size {w} does not divide global batch {b}")
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
