#!/usr/bin/env python
"""Ingest: the training feed against a standard PIL + torchvision DataLoader, per CPU core.

Both turn one Parquet set of JPEGs (the CIFAR-10 quick-start images upscaled, bicubic, to a
short side uniform in [--short-min, --short-max], aspect 4:3, 3:4 or 1:1, plus Gaussian grain so
that they compress like photographs; quality 90; row groups of --row-group rows) into batches of
64 with DINO's crops (2 x 224 + 10 x 96 by default):

* ``reference``: per-image PIL decode + torchvision transforms per crop (DINO's PIL blur) in a
  ``DataLoader(num_workers=N, shuffle=True, persistent_workers=True)``, images in memory (its
  best case: no file reads);
* ``feed``: the training feed, ``massl_ray.data.feed.iter_batches`` (rank 0 of 1: read tasks
  per row group, decode tasks of ``data.decode_rows`` positions) on a Ray of ``num_cpus=N``.

Each takes ``--warmup`` images (start-up: worker processes, first reads), then ``--measure``
images are timed: img/s, per core (/ N), the CPU its process tree used (this process, the
DataLoader's workers or Ray's processes, from /proc) as cores busy and CPU-s per image; from the
feed's, the CPUs per GPU that keep a GPU's data-wait under 5 % (GPU rate: ``--gpu-images-per-s``,
else the best massl_ray variant of ``results/gpu_step.json`` on a GPU, else the cost model's
ViT-S/16 on an H100 SXM at 40 % MFU). ``--rounds R``: medians of R; the load average is recorded.

    python benchmarks/ingest.py                     # 4,096 images at the paper's crops, N = 2
    python benchmarks/ingest.py --quick             # CI: a few hundred small images, 32/16 px
    python benchmarks/ingest.py --draft-compare     # decode ms/img, full vs training's (draft)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [p for p in (str(REPO), str(BENCH)) if p not in sys.path]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

import cost_model  # noqa: E402
from benchmarks._shared import finite  # noqa: E402
from massl_ray.config import Config, CropConfig  # noqa: E402

SOURCE = REPO / "jobs" / "data" / "cifar10-quick" / "train.parquet"
BATCH = 64
FULL = dict(images=4096, short_min=288, short_max=432, row_group=512, global_size=224,
            local_size=96, num_local_crops=10, warmup=128, measure=1536)
QUICK = dict(images=384, short_min=40, short_max=64, row_group=64, global_size=32,
             local_size=16, num_local_crops=2, warmup=64, measure=192)


def make_data(path: Path, a) -> dict:
    """The Parquet set (deterministic for a seed); returns a description."""
    t = pq.read_table(SOURCE, columns=["image", "label"])
    src, labels = t.column("image").to_pylist(), t.column("label").to_pylist()
    rng = np.random.default_rng(a.seed)
    out, pixels = [], []
    for i in range(a.images):
        img = Image.open(io.BytesIO(src[i % len(src)])).convert("RGB")
        short = int(rng.integers(a.short_min, a.short_max + 1))
        ratio = (4 / 3, 3 / 4, 1.0)[int(rng.integers(0, 3))]
        w, h = (round(short * ratio), short) if ratio >= 1 else (short, round(short / ratio))
        arr = np.asarray(img.resize((w, h), Image.BICUBIC), np.float32) + rng.normal(0.0, a.grain, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
        pixels.append(w * h)
    pq.write_table(pa.table({"image": pa.array(out, pa.binary()), "label": pa.array(
        [labels[i % len(src)] for i in range(a.images)], pa.int64())}), path, row_group_size=a.row_group)
    return {"rows": a.images, "row_group_rows": a.row_group, "short_side": [a.short_min, a.short_max],
            "grain": a.grain, "mean_megapixels": float(np.mean(pixels)) / 1e6,
            "mean_jpeg_bytes": float(np.mean([len(b) for b in out]))}


# ---------------------------------------------------------------------------- reference path
def reference_transforms(c: CropConfig):
    """(global crop 1, global crop 2, local crop) torchvision pipelines on PIL images, with the
    probabilities and ranges of ``CropConfig``; DINO's blur: PIL's with a radius ~ U[sigma]."""
    import torchvision.transforms as T

    blur = T.Lambda(lambda im: im.filter(ImageFilter.GaussianBlur(random.uniform(*c.blur_sigma))))

    def one(size, scale, blur_p, sol_p):
        return T.Compose([
            T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=c.flip_p),
            T.RandomApply([T.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue)], p=c.jitter_p),
            T.RandomGrayscale(p=c.grayscale_p),
            T.RandomApply([blur], p=blur_p),
            T.RandomSolarize(c.solarize_threshold, p=sol_p),
            T.PILToTensor()])

    return (one(c.global_size, c.global_scale, c.blur_p[0], c.solarize_p[0]),
            one(c.global_size, c.global_scale, c.blur_p[1], c.solarize_p[1]),
            one(c.local_size, c.local_scale, c.blur_p[2], c.solarize_p[2]))


class ReferenceDataset(torch.utils.data.Dataset):
    """Encoded bytes -> PIL decode -> per-crop torchvision transforms -> uint8 tensors."""

    def __init__(self, images: list, crops: CropConfig):
        self.images, self.crops, self._t = images, crops, None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        if self._t is None:
            self._t = reference_transforms(self.crops)
        g1, g2, loc = self._t
        img = Image.open(io.BytesIO(self.images[i])).convert("RGB")
        return {"global_crops": torch.stack([g1(img), g2(img)]),
                "local_crops": torch.stack([loc(img) for _ in range(self.crops.num_local_crops)])}


# ---------------------------------------------------------------------------- measuring
def decode_compare(jpegs: list, crops: CropConfig) -> dict:
    """CPU-ms per image (one thread), [decode, decode + crops (batches of 64)], the full decode vs
    training's (draft), 2nd of 2 rounds; ``drafted``: the share of the images it reduces."""
    from massl_ray.data import images, multicrop
    mc = multicrop.MultiCrop(crops)
    out = {"drafted": np.mean([mc.reduction(*Image.open(io.BytesIO(d)).size) > 1 for d in jpegs])}
    for name, fn in 2 * (("full", images.decode_image), ("draft", lambda d: mc.decode(d)[0])):
        t0, imgs = time.process_time(), [fn(d) for d in jpegs]
        t1, _ = time.process_time(), [mc(imgs[i:i + BATCH], torch.Generator()) for i in range(0, len(imgs), BATCH)]
        out[name] = [1e3 * (t - t0) / len(jpegs) for t in (t1, time.process_time())]
    return out


