#!/usr/bin/env python
"""massl_ray's cost model: FLOPs, bytes and time of a MaSSL training step, from the config.

Pure arithmetic (stdlib + ``massl_ray.config``, no torch) so it can size a cluster anywhere.
``docs/performance.md`` is generated from it::

    python benchmarks/cost_model.py tables              # the doc's prediction tables (Markdown)
    python benchmarks/cost_model.py validate [--quick]  # checkpoint bytes vs state.pt
    python benchmarks/cost_model.py show --config jobs/imagenet_vit_s16_800ep.yaml [overrides]

Conventions
-----------
* FLOPs are model FLOPs of matrix products (2 per multiply-add): the ViT's patch embedding,
  qkv / proj / MLP linears and the two attention products (Q K^T and A V), the projection head's
  three linears, and the memory logits. Norms, GELU, softmax, the optimizer and the EMA are
  memory-bound and not counted (they are the "utilisation" lost in MFU).
* Backward = 2 x forward for every matrix product whose input needs a gradient (grad-input +
  grad-weight); the patch embedding's input (the image) needs none, so its backward is 1 x.
  The student runs forward + backward on 2 + L crops; the teacher runs forward only on the 2
  global crops.
* Memory logits (massl_ray's analytic-gradient loss): forward ``(V + 2) * B * K * D * 2``
  (student and teacher logits), backward ``V * B * K * D * 2`` (d loss / d z_s = g @ M).
* ViT shapes follow timm's ``VisionTransformer`` as massl_ray builds it: a class token, no
  register tokens, qkv bias, MLP ratio 4, final norm, no classifier.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from massl_ray.config import Config, load_config  # noqa: E402  (no torch import)

# massl_ray.method.model.ARCHS presets, as (embed_dim, depth, num_heads). Duplicated here so that this
# module never imports torch/timm; tests/test_benchmarks_cost_model.py checks the parameter counts
# against the models massl_ray actually builds.
PRESETS = {"vit_micro": (192, 4, 3), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
           "vit_base": (768, 12, 12), "vit_tiny_patch16_224": (192, 12, 3),
           "vit_small_patch16_224": (384, 12, 6), "vit_base_patch16_224": (768, 12, 12),
           "vit_large_patch16_224": (1024, 24, 16)}

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' datasheets.
PEAK_BF16 = {"H100 SXM": 989.4e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H200": 989.4e12,
             "H200 NVL": 835e12, "GH200": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12}

IMAGENET_TRAIN_IMAGES = 1_281_167
FP32 = 4


# ------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class ViTSpec:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int  # the size the position embeddings are built for (= crops.global_size)
    mlp_ratio: float = 4.0
    in_chans: int = 3

    @property
    def hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def tokens(self, img: int) -> int:
        return (img // self.patch_size) ** 2 + 1  # patches + class token

    def params(self) -> int:
        d, h, p = self.embed_dim, self.hidden, self.patch_size
        patch = d * self.in_chans * p * p + d
        pos = self.tokens(self.img_size) * d
        block = (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (d * h + h) + (h * d + d)
        return patch + d + pos + self.depth * block + 2 * d  # + cls token, final norm

    def num_tensors(self) -> int:
        # patch w/b, cls, pos, 12 per block (2 norms x 2, qkv w/b, proj w/b, fc1 w/b, fc2 w/b),
        # final norm w/b
        return 2 + 2 + 12 * self.depth + 2

    def forward_flops(self, img: int) -> dict:
        """Forward FLOPs of one crop of side ``img``, by part."""
        d, h = self.embed_dim, self.hidden
        n_patch = (img // self.patch_size) ** 2
        n = n_patch + 1
        return {
            "patch_embed": 2 * n_patch * (self.in_chans * self.patch_size ** 2) * d,
            "qkv_proj": self.depth * (2 * n * d * 3 * d + 2 * n * d * d),
            "attention": self.depth * (2 * 2 * n * n * d),
            "mlp": self.depth * (2 * 2 * n * d * h),
        }


@dataclass(frozen=True)
class Workload:
    """Everything the cost of one training step depends on."""

    vit: ViTSpec
    head_hidden: int
    head_out: int  # D, the embedding size
    global_size: int
    local_size: int
    num_local: int  # L
    batch: int  # per worker
    memory_size: int  # K
    workers: int = 1

    @property
    def views(self) -> int:
        return 2 + self.num_local

    @property
    def global_batch(self) -> int:
        return self.batch * self.workers


def vit_spec_from_config(cfg: Config) -> ViTSpec:
    m = cfg.model
    if m.arch not in PRESETS and (m.embed_dim is None or m.depth is None or m.num_heads is None):
        raise ValueError(f"cost model: unknown model.arch {m.arch!r}; known: {', '.join(PRESETS)} "
                         f"(or set model.embed_dim, depth and num_heads)")
    d, depth, heads = PRESETS.get(m.arch, (None, None, None))
    return ViTSpec(embed_dim=m.embed_dim or d, depth=m.depth or depth, num_heads=m.num_heads or heads,
                   patch_size=m.patch_size, img_size=cfg.crops.global_size)


def workload_from_config(cfg: Config) -> Workload:
    c = cfg.crops
    return Workload(vit=vit_spec_from_config(cfg), head_hidden=cfg.model.head_hidden_dim,
                    head_out=cfg.model.head_out_dim, global_size=c.global_size,
                    local_size=c.local_size, num_local=c.num_local_crops,
                    batch=cfg.optim.batch_size_per_worker, memory_size=cfg.massl.memory_size,
                    workers=cfg.world_size)


# ------------------------------------------------------------------------------------ FLOPs
def head_params(w: Workload) -> int:
    d, h, o = w.vit.embed_dim, w.head_hidden, w.head_out
    return d * h + h + h * h + h + h * o + o


def head_forward_flops(w: Workload) -> int:
    d, h, o = w.vit.embed_dim, w.head_hidden, w.head_out
    return 2 * (d * h + h * h + h * o)


def step_flops(w: Workload) -> dict:
    """Model FLOPs of one training step on one worker (batch ``w.batch``), by component."""
    v, b = w.views, w.batch
    fg, fl = w.vit.forward_flops(w.global_size), w.vit.forward_flops(w.local_size)
    patch_fwd_s = b * (2 * fg["patch_embed"] + w.num_local * fl["patch_embed"])
    rest_fwd_s = b * sum(2 * fg[k] + w.num_local * fl[k] for k in fg if k != "patch_embed")
    backbone_student = 3 * rest_fwd_s + 2 * patch_fwd_s  # patch embed: no grad-input
    backbone_teacher = b * 2 * sum(fg.values())
    head_student = 3 * b * v * head_forward_flops(w)
    head_teacher = b * 2 * head_forward_flops(w)
    k, d = w.memory_size, w.head_out
    logits_fwd = (v + 2) * b * k * d * 2
    logits_bwd = v * b * k * d * 2
    out = {"backbone_student": backbone_student, "backbone_teacher": backbone_teacher,
           "head_student": head_student, "head_teacher": head_teacher,
           "memory_logits_fwd": logits_fwd, "memory_logits_bwd": logits_bwd}
    out["backbone"] = backbone_student + backbone_teacher
    out["head"] = head_student + head_teacher
    out["memory_logits"] = logits_fwd + logits_bwd
    out["total"] = out["backbone"] + out["head"] + out["memory_logits"]
    out["per_image"] = out["total"] / b
    return out


# ------------------------------------------------------------------------------------ bytes
def model_params(w: Workload) -> int:
    """Parameters of one network (backbone + head); the student and the teacher each hold one."""
    return w.vit.params() + head_params(w)


def model_tensors(w: Workload) -> int:
    return w.vit.num_tensors() + 6


def memory_bank_bytes(k: int, d: int = 256) -> int:
    """The replicated FIFO memory: K x D float32 rows + an int64 pointer (on every worker)."""
    return k * d * FP32 + 8


def allgather_bytes(workers: int, batch: int, d: int = 256) -> dict:
    """Per step and worker: the teacher keys of global view 2 ([B, D], float32 after .float())."""
    sent = batch * d * FP32
    # gathered: what every worker ends up holding (its own incl.); wire: a ring all-gather's
    return {"keys_per_worker": sent, "gathered_tensor": workers * sent,
            "wire_per_worker_ring": (workers - 1) * sent}


def grad_allreduce_bytes(w: Workload) -> dict:
    """DDP's gradient all-reduce per step and worker (float32 gradients of the student)."""
    g = model_params(w) * FP32
    return {"gradients": g, "wire_per_worker_ring": 2 * (w.workers - 1) / max(w.workers, 1) * g}


