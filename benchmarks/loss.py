#!/usr/bin/env python
"""Loss + memory step benchmark: massl_ray's path against the reference formulation.

One "step" here is everything MaSSL does between the embeddings and the optimiser (method.md
§4 steps 3-7), on fixed unit embeddings z_s [V, B, D] (a leaf with requires_grad, standing in for
the student's output) and z_t [2, B, D]:

* ``ours`` (massl_ray): ``block_permutation`` drawn on the device from a ``torch.Generator``,
  ``massl_loss`` forward + backward (optionally chunked with ``--chunk-blocks``), then
  ``MemoryBank.update`` with the teacher's global view 2.
* ``reference`` (the authors' formulation, reimplemented from docs/method.md §4/§6, not copied):
  a fresh ``torch.randperm`` on the CPU moved to the device; two clones of the whole memory (one
  for the student logits, one for the teacher's); all V x B x K logits materialised; gathered
  with the permutation (``torch.gather``) into [V, B, N_B, S] / [2, B, N_B, S]; a Python double
  loop over the (i, j) pairs with i != j, each computing log_softmax of the student block logits
  and the block cross entropy with autograd (DINO-style); backward; then the FIFO write.

First both paths run one step from the same state with the same partition and the results are
compared (loss to 1e-4 relative, gradient w.r.t. z_s, the memory afterwards). Then each path is
timed in its own fresh subprocess (so neither sees the other's allocator caches): ``--warmup``
steps, then ``--repeats`` timed steps (median reported).

Peak memory (also per subprocess):
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; "step" peak is
  that minus what was allocated just before the first step (inputs + memory bank).
* CPU: torch has no public CPU-allocator peak counter, so the process's resident-set high-water
  mark is used: VmHWM is reset through /proc/self/clear_refs right before the first step and the
  "step" peak is VmHWM minus VmRSS at that moment (inputs and memory bank already resident). If
  the reset is not allowed, ru_maxrss is used instead (then the baseline is the high-water mark
  before the steps, which is the same thing here because setup allocations are still resident).
  RSS counts whole pages and whatever the C allocator keeps, so it is an upper bound on the
  tensors' peak, and the same bound for both paths.

Usage::

    python benchmarks/loss.py                     # the issue's setting: V=12 B=64 D=256 K=65536 S=16384
    python benchmarks/loss.py --tiny              # CI-sized
    python benchmarks/loss.py --device cuda --chunk-blocks 1 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._shared import proc_kib, reset_hwm  # noqa: E402
from massl_ray.method.loss import massl_loss  # noqa: E402
from massl_ray.method.memory import MemoryBank, block_permutation  # noqa: E402

PAPER = dict(views=12, batch=64, dim=256, memory_size=65536, block_size=16384)
TINY = dict(views=4, batch=8, dim=64, memory_size=1024, block_size=256)
STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.04
MiB = 2 ** 20


# ---------------------------------------------------------------------------- inputs
def make_inputs(a, device: torch.device, seed: int):
    """Unit embeddings and a memory bank, identical for every path (seeded, built on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    z_s = F.normalize(torch.randn(a.views, a.batch, a.dim, generator=g), dim=-1).to(device)
    z_t = F.normalize(torch.randn(2, a.batch, a.dim, generator=g), dim=-1).to(device)
    bank = MemoryBank(a.memory_size, a.dim, seed=seed + 1).to(device)
    return z_s.requires_grad_(True), z_t, bank


# ---------------------------------------------------------------------------- massl_ray's path
class Ours:
    name = "massl_ray"

    def __init__(self, a, device, bank: MemoryBank, seed: int):
        self.a, self.device, self.bank = a, device, bank
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def partition(self) -> torch.Tensor:
        return block_permutation(self.a.memory_size, self.a.block_size, self.gen, self.device)

    def step(self, z_s, z_t, partition: Optional[torch.Tensor] = None) -> torch.Tensor:
        if partition is None:
            partition = self.partition()
        loss, _stats = massl_loss(z_s, z_t, self.bank.rows, partition, STUDENT_TEMP, TEACHER_TEMP,
                                  chunk_blocks=self.a.chunk_blocks)
        loss.backward()
        self.bank.update(z_t[1])
        return loss.detach()


# ---------------------------------------------------------------------------- reference path
class Reference:
    """The authors' formulation as described in method.md (reimplemented, not copied)."""

    name = "reference"

    def __init__(self, a, device, memory: torch.Tensor):
        self.a, self.device = a, device
        self.memory = memory.clone()  # [K, D]; its own FIFO, same initial rows as the bank
        self.ptr = 0
        assert a.memory_size % a.batch == 0  # as the reference asserts K % G == 0

    def step(self, z_s, z_t, partition: Optional[torch.Tensor] = None) -> torch.Tensor:
        a = self.a
        v, b = z_s.shape[0], z_s.shape[1]
        n_blocks, s = a.memory_size // a.block_size, a.block_size
        if partition is None:
            perm = torch.randperm(a.memory_size).to(self.device)  # fresh CPU permutation each step
        else:
            perm = partition.reshape(-1)
        mem_student = self.memory.clone().detach()  # two clones of the whole memory per step
        mem_teacher = self.memory.clone().detach()
        student_logits = z_s @ mem_student.T / STUDENT_TEMP  # [V, B, K], all materialised
        with torch.no_grad():
            teacher_logits = z_t @ mem_teacher.T / TEACHER_TEMP  # [2, B, K]
        # Permute the slots with torch.gather (of x[..., perm], index_select and gather, gather
        # is the fastest forward + backward on CPU, so the baseline is not handicapped).
        student_blocks = student_logits.gather(-1, perm.expand(v, b, -1)).view(v, b, n_blocks, s)
        teacher_blocks = teacher_logits.gather(-1, perm.expand(2, b, -1)).view(2, b, n_blocks, s)
        teacher_probs = F.softmax(teacher_blocks, dim=-1)
        total, n_pairs = 0.0, 0
        for j in range(2):
            for i in range(v):
                if i == j:
                    continue
                ce = torch.sum(-teacher_probs[j] * F.log_softmax(student_blocks[i], dim=-1), dim=-1)
                total = total + ce.mean()  # mean over samples and blocks
                n_pairs += 1
        loss = total / n_pairs
        loss.backward()
        with torch.no_grad():  # FIFO write of the teacher's global view 2
            keys = z_t[1].detach()
            self.memory[self.ptr:self.ptr + b] = keys
            self.ptr = (self.ptr + b) % a.memory_size
        return loss.detach()


# ---------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(a) -> dict:
    """Time and measure one path in this (fresh) process."""
    device = torch.device(a.device)
    z_s, z_t, bank = make_inputs(a, device, a.seed)
    path = Ours(a, device, bank, a.seed) if a.worker == "ours" else Reference(a, device, bank.rows)
    if a.worker != "ours":
        del bank
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        method = "torch.cuda.max_memory_allocated - memory_allocated before the first step"
    else:
        if reset_hwm() and proc_kib("VmHWM") is not None:
            base = proc_kib("VmRSS") * 1024
            method = "RSS high-water (VmHWM, reset via /proc/self/clear_refs) - VmRSS before the first step"
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            method = "ru_maxrss after the steps - ru_maxrss before the first step"
    times = []
    for it in range(a.warmup + a.repeats):
        z_s.grad = None
        _sync(device)
        t0 = time.perf_counter()
        path.step(z_s, z_t)
        _sync(device)
        if it >= a.warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_abs = torch.cuda.max_memory_allocated(device)
    elif method.startswith("RSS"):
        peak_abs = proc_kib("VmHWM") * 1024
    else:
        peak_abs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "path": path.name,
        "time_s_median": statistics.median(times),
        "time_s_min": min(times),
        "times_s": times,
        "peak_mem_step_bytes": max(0, peak_abs - base),
        "peak_mem_abs_bytes": peak_abs,
        "baseline_bytes": base,
        "memory_method": method,
    }