def tree_cpu_s(root: int) -> float:
    """utime + stime (s) of ``root`` and all its live descendants, from /proc."""
    tick, parent, cpu = os.sysconf("SC_CLK_TCK"), {}, {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)], cpu[int(d)] = int(rest[1]), (int(rest[11]) + int(rest[12])) / tick
    total, todo = 0.0, [root]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += [c for c, pp in parent.items() if pp == p]
    return total


def measure(batches, warmup: int, count: int, crops: CropConfig) -> dict:
    """Time ``count`` images after ``warmup`` images of ``batches``."""
    expect = ((2, 3, crops.global_size, crops.global_size),
              (crops.num_local_crops, 3, crops.local_size, crops.local_size))
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    first = t_warm = cpu0 = None
    seen = measured = 0
    for b in batches:
        g, lc = b["global_crops"], b["local_crops"]
        if first is None:
            first = time.perf_counter()
            if g.dtype != torch.uint8 or (tuple(g.shape[1:]), tuple(lc.shape[1:])) != expect:
                raise RuntimeError(f"unexpected batch: {g.dtype} {tuple(g.shape)}, {tuple(lc.shape)}")
        if t_warm is not None:
            measured += int(g.shape[0])
            if measured >= count:
                break
        seen += int(g.shape[0])
        if t_warm is None and seen >= warmup:
            t_warm, cpu0 = time.perf_counter(), tree_cpu_s(os.getpid())
    end = time.perf_counter()
    if t_warm is None or measured < count:
        raise RuntimeError(f"the path stopped after {seen} images (needed {warmup} + {count})")
    cpu, wall = tree_cpu_s(os.getpid()) - cpu0, end - t_warm
    return {"startup_s": first - t0, "warmup_s": t_warm - t0, "images": measured, "wall_s": wall,
            "img_s": measured / wall, "cpu_s": cpu, "cores_busy": cpu / wall,
            "cpu_s_per_image": cpu / measured, "load1_before": load0, "load1_after": os.getloadavg()[0]}


