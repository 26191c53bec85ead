#!/usr/bin/env python
"""Training-step benchmark on one device: massl_ray's Learner.step vs the authors' formulation.

Measures images/s, model FLOP utilisation (MFU) and peak device memory of one full training
step (teacher forward, student forward + backward, memory loss, clipping, AdamW, EMA, FIFO write)
for the paper's ViT-S/16 setting (``jobs/imagenet_vit_s16_800ep.yaml`` on one worker: batch 64,
2 x 224 + 10 x 96 crops, K = 131072 in blocks of 16384, bf16):

* ``massl_ray``: :meth:`massl_ray.method.learner.Learner.step` on uint8 crops already on the host in
  pinned memory (non-blocking copies, normalisation on the device, bf16 autocast, fused AdamW,
  foreach clipping, no host sync), as the worker loop calls it;
* ``massl_ray_compile``: the same with ``torch.compile`` of the student and teacher forwards
  (config key ``run.compile``);
* ``reference``: the authors' step (``benchmarks/reference.py``): float32 crops normalised on the
  host, fp16 autocast + GradScaler, CPU permutation, two memory clones, all logits materialised,
  a Python double loop over view pairs, per-parameter ``.item()`` clipping, ``loss.item()``.

All variants build the same model and memory from the same config and seed and take the same
crops. Before timing, each variant runs one step from that identical initial state with the same
block partition and reports its loss: on CPU in fp32 they must agree to 1e-4 (the benchmark
fails otherwise); on a GPU the precisions differ (bf16 vs fp16), so both values are printed.

Each variant runs in its own subprocess (fresh allocator, an OOM or a compile failure in one
variant is reported and the others still run): ``--warmup`` steps, then ``--windows`` windows
of ``--steps`` steps; a window is timed from a device sync to a device sync, and the median
window gives time/step (the host may run ahead inside a window, as in training).

FLOPs per step come from the analytic model ``benchmarks/cost_model.py`` (backbone: patch
embedding, qkv/proj/MLP and attention products per token; head; memory logits; backward = 2 x
forward) and are cross-checked against ``torch.utils.flop_counter.FlopCounterMode`` on one
eager massl_ray step. MFU = FLOPs/step / time/step / peak, with the peak dense bf16 FLOP/s of the
detected card (table below; ``--peak-tflops`` overrides). On CPU the "peak" is the measured fp32
rate of a 1024^3 matmul with the same threads (a utilisation, not a datasheet figure).

Peak memory: CUDA ``max_memory_allocated`` over the timed steps (weights, optimizer state,
memory bank, inputs and activations included). CPU: the resident-set high-water mark (VmHWM,
reset before the timed steps), an upper bound of the tensors' peak.

Usage (one command; on a machine with a GPU it runs the paper's setting, on CPU the tiny one)::

    python benchmarks/gpu_step.py                       # -> benchmarks/results/gpu_step.json
    python benchmarks/gpu_step.py --variants reference,massl_ray --steps 10
    python benchmarks/gpu_step.py --tiny --device cpu   # what CI runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import cost_model  # noqa: E402
from benchmarks._shared import fill_defaults, proc_kib, reset_hwm  # noqa: E402
from massl_ray.config import ConfigError, apply_overrides, load_config  # noqa: E402

PAPER_CONFIG = REPO / "jobs" / "imagenet_vit_s16_800ep.yaml"
PAPER_OVERRIDES = ["run.num_workers=1", "run.use_gpu=true", "optim.precision=bf16"]
# CPU-sized (about 1 GFLOP per step): the tests' tiny setting (32 px global / 16 px local
# crops, patch 4, L = 2, batch 8, K = 256 in 4 blocks) on a narrower ViT (64 wide, 2 blocks,
# 2 heads), fp32.
TINY_OVERRIDES = cost_model.TINY + ["model.embed_dim=64", "model.depth=2", "model.num_heads=2",
                                    "optim.precision=fp32"]
VARIANTS = ("reference", "massl_ray", "massl_ray_compile")
MiB = 2 ** 20

# Dense bf16 tensor-core peak FLOP/s by device-name pattern (first match wins).
PEAKS = [
    ("GH200", cost_model.PEAK_BF16["GH200"]),
    ("H200 NVL", cost_model.PEAK_BF16["H200 NVL"]),
    ("H200", cost_model.PEAK_BF16["H200"]),
    ("H100 NVL", cost_model.PEAK_BF16["H100 NVL"]),
    ("H100 PCIe", cost_model.PEAK_BF16["H100 PCIe"]),
    ("H100", cost_model.PEAK_BF16["H100 SXM"]),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("H800", cost_model.PEAK_BF16["H100 SXM"]),
    ("A100", cost_model.PEAK_BF16["A100"]),
    ("A800", cost_model.PEAK_BF16["A100"]),
    ("L40S", cost_model.PEAK_BF16["L40S"]),
    ("L4", cost_model.PEAK_BF16["L4"]),
    ("A10G", None),  # AWS's A10 variant: no public datasheet figure here, pass --peak-tflops
    ("A10", cost_model.PEAK_BF16["A10"]),
]


def detect_peak(name: str) -> Optional[float]:
    n = name.upper().replace("-", " ")
    for pat, val in PEAKS:
        if pat.upper() in n:
            return val  # None for a known name without a figure
    return None


# ------------------------------------------------------------------------------------ worker
def build_config(a, variant: Optional[str] = None):
    cfg = load_config(a.config, a.overrides_list, validate=False)
    if variant == "massl_ray_compile":
        try:
            apply_overrides(cfg, ["run.compile=true"])
        except ConfigError:  # the key is not in massl_ray.config yet; Learner reads it with getattr
            cfg.run.compile = True
    return cfg.validate()


def make_crops(cfg, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    b, c = cfg.optim.batch_size_per_worker, cfg.crops
    gc = torch.randint(0, 256, (b, 2, 3, c.global_size, c.global_size), generator=g, dtype=torch.uint8)
    lc = torch.randint(0, 256, (b, c.num_local_crops, 3, c.local_size, c.local_size), generator=g,
                       dtype=torch.uint8)
    return gc, lc


def run_worker(a) -> dict:
    import torch

    from massl_ray.method.learner import Learner, normalize
    from massl_ray.method.memory import MemoryBank, block_permutation
    from massl_ray.method.model import build_student_teacher

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    variant = a.worker
    cfg = build_config(a, variant)
    seed = cfg.run.seed

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    info = {"variant": variant, "device": str(device), "threads": torch.get_num_threads()}
    gc, lc = make_crops(cfg, seed)
    t_build = time.perf_counter()
    if variant == "reference":
        from reference import ReferenceStep

        torch.manual_seed(seed)  # exactly as Learner builds its networks
        student, teacher = build_student_teacher(cfg)
        student, teacher = student.to(device), teacher.to(device)
        rows = MemoryBank(cfg.massl.memory_size, cfg.model.head_out_dim, seed=seed).rows
        fp16 = cuda and cfg.optim.precision != "fp32"
        path = ReferenceStep(cfg, student, teacher, rows, device, fp16=fp16)
        info["precision"] = "fp16 autocast + GradScaler" if fp16 else "fp32"
        # host-side float32 normalised crops, one tensor per view (the data loader's output)
        mean, std = torch.tensor(cfg.crops.mean), torch.tensor(cfg.crops.std)
        views = [normalize(gc[:, i], mean, std) for i in range(2)]
        views += [normalize(lc[:, i], mean, std) for i in range(lc.shape[1])]
        if cuda:
            views = [v.pin_memory() for v in views]
        del gc, lc

        def step(partition=None):
            return path.step(views, partition)

        def loss_of(x):
            return float(x)
    else:
        learner = Learner(cfg, device)
        path = learner
        info["precision"] = cfg.optim.precision + (" autocast" if cfg.optim.precision != "fp32" else "")
        info["compile"] = bool(getattr(cfg.run, "compile", False))
        if cuda:
            gc, lc = gc.pin_memory(), lc.pin_memory()

        def step(partition=None):
            return learner.step(gc, lc, check_finite=False)

        def loss_of(res):
            return float(res.loss)
    info["build_s"] = time.perf_counter() - t_build
    info["input_host_bytes"] = (sum(v.numel() * v.element_size() for v in views) if variant == "reference"
                                else gc.numel() + lc.numel())

    # 1. value check: step 0 from the identical initial state with Learner's step-0 partition
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + 0)  # = Learner._partition(0)
    partition = block_permutation(cfg.massl.memory_size, cfg.block_size, gen, device)
    # Same drop-path draws in both variants: Learner.step seeds torch from (seed, step, rank)
    # itself; the reference is seeded with the same value for step 0 on rank 0.
    from massl_ray.method.learner import _step_seed
    torch.manual_seed(_step_seed(seed, 0, 0))
    t0 = time.perf_counter()
    out = step(partition) if variant == "reference" else step()
    info["loss_step0"] = loss_of(out)
    sync()
    info["first_step_s"] = time.perf_counter() - t0  # includes compilation for *_compile

    # 2. warm-up, 3. timed windows
    for _ in range(a.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        mem_method = "torch.cuda.max_memory_allocated over the timed steps"
    else:
        ok = reset_hwm()
        base = (proc_kib("VmRSS") or 0) * 1024
        mem_method = ("process RSS high-water mark (VmHWM reset before the timed steps)" if ok
                      else "process ru_maxrss (VmHWM reset not permitted)")
    windows, cpu_windows, host = [], [], []
    for _ in range(a.windows):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.steps):
            h0 = time.perf_counter()
            out = step()
            host.append(time.perf_counter() - h0)
        sync()
        windows.append((time.perf_counter() - t0) / a.steps)
        cpu_windows.append((time.process_time() - c0) / a.steps)
    info["loss_last"] = loss_of(out)
    if variant == "reference":
        info["grad_scale"] = path.scaler.get_scale() if path.fp16 else None
    if cuda:
        info["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
        info["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        info["mem_before_timed_bytes"] = base
    else:
        hwm = proc_kib("VmHWM")
        info["peak_mem_bytes"] = (hwm or 0) * 1024
        info["mem_before_timed_bytes"] = base
    info["mem_method"] = mem_method
    info["time_per_step_s"] = statistics.median(windows)
    info["time_per_step_min_s"] = min(windows)
    info["window_times_s"] = windows
    # process CPU-seconds per step: on a shared CPU machine a steadier figure than wall time
    info["cpu_seconds_per_step"] = statistics.median(cpu_windows)
    info["host_dispatch_s_median"] = statistics.median(host)
    info["images_per_s"] = cfg.optim.batch_size_per_worker / info["time_per_step_s"]

    # 4. FLOPs actually executed by one eager massl_ray step
    if a.count_flops and variant == "massl_ray":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        # the math SDPA backend runs attention as bmm, which FlopCounterMode counts everywhere
        try:
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                step()
            sync()
            info["flop_counter_per_step"] = int(fc.get_total_flops())
        except Exception as e:  # noqa: BLE001 - the timings above stand; report the failure
            info["flop_counter_error"] = f"{type(e).__name__}: {str(e)[-500:]}"
    if a.measure_cpu_peak and not cuda:
        info["cpu_matmul"] = cost_model._cpu_matmul_flops(torch.get_num_threads(), seconds=1.0)
    return info


def worker_main(a) -> int:
    try:
        res = run_worker(a)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which reports it
        oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
        res = {"variant": a.worker, "error": "out of memory" if oom else type(e).__name__,
               "message": str(e)[-2000:], "traceback": traceback.format_exc()[-4000:]}
        try:
            import torch

            if torch.cuda.is_available() and a.device.startswith("cuda"):
                res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        except Exception:  # noqa: BLE001
            pass
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------ parent
def spawn(a, variant: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--device", a.device,
           "--config", str(a.config), "--warmup", str(a.warmup), "--steps", str(a.steps),
           "--windows", str(a.windows), "--threads", str(a.threads)]
    if a.count_flops:
        cmd.append("--count-flops")
    if a.measure_cpu_peak and variant == a.variants[0]:
        cmd.append("--measure-cpu-peak")
    cmd += ["--set"] + a.overrides_list if a.overrides_list else []
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO),
                              timeout=a.variant_timeout)
    except subprocess.TimeoutExpired as e:
        return {"variant": variant, "error": "timeout",
                "message": f"no result within {a.variant_timeout} s",
                "stderr_tail": (e.stderr or b"")[-2000:].decode(errors="replace")
                if isinstance(e.stderr, bytes) else str(e.stderr)[-2000:]}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"variant": variant, "error": f"worker exited with {proc.returncode}",
                "message": (proc.stderr or proc.stdout)[-3000:]}
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_wall_s"] = time.perf_counter() - t0
    if "error" in res:
        res.setdefault("stderr_tail", proc.stderr[-2000:])
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda if available)")
    p.add_argument("--tiny", action="store_true", help="the CPU-sized setting (automatic without CUDA)")
    p.add_argument("--config", default=None,
                   help=f"job config (default {PAPER_CONFIG.relative_to(REPO)}; ignored with --tiny)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[],
                   help="extra section.key=value overrides (e.g. massl.loss_chunk_blocks=1)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} "
                        "(default: all on CUDA; reference,massl_ray on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window (default 10; tiny 3)")
    p.add_argument("--windows", type=int, default=None, help="timed windows (default 3; tiny 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the workers (default: 1 on CPU, torch's default on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak (dense bf16 TFLOP/s) for MFU; default: detected from the name")
    p.add_argument("--variant-timeout", type=int, default=420, help="seconds per variant process")
    p.add_argument("--no-count-flops", dest="count_flops", action="store_false",
                   help="skip the FlopCounterMode cross-check step")
    p.add_argument("--count-flops", dest="count_flops", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure-cpu-peak", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loss-tol", type=float, default=1e-4, help="fp32 CPU loss agreement (relative)")
    p.add_argument("--out", default=str(BENCH / "results" / "gpu_step.json"))
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.set_defaults(count_flops=True)
    a = p.parse_args(argv)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not a.device.startswith("cuda"):
        a.tiny = a.tiny or a.worker is None and a.config is None
    if a.worker is None:
        if a.tiny:
            a.config = None
            a.overrides_list = TINY_OVERRIDES + list(a.overrides)
        else:
            a.config = str(Path(a.config).resolve() if a.config else PAPER_CONFIG)
            a.overrides_list = PAPER_OVERRIDES + list(a.overrides)
            if not a.device.startswith("cuda"):
                a.overrides_list.append("optim.precision=fp32")
    else:  # the parent passes the resolved overrides
        a.config = None if a.config in (None, "None") else a.config
        a.overrides_list = list(a.overrides)
    if a.threads is None:
        a.threads = 0 if a.device.startswith("cuda") else 1
    fill_defaults(a, a.tiny, {"warmup": (1, 5), "steps": (3, 10), "windows": (2, 3)})
    if a.variants is None:
        a.variants = list(VARIANTS) if a.device.startswith("cuda") else ["reference", "massl_ray"]
    else:
        a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        bad = [v for v in a.variants if v not in VARIANTS]
        if bad:
            p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    return a


def _fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker_main(a)
    import torch

    cuda = a.device.startswith("cuda")
    cfg = build_config(a)
    w = cost_model.workload_from_config(cfg)
    flops = cost_model.step_flops(w)
    if cuda:
        dev_name = torch.cuda.get_device_name(torch.device(a.device))
        cap = torch.cuda.get_device_capability(torch.device(a.device))
        peak = a.peak_tflops * 1e12 if a.peak_tflops else detect_peak(dev_name)
        peak_src = "--peak-tflops" if a.peak_tflops else ("datasheet dense bf16" if peak else None)
    else:
        dev_name, cap = platform.processor() or platform.machine(), None
        peak = a.peak_tflops * 1e12 if a.peak_tflops else None
        peak_src = "--peak-tflops" if peak else None
        a.measure_cpu_peak = peak is None
    setting = {
        "config": a.config,
        "overrides": a.overrides_list, "tiny": a.tiny, "arch": cfg.model.arch,
        "patch": cfg.model.patch_size, "batch": cfg.optim.batch_size_per_worker,
        "global_size": cfg.crops.global_size, "local_size": cfg.crops.local_size,
        "num_local_crops": cfg.crops.num_local_crops, "memory_size": cfg.massl.memory_size,
        "block_size": cfg.block_size, "loss_chunk_blocks": cfg.massl.loss_chunk_blocks,
        "precision": cfg.optim.precision, "warmup": a.warmup, "steps": a.steps,
        "windows": a.windows,
    }
    print(f"training-step benchmark on {dev_name} ({a.device}); {cfg.model.arch}/{cfg.model.patch_size} "
          f"B={setting['batch']} crops 2x{setting['global_size']}+{setting['num_local_crops']}x"
          f"{setting['local_size']} K={setting['memory_size']} S={setting['block_size']} "
          f"({cfg.optim.precision}); analytic {flops['total'] / 1e9:.4g} GFLOP/step; "
          f"variants {','.join(a.variants)}", flush=True)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for v in a.variants:
        t0 = time.perf_counter()
        r = spawn(a, v)
        results[v] = r
        # partial results after every variant: a killed run still leaves what it measured
        out.write_text(json.dumps({"partial": True, "device": a.device, "device_name": dev_name,
                                   "setting": setting, "flops": flops, "paths": results}, indent=2))
        status = r.get("error") or f"{r['time_per_step_s'] * 1e3:.1f} ms/step"
        print(f"  {v:<18} {status}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if "error" in r:
            print(f"    {r.get('message', '')[-600:]}", file=sys.stderr)

    if not peak:
        cm = next((r["cpu_matmul"] for r in results.values() if "cpu_matmul" in r), None)
        if cm:
            peak = cm["flop_per_wall_s"]
            peak_src = f"measured fp32 matmul {cm['n']}^3, {cm['threads']} thread(s) (wall)"
    for r in results.values():
        if "time_per_step_s" in r:
            r["achieved_flop_per_s"] = flops["total"] / r["time_per_step_s"]
            r["mfu"] = r["achieved_flop_per_s"] / peak if peak else None

    # value check
    ok_vals = [r for r in results.values() if "loss_step0" in r]
    check = {"losses_step0": {k: r["loss_step0"] for k, r in results.items() if "loss_step0" in r}}
    if "reference" in check["losses_step0"] and "massl_ray" in check["losses_step0"]:
        lo, lr_ = check["losses_step0"]["massl_ray"], check["losses_step0"]["reference"]
        check["rel_diff"] = abs(lo - lr_) / abs(lr_)
        same_precision = not cuda and cfg.optim.precision == "fp32"
        check["compared_in"] = "fp32 (same precision)" if same_precision else "different precisions (bf16 vs fp16): printed only"
        check["losses_match"] = check["rel_diff"] <= a.loss_tol if same_precision else None
    fc = results.get("massl_ray", {}).get("flop_counter_per_step")
    flop_check = {"analytic_per_step": flops["total"], "flop_counter_per_step": fc,
                  "rel_diff": (flops["total"] - fc) / fc if fc else None}

    # table
    print(f"\n{'path':<18} {'ms/step':>9} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>7} {'peak mem':>10} "
          f"{'loss@0':>10}  precision")
    for k, r in results.items():
        if "error" in r:
            print(f"{k:<18} {'FAILED: ' + r['error']:>45}   peak mem {_fmt((r.get('peak_mem_bytes') or 0) / MiB, '.0f')} MiB")
            continue
        mfu = r.get("mfu")
        print(f"{k:<18} {r['time_per_step_s'] * 1e3:>9.2f} {r['images_per_s']:>9.1f} "
              f"{r['achieved_flop_per_s'] / 1e12:>8.3f} {_fmt(mfu and 100 * mfu, '5.1f') + '%':>7} "
              f"{r['peak_mem_bytes'] / MiB:>6.0f} MiB {r['loss_step0']:>10.6f}  {r.get('precision')}")
    speedups = {}
    ref = results.get("reference", {})
    for k, r in results.items():
        if k != "reference" and "images_per_s" in r and "images_per_s" in ref:
            speedups[k] = r["images_per_s"] / ref["images_per_s"]
    for k, s in speedups.items():
        print(f"{k} / reference images/s: {s:.2f}x")
    if not cuda:
        print("process CPU-seconds per step (steadier than wall time on a shared machine): "
              + ", ".join(f"{k} {1e3 * r['cpu_seconds_per_step']:.1f} ms" for k, r in results.items()
                          if "cpu_seconds_per_step" in r))
    best = max((r for k, r in results.items() if k != "reference" and "mfu" in r),
               key=lambda r: r["images_per_s"], default=None)
    targets = None
    if cuda and best is not None:
        targets = {"speedup>=1.5": (speedups.get(best["variant"]) or 0) >= 1.5,
                   "mfu>=0.40": (best.get("mfu") or 0) >= 0.40, "best_variant": best["variant"]}
        print(f"targets (H100: >= 1.5x the reference's images/s, >= 40% MFU): {targets}")
    print(f"peak: {_fmt(peak and peak / 1e12, '.4g')} TFLOP/s ({peak_src}); FLOPs/step analytic "
          f"{flops['total']:.6g}, FlopCounterMode {fc if fc is not None else '-'}"
          + (f" ({100 * flop_check['rel_diff']:+.2f}%)" if fc else ""))
    if "rel_diff" in check:
        print(f"loss at step 0 (same weights, memory, inputs, partition): massl_ray "
              f"{check['losses_step0']['massl_ray']:.8f} vs reference {check['losses_step0']['reference']:.8f} "
              f"(rel diff {check['rel_diff']:.2e}; {check['compared_in']})")

    result = {
        "device": a.device, "device_name": dev_name, "capability": cap, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
        "setting": setting, "flops": flops, "flop_check": flop_check,
        "peak_flop_per_s": peak, "peak_source": peak_src,
        "paths": results, "speedup_vs_reference": speedups, "check": check, "targets": targets,
        "unix_time": time.time(), "partial": False,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    failed = [k for k, r in results.items() if "error" in r]
    if check.get("losses_match") is False:
        print("ERROR: the two steps compute different losses", file=sys.stderr)
        return 1
    if not ok_vals or (not cuda and failed):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