def check_values(a, device: torch.device) -> dict:
    """One step of each path from the same state with the same partition: must agree."""
    z_s, z_t, bank = make_inputs(a, device, a.seed)
    ref = Reference(a, device, bank.rows)
    ours = Ours(a, device, bank, a.seed)
    partition = ours.partition()
    loss_ours = ours.step(z_s, z_t, partition)
    grad_ours = z_s.grad.detach().clone()
    z_s.grad = None
    loss_ref = ref.step(z_s, z_t, partition)
    grad_ref = z_s.grad.detach().clone()
    rel_loss = abs(float(loss_ours) - float(loss_ref)) / abs(float(loss_ref))
    rel_grad = float((grad_ours - grad_ref).abs().max() / grad_ref.abs().max())
    mem_equal = bool(torch.equal(bank.rows, ref.memory)) and int(bank.ptr) == ref.ptr
    return {
        "loss_ours": float(loss_ours), "loss_reference": float(loss_ref),
        "loss_rel_diff": rel_loss, "grad_max_rel_diff": rel_grad,
        "grad_norm_ours": float(grad_ours.norm()), "grad_norm_reference": float(grad_ref.norm()),
        "memory_after_update_equal": mem_equal,
        "losses_match": rel_loss <= 1e-4,
        "grads_match": rel_grad <= a.grad_tol,
    }


