#!/usr/bin/env python
"""Training-step benchmark: the Ray path (Ray Data -> Ray Train worker) against a plain loop.

Two questions of issue 3:

(a) **Data wait on the Ray path**: what share of the steady-state step time does the train
    worker spend waiting for the next batch (target <= 5 %)?
(b) **Ray overhead**: images/s of the Ray path against a plain in-process loop over pre-made
    batches (target >= 0.9x).

* ``ray``: ``massl_ray.train.trainer.train(cfg)`` with 1 train worker, in a fresh process that calls
  ``ray.init(num_cpus=--cpus)`` first (default 2: the worker reserves ``run.cpus_per_worker=1``
  CPU and runs torch with 1 thread, Ray Data decodes on the other with ``data.decode_cpus=1``).
  The figures come from the run's ``metrics.jsonl``: every ``run.log_every_steps`` steps the loop
  logs the window's ``images_per_s`` and ``data_wait_share``. The first window is dropped (it
  holds Ray Data's start-up and the first fill of the pipeline); the others are pooled by time
  (total images / total seconds, total wait / total seconds). Windows that contain an epoch
  boundary (Ray Data re-executes its plan every epoch) are also reported apart.
* ``plain``: the same configuration in a fresh process without Ray: ``Learner(cfg)``, a few
  batches of uint8 crops made up front with ``local_view_batches`` (MultiCrop on the real
  images), then ``learner.step`` timed over them (after warm-up steps), with a host sync every
  ``run.log_every_steps`` steps as the loop does. Run twice per round: with
  ``torch.set_num_threads(1)`` (**equal threads**: the Ray worker computes on 1 thread) and with
  torch's default thread count (**raw**: on this machine the plain loop then has every core for
  compute, while the Ray path gives one to decoding).

The paths alternate (plain 1-thread, plain raw, ray, plain 1-thread, plain raw, ...) so that a
change of load on the shared machine hits both; the load average is recorded with each run.
Because wall-clock rates measured minutes apart on a shared machine can differ by several x, the
CPU seconds per step are reported too (load-insensitive): ``time.process_time`` of the plain
loop, and for the Ray path the train worker process's utime + stime (``/proc/<pid>/stat``, pid
from ``<run dir>/workers/rank_0.json``) sampled whenever a metrics line appears.

Usage::

    python benchmarks/train_step.py                 # jobs/quickstart.yaml, 160 steps on Ray
    python benchmarks/train_step.py --quick         # CI: tiny model, a few steps
    python benchmarks/train_step.py --config jobs/quickstart.yaml --steps 200 --log-every 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._shared import fill_defaults, finite  # noqa: E402

QUICKSTART = REPO / "jobs" / "quickstart.yaml"
CIFAR = REPO / "jobs" / "data" / "cifar10-quick" / "train.parquet"

# --quick: a tiny model on 16/8 px crops (the Ray integration tests' size), 512 images.
QUICK_OVERRIDES = [
    "model.arch=vit_micro", "model.patch_size=4", "model.depth=2",
    "model.head_hidden_dim=128", "model.head_out_dim=32",
    "crops.global_size=16", "crops.local_size=8", "crops.num_local_crops=2",
    "massl.memory_size=2048", "massl.block_size=512",
    "optim.batch_size_per_worker=32", "data.limit=512",
]




def build_config(a, run_name: str, storage: str):
    """The benchmark's configuration (same for both paths), steps per epoch derived."""
    from massl_ray.config import load_config
    from massl_ray.data.sources import open_source

    overrides = (QUICK_OVERRIDES if a.quick else []) + [
        f"data.train={CIFAR if a.data is None else Path(a.data).absolute()}",
        f"run.name={run_name}", f"run.storage_path={storage}",
        f"run.max_steps={a.steps}", f"run.log_every_steps={a.log_every}",
        "run.checkpoint_every_steps=1000000", "run.final_knn=false", "run.resume=never",
        "run.num_workers=1", "run.cpus_per_worker=1", "data.decode_cpus=1",
    ] + list(a.override)
    cfg = load_config(a.config, overrides)
    d = cfg.data
    # as massl_ray.train.trainer.prepare derives it (without importing Ray into the plain loop)
    src = open_source(d.train, d.format, d.image_column, d.label_column, what="data.train")
    rows = src.num_rows if d.limit is None else min(d.limit, src.num_rows)
    if cfg.optim.steps_per_epoch is None:
        cfg.optim.steps_per_epoch = rows // cfg.global_batch_size
    return cfg, src


