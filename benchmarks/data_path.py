#!/usr/bin/env python
"""The training data path at ImageNet crop sizes: images/s per CPU core of four loaders, one run.

Every path turns the same class-sorted, ImageNet-like Parquet set (generated once and cached:
``--images`` JPEGs of 300-500 px per side, smooth noise + shapes + grain, quality 90, classes in
storage order, row groups of ``--row-group`` rows) into batches of 64 with DINO's crops
(2 x 224 + 10 x 96 by default: ``global_crops`` uint8 [64, 2, 3, 224, 224], ``local_crops``
uint8 [64, 10, 3, 96, 96]):

* ``reference``: per-image PIL decode + torchvision transforms per crop
  (``benchmarks/pipeline.py``'s ``ReferenceDataset``, DINO's PIL blur) in a
  ``torch.utils.data.DataLoader(num_workers=N, shuffle=True, persistent_workers=True)``; its
  images are a seeded random sample of the set held in memory (its best case: no file reads);
* ``old_exact``: today's exact order (``data.order=exact``) **at commit c95e937**, run from a
  ``git worktree`` of that commit (``--old-root``, created when missing) with ``PYTHONPATH``
  pointing there: ``build_step_dataset`` (one Ray Data task per step, rows fetched by index
  through per-process row-group caches);
* ``old_stream``: today's ``data.order=stream`` at the same commit: ``build_train_dataset``
  (Ray Data read, full ``random_shuffle``, repartition, ``map_batches`` decode) consumed by
  ``iter_torch_batches``;
* ``new``: the new exact path of this tree, ``massl_ray.data.feed.iter_batches`` (row groups
  read once per epoch, decode tasks by the epoch plan); reported as "not available" with the
  reason when this tree has no ``massl_ray.data.feed``.

Each path runs in its own subprocess (the two old paths share one, with one Ray): Ray is
started with ``num_cpus=N``, a ``--object-store-mib`` object store and no dashboard; the
DataLoader gets N workers. A path's first ``--warmup`` images are a warm-up (worker start-up,
reads, the shuffle: reported as ``startup_s``, time to the first batch, and ``warmup_s``); the
next ``--measure`` images are timed. Reported per path: images/s over the measured images, per
core (/ N, the CPUs the path was given), and the CPU the whole process tree actually used in
that window (``cores_busy``, from /proc: the consumer, Ray's workers and daemons, or the
DataLoader's workers). Ratios are against the reference. The load average is recorded: the
machine may be shared. ``--rounds R`` repeats the sequence (reversed every other round) and
reports medians.

Usage::

    python benchmarks/data_path.py                        # 10,000 images, N = 2, ~10 minutes
    python benchmarks/data_path.py --rounds 2 --measure 2048
    python benchmarks/data_path.py --quick                # CI: tiny images and crops, ~1 min
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "c95e937"
BATCH = 64
ALL_PATHS = ("reference", "old_exact", "old_stream", "new")
FULL = dict(images=10_000, classes=100, min_px=300, max_px=500, row_group=1000,
            global_size=224, local_size=96, num_local_crops=10, warmup=128, measure=1536)
QUICK = dict(images=512, classes=4, min_px=48, max_px=80, row_group=64,
             global_size=32, local_size=16, num_local_crops=2, warmup=64, measure=256)


# ---------------------------------------------------------------------------- the data set
def _one_image(args) -> tuple[bytes, int, int]:
    """A realistic-looking JPEG: smooth coloured noise, shapes in the class's colours, grain."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    i, label, classes, seed, min_px, max_px = args
    rng = np.random.default_rng([seed, i])
    w, h = (int(x) for x in rng.integers(min_px, max_px + 1, 2))
    hue = np.array([np.sin(2 * np.pi * label / classes + k * 2.1) for k in range(3)]) * 70 + 128
    small = rng.normal(0, 45, (int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3)) + hue
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(8, w // 2 + 9)), y0 + int(rng.integers(8, h // 2 + 9))
        col = tuple(int(c) for c in np.clip(hue + rng.normal(0, 60, 3), 0, 255))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            d.ellipse([x0, y0, x1, y1], fill=col)
        elif kind == 1:
            d.rectangle([x0, y0, x1, y1], fill=col)
        else:
            d.polygon([(x0, y0), (x1, y0 + (y1 - y0) // 3), (x0 + (x1 - x0) // 2, y1)], fill=col)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), w, h


def make_dataset(cache_dir: Path, images: int, classes: int, min_px: int, max_px: int,
                 row_group: int, seed: int, procs: int) -> tuple[Path, dict]:
    """The class-sorted Parquet set (``part-*.parquet`` of one row group each), cached by its
    parameters under ``cache_dir``; returns its folder and a description."""
    import multiprocessing as mp

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"imagenet_like_n{images}_c{classes}_{min_px}-{max_px}px_rg{row_group}_s{seed}"
    root = cache_dir / name
    info_path = root / "_dataset.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        info["cached"] = True
        return root, info
    t0 = time.perf_counter()
    tmp = cache_dir / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    labels = (np.arange(images) * classes // images).astype(np.int64)  # class-sorted
    jobs = [(i, int(labels[i]), classes, seed, min_px, max_px) for i in range(images)]
    nbytes, sides = [], []
    with mp.get_context("fork").Pool(procs) as pool:
        for f, lo in enumerate(range(0, images, row_group)):
            out = pool.map(_one_image, jobs[lo:lo + row_group], chunksize=16)
            pq.write_table(pa.table({"image": pa.array([o[0] for o in out], pa.binary()),
                                     "label": pa.array(labels[lo:lo + len(out)], pa.int64())}),
                           tmp / f"part-{f:05d}.parquet", row_group_size=row_group,
                           compression="NONE")
            nbytes += [len(o[0]) for o in out]
            sides += [s for o in out for s in o[1:]]
    info = {"path": str(root), "rows": images, "classes": classes, "class_sorted": True,
            "row_group_rows": row_group, "files": -(-images // row_group),
            "side_px": [min_px, max_px], "mean_side_px": float(np.mean(sides)),
            "mean_jpeg_bytes": float(np.mean(nbytes)), "total_mib": sum(nbytes) / 2**20,
            "jpeg_quality": 90, "content": "bicubic-upsampled colour noise + 3-8 shapes in the "
            "class's hue + blur + grain", "seed": seed, "generate_s": time.perf_counter() - t0}
    (tmp / "_dataset.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    info["cached"] = False
    return root, info


# ---------------------------------------------------------------------------- measuring
def _tree_cpu_s(root_pid: int) -> float:
    """utime + stime (s) of ``root_pid`` and all its live descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(rest[1])
        cpu[int(d)] = (int(rest[11]) + int(rest[12])) / tick
    kids: dict[int, list[int]] = {}
    for p, pp in parent.items():
        kids.setdefault(pp, []).append(p)
    total, todo = 0.0, [root_pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += kids.get(p, [])
    return total


def measure(batches: Iterator[dict], warmup: int, count: int, expect_g: tuple,
            expect_l: tuple) -> dict:
    """Time ``count`` images after ``warmup`` images of ``batches``."""
    me = os.getpid()
    t0 = time.perf_counter()
    first = t_warm = None
    seen = measured = 0
    cpu0 = None
    load0 = os.getloadavg()[0]
    for b in batches:
        g, lc = b["global_crops"], b["local_crops"]
        n = int(g.shape[0])
        if first is None:
            first = time.perf_counter()
            if str(g.dtype) != "torch.uint8" or tuple(g.shape[1:]) != expect_g \
                    or tuple(lc.shape[1:]) != expect_l:
                raise RuntimeError(f"unexpected batch: global {g.dtype} {tuple(g.shape)}, "
                                   f"local {lc.dtype} {tuple(lc.shape)}")
        if t_warm is not None:
            measured += n
            if measured >= count:
                break
        seen += n
        if t_warm is None and seen >= warmup:
            t_warm = time.perf_counter()
            cpu0 = _tree_cpu_s(me)
    end = time.perf_counter()
    if t_warm is None or measured < count:
        raise RuntimeError(f"the path stopped after {seen + measured} images "
                           f"(needed {warmup} + {count})")
    cpu = _tree_cpu_s(me) - cpu0
    wall = end - t_warm
    return {"startup_s": first - t0, "warmup_s": t_warm - t0, "images": measured,
            "wall_s": wall, "img_s": measured / wall, "cpu_s": cpu, "cores_busy": cpu / wall,
            "load1_before": load0, "load1_after": os.getloadavg()[0]}


def _crops(s: dict):
    from massl_ray.config import CropConfig

    return CropConfig(global_size=s["global_size"], local_size=s["local_size"],
                      num_local_crops=s["num_local_crops"])


def _shapes(s: dict) -> tuple[tuple, tuple]:
    return ((2, 3, s["global_size"], s["global_size"]),
            (s["num_local_crops"], 3, s["local_size"], s["local_size"]))


def _ray_init(s: dict) -> None:
    import ray

    ray.init(num_cpus=s["cpus"], object_store_memory=s["object_store_mib"] * 2**20,
             include_dashboard=False, log_to_driver=False, _temp_dir=s.get("ray_temp_dir"))
    ray.data.DataContext.get_current().enable_progress_bars = False


def _base_config(s: dict, steps: int):
    from massl_ray.config import Config

    cfg = Config(crops=_crops(s))
    cfg.data.train = s["data"]
    cfg.data.decode_batch_size = BATCH
    cfg.data.decode_cpus = 1.0
    cfg.optim.batch_size_per_worker = BATCH
    cfg.optim.steps_per_epoch = steps
    cfg.optim.epochs = 1
    cfg.run.num_workers = 1
    return cfg


def worker_reference(s: dict) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from benchmarks.pipeline import ReferenceDataset

    t = pq.read_table(s["data"], columns=["image", "label"])
    n = s["warmup"] + s["measure"] + 2 * BATCH
    idx = np.random.default_rng(s["seed"]).choice(t.num_rows, size=min(n, t.num_rows),
                                                  replace=False)
    t = t.take(pa.array(np.sort(idx)))
    ds = ReferenceDataset(t.column("image").to_pylist(), t.column("label").to_numpy(),
                          _crops(s), "pil")
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True,
                                         num_workers=s["cpus"], persistent_workers=True,
                                         multiprocessing_context="fork")
    return {"reference": measure(iter(loader), s["warmup"], s["measure"], *_shapes(s))}


def worker_old(s: dict) -> dict:
    """Today's exact and stream paths (this process imports massl_ray from the old worktree)."""
    import copy

    import massl_ray
    from massl_ray.data.pipeline import build_step_dataset, build_train_dataset
    from massl_ray.data.sources import open_source

    assert str(Path(massl_ray.__file__).resolve()).startswith(str(Path(s["old_root"]).resolve())), \
        massl_ray.__file__
    _ray_init(s)
    src = open_source(s["data"])
    steps = src.num_rows // BATCH
    out = {}
    for name in s["paths"]:
        cfg = _base_config(s, steps)
        if name == "old_exact":
            cfg.data.order = "exact"
            cfg.data.shuffle = "full"
            ds = build_step_dataset(cfg, src, rank=0, start_step=0, num_steps=steps)
        else:
            cfg.data.order = "stream"
            cfg.data.shuffle = "full"
            ds = build_train_dataset(copy.deepcopy(cfg), src, reporter=None)
        it = ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=cfg.data.prefetch_batches)
        out[name] = measure(iter(it), s["warmup"], s["measure"], *_shapes(s))
        out[name]["settings"] = {"order": cfg.data.order, "shuffle": cfg.data.shuffle,
                                 "decode_cpus": cfg.data.decode_cpus,
                                 "row_cache_mb": cfg.data.row_cache_mb}
        del it, ds
    return out


def worker_new(s: dict) -> dict:
    from massl_ray.data.sources import open_source

    try:
        from massl_ray.data.feed import iter_batches
    except ImportError as e:
        return {"new": {"available": False, "reason": f"massl_ray.data.feed: {e}"}}
    _ray_init(s)
    src = open_source(s["data"])
    steps = src.num_rows // BATCH
    cfg = _base_config(s, steps)
    cfg.data.order = "exact"
    cfg = cfg.validate()
    stop = -(-(s["warmup"] + s["measure"]) // BATCH) + 1
    r = measure(iter(iter_batches(cfg, src, start_step=0, stop_step=min(stop, steps), rank=0,
                                  world=1)), s["warmup"], s["measure"], *_shapes(s))
    d = cfg.data
    r["settings"] = {k: getattr(d, k, None) for k in ("order", "shuffle", "window_groups",
                                                      "decode_rows", "decode_cpus",
                                                      "read_cpus", "prefetch_tasks")}
    return {"new": r}


WORKERS = {"reference": worker_reference, "old": worker_old, "new": worker_new}


def _worker_main(kind: str, spec: str) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    s = json.loads(spec)
    res = WORKERS[kind](s)
    print("RESULT " + json.dumps(res), flush=True)
    os._exit(0)  # skip slow interpreter/Ray teardown; the parent waits for nothing else


# ---------------------------------------------------------------------------- driver
def ensure_old_worktree(root: Path) -> str:
    """A worktree of OLD_COMMIT at ``root`` (created if missing); returns its commit."""
    if not (root / "massl_ray" / "__init__.py").exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)
        p = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(root),
                            OLD_COMMIT], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"git worktree add {root} {OLD_COMMIT} failed: {p.stderr}")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    want = subprocess.run(["git", "-C", str(REPO), "rev-parse", OLD_COMMIT], capture_output=True,
                          text=True).stdout.strip()
    if not head or head != want:
        raise RuntimeError(f"{root} is at {head or '?'}, not {OLD_COMMIT} ({want}): remove it "
                           "or pass another --old-root")
    return head


def run_worker(kind: str, spec: dict, code_root: Path, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(code_root) + os.pathsep + str(REPO) if kind == "old" else str(REPO)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, cwd=str(code_root), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{kind} worker: no result within {timeout:.0f}s") from None
    line = next((x for x in p.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{kind} worker failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n"
                           f"{p.stderr[-6000:]}")
    res = json.loads(line[len("RESULT "):])
    for r in res.values():
        r["process_s"] = time.perf_counter() - t0  # the whole subprocess, start-up included
    return res


def summarise(runs: list[dict], cpus: int) -> dict:
    if any(not r.get("available", True) for r in runs):
        return {"available": False, "reason": runs[0].get("reason")}
    img_s = statistics.median(r["img_s"] for r in runs)
    return {"available": True, "img_s": img_s, "img_s_per_core": img_s / cpus,
            "cores_busy": statistics.median(r["cores_busy"] for r in runs),
            "img_s_per_busy_core": statistics.median(r["img_s"] / max(r["cores_busy"], 1e-9)
                                                     for r in runs),
            "startup_s": statistics.median(r["startup_s"] for r in runs),
            "settings": runs[0].get("settings"), "runs": runs}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: tiny images and crops")
    p.add_argument("--images", type=int, default=None, help="images in the generated set (10,000)")
    p.add_argument("--classes", type=int, default=None, help="classes (100), in storage order")
    p.add_argument("--row-group", type=int, default=None, help="rows per Parquet row group (1000)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up images per path (128)")
    p.add_argument("--measure", type=int, default=None, help="measured images per path (1536)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the sequence of paths")
    p.add_argument("--cpus", type=int, default=2, help="Ray num_cpus = DataLoader workers = N")
    p.add_argument("--object-store-mib", type=int, default=None,
                   help="Ray object store per path (default 1536 MiB; quick 256)")
    p.add_argument("--paths", default=",".join(ALL_PATHS),
                   help="comma-separated subset of %s" % ",".join(ALL_PATHS))
    p.add_argument("--cache-dir", default="/tmp/massl_bench_data",
                   help="where the generated set is kept between runs (default /tmp/...)")
    p.add_argument("--old-root", default="/tmp/massl_old",
                   help=f"git worktree of {OLD_COMMIT} (created when missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker subprocess")
    p.add_argument("--ray-temp-dir", default=None, help="Ray's temp dir (default: Ray's)")
    p.add_argument("--out", default=None, help="JSON output (default "
                   "benchmarks/results/data_path[_quick].json)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    base = QUICK if a.quick else FULL
    for k in ("images", "classes", "row_group", "warmup", "measure"):
        if getattr(a, k) is None:
            setattr(a, k, base[k])
    if a.object_store_mib is None:
        a.object_store_mib = 256 if a.quick else 1536
    if a.timeout is None:
        a.timeout = 300 if a.quick else 1800
    a.paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    bad = set(a.paths) - set(ALL_PATHS)
    if bad or not a.paths:
        p.error(f"--paths: unknown {sorted(bad)}")
    if a.cpus < 1 or a.rounds < 1 or a.warmup < 1 or a.measure < BATCH:
        p.error("need --cpus >= 1, --rounds >= 1, --warmup >= 1, --measure >= 64")
    if a.warmup + a.measure + 2 * BATCH > a.images:
        p.error("--images must exceed --warmup + --measure by two batches")
    if a.out is None:
        a.out = str(REPO / "benchmarks" / "results" / ("data_path_quick.json" if a.quick
                                                       else "data_path.json"))
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return _worker_main(*a.worker)
    base = QUICK if a.quick else FULL
    t_start = time.time()
    load_start = os.getloadavg()
    data, data_info = make_dataset(Path(a.cache_dir), a.images, a.classes, base["min_px"],
                                   base["max_px"], a.row_group, a.seed, a.cpus)
    print(f"data path benchmark: {data_info['rows']} class-sorted JPEGs "
          f"({data_info['side_px'][0]}-{data_info['side_px'][1]} px, mean "
          f"{data_info['mean_jpeg_bytes'] / 1024:.0f} KiB, {data_info['files']} files of "
          f"{a.row_group}-row groups; {'cached' if data_info['cached'] else 'generated in %.0fs' % data_info['generate_s']}) "
          f"at {data}; crops 2 x {base['global_size']} + {base['num_local_crops']} x "
          f"{base['local_size']}, batch {BATCH}, N = {a.cpus} CPUs; warm-up {a.warmup}, "
          f"measured {a.measure} images per path; load average {load_start[0]:.2f} on "
          f"{os.cpu_count()} cores", flush=True)
    spec = {"data": str(data), "cpus": a.cpus, "object_store_mib": a.object_store_mib,
            "warmup": a.warmup, "measure": a.measure, "seed": a.seed,
            "ray_temp_dir": a.ray_temp_dir,
            **{k: base[k] for k in ("global_size", "local_size", "num_local_crops")}}
    old_paths = [x for x in ("old_exact", "old_stream") if x in a.paths]
    old_commit = None
    if old_paths:
        old_commit = ensure_old_worktree(Path(a.old_root))
    groups = []
    if "reference" in a.paths:
        groups.append(("reference", REPO, {}))
    if old_paths:
        groups.append(("old", Path(a.old_root), {"paths": old_paths, "old_root": a.old_root}))
    if "new" in a.paths:
        groups.append(("new", REPO, {}))
    runs: dict[str, list] = {k: [] for k in ALL_PATHS if k in a.paths}
    for rnd in range(a.rounds):
        for kind, root, extra in (groups if rnd % 2 == 0 else groups[::-1]):
            res = run_worker(kind, {**spec, **extra}, root, a.timeout)
            for name, r in res.items():
                r["round"] = rnd
                runs[name].append(r)
                if r.get("available", True):
                    print(f"  round {rnd + 1} {name:<11} start-up {r['startup_s']:6.1f} s  "
                          f"{r['img_s']:7.1f} img/s  cores busy {r['cores_busy']:.2f}  "
                          f"load {r['load1_before']:.1f}->{r['load1_after']:.1f}", flush=True)
                else:
                    print(f"  round {rnd + 1} {name:<11} not available: {r['reason']}", flush=True)
    res = {k: summarise(v, a.cpus) for k, v in runs.items()}
    ratios = {}
    ref = res.get("reference")
    for k, r in res.items():
        if ref and k != "reference":
            ratios[f"{k}/reference"] = (r["img_s_per_core"] / ref["img_s_per_core"]
                                        if r["available"] else None)
    targets = {}
    if ref and "new" in res:
        new = res["new"]
        targets["new >= 1.5 x reference per core"] = (
            None if not new["available"] else bool(ratios["new/reference"] >= 1.5))
        if "old_stream" in res:
            targets["new >= old_stream per core"] = (
                None if not new["available"] else
                bool(new["img_s_per_core"] >= res["old_stream"]["img_s_per_core"]))
    load_end = os.getloadavg()
    print(f"\n{'path':<11} {'img/s':>8} {'img/s/core':>11} {'x reference':>12} "
          f"{'cores busy':>11} {'img/s/busy core':>16} {'start-up':>9}")
    for k, r in res.items():
        if not r["available"]:
            print(f"{k:<11} {'not available: ' + str(r['reason'])}")
            continue
        ratio = "1.00" if k == "reference" else (f"{ratios[k + '/reference']:.2f}"
                                                 if ref else "-")
        print(f"{k:<11} {r['img_s']:>8.1f} {r['img_s_per_core']:>11.1f} {ratio:>12} "
              f"{r['cores_busy']:>11.2f} {r['img_s_per_busy_core']:>16.1f} "
              f"{r['startup_s']:>8.1f}s")
    for t, met in targets.items():
        print(f"target {t}: {'not measured' if met is None else met}")
    print(f"img/s: median over {a.rounds} round(s) of {a.measure} images after a {a.warmup}-image "
          f"warm-up; per core: / N = {a.cpus}; cores busy: CPU time of the path's process tree "
          f"/ wall time. Load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end "
          f"({os.cpu_count()} cores, shared).")
    result = {
        "setting": {"quick": a.quick, "cpus": a.cpus, "batch_size": BATCH, "rounds": a.rounds,
                    "warmup": a.warmup, "measure": a.measure,
                    "object_store_mib": a.object_store_mib, "paths": a.paths,
                    "crops": {k: base[k] for k in ("global_size", "local_size",
                                                   "num_local_crops")},
                    "old_commit": old_commit, "old_root": a.old_root if old_paths else None},
        "data": data_info,
        "machine": {"cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "load_avg_start": load_start, "load_avg_end": load_end,
                    "wall_s": time.time() - t_start},
        "paths": res,
        "ratios_per_core_over_reference": ratios,
        "targets": targets,
    }
    sys.path.insert(0, str(REPO))
    from benchmarks._shared import finite

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(result), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