def spawn_worker(a, which: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which,
           "--device", a.device, "--views", str(a.views), "--batch", str(a.batch),
           "--dim", str(a.dim), "--memory-size", str(a.memory_size),
           "--block-size", str(a.block_size), "--chunk-blocks", str(a.chunk_blocks),
           "--warmup", str(a.warmup), "--repeats", str(a.repeats), "--seed", str(a.seed)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"{which} worker failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pool_rounds(rounds: list) -> dict:
    times = [t for r in rounds for t in r["times_s"]]
    peak = max(rounds, key=lambda r: r["peak_mem_step_bytes"])
    return {**peak, "time_s_median": statistics.median(times), "time_s_min": min(times),
            "times_s": times, "rounds": len(rounds),
            "peak_mem_step_bytes_per_round": [r["peak_mem_step_bytes"] for r in rounds]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CI-sized: V=4 B=8 D=64 K=1024 S=256")
    p.add_argument("--views", type=int, help=f"student views V (default {PAPER['views']})")
    p.add_argument("--batch", type=int, help=f"per-worker batch B (default {PAPER['batch']})")
    p.add_argument("--dim", type=int, help=f"embedding dim D (default {PAPER['dim']})")
    p.add_argument("--memory-size", type=int, help=f"memory slots K (default {PAPER['memory_size']})")
    p.add_argument("--block-size", type=int, help=f"block size S (default {PAPER['block_size']})")
    p.add_argument("--chunk-blocks", type=int, default=0,
                   help="massl_loss chunk_blocks (0 = all blocks at once, the config default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; tiny 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 5; tiny 10)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate fresh ours/reference processes this many times; times are pooled, "
                        "peak memory is the max over rounds")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-tol", type=float, default=1e-4,
                   help="max |g_ours - g_ref| / max |g_ref| allowed (float32)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loss.json"))
    p.add_argument("--worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    base = TINY if a.tiny else PAPER
    for key, val in base.items():
        if getattr(a, key) is None:
            setattr(a, key, val)
    if a.warmup is None:
        a.warmup = 3 if a.tiny else 2
    if a.repeats is None:
        a.repeats = 10 if a.tiny else 5
    if a.memory_size % a.block_size:
        p.error(f"--memory-size {a.memory_size} is not divisible by --block-size {a.block_size}")
    if a.views < 2 or a.repeats < 1 or a.warmup < 0 or a.rounds < 1:
        p.error("need --views >= 2, --repeats >= 1, --warmup >= 0, --rounds >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(run_worker(a)))
        return 0

    device = torch.device(a.device)
    setting = {k: getattr(a, k) for k in ("views", "batch", "dim", "memory_size", "block_size",
                                          "chunk_blocks", "warmup", "repeats", "rounds", "seed")}
    setting["num_blocks"] = a.memory_size // a.block_size
    print(f"MaSSL loss + memory step: V={a.views} B={a.batch} D={a.dim} K={a.memory_size} "
          f"S={a.block_size} (N_B={setting['num_blocks']}) chunk_blocks={a.chunk_blocks} "
          f"device={device} threads={torch.get_num_threads()}")

    check = check_values(a, device)
    print(f"values: loss massl_ray {check['loss_ours']:.8f}  reference {check['loss_reference']:.8f}  "
          f"rel diff {check['loss_rel_diff']:.2e}; grad |g| {check['grad_norm_ours']:.6e} vs "
          f"{check['grad_norm_reference']:.6e}, max rel diff {check['grad_max_rel_diff']:.2e}; "
          f"memory after update equal: {check['memory_after_update_equal']}")

    # Alternate the two paths' processes (--rounds) so load changes on a shared machine hit both.
    runs = {"ours": [], "ref": []}
    for _ in range(a.rounds):
        for which in ("ours", "ref"):
            runs[which].append(spawn_worker(a, which))
    ours, ref = pool_rounds(runs["ours"]), pool_rounds(runs["ref"])
    ratios = {
        "time": ref["time_s_median"] / ours["time_s_median"],
        "time_min": ref["time_s_min"] / ours["time_s_min"],
        "peak_mem_step": ref["peak_mem_step_bytes"] / max(1, ours["peak_mem_step_bytes"]),
        "peak_mem_abs": ref["peak_mem_abs_bytes"] / max(1, ours["peak_mem_abs_bytes"]),
    }
    rows = [("reference", ref), ("massl_ray", ours)]
    print(f"\n{'path':<11} {'time/step (median)':>19} {'min':>10} {'peak step mem':>14} {'peak abs':>11}")
    for name, r in rows:
        print(f"{name:<11} {r['time_s_median'] * 1e3:>16.1f} ms {r['time_s_min'] * 1e3:>7.1f} ms "
              f"{r['peak_mem_step_bytes'] / MiB:>10.1f} MiB {r['peak_mem_abs_bytes'] / MiB:>7.1f} MiB")
    print(f"{'ref / ours':<11} {ratios['time']:>18.2f}x {'':>10} {ratios['peak_mem_step']:>13.2f}x "
          f"{ratios['peak_mem_abs']:>10.2f}x")
    print(f"\ntime: median (and min) of {a.repeats} steps x {a.rounds} round(s), after {a.warmup} warm-up "
          f"steps, each path in a fresh process per round (min ratio: {ratios['time_min']:.2f}x).")
    print(f"peak memory: {ours['memory_method']}; 'peak abs' includes the interpreter, torch, the "
          f"inputs and the memory bank.")
    targets = {"time_ratio>=3": ratios["time"] >= 3.0, "peak_mem_step_ratio>=2": ratios["peak_mem_step"] >= 2.0}
    print(f"targets (ours >= 3x faster, <= half the step's peak memory): {targets}")

    result = {
        "setting": setting,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "check": check,
        "ours": ours,
        "reference": ref,
        "ratios_reference_over_ours": ratios,
        "targets_met": targets,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if not (check["losses_match"] and check["grads_match"] and check["memory_after_update_equal"]):
        print("ERROR: the two paths disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