# Bytes torch.save spends per tensor beyond its data (zip record header + 64-byte alignment,
# central-directory entry, pickle of the storage reference) and fixed extras, measured once on
# this codebase's checkpoints; small next to any real model.
TENSOR_OVERHEAD = 300
FIXED_OVERHEAD = 20_000  # RNG states (torch 5056 B, numpy 4992 B, python ~ 8 kB), config, format


def checkpoint_bytes(w: Workload, cuda: bool = False) -> dict:
    """state.pt of a checkpoint: student + teacher, AdamW (exp_avg, exp_avg_sq, step per tensor),
    the memory bank and pointer, RNG states and the config."""
    p, n_t = model_params(w), model_tensors(w)
    parts = {"student": p * FP32 + n_t * TENSOR_OVERHEAD, "teacher": p * FP32 + n_t * TENSOR_OVERHEAD,
             "adamw": 2 * p * FP32 + n_t * (3 * TENSOR_OVERHEAD + FP32),
             "memory_bank": memory_bank_bytes(w.memory_size, w.head_out) + 2 * TENSOR_OVERHEAD,
             "rng_config_misc": FIXED_OVERHEAD + (16 if cuda else 0)}
    parts["total"] = sum(parts.values())
    return parts


def device_state_bytes(w: Workload) -> int:
    """Resident training state per GPU: student (fp32) + grads + AdamW 2x + teacher + memory."""
    p = model_params(w)
    return 5 * p * FP32 + memory_bank_bytes(w.memory_size, w.head_out)