# ---------------------------------------------------------------------------- plain loop
def run_plain(a) -> dict:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from massl_ray.method.learner import Learner
    from massl_ray.data.views import local_view_batches

    storage = tempfile.mkdtemp(prefix="massl_bench_plain_")
    try:
        cfg, src = build_config(a, "plain", storage)
        t0 = time.perf_counter()
        batches = []
        for b in local_view_batches(src, cfg.crops, cfg.optim.batch_size_per_worker, epoch=0,
                                    seed=cfg.run.seed, shuffle=cfg.data.shuffle,
                                    limit=cfg.data.limit,
                                    decode_batch_size=cfg.data.decode_batch_size):
            batches.append(b)
            if len(batches) == a.plain_batches:
                break
        make_s = time.perf_counter() - t0
        learner = Learner(cfg, "cpu")
        bs = cfg.optim.batch_size_per_worker
        load0 = os.getloadavg()[0]
        times, cpu = [], 0.0
        for i in range(a.plain_warmup + a.plain_steps):
            b = batches[i % len(batches)]
            t, c = time.perf_counter(), time.process_time()
            res = learner.step(b["global_crops"], b["local_crops"])
            if (i + 1) % cfg.run.log_every_steps == 0:
                res.metrics()  # the loop's host sync at log steps
            if i >= a.plain_warmup:
                times.append(time.perf_counter() - t)
                cpu += time.process_time() - c
        total = sum(times)
        return {"path": "plain", "threads": torch.get_num_threads(), "steps": len(times),
                "batch_size": bs, "images_per_s": bs * len(times) / total,
                "step_s_median": statistics.median(times), "step_s_mean": total / len(times),
                # CPU seconds of the process per step (all threads): robust to the machine's load
                "cpu_s_per_step": cpu / len(times),
                "batches_made": len(batches), "batches_make_s": make_s,
                "load1_before": load0, "load1_after": os.getloadavg()[0]}
    finally:
        shutil.rmtree(storage, ignore_errors=True)


