#!/usr/bin/env python
"""Training-step benchmark on one device: massl_ray's Learner.step vs the authors' formulation.

Images/s, MFU and peak device memory of a full training step in the paper's ViT-S/16 setting
(``jobs/imagenet_vit_s16_800ep.yaml`` on one worker: batch 64, 2 x 224 + 10 x 96 crops, K =
131072 in blocks of 16384, bf16), variants ``massl_ray`` (``Learner.step`` on pinned uint8
crops), ``massl_ray_compile`` (with ``run.compile``) and ``reference`` (the authors' step,
``benchmarks/reference.py``); docs/performance.md section 2 has the details.

All build the same weights and memory from the same config and seed and take the same crops.
Value check first: steps 0 and 1 with Learner's block partitions and drop-path seeds; each
variant reports the losses and projections (on a fixed random vector) of the memory's change at
step 0 and of the student's change over both steps. On CPU in fp32 they must agree (the script
fails otherwise): step 0's loss checks the forward and the loss, step 1's the memory after the
FIFO write (step 0 has lr 0), the student's change the gradients, clipping and AdamW. On a GPU
(bf16 vs fp16) the values are only printed. Then ``--warmup`` steps and ``--windows`` windows of
``--steps`` steps, each timed from a device sync to a device sync (median window), each variant
in its own process. FLOPs per step: ``benchmarks/cost_model.py``, cross-checked against
``FlopCounterMode``. MFU = FLOPs / time / peak (dense bf16 of the detected card or
``--peak-tflops``; on CPU a measured 1024^3 fp32 matmul on the same threads). Peak memory:
``max_memory_allocated`` over the timed steps (CPU: the resident-set high-water mark).

    python benchmarks/gpu_step.py                     # the paper's setting on CUDA
    python benchmarks/gpu_step.py --quick             # CI: tiny, CPU, in one process
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
from benchmarks._shared import proc_field, reset_hwm  # noqa: E402
from massl_ray.config import load_config  # noqa: E402

PAPER_CONFIG = REPO / "jobs" / "imagenet_vit_s16_800ep.yaml"
PAPER_OVERRIDES = ["run.num_workers=1", "run.use_gpu=true", "optim.precision=bf16"]
# CPU-sized (about 1 GFLOP per step): the tests' tiny setting on a 64-wide, 2-block ViT, fp32.
TINY_OVERRIDES = cost_model.TINY + ["model.embed_dim=64", "model.depth=2", "model.num_heads=2",
                                    "optim.precision=fp32"]
VARIANTS = ("reference", "massl_ray", "massl_ray_compile")
CHECK_STEPS = 2
MiB = 2 ** 20
# device-name pattern -> cost_model.PEAK_BF16 key, first match (None: no datasheet figure here)
PEAKS = [("GH200", "GH200"), ("H200 NVL", "H200 NVL"), ("H200", "H200"), ("H100 NVL", "H100 NVL"),
         ("H100 PCIE", "H100 PCIe"), ("H100", "H100 SXM"), ("H800", "H100 SXM"), ("A100", "A100"),
         ("A800", "A100"), ("L40S", "L40S"), ("L4", "L4"), ("A10G", None), ("A10", "A10")]


def detect_peak(name: str) -> Optional[float]:
    n = name.upper().replace("-", " ")
    key = next((k for pat, k in PEAKS if pat in n), None)
    return cost_model.PEAK_BF16[key] if key else None


# ------------------------------------------------------------------------------------ worker
def build_config(a, variant: Optional[str] = None):
    cfg = load_config(a.config, a.overrides_list, validate=False)
    cfg.run.compile = variant == "massl_ray_compile"
    return cfg.validate()


def flat(tensors):
    """The tensors as one float64 vector on the host."""
    import torch

    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def project(x, seed: int) -> float:
    import torch

    return float(x @ torch.randn(x.numel(), generator=torch.Generator().manual_seed(seed),
                                 dtype=torch.float64))


def run_worker(a) -> dict:
    import torch

    from massl_ray.method.learner import Learner, _step_seed, normalize
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
    gc, lc = cost_model.random_crops(cfg, seed)
    t_build = time.perf_counter()
    if variant == "reference":
        from reference import ReferenceStep

        torch.manual_seed(seed)  # exactly as Learner builds its networks
        student, teacher = build_student_teacher(cfg)
        rows = MemoryBank(cfg.massl.memory_size, cfg.model.head_out_dim, seed=seed).rows
        fp16 = cuda and cfg.optim.precision != "fp32"
        path = ReferenceStep(cfg, student.to(device), teacher.to(device), rows, device, fp16=fp16)
        info["precision"] = "fp16 autocast + GradScaler" if fp16 else "fp32"
        # host-side float32 normalised crops, one tensor per view (the data loader's output)
        mean, std = torch.tensor(cfg.crops.mean), torch.tensor(cfg.crops.std)
        views = [normalize(gc[:, i], mean, std) for i in range(2)]
        views += [normalize(lc[:, i], mean, std) for i in range(lc.shape[1])]
        views = [v.pin_memory() for v in views] if cuda else views
        info["input_host_bytes"] = sum(v.numel() * v.element_size() for v in views)
        state, loss_of = (path.student, lambda: path.memory), float

        def step(partition=None):
            return path.step(views, partition)
    else:
        learner = path = Learner(cfg, device)
        info["precision"] = cfg.optim.precision + (" autocast" if cfg.optim.precision != "fp32" else "")
        info["compile"] = bool(cfg.run.compile)
        gc, lc = (gc.pin_memory(), lc.pin_memory()) if cuda else (gc, lc)
        info["input_host_bytes"] = gc.numel() + lc.numel()
        state = (learner.student, lambda: learner.memory.rows)

        def step(partition=None):
            return learner.step(gc, lc, check_finite=False)

        def loss_of(res):
            return float(res.loss)
    info["build_s"] = time.perf_counter() - t_build

    # 1. value check: steps 0 and 1 with Learner's partitions and drop-path seeds
    p0, m0 = flat(state[0].parameters()), flat([state[1]()])
    gen = torch.Generator(device=device)
    losses, t0 = [], time.perf_counter()
    for s in range(CHECK_STEPS):
        gen.manual_seed(seed * 1_000_003 + s)  # = Learner._partition(s)
        partition = block_permutation(cfg.massl.memory_size, cfg.block_size, gen, device)
        torch.manual_seed(_step_seed(seed, s, 0))  # Learner.step seeds itself the same way
        losses.append(loss_of(step(partition) if variant == "reference" else step()))
        if s == 0:
            sync()
            info["first_step_s"] = time.perf_counter() - t0  # includes compilation for *_compile
            m1 = flat([state[1]()])
    info["check"] = {"losses": losses, "student_update": project(flat(state[0].parameters()) - p0, 1),
                     "memory_update_step0": project(m1 - m0, 2)}

    # 2. warm-up, 3. timed windows
    for _ in range(a.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    info["mem_method"] = ("torch.cuda.max_memory_allocated over the timed steps" if cuda else
                          "process VmHWM" + (", reset before the timed steps" if reset_hwm() else ""))
    info["mem_before_timed_bytes"] = (torch.cuda.memory_allocated(device) if cuda
                                      else (proc_field("VmRSS") or 0) * 1024)
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
    info.update(loss_last=loss_of(out), time_per_step_s=statistics.median(windows),
                time_per_step_min_s=min(windows), window_times_s=windows,
                # process CPU-seconds per step: on a shared machine steadier than wall time
                cpu_seconds_per_step=statistics.median(cpu_windows),
                host_dispatch_s_median=statistics.median(host),
                peak_mem_bytes=(torch.cuda.max_memory_allocated(device) if cuda
                                else (proc_field("VmHWM") or 0) * 1024))
    info["images_per_s"] = cfg.optim.batch_size_per_worker / info["time_per_step_s"]

    # 4. FLOPs actually executed by one eager massl_ray step (math SDPA: attention as bmm)
    if a.count_flops and variant == "massl_ray":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        try:
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                step()
            sync()
            info["flop_counter_per_step"] = int(fc.get_total_flops())
        except Exception as e:  # noqa: BLE001 - the timings above stand; report the failure
            info["flop_counter_error"] = f"{type(e).__name__}: {str(e)[-500:]}"
    if a.measure_cpu_peak and not cuda:
        info["cpu_matmul"] = cost_model.cpu_matmul_flops(torch.get_num_threads(), seconds=1.0)
    return info


def worker_main(a) -> int:
    try:
        res = run_worker(a)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which reports it
        oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
        res = {"variant": a.worker, "error": "out of memory" if oom else type(e).__name__,
               "message": str(e)[-2000:], "traceback": traceback.format_exc()[-4000:]}
        if a.device.startswith("cuda"):
            import torch

            res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------ parent
def spawn(a, variant: str) -> dict:
    if a.in_process:
        return run_worker(argparse.Namespace(**{**vars(a), "worker": variant, "measure_cpu_peak":
                                                a.measure_cpu_peak and variant == a.variants[0]}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--device", a.device,
           "--config", str(a.config), "--warmup", str(a.warmup), "--steps", str(a.steps),
           "--windows", str(a.windows), "--threads", str(a.threads)]
    cmd += [] if a.count_flops else ["--no-count-flops"]
    cmd += ["--measure-cpu-peak"] if a.measure_cpu_peak and variant == a.variants[0] else []
    cmd += ["--set"] + a.overrides_list if a.overrides_list else []
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO),
                              timeout=a.variant_timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr)
        return {"variant": variant, "error": "timeout", "stderr_tail": err[-2000:],
                "message": f"no result within {a.variant_timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"variant": variant, "error": f"worker exited with {proc.returncode}",
                "message": (proc.stderr or proc.stdout)[-3000:]}
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_wall_s"] = time.perf_counter() - t0
    return res if "error" not in res else {**res, "stderr_tail": proc.stderr[-2000:]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda if any)")
    p.add_argument("--tiny", action="store_true", help="the CPU-sized setting (default without CUDA)")
    p.add_argument("--quick", action="store_true",
                   help="CI: --tiny --device cpu --in-process, 1 warm-up step, 1 window of 2")
    p.add_argument("--in-process", action="store_true", help="the variants one after the other "
                   "in this process (no interpreter start-ups: most of a tiny run's time)")
    p.add_argument("--config", default=None,
                   help=f"job config (default {PAPER_CONFIG.relative_to(REPO)}; ignored with --tiny)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[],
                   help="extra section.key=value overrides (e.g. massl.loss_chunk_blocks=1)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)} "
                   "(default: all on CUDA; reference,massl_ray on CPU)")
    for k, h in (("warmup", "warm-up steps (5; tiny 1)"), ("windows", "timed windows (3; tiny 2)"),
                 ("steps", "steps per timed window (10; tiny 3)")):
        p.add_argument("--" + k, type=int, default=None, help=h)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the workers (default: 1 on CPU, torch's default on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak (dense bf16 TFLOP/s) for MFU; default: detected from the name")
    p.add_argument("--variant-timeout", type=int, default=420, help="seconds per variant process")
    p.add_argument("--no-count-flops", dest="count_flops", action="store_false",
                   help="skip the FlopCounterMode cross-check step")
    p.add_argument("--measure-cpu-peak", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loss-tol", type=float, default=1e-4,
                   help="fp32 CPU agreement of the losses and the memory (relative)")
    p.add_argument("--update-tol", type=float, default=1e-3,
                   help="fp32 CPU agreement of the student update (relative; AdamW's first steps "
                        "are about lr x sign(gradient): near-zero gradients amplify rounding)")
    p.add_argument("--out", default=str(BENCH / "results" / "gpu_step.json"))
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.tiny, a.device, a.in_process = True, "cpu", True
    if a.device is None:
        a.device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    cuda = a.device.startswith("cuda")
    if not cuda:
        a.tiny = a.tiny or a.worker is None and a.config is None
    if a.worker is None:
        if a.tiny:
            a.config, a.overrides_list = None, TINY_OVERRIDES + list(a.overrides)
        else:
            a.config = str(Path(a.config).resolve() if a.config else PAPER_CONFIG)
            a.overrides_list = PAPER_OVERRIDES + list(a.overrides)
            a.overrides_list += [] if cuda else ["optim.precision=fp32"]
    else:  # the parent passes the resolved overrides
        a.config = None if a.config in (None, "None") else a.config
        a.overrides_list = list(a.overrides)
    if a.threads is None:
        a.threads = 0 if cuda else 1
    small = {"warmup": 1, "steps": 2 if a.quick else 3, "windows": 1 if a.quick else 2}
    for k, full in {"warmup": 5, "steps": 10, "windows": 3}.items():
        if getattr(a, k) is None:
            setattr(a, k, small[k] if a.tiny else full)
    a.variants = ([v.strip() for v in a.variants.split(",")] if a.variants
                  else list(VARIANTS if cuda else VARIANTS[:2]))
    if set(a.variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(set(a.variants) - set(VARIANTS))}; choose from {VARIANTS}")
    return a


def _fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def compare(results: dict, tol: float, update_tol: float, same_precision: bool) -> dict:
    """The value check of massl_ray against the reference (see the module docstring)."""
    ours, ref = (results.get(k, {}).get("check") for k in ("massl_ray", "reference"))
    check = {"values": {k: r["check"] for k, r in results.items() if "check" in r}}
    if ours and ref:
        def rel(x, y):
            return abs(x - y) / max(abs(y), 1e-30)

        diffs = {f"loss_step{s}": rel(ours["losses"][s], ref["losses"][s]) for s in range(CHECK_STEPS)}
        diffs.update({k: rel(ours[k], ref[k]) for k in ("student_update", "memory_update_step0")})
        check["rel_diffs"] = diffs
        check["losses_step0"] = {"massl_ray": ours["losses"][0], "reference": ref["losses"][0]}
        check["compared_in"] = ("fp32 (same precision)" if same_precision
                                else "different precisions (bf16 vs fp16): printed only")
        check["losses_match"] = (all(d <= (update_tol if k == "student_update" else tol)
                                     for k, d in diffs.items()) if same_precision else None)
    return check


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker_main(a)
    import torch

    cuda = a.device.startswith("cuda")
    cfg = build_config(a)
    flops = cost_model.step_flops(cost_model.workload_from_config(cfg))
    peak = a.peak_tflops * 1e12 if a.peak_tflops else None
    peak_src = "--peak-tflops" if peak else None
    dev_name, cap = platform.processor() or platform.machine(), None
    if cuda:
        dev_name = torch.cuda.get_device_name(torch.device(a.device))
        cap = torch.cuda.get_device_capability(torch.device(a.device))
        if not peak:
            peak = detect_peak(dev_name)
            peak_src = "datasheet dense bf16" if peak else None
    a.measure_cpu_peak = not cuda and peak is None
    c, m = cfg.crops, cfg.massl
    setting = {"config": a.config, "overrides": a.overrides_list, "tiny": a.tiny, "quick": a.quick,
               "arch": cfg.model.arch, "patch": cfg.model.patch_size,
               "batch": cfg.optim.batch_size_per_worker, "global_size": c.global_size,
               "local_size": c.local_size, "num_local_crops": c.num_local_crops,
               "memory_size": m.memory_size, "block_size": cfg.block_size,
               "loss_chunk_blocks": m.loss_chunk_blocks, "precision": cfg.optim.precision,
               "warmup": a.warmup, "steps": a.steps, "windows": a.windows}
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
        r = results[v] = spawn(a, v)
        # partial results after every variant: a killed run still leaves what it measured
        out.write_text(json.dumps({"partial": True, "device": a.device, "device_name": dev_name,
                                   "setting": setting, "flops": flops, "paths": results}, indent=2))
        status = r.get("error") or f"{r['time_per_step_s'] * 1e3:.1f} ms/step"
        print(f"  {v:<18} {status}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if "error" in r:
            print(f"    {r.get('message', '')[-600:]}", file=sys.stderr)

    cm = next((r["cpu_matmul"] for r in results.values() if "cpu_matmul" in r), None)
    if not peak and cm:
        peak, peak_src = cm["flop_per_wall_s"], f"measured fp32 matmul {cm['n']}^3, {cm['threads']} thread(s)"
    for r in results.values():
        if "time_per_step_s" in r:
            r["achieved_flop_per_s"] = flops["total"] / r["time_per_step_s"]
            r["mfu"] = r["achieved_flop_per_s"] / peak if peak else None
    check = compare(results, a.loss_tol, a.update_tol, not cuda and cfg.optim.precision == "fp32")
    fc = results.get("massl_ray", {}).get("flop_counter_per_step")
    flop_check = {"analytic_per_step": flops["total"], "flop_counter_per_step": fc,
                  "rel_diff": (flops["total"] - fc) / fc if fc else None}

    print(f"\n{'path':<18} {'ms/step':>9} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>7} {'peak mem':>10} "
          f"{'loss@0':>10}  precision")
    for k, r in results.items():
        if "error" in r:
            print(f"{k:<18} {'FAILED: ' + r['error']:>45}   peak mem "
                  f"{_fmt((r.get('peak_mem_bytes') or 0) / MiB, '.0f')} MiB")
            continue
        mfu = r.get("mfu")
        print(f"{k:<18} {r['time_per_step_s'] * 1e3:>9.2f} {r['images_per_s']:>9.1f} "
              f"{r['achieved_flop_per_s'] / 1e12:>8.3f} {_fmt(mfu and 100 * mfu, '5.1f') + '%':>7} "
              f"{r['peak_mem_bytes'] / MiB:>6.0f} MiB {r['check']['losses'][0]:>10.6f}  {r.get('precision')}")
    ref = results.get("reference", {})
    speedups = {k: r["images_per_s"] / ref["images_per_s"] for k, r in results.items()
                if k != "reference" and "images_per_s" in r and "images_per_s" in ref}
    print("".join(f"{k} / reference images/s: {x:.2f}x\n" for k, x in speedups.items()), end="")
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
    if "rel_diffs" in check:
        print(f"value check, massl_ray vs reference from the same state ({check['compared_in']}): "
              + ", ".join(f"{k} {v:.1e}" for k, v in check["rel_diffs"].items()))

    out.write_text(json.dumps({
        "device": a.device, "device_name": dev_name, "capability": cap, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
        "setting": setting, "flops": flops, "flop_check": flop_check, "peak_flop_per_s": peak,
        "peak_source": peak_src, "paths": results, "speedup_vs_reference": speedups,
        "check": check, "targets": targets, "unix_time": time.time(), "partial": False}, indent=2))
    print(f"wrote {out}")
    if check.get("losses_match") is False:
        print("ERROR: the two steps compute different values", file=sys.stderr)
    failed = any("error" in r for r in results.values())
    return 1 if check.get("losses_match") is False or not check["values"] or (not cuda and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
