#!/usr/bin/env python
"""Input-pipeline sizing: decode + multi-crop throughput per CPU core, and cores per GPU.

Runs :func:`massl_ray.data.views.make_views` — the exact function the Ray Data pipeline runs in each
decode task — in one process with ``torch.set_num_threads(1)``, at the paper's crop sizes
(2 x 224 + 10 x 96, ``CropConfig()`` defaults) on real JPEGs larger than 224 px, and reports the
cost per image in **CPU-seconds** (``time.process_time``: what one core spends; robust to other
processes on a shared machine) and in wall seconds.

Images: the first ``--images`` rows of ``jobs/data/cifar10-quick/train.parquet`` (32 px CIFAR-10
JPEGs), upscaled (bicubic) so that the short side is uniform in [``--short-min``, ``--short-max``]
(default 288..432 px) with aspect ratio 4:3, 3:4 or 1:1, plus Gaussian grain (``--grain``, std
12/255: upscaled CIFAR is far smoother than a photograph and would compress to ~0.1 byte/pixel),
re-encoded as JPEG quality 90. With the defaults an image has about 0.16 megapixels and ~60 KB,
the size class of ImageNet-1k's training images (about 0.18 megapixels, ~110 KB on average).
JPEG decoding is a small share of the cost (it is reported separately); the multi-crop part
depends on the crop sizes and, through the antialiased resize, on the source size.

Cores per GPU: to keep the GPU's data-wait under 5 %, the decode tasks must deliver at least
0.95 x the GPU's images/s (prefetching hides the jitter), so

    cores per GPU >= 0.95 x (GPU images/s) x (CPU-seconds per image) / ray_data_efficiency

``ray_data_efficiency`` (``--ray-efficiency``, default 0.85) is the share of a decode task's CPU
time spent in make_views (the rest: Arrow conversion, object-store writes, scheduling) — an
assumption until measured on a cluster. The GPU rate (``--gpu-images-per-s``) defaults to the
best massl_ray variant of ``benchmarks/results/gpu_step.json`` when that file holds a GPU
measurement, otherwise to the cost model's estimate for ViT-S/16 on an H100 SXM at the 40 % MFU
target: 0.40 x 989.4 TFLOP/s / 123.6 GFLOP per image (benchmarks/cost_model.py) = 3,200 img/s.

Usage::

    python benchmarks/ingest.py                          # -> benchmarks/results/ingest.json
    python benchmarks/ingest.py --gpu-images-per-s 1500 --images 256
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cost_model  # noqa: E402
from massl_ray.config import CropConfig, load_config  # noqa: E402
from massl_ray.data.images import try_decode  # noqa: E402
from massl_ray.data.multicrop import MultiCrop  # noqa: E402
from massl_ray.data.views import make_views  # noqa: E402

SOURCE = REPO / "jobs" / "data" / "cifar10-quick" / "train.parquet"


def make_jpegs(n: int, short_min: int, short_max: int, quality: int, seed: int,
               grain: float = 0.0) -> list[bytes]:
    """Upscaled CIFAR-10 images (+ Gaussian grain) as JPEG bytes (deterministic for a seed)."""
    rows = pq.read_table(SOURCE, columns=["image"]).column("image").to_pylist()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.open(io.BytesIO(rows[i % len(rows)])).convert("RGB")
        short = int(rng.integers(short_min, short_max + 1))
        ratio = (4 / 3, 3 / 4, 1.0)[int(rng.integers(0, 3))]
        w, h = (round(short * ratio), short) if ratio >= 1 else (short, round(short / ratio))
        img = img.resize((w, h), Image.BICUBIC)
        if grain > 0:
            arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, grain, (h, w, 3))
            img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def gpu_rate_default() -> tuple[float, str]:
    res = BENCH / "results" / "gpu_step.json"
    if res.is_file():
        try:
            r = json.loads(res.read_text())
            if str(r.get("device", "")).startswith("cuda") and not r["setting"].get("tiny"):
                best = max((p for k, p in r["paths"].items()
                            if k != "reference" and "images_per_s" in p),
                           key=lambda p: p["images_per_s"])
                return best["images_per_s"], (f"measured: {best['variant']} on {r['device_name']} "
                                              f"(benchmarks/results/gpu_step.json)")
        except (KeyError, ValueError, TypeError):
            pass
    w, _, _ = cost_model.recipe("vit_s16_800ep")
    rate = cost_model.images_per_s(w, cost_model.PEAK_BF16["H100 SXM"], 0.40)
    return rate, ("estimate: ViT-S/16 recipe at 40% MFU on an H100 SXM (989.4 TFLOP/s dense bf16), "
                  f"{cost_model.step_flops(w)['per_image'] / 1e9:.1f} GFLOP/image (cost_model.py)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128, help="JPEGs to build and process per round")
    p.add_argument("--rounds", type=int, default=2, help="timed passes over the images")
    p.add_argument("--batch", type=int, default=64, help="rows per make_views call (data.decode_batch_size)")
    p.add_argument("--short-min", type=int, default=288)
    p.add_argument("--short-max", type=int, default=432)
    p.add_argument("--grain", type=float, default=12.0,
                   help="std of the Gaussian grain added after upscaling (0..255 scale)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--config", default=None,
                   help="take the crops section from this job config (default: CropConfig() = paper)")
    p.add_argument("--gpu-images-per-s", type=float, default=None,
                   help="GPU training rate to feed (default: gpu_step.json if measured on a GPU, "
                        "else the cost-model estimate for ViT-S/16 on an H100 at 40%% MFU)")
    p.add_argument("--ray-efficiency", type=float, default=0.85,
                   help="share of a Ray Data decode task's CPU time spent in make_views (assumed)")
    p.add_argument("--max-wait", type=float, default=0.05, help="allowed data-wait share")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(BENCH / "results" / "ingest.json"))
    a = p.parse_args(argv)

    torch.set_num_threads(1)
    crops = load_config(a.config, validate=False).crops if a.config else CropConfig()
    mc = MultiCrop(crops)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    jpegs = make_jpegs(a.images, a.short_min, a.short_max, a.quality, a.seed, a.grain)
    build_s = time.perf_counter() - t0
    sizes = []
    for b in jpegs[:64]:
        with Image.open(io.BytesIO(b)) as im:
            sizes.append(im.size[0] * im.size[1])
    print(f"{len(jpegs)} JPEGs, mean {np.mean(sizes) / 1e6:.3f} MPix, mean {np.mean([len(b) for b in jpegs]) / 1024:.1f} KiB "
          f"(built in {build_s:.1f} s); crops 2x{crops.global_size} + {crops.num_local_crops}x{crops.local_size}; "
          f"1 thread; load average {load0[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    # decode only (the share of the cost that is JPEG decoding)
    c0 = time.process_time()
    for b in jpegs:
        img, _ = try_decode(b)
    decode_cpu = (time.process_time() - c0) / len(jpegs)

    # warm-up, then timed rounds of make_views over all images in batches of a.batch
    ids = [None] * len(jpegs)
    make_views(jpegs[:8], ids[:8], mc, torch.Generator().manual_seed(a.seed))
    cpu_per_image, wall_per_image = [], []
    bad = 0
    for r in range(a.rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(0, len(jpegs), a.batch):
            out, badrows = make_views(jpegs[i:i + a.batch], ids[i:i + a.batch], mc,
                                      torch.Generator().manual_seed(a.seed * 1000 + r * 100 + i))
            bad += len(badrows)
            assert out["global_crops"].shape[1:] == (2, 3, crops.global_size, crops.global_size)
            assert out["local_crops"].shape[1:] == (crops.num_local_crops, 3, crops.local_size, crops.local_size)
        cpu_per_image.append((time.process_time() - c0) / len(jpegs))
        wall_per_image.append((time.perf_counter() - w0) / len(jpegs))
        print(f"  round {r + 1}: {1e3 * cpu_per_image[-1]:.1f} CPU-ms/image, "
              f"{1e3 * wall_per_image[-1]:.1f} wall-ms/image", flush=True)
    if bad:
        print(f"ERROR: {bad} images failed to decode", file=sys.stderr)
        return 1
    core_s = statistics.median(cpu_per_image)
    per_core = 1.0 / core_s
    gpu_rate, gpu_src = (a.gpu_images_per_s, "--gpu-images-per-s") if a.gpu_images_per_s else gpu_rate_default()
    cores_make_views = cost_model.cpu_cores_per_gpu(gpu_rate, core_s, a.max_wait, 1.0)
    cores_ray = cost_model.cpu_cores_per_gpu(gpu_rate, core_s, a.max_wait, a.ray_efficiency)

    def wait_share(n_cores: float) -> float:
        return max(0.0, 1.0 - n_cores * per_core * a.ray_efficiency / gpu_rate)

    print(f"\nmake_views: {1e3 * core_s:.1f} CPU-ms per image (decode {1e3 * decode_cpu:.1f} ms, "
          f"multi-crop {1e3 * (core_s - decode_cpu):.1f} ms) -> {per_core:.1f} images/s per core")
    print(f"GPU rate to feed: {gpu_rate:.0f} images/s ({gpu_src})")
    print(f"CPU cores per GPU for data-wait <= {100 * a.max_wait:.0f}%: {cores_make_views} in make_views alone, "
          f"{cores_ray} as Ray Data decode CPUs (efficiency {a.ray_efficiency})")
    table = {n: wait_share(n) for n in (4, 8, 16, 32, 48, 64, 96) if n}
    print("predicted data-wait share vs Ray Data CPUs per GPU: "
          + ", ".join(f"{n}: {100 * s:.0f}%" for n, s in table.items()))
    result = {
        "crops": {"global_size": crops.global_size, "local_size": crops.local_size,
                  "num_local_crops": crops.num_local_crops},
        "images": len(jpegs), "rounds": a.rounds, "batch": a.batch,
        "jpeg": {"short_side": [a.short_min, a.short_max], "quality": a.quality, "grain": a.grain,
                 "mean_megapixels": float(np.mean(sizes) / 1e6),
                 "mean_bytes": float(np.mean([len(b) for b in jpegs]))},
        "threads": torch.get_num_threads(),
        "core_seconds_per_image": core_s, "decode_core_seconds_per_image": decode_cpu,
        "multicrop_core_seconds_per_image": core_s - decode_cpu,
        "images_per_s_per_core": per_core,
        "cpu_s_per_image_rounds": cpu_per_image, "wall_s_per_image_rounds": wall_per_image,
        "gpu_images_per_s": gpu_rate, "gpu_images_per_s_source": gpu_src,
        "max_data_wait": a.max_wait, "ray_efficiency": a.ray_efficiency,
        "cores_per_gpu_make_views": cores_make_views, "cores_per_gpu_ray_data": cores_ray,
        "data_wait_vs_cores": table,
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