# ------------------------------------------------------------------------------------ time
def images_per_s(w: Workload, peak_flops: float, mfu: float) -> float:
    return mfu * peak_flops / step_flops(w)["per_image"]


def epoch_time(w: Workload, gpus: int, images: int, gpu_images_per_s: float,
               comm_bus_bytes_per_s: Optional[float] = None) -> dict:
    """Seconds per epoch on ``gpus`` GPUs (one worker each) at ``gpu_images_per_s`` per GPU.

    Communication not overlapped with compute (an upper bound: DDP overlaps the gradient
    all-reduce with the backward pass) is added when ``comm_bus_bytes_per_s`` is given.
    """
    ww = replace(w, workers=gpus)
    steps = images // (w.batch * gpus)
    compute = w.batch / gpu_images_per_s
    comm = 0.0
    if comm_bus_bytes_per_s:
        comm = (grad_allreduce_bytes(ww)["wire_per_worker_ring"]
                + allgather_bytes(gpus, w.batch, w.head_out)["wire_per_worker_ring"]) / comm_bus_bytes_per_s
    step = compute + comm
    return {"steps": steps, "step_s": step, "compute_s": compute, "comm_s": comm,
            "epoch_s": steps * step}


# ------------------------------------------------------------------------------------ recipes
def recipe(name: str) -> tuple[Workload, int, int]:
    """(per-worker workload, GPUs, epochs) of the paper's ImageNet-1k recipes."""
    gpus, epochs = {"vit_s16_800ep": (2, 800), "vit_b16_400ep": (4, 400)}[name]
    cfg = load_config(REPO / "jobs" / f"imagenet_{name}.yaml", validate=False)
    return workload_from_config(cfg), gpus, epochs


def _fmt_flops(x: float) -> str:
    unit, s = next(((u, s) for u, s in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9),
                                         ("MFLOP", 1e6)) if abs(x) >= s), ("FLOP", 1))
    return f"{x / s:.3g} {unit}"