def gpu_rate_default() -> tuple[float, str]:
    res = BENCH / "results" / "gpu_step.json"
    try:
        r = json.loads(res.read_text())
        if str(r.get("device", "")).startswith("cuda") and not r["setting"].get("tiny"):
            best = max((p for k, p in r["paths"].items() if k != "reference" and "images_per_s" in p),
                       key=lambda p: p["images_per_s"])
            return best["images_per_s"], f"measured: {best['variant']} on {r['device_name']} ({res.name})"
    except (OSError, KeyError, ValueError, TypeError):
        pass
    w, _, _ = cost_model.recipe("vit_s16_800ep")
    return (cost_model.images_per_s(w, cost_model.PEAK_BF16["H100 SXM"], 0.40),
            "estimate: ViT-S/16 at 40% MFU on an H100 SXM (cost_model.py)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: small images and crops")
    for k in ("images", "short_min", "short_max", "row_group", "warmup", "measure"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                       help=f"default {FULL[k]} (quick {QUICK[k]})")
    p.add_argument("--grain", type=float, default=12.0, help="std of the grain (0..255 scale)")
    p.add_argument("--cpus", type=int, default=2, help="Ray num_cpus = DataLoader workers = N")
    p.add_argument("--rounds", type=int, default=1, help="repeat both loaders (medians)")
    p.add_argument("--set", nargs="*", default=[], metavar="data.KEY=VALUE",
                   help="config overrides for the feed (e.g. data.decode_rows=128)")
    p.add_argument("--object-store-mib", type=int, default=None, help="default 1536 (quick 256)")
    p.add_argument("--gpu-images-per-s", type=float, default=None, help="GPU rate to feed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-temp-dir", default=None, help="Ray's temp dir (default: Ray's)")
    p.add_argument("--out", default=str(BENCH / "results" / "ingest.json"))
    p.add_argument("--draft-compare", action="store_true", help="decode ms/img, full vs draft")
    a = p.parse_args(argv)
    base = QUICK if a.quick else FULL
    vars(a).update({k: v for k, v in base.items() if getattr(a, k, None) is None})
    a.object_store_mib = a.object_store_mib or (256 if a.quick else 1536)
    if a.warmup + a.measure + 2 * BATCH > a.images and not a.draft_compare:
        p.error("--images must exceed --warmup + --measure by two batches")
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **os.environ})
    crops = CropConfig(**{k: base[k] for k in ("global_size", "local_size", "num_local_crops")})
    t_start, load_start = time.time(), os.getloadavg()
    data = (work := Path(tempfile.mkdtemp(prefix="massl_ingest_"))) / "data.parquet"
    info = make_data(data, a)
    jpegs = pq.read_table(data, columns=["image"]).column("image").to_pylist()
    print(f"ingest: {a.images} JPEGs, {info['mean_megapixels']:.3f} MPix, "
          f"{info['mean_jpeg_bytes'] / 1024:.1f} KiB on average; crops 2 x {crops.global_size} + "
          f"{crops.num_local_crops} x {crops.local_size}, batch {BATCH}, N = {a.cpus}; load "
          f"average {load_start[0]:.2f} on {os.cpu_count()} cores", flush=True)
    if a.draft_compare:  # one thread: process_time is then the CPU of one core
        torch.set_num_threads(1)
        print(json.dumps(finite(decode_compare(jpegs, crops))))
        return shutil.rmtree(work, ignore_errors=True) or 0

    import ray

    from massl_ray.config import apply_overrides
    from massl_ray.data.feed import iter_batches
    from massl_ray.data.sources import open_source

    src = open_source(str(data))
    cfg = Config(crops=crops)
    cfg.data.train, cfg.data.decode_cpus = str(data), 1.0
    cfg.optim.batch_size_per_worker, cfg.optim.epochs, cfg.run.num_workers = BATCH, 1, 1
    cfg.optim.steps_per_epoch = src.num_rows // BATCH
    cfg = apply_overrides(cfg, a.set).validate()
    stop = min(cfg.optim.steps_per_epoch, -(-(a.warmup + a.measure) // BATCH) + 1)
    runs: dict = {"reference": [], "feed": []}
    try:
        for rnd in range(a.rounds):
            loader = torch.utils.data.DataLoader(
                ReferenceDataset(jpegs, crops), batch_size=BATCH, shuffle=True,
                num_workers=a.cpus, persistent_workers=True,
                multiprocessing_context="spawn" if ray.is_initialized() else "fork")
            runs["reference"].append(measure(iter(loader), a.warmup, a.measure, crops))
            del loader
            if not ray.is_initialized():
                ray.init(num_cpus=a.cpus, object_store_memory=a.object_store_mib * 2**20,
                         include_dashboard=False, log_to_driver=False, _temp_dir=a.ray_temp_dir)
            runs["feed"].append(measure(iter_batches(cfg, src, 0, stop), a.warmup, a.measure, crops))
            for name, r in runs.items():
                r = r[-1]
                print(f"  round {rnd + 1} {name:<9} start-up {r['startup_s']:5.1f} s  {r['img_s']:7.1f}"
                      f" img/s  cores busy {r['cores_busy']:.2f}  {1e3 * r['cpu_s_per_image']:.1f} "
                      f"CPU-ms/img  load {r['load1_before']:.1f}->{r['load1_after']:.1f}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    paths = {name: {**{k: statistics.median(r[k] for r in rs) for k in
                       ("img_s", "cores_busy", "cpu_s_per_image", "startup_s")}, "runs": rs}
             for name, rs in runs.items()}
    for r in paths.values():
        r["img_s_per_core"] = r["img_s"] / a.cpus
    ratio = paths["feed"]["img_s_per_core"] / paths["reference"]["img_s_per_core"]
    feed_cpu = paths["feed"]["cpu_s_per_image"]  # a short window may read 0 ticks
    cpu_ratio = paths["reference"]["cpu_s_per_image"] / feed_cpu if feed_cpu else float("nan")
    gpu_rate, gpu_src = ((a.gpu_images_per_s, "--gpu-images-per-s") if a.gpu_images_per_s
                         else gpu_rate_default())
    cores = cost_model.cpu_cores_per_gpu(gpu_rate, feed_cpu)
    print(f"\n{'path':<10} {'img/s':>8} {'img/s/core':>11} {'cores busy':>11} {'CPU-ms/img':>11} {'start-up':>9}")
    for k, r in paths.items():
        print(f"{k:<10} {r['img_s']:>8.1f} {r['img_s_per_core']:>11.1f} {r['cores_busy']:>11.2f} "
              f"{1e3 * r['cpu_s_per_image']:>11.2f} {r['startup_s']:>8.1f}s")
    print(f"feed / reference: {ratio:.2f}x img/s per core, {cpu_ratio:.2f}x less CPU per image")
    print(f"feed CPUs per GPU for a data-wait <= 5% at {gpu_rate:.0f} img/s ({gpu_src}): {cores}")
    result = {
        "setting": {"quick": a.quick, "cpus": a.cpus, "batch_size": BATCH, "rounds": a.rounds,
                    "warmup": a.warmup, "measure": a.measure, "overrides": a.set,
                    "crops": {k: base[k] for k in ("global_size", "local_size", "num_local_crops")},
                    "feed": {k: getattr(cfg.data, k) for k in ("decode_rows", "decode_cpus",
                                                              "read_cpus", "window_groups")}},
        "data": info, "paths": paths, "core_seconds_per_image": feed_cpu,
        "ratios": {"feed/reference img_s_per_core": ratio, "reference/feed cpu_s_per_image": cpu_ratio},
        "gpu_images_per_s": gpu_rate, "gpu_images_per_s_source": gpu_src, "cores_per_gpu": cores,
        "machine": {"cpu_count": os.cpu_count(), "load_avg_start": load_start,
                    "load_avg_end": os.getloadavg(), "wall_s": time.time() - t_start,
                    "torch": torch.__version__}}
    (out := Path(a.out)).parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(result), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