# ---------------------------------------------------------------------------- Ray path
def windows_of(lines: list[dict], batch: int, steps_per_epoch: int) -> list[dict]:
    out, prev = [], 0
    for m in lines:
        step = int(m["step"])
        n = step - prev
        if n <= 0:
            continue
        elapsed = batch * n / m["images_per_s"]
        out.append({"from_step": prev, "to_step": step, "steps": n, "images": batch * n,
                    "elapsed_s": elapsed, "wait_s": m["data_wait_share"] * elapsed,
                    "images_per_s": m["images_per_s"], "data_wait_share": m["data_wait_share"],
                    # a new epoch starts inside this window: the pipeline was re-executed
                    "epoch_boundary": prev == 0
                    or (step - 1) // steps_per_epoch != (prev - 1) // steps_per_epoch})
        prev = step
    return out


def pool(ws: list[dict]) -> dict:
    if not ws:
        return {"windows": 0, "images_per_s": float("nan"), "data_wait_share": float("nan"),
                "compute_images_per_s": float("nan")}
    img = sum(w["images"] for w in ws)
    el = sum(w["elapsed_s"] for w in ws)
    wait = sum(w["wait_s"] for w in ws)
    return {"windows": len(ws), "steps": sum(w["steps"] for w in ws), "elapsed_s": el,
            "images_per_s": img / el, "data_wait_share": wait / el,
            "compute_images_per_s": img / max(el - wait, 1e-9)}


def _proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class WorkerCpuMonitor(threading.Thread):
    """Samples the train worker's CPU time each time a metrics line appears (its pid comes from
    ``<run dir>/workers/rank_0.json``): CPU seconds per step, robust to the machine's load."""

    def __init__(self, run_dir: Path, period: float = 0.1):
        super().__init__(daemon=True)
        self.run_dir, self.period = run_dir, period
        self.samples: dict[int, float] = {}  # logged step -> worker CPU seconds
        self.stop_evt = threading.Event()

    def run(self) -> None:
        pid, seen = None, 0
        while not self.stop_evt.is_set():
            if pid is None:
                try:
                    pid = int(json.loads((self.run_dir / "workers" / "rank_0.json").read_text())["pid"])
                except (OSError, ValueError, KeyError):
                    pass
            try:
                lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
            except OSError:
                lines = []
            if pid is not None and len(lines) > seen:
                cpu = _proc_cpu_s(pid)
                try:
                    step = int(json.loads(lines[-1])["step"])
                except (ValueError, KeyError):
                    step = None
                if cpu is not None and step is not None and len(lines) == seen + 1:
                    self.samples[step] = cpu  # skip catch-ups of several lines at once
                seen = len(lines)
            self.stop_evt.wait(self.period)


def run_ray(a) -> dict:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from massl_ray.train.trainer import run_dir_of, train

    storage = tempfile.mkdtemp(prefix="massl_bench_ray_")
    try:
        cfg, _src = build_config(a, f"bench_{os.getpid()}", storage)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=512 * 2**20, _temp_dir=a.ray_temp_dir)
        init_s = time.perf_counter() - t0
        run_dir = run_dir_of(cfg)
        mon = WorkerCpuMonitor(run_dir)
        mon.start()
        try:
            result = train(cfg)
        finally:
            mon.stop_evt.set()
            mon.join(timeout=5)
        wall = time.perf_counter() - t0
        ray.shutdown()
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
        bs, spe = cfg.optim.batch_size_per_worker, cfg.optim.steps_per_epoch
        ws = windows_of(lines, bs, spe)
        steady = ws[1:]
        first = ws[0] if ws else None
        # worker CPU seconds per step between consecutive sampled log steps, first window dropped
        smp = sorted((k, v) for k, v in mon.samples.items() if k >= (ws[0]["to_step"] if ws else 0))
        cpu_steps = smp[-1][0] - smp[0][0] if len(smp) >= 2 else 0
        cpu_per_step = (smp[-1][1] - smp[0][1]) / cpu_steps if cpu_steps else float("nan")
        return {
            "path": "ray", "cpus": a.cpus, "decode_rows": cfg.data.decode_rows,
            "cpus_per_worker": cfg.run.cpus_per_worker,
            "decode_cpus": cfg.data.decode_cpus, "torch_threads_worker": max(1, int(cfg.run.cpus_per_worker)),
            "batch_size": bs, "steps": int(lines[-1]["step"]) if lines else 0,
            "steps_per_epoch": spe, "log_every_steps": cfg.run.log_every_steps,
            "ray_init_s": init_s, "wall_s": wall, "train_wall_s": result.get("wall_s"),
            "first_window": first,
            "steady": pool(steady),
            "steady_within_epoch": pool([w for w in steady if not w["epoch_boundary"]]),
            "epoch_boundary_windows": pool([w for w in steady if w["epoch_boundary"]]),
            "worker_cpu_s_per_step": cpu_per_step, "worker_cpu_steps": cpu_steps,
            "worker_cpu_samples": smp,
            "windows": ws, "load1_before": load0, "load1_after": os.getloadavg()[0],
        }
    finally:
        shutil.rmtree(storage, ignore_errors=True)


# ---------------------------------------------------------------------------- driver
def spawn(a, worker: str, threads: int = 0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker,
           "--steps", str(a.steps), "--log-every", str(a.log_every), "--cpus", str(a.cpus),
           "--plain-steps", str(a.plain_steps), "--plain-warmup", str(a.plain_warmup),
           "--plain-batches", str(a.plain_batches), "--threads", str(threads)]
    if a.config:
        cmd += ["--config", a.config]
    if a.quick:
        cmd.append("--quick")
    if a.data:
        cmd += ["--data", a.data]
    if a.ray_temp_dir:
        cmd += ["--ray-temp-dir", a.ray_temp_dir]
    for o in a.override:
        cmd += ["--override", o]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if worker == "plain" and threads:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)  # torch's default thread count for the raw loop
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), env=env,
                          timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} run failed (rc {proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="job YAML (default jobs/quickstart.yaml; --quick: a tiny model)")
    p.add_argument("--override", action="append", default=[],
                   help="extra section.key=value (repeatable)")
    p.add_argument("--data", default=None, help="training Parquet (default: the quick-start data)")
    p.add_argument("--steps", type=int, default=None,
                   help="Ray run length in steps (default 160: crosses an epoch boundary of the "
                        "quick-start data; quick 12)")
    p.add_argument("--log-every", type=int, default=None, help="window length (default 10; quick 4)")
    p.add_argument("--cpus", type=int, default=2, help="ray.init(num_cpus=...) (default 2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="plain-loop runs (each thread setting) around the Ray run (default 2; quick 1)")
    p.add_argument("--plain-steps", type=int, default=None, help="timed plain steps (default 30; quick 4)")
    p.add_argument("--plain-warmup", type=int, default=None, help="untimed plain steps (default 3; quick 1)")
    p.add_argument("--plain-batches", type=int, default=8, help="distinct pre-made batches (cycled)")
    p.add_argument("--quick", action="store_true", help="CI-sized: tiny model, few steps")
    p.add_argument("--timeout", type=int, default=900, help="seconds per sub-run")
    p.add_argument("--ray-temp-dir", default=None, help="Ray's temp dir (default: Ray's)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    p.add_argument("--worker", choices=["plain", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.config is None:
        a.config = str(QUICKSTART)
    fill_defaults(a, a.quick, {"steps": (12, 160), "log_every": (4, 10), "rounds": (1, 2),
                               "plain_steps": (4, 30), "plain_warmup": (1, 3)})
    if a.steps < 2 * a.log_every:
        p.error("--steps must cover at least two --log-every windows (the first is dropped)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker == "plain":
        print(json.dumps(finite(run_plain(a))))
        return 0
    if a.worker == "ray":
        print(json.dumps(finite(run_ray(a))))
        return 0

    t_start = time.time()
    load_start = os.getloadavg()
    print(f"train step, config {Path(a.config).relative_to(REPO) if a.config.startswith(str(REPO)) else a.config}"
          f"{' + quick overrides' if a.quick else ''}: Ray {a.steps} steps (windows of "
          f"{a.log_every}), plain {a.plain_steps} steps x {a.rounds} round(s) per thread setting; "
          f"load average {load_start[0]:.2f} on {os.cpu_count()} cores", flush=True)
    plain1, plainraw, rays = [], [], []

    def do_plain():
        r1 = spawn(a, "plain", threads=1)
        plain1.append(r1)
        print(f"  plain 1 thread   {r1['images_per_s']:8.1f} img/s  step {r1['step_s_median'] * 1e3:7.1f} ms"
              f"  cpu/step {r1['cpu_s_per_step'] * 1e3:7.1f} ms"
              f"  load {r1['load1_before']:.1f}->{r1['load1_after']:.1f}", flush=True)
        r2 = spawn(a, "plain", threads=0)
        plainraw.append(r2)
        print(f"  plain {r2['threads']} threads  {r2['images_per_s']:8.1f} img/s  step "
              f"{r2['step_s_median'] * 1e3:7.1f} ms  load {r2['load1_before']:.1f}->{r2['load1_after']:.1f}",
              flush=True)

    for rnd in range(a.rounds):
        do_plain()
        if rnd == 0:
            r = spawn(a, "ray")
            rays.append(r)
            s = r["steady"]
            print(f"  ray (1 worker)   {s['images_per_s']:8.1f} img/s  data-wait "
                  f"{100 * s['data_wait_share']:5.1f}%  ({s['windows']} windows after the first; "
                  f"first window {r['first_window']['elapsed_s']:.1f} s)  load "
                  f"{r['load1_before']:.1f}->{r['load1_after']:.1f}  worker cpu/step "
                  f"{r['worker_cpu_s_per_step'] * 1e3:.1f} ms", flush=True)
    ray_r = rays[0]
    p1 = statistics.median(x["images_per_s"] for x in plain1)
    praw = statistics.median(x["images_per_s"] for x in plainraw)
    st, we, eb = ray_r["steady"], ray_r["steady_within_epoch"], ray_r["epoch_boundary_windows"]
    cpu1 = statistics.median(x["cpu_s_per_step"] for x in plain1)
    ratios = {
        # CPU seconds per step, plain (1 thread) / Ray worker: > 1 means the Ray worker spends
        # less CPU per step; insensitive to the load of the shared machine
        "plain_equal_threads_cpu/ray_worker_cpu_per_step": cpu1 / ray_r["worker_cpu_s_per_step"],
        "ray/plain_equal_threads": st["images_per_s"] / p1,
        "ray/plain_raw": st["images_per_s"] / praw,
        "ray_compute_only/plain_equal_threads": st["compute_images_per_s"] / p1,
        "ray_within_epoch/plain_equal_threads": we["images_per_s"] / p1,
    }
    load_end = os.getloadavg()
    raw_threads = plainraw[0]["threads"]
    print(f"\n{'path':<28} {'img/s':>8} {'data-wait':>10}")
    print(f"{'plain, 1 thread':<28} {p1:>8.1f} {'-':>10}")
    print(f"{f'plain, {raw_threads} threads (raw)':<28} {praw:>8.1f} {'-':>10}")
    print(f"{'ray, steady (all windows)':<28} {st['images_per_s']:>8.1f} {100 * st['data_wait_share']:>9.1f}%")
    print(f"{'ray, within an epoch':<28} {we['images_per_s']:>8.1f} {100 * we['data_wait_share']:>9.1f}%")
    if eb["windows"]:
        print(f"{'ray, epoch-boundary windows':<28} {eb['images_per_s']:>8.1f} {100 * eb['data_wait_share']:>9.1f}%")
    print(f"{'ray, first window (dropped)':<28} {ray_r['first_window']['images_per_s']:>8.1f} "
          f"{100 * ray_r['first_window']['data_wait_share']:>9.1f}%")
    print(f"\nCPU s/step: plain 1 thread {cpu1:.3f}, Ray train worker {ray_r['worker_cpu_s_per_step']:.3f} "
          f"(plain / ray {ratios['plain_equal_threads_cpu/ray_worker_cpu_per_step']:.2f}x; load-insensitive)")
    print(f"ray / plain (equal threads): {ratios['ray/plain_equal_threads']:.2f}x   "
          f"ray / plain (raw, {raw_threads} threads): {ratios['ray/plain_raw']:.2f}x   "
          f"ray compute-only / plain (equal): {ratios['ray_compute_only/plain_equal_threads']:.2f}x")
    targets = {"data_wait_share<=0.05": st["data_wait_share"] <= 0.05,
               "ray/plain_equal_threads>=0.9": ratios["ray/plain_equal_threads"] >= 0.9}
    print(f"targets: {targets}")
    print(f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end "
          f"({os.cpu_count()} cores, shared)")

    result = {
        "setting": {"config": a.config, "quick": a.quick, "overrides": (QUICK_OVERRIDES if a.quick else []) + a.override,
                    "ray_steps": a.steps, "log_every_steps": a.log_every, "cpus": a.cpus,
                    "plain_steps": a.plain_steps, "plain_warmup": a.plain_warmup, "rounds": a.rounds},
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_avg_start": load_start, "load_avg_end": load_end, "wall_s": time.time() - t_start},
        "plain_equal_threads": {"images_per_s": p1, "cpu_s_per_step": cpu1, "runs": plain1},
        "plain_raw": {"images_per_s": praw, "threads": raw_threads, "runs": plainraw},
        "ray": ray_r,
        "ratios": ratios,
        "targets_met": targets,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(result), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