def _fmt_bytes(x: float) -> str:
    unit, s = next(((u, s) for u, s in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10))
                    if abs(x) >= s), (None, 1))
    return f"{x / s:.3g} {unit}" if unit else f"{int(x)} B"


def _fmt_time(s: float) -> str:
    if s >= 3600 * 48:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def cpu_cores_per_gpu(gpu_images_per_s: float, core_s_per_image: float, max_wait: float = 0.05
                      ) -> int:
    """Feed CPUs per GPU so that the data-wait share stays <= ``max_wait``: the feed must
    deliver (1 - max_wait) x the GPU's rate (benchmarks/ingest.py measures its CPU per image)."""
    return math.ceil((1.0 - max_wait) * gpu_images_per_s * core_s_per_image)


def tables(gpu_images_per_s: Optional[dict] = None, ingest: Optional[dict] = None) -> str:
    """The Markdown tables of docs/performance.md."""
    out = []
    s, _, _ = recipe("vit_s16_800ep")
    b, _, _ = recipe("vit_b16_400ep")

    out.append("### FLOPs per training step (one worker)\n")
    out.append("| setting | backbone (student f+b) | backbone (teacher f) | head | memory logits "
               "| total / step | total / image |")
    out.append("|---|---|---|---|---|---|---|")
    for name, w in (("ViT-S/16, B=64, 2x224+10x96, K=2^17", s),
                    ("ViT-B/16, B=32, 2x224+10x96, K=2^17", b)):
        f = step_flops(w)
        out.append(f"| {name} | {_fmt_flops(f['backbone_student'])} | {_fmt_flops(f['backbone_teacher'])} "
                   f"| {_fmt_flops(f['head'])} | {_fmt_flops(f['memory_logits'])} | "
                   f"{_fmt_flops(f['total'])} | {_fmt_flops(f['per_image'])} |")

    out.append("\n### Memory logits vs K (ViT-S recipe, V=12, B=64, D=256)\n")
    out.append("| K | memory bank bytes (per worker) | memory-logit FLOPs / step | share of step FLOPs |")
    out.append("|---|---|---|---|")
    for k in (16384, 65536, 131072, 262144, 1048576):
        w = replace(s, memory_size=k)
        f = step_flops(w)
        out.append(f"| {k} | {_fmt_bytes(memory_bank_bytes(k))} | {_fmt_flops(f['memory_logits'])} | "
                   f"{100 * f['memory_logits'] / f['total']:.1f}% |")

    out.append("\n### Communication per step and worker (ViT-S recipe, B=64 per worker)\n")
    out.append("| workers | all-gather: gathered keys | all-gather wire (ring) | DDP gradient all-reduce wire (ring) |")
    out.append("|---|---|---|---|")
    for wk in (1, 2, 4, 8, 16, 64):
        ag = allgather_bytes(wk, s.batch, s.head_out)
        ar = grad_allreduce_bytes(replace(s, workers=wk))
        out.append(f"| {wk} | {_fmt_bytes(ag['gathered_tensor'])} | {_fmt_bytes(ag['wire_per_worker_ring'])} "
                   f"| {_fmt_bytes(ar['wire_per_worker_ring'])} |")

    out.append("\n### Checkpoint (state.pt) and resident device state\n")
    out.append("| setting | params / network | student | teacher | AdamW | memory bank | state.pt total | device state (w/o activations) |")
    out.append("|---|---|---|---|---|---|---|---|")
    for name, w in (("ViT-S/16, K=2^17", s), ("ViT-B/16, K=2^17", b)):
        c = checkpoint_bytes(w, cuda=True)
        out.append(f"| {name} | {model_params(w) / 1e6:.2f} M | {_fmt_bytes(c['student'])} | "
                   f"{_fmt_bytes(c['teacher'])} | {_fmt_bytes(c['adamw'])} | {_fmt_bytes(c['memory_bank'])} "
                   f"| {_fmt_bytes(c['total'])} | {_fmt_bytes(device_state_bytes(w))} |")

    out.append("\n### Predicted time per epoch, ImageNet-1k (1,281,167 images)\n")
    out.append("GPU throughput = MFU x peak / FLOPs per image; communication not overlapped, at an "
               "effective 100 GB/s bus bandwidth (NVLink within a node; an upper bound on its cost).\n")
    out.append("| recipe | GPUs | card | MFU | images/s per GPU | step | epoch | whole run |")
    out.append("|---|---|---|---|---|---|---|---|")
    for rname, label in (("vit_s16_800ep", "ViT-S/16 800 ep"), ("vit_b16_400ep", "ViT-B/16 400 ep")):
        w, gpus, epochs = recipe(rname)
        for card in ("H100 SXM", "A100"):
            for mfu in (0.25, 0.40):
                r = images_per_s(w, PEAK_BF16[card], mfu)
                e = epoch_time(w, gpus, IMAGENET_TRAIN_IMAGES, r, 100e9)
                out.append(f"| {label} | {gpus} x {w.batch} | {card} | {int(mfu * 100)}% | {r:.0f} | "
                           f"{e['step_s'] * 1e3:.1f} ms | {_fmt_time(e['epoch_s'])} | "
                           f"{_fmt_time(e['epoch_s'] * epochs)} |")
        if gpu_images_per_s and rname in gpu_images_per_s:
            card, r = gpu_images_per_s[rname]
            e = epoch_time(w, gpus, IMAGENET_TRAIN_IMAGES, r, 100e9)
            out.append(f"| {label} | {gpus} x {w.batch} | {card} | measured | {r:.0f} | "
                       f"{e['step_s'] * 1e3:.1f} ms | {_fmt_time(e['epoch_s'])} | "
                       f"{_fmt_time(e['epoch_s'] * epochs)} |")
    if ingest:
        core_s = ingest["core_seconds_per_image"]
        out.append("\n### CPU cores per GPU for the input pipeline\n")
        out.append(f"Measured cost of the feed: {core_s * 1e3:.1f} CPU-ms per image (benchmarks/"
                   f"ingest.py: the CPU of its processes per image). Feed CPUs per GPU = 0.95 x "
                   f"images/s per GPU x CPU-seconds per image for a data-wait <= 5%.\n")
        out.append("| recipe | card | MFU | images/s per GPU | CPU cores per GPU |")
        out.append("|---|---|---|---|---|")
        for rname, label in (("vit_s16_800ep", "ViT-S/16"), ("vit_b16_400ep", "ViT-B/16")):
            w, gpus, _ = recipe(rname)
            for card in ("H100 SXM", "A100"):
                for mfu in (0.25, 0.40):
                    r = images_per_s(w, PEAK_BF16[card], mfu)
                    out.append(f"| {label} | {card} | {int(mfu * 100)}% | {r:.0f} | "
                               f"{cpu_cores_per_gpu(r, core_s)} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ validation
def random_crops(cfg: Config, seed: int = 0, batch: Optional[int] = None) -> tuple:
    """Seeded uint8 crops of the config's shapes: global [B, 2, 3, G, G], local [B, L, 3, S, S]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, c = batch or cfg.optim.batch_size_per_worker, cfg.crops
    return (torch.randint(0, 256, (b, 2, 3, c.global_size, c.global_size), generator=g,
                          dtype=torch.uint8),
            torch.randint(0, 256, (b, c.num_local_crops, 3, c.local_size, c.local_size),
                          generator=g, dtype=torch.uint8))


def cpu_matmul_flops(threads: int, seconds: float = 1.5, n: int = 1024) -> dict:
    """Measured fp32 matmul rate (FLOP per CPU-second and per wall second) on this machine."""
    import time

    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    reps, c0, w0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - w0 < seconds:
        torch.mm(a, b, out=c)
        reps += 1
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    f = reps * 2 * n ** 3
    return {"n": n, "threads": threads, "flop_per_cpu_s": f / cpu, "flop_per_wall_s": f / wall,
            "cpu_s": cpu, "wall_s": wall}


def _checkpoint_actual(cfg: Config, directory: Path, batch: Optional[int] = None) -> int:
    """Bytes of state.pt after one real step (so AdamW has its states)."""
    from massl_ray.method.checkpoint import save_checkpoint
    from massl_ray.method.learner import Learner

    learner = Learner(cfg)
    learner.step(*random_crops(cfg, 0, batch))
    save_checkpoint(learner.state_dict(), directory)
    return (directory / "state.pt").stat().st_size


TINY = [  # the tests' tiny setting (tests/conftest.py), fp32
    "model.arch=vit_micro", "model.patch_size=4", "model.drop_path_rate=0.1",
    "model.head_hidden_dim=64", "model.head_out_dim=32", "crops.global_size=32",
    "crops.local_size=16", "crops.num_local_crops=2", "massl.memory_size=256",
    "massl.block_size=64", "optim.batch_size_per_worker=8", "optim.steps_per_epoch=10",
    "optim.epochs=2", "optim.fused_adamw=false", "run.num_workers=1", "run.use_gpu=false",
]


def validate(out: Optional[Path], quick: bool = False) -> dict:
    """The checkpoint bytes against the state.pt massl_ray writes after one step (CPU), for the
    tiny config, the quick start and ViT-S/16 (``quick``: the tiny config only). FLOPs (vs
    FlopCounterMode) and time (MFU): gpu_step.py."""
    import os
    import tempfile

    configs = [("tiny", load_config(None, TINY), None)]
    if not quick:
        configs += [("quickstart", load_config(REPO / "jobs" / "quickstart.yaml", [
                        "run.use_gpu=false", "run.num_workers=1", "optim.steps_per_epoch=78"]), 8),
                    ("ViT-S/16, K=2^17", load_config(REPO / "jobs" / "imagenet_vit_s16_800ep.yaml", [
                        "run.num_workers=1", "run.use_gpu=false", "optim.precision=fp32",
                        "optim.batch_size_per_worker=2", "crops.num_local_crops=0"]), 2)]
    rows, load0 = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        for name, cfg, batch in configs:
            pred = checkpoint_bytes(workload_from_config(cfg))["total"]
            meas = _checkpoint_actual(cfg, Path(d) / f"c{len(rows)}", batch)
            rows.append({"quantity": "checkpoint state.pt bytes", "setting": name, "unit": "B",
                         "predicted": pred, "measured": meas, "error": (pred - meas) / meas})
            print(f"checkpoint state.pt bytes, {name}: predicted {pred:,}, measured {meas:,} "
                  f"({100 * rows[-1]['error']:+.3f}%)", flush=True)
    res = {"rows": rows, "quick": quick, "loadavg_start": load0,
           "loadavg_end": os.getloadavg(), "cpu_count": os.cpu_count()}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"wrote {out}")
    return res


def validation_table(res: dict) -> str:
    lines = ["| quantity | setting | predicted | measured | error |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        p, m = (f"{_fmt_bytes(r[k])} ({int(r[k])})" for k in ("predicted", "measured"))
        lines.append(f"| {r['quantity']} | {r['setting']} | {p} | {m} | {100 * r['error']:+.2f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tables", help="print the Markdown tables of docs/performance.md")
    t.add_argument("--ingest", default=str(REPO / "benchmarks" / "results" / "ingest.json"),
                   help="ingest.py's JSON (for the CPU-cores table), if it exists")
    v = sub.add_parser("validate", help="predicted vs measured on this machine")
    v.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cost_model_validation.json"))
    v.add_argument("--quick", action="store_true", help="the tiny config only (CI)")
    s = sub.add_parser("show", help="the cost of one config")
    s.add_argument("--config", required=True)
    s.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.cmd == "tables":
        ing = Path(a.ingest)
        print(tables(ingest=json.loads(ing.read_text()) if ing.is_file() else None))
    elif a.cmd == "validate":
        print("\n" + validation_table(validate(Path(a.out), quick=a.quick)))
    else:
        cfg = load_config(a.config, a.overrides, validate=False)
        w = workload_from_config(cfg)
        print(json.dumps({"workload": asdict(w), "flops": step_flops(w), "params": model_params(w),
                          "checkpoint": checkpoint_bytes(w),
                          "allgather": allgather_bytes(w.workers, w.batch, w.head_out),
                          "grad_allreduce": grad_allreduce_bytes(w)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
