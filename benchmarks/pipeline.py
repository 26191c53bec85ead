#!/usr/bin/env python
"""Multi-crop ingest benchmark: massl_ray's Ray Data pipeline against a per-image PIL reference.

Both paths read the same encoded images (JPEG bytes in a Parquet file) and produce the same
crops: ``global_crops`` uint8 [B, 2, 3, G, G] and ``local_crops`` uint8 [B, L, 3, S, S] with
DINO's recipe (RandomResizedCrop bicubic, flip, ColorJitter p=0.8, grayscale, Gaussian blur,
solarisation; the probabilities and ranges of ``massl_ray.config.CropConfig``), batches of 64.

* ``ray_exact`` (massl_ray's only training order, ``data.order=exact``): what a train worker
  gets, one epoch per pass through ``massl_ray.data.feed.iter_batches`` (the feed coordinator's
  read task per row group, decode tasks of ``data.decode_rows`` positions, the rank's pieces
  fetched from the object store). The Ray Data streaming-shuffle variants this benchmark also
  measured (``ray``, ``ray_one_block``, ``ray_cached``: ``data.order=stream``) were removed with
  that order; their figures stay in docs/performance.md section 8.
* ``reference``: a ``torch.utils.data.Dataset`` that decodes each image with PIL and applies a
  ``torchvision.transforms`` pipeline per crop (2 global + L local, ending in ``PILToTensor``;
  the blur is DINO's PIL ``GaussianBlur(radius=sigma)`` unless ``--ref-blur torchvision``),
  in a ``DataLoader(num_workers=N, batch_size=64, shuffle=True, persistent_workers=True)`` with
  spawned workers (the parent process runs Ray; forking it is unsafe).

Everything runs in one process: Ray is started once, the DataLoader workers once, and the paths
take turns pass by pass (reference, ray_exact, then the next
round in reverse order), so that a change of load on the shared machine hits every path alike. The first pass of each path is
a warm-up: its time to the first batch is reported as the path's **start-up** (Ray: worker
processes importing torch, the read and the shuffle; DataLoader: spawning the workers) and is
excluded from the rates. Each later pass reports

* ``steady``: rows after the first batch / time from the first to the last batch (the rate once
  the pipeline delivers; meaningless when the first batch arrives only after most of the work,
  which is flagged as ``streams: false``);
* ``pass``: rows / wall time of the whole pass, first-batch latency included (the per-epoch rate
  a training loop sees: Ray Data re-executes its plan every epoch).

The headline ratio is ``ours / reference`` on the median ``pass`` rate of the measured passes
(robust when a path does not stream); the ``steady`` ratio is printed next to it. Rates per core
divide by N. The load average (``os.getloadavg``) is recorded with every pass.

Settings (``--setting``):

* ``cifar``: the quick-start images (32 x 32 JPEG, ``jobs/data/cifar10-quick/train.parquet``),
  32 px global / 16 px local crops, L = 4.
* ``imagenet``: JPEGs larger than 224 px made at start-up by upscaling CIFAR images (bicubic) to
  random sizes in [256, 320] x [256, 320] and re-encoding them (quality 90) into a Parquet file
  in a temporary directory; 224 / 96 crops, L = 10.

Usage::

    python benchmarks/pipeline.py --setting cifar                 # 5000 images, N = 2 CPUs
    python benchmarks/pipeline.py --setting imagenet --cpus 2
    python benchmarks/pipeline.py --quick                         # CI: a few hundred images
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._shared import finite  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from massl_ray.config import Config, CropConfig  # noqa: E402
from massl_ray.data.multicrop import blur_kernel_size  # noqa: E402

CIFAR = REPO / "jobs" / "data" / "cifar10-quick" / "train.parquet"
BATCH = 64
SETTINGS = {
    "cifar": dict(global_size=32, local_size=16, num_local_crops=4, images=5000),
    "imagenet": dict(global_size=224, local_size=96, num_local_crops=10, images=1024),
}
QUICK_IMAGES = {"cifar": 384, "imagenet": 96}
ALL_PATHS = ("reference", "ray_exact")


# ---------------------------------------------------------------------------- data
def prepare_data(setting: str, images: int, workdir: Path, seed: int) -> tuple[Path, dict]:
    """The Parquet file both paths read, and a description of it."""
    table = pq.read_table(CIFAR, columns=["image", "label"])
    n_src = table.num_rows
    if setting == "cifar":
        if images >= n_src:
            return CIFAR, {"file": str(CIFAR), "rows": n_src, "generated": False}
        path = workdir / "cifar_subset.parquet"
        pq.write_table(table.slice(0, images), path)
        return path, {"file": "first %d rows of %s" % (images, CIFAR), "rows": images,
                      "generated": True}
    rng = np.random.default_rng(seed)
    raw = table.column("image").to_pylist()
    labels = table.column("label").to_numpy()
    out, sizes, lab = [], [], []
    for i in range(images):
        j = i % n_src
        im = Image.open(io.BytesIO(raw[j])).convert("RGB")
        w, h = int(rng.integers(256, 321)), int(rng.integers(256, 321))
        im = im.resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
        sizes.append((w, h))
        lab.append(int(labels[j]))
    path = workdir / "imagenet_like.parquet"
    pq.write_table(pa.table({"image": pa.array(out, pa.binary()),
                             "label": pa.array(lab, pa.int16())}), path)
    nbytes = [len(b) for b in out]
    return path, {"file": "generated: %d CIFAR images upscaled (bicubic) to [256, 320]^2, JPEG q90"
                          % images, "rows": images, "generated": True,
                  "mean_jpeg_bytes": float(np.mean(nbytes)),
                  "mean_side_px": float(np.mean([s for wh in sizes for s in wh]))}


def read_encoded(path: Path) -> tuple[list[bytes], np.ndarray]:
    t = pq.read_table(path, columns=["image", "label"])
    return t.column("image").to_pylist(), t.column("label").to_numpy().astype(np.int64)


# ---------------------------------------------------------------------------- reference path
class PILGaussianBlur:
    """DINO's blur: PIL ``ImageFilter.GaussianBlur`` with a radius ~ U[sigma]."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        r = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=r))


def reference_transforms(c: CropConfig, blur: str = "pil"):
    """(global crop 1, global crop 2, local crop) torchvision pipelines on PIL images."""
    import torchvision.transforms as T

    def one(size: int, scale, blur_p: float, sol_p: float):
        if blur == "pil":
            blur_t = PILGaussianBlur(tuple(c.blur_sigma))
        else:
            blur_t = T.GaussianBlur(blur_kernel_size(size), sigma=tuple(c.blur_sigma))
        return T.Compose([
            T.RandomResizedCrop(size, scale=tuple(scale),
                                interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=c.flip_p),
            T.RandomApply([T.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue)],
                          p=c.jitter_p),
            T.RandomGrayscale(p=c.grayscale_p),
            T.RandomApply([blur_t], p=blur_p),
            T.RandomSolarize(c.solarize_threshold, p=sol_p),
            T.PILToTensor(),
        ])

    return (one(c.global_size, c.global_scale, c.blur_p[0], c.solarize_p[0]),
            one(c.global_size, c.global_scale, c.blur_p[1], c.solarize_p[1]),
            one(c.local_size, c.local_scale, c.blur_p[2], c.solarize_p[2]))


class ReferenceDataset(torch.utils.data.Dataset):
    """Encoded bytes -> PIL decode -> per-crop torchvision transforms -> uint8 tensors."""

    def __init__(self, images: list[bytes], labels: np.ndarray, crops: CropConfig,
                 blur: str = "pil"):
        self.images, self.labels, self.crops, self.blur = images, labels, crops, blur
        self._t = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        if self._t is None:
            self._t = reference_transforms(self.crops, self.blur)
        g1, g2, loc = self._t
        img = Image.open(io.BytesIO(self.images[i])).convert("RGB")
        g = torch.stack([g1(img), g2(img)])
        if self.crops.num_local_crops:
            lc = torch.stack([loc(img) for _ in range(self.crops.num_local_crops)])
        else:
            s = self.crops.local_size
            lc = torch.empty((0, 3, s, s), dtype=torch.uint8)
        return {"global_crops": g, "local_crops": lc, "label": int(self.labels[i])}


# ---------------------------------------------------------------------------- Ray paths
# Each Ray path is massl_ray's own training feed under given data settings.
RAY_VARIANTS = {
    "ray_exact": {"order": "exact"},             # the epoch plan: row groups read once, decode tasks
}


def ray_dataset(variant: str, cfg: Config, src):
    import copy

    c = copy.deepcopy(cfg)
    for k, v in RAY_VARIANTS[variant].items():
        setattr(c.data, k, v)
    c.validate()
    return None, c  # the feed, one epoch per pass (exact_pass)


def exact_pass(cfg: Config, src, epoch: int):
    """One epoch of rank 0 of 1 in the exact data order, as a train worker streams it
    (massl_ray.data.feed: read tasks per row group, decode tasks, the coordinator's pieces)."""
    import copy

    from massl_ray.data.feed import iter_batches

    c = copy.deepcopy(cfg)
    c.optim.batch_size_per_worker = BATCH
    c.optim.steps_per_epoch = spe = src.num_rows // BATCH
    c.optim.epochs = epoch + 1
    return iter_batches(c, src, start_step=epoch * spe, stop_step=(epoch + 1) * spe)


# ---------------------------------------------------------------------------- measurement
def time_pass(batches: Iterator[dict], expect_g: tuple, expect_l: tuple) -> dict:
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    first = None
    rows = rows_after = 0
    for b in batches:
        g, lc = b["global_crops"], b["local_crops"]
        if first is None:
            first = time.perf_counter()
            if g.dtype != torch.uint8 or tuple(g.shape[1:]) != expect_g \
                    or tuple(lc.shape[1:]) != expect_l:
                raise RuntimeError(f"unexpected batch: global {g.dtype} {tuple(g.shape)}, "
                                   f"local {lc.dtype} {tuple(lc.shape)}")
        else:
            rows_after += g.shape[0]
        rows += g.shape[0]
    end, c1 = time.perf_counter(), time.process_time()
    if first is None:
        raise RuntimeError("the pipeline produced no batch")
    wall, steady_t = end - t0, end - first
    return {
        "rows": rows,
        "first_batch_s": first - t0,
        "wall_s": wall,
        "pass_img_s": rows / wall,
        "steady_img_s": rows_after / steady_t if steady_t > 0 and rows_after else float("nan"),
        # streaming: the first batch arrived within the first half of the pass
        "streams": (first - t0) < 0.5 * wall,
        # CPU of this (consuming) process during the pass, all threads: Ray's driver-side
        # executor + batch formatting, or the DataLoader's main process
        "consumer_cpu_s": c1 - c0,
        "load1_before": load0,
        "load1_after": os.getloadavg()[0],
    }


def summarise(name: str, passes: list[dict], cpus: int) -> dict:
    measured = passes[1:]
    pass_rates = [p["pass_img_s"] for p in measured]
    steady = [p["steady_img_s"] for p in measured if math.isfinite(p["steady_img_s"])]
    out = {
        "path": name,
        "startup_s": passes[0]["first_batch_s"],
        "warmup_pass": passes[0],
        "passes": measured,
        "pass_img_s": statistics.median(pass_rates),
        "steady_img_s": statistics.median(steady) if steady else float("nan"),
        "first_batch_s_warm": statistics.median(p["first_batch_s"] for p in measured),
        "streams": all(p["streams"] for p in measured),
    }
    out["pass_img_s_per_core"] = out["pass_img_s"] / cpus
    out["steady_img_s_per_core"] = out["steady_img_s"] / cpus
    return out




def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cifar")
    p.add_argument("--cpus", type=int, default=2,
                   help="Ray num_cpus = DataLoader num_workers = N (default 2)")
    p.add_argument("--images", type=int, default=None,
                   help="rows per pass (default: cifar 5000, imagenet 1024; quick: 384 / 96)")
    p.add_argument("--rounds", type=int, default=None,
                   help="measured passes per path, interleaved (default 3; quick 1)")
    p.add_argument("--paths", default=None,
                   help="comma-separated subset of %s (default all; quick: reference,ray_exact)"
                        % ",".join(ALL_PATHS))
    p.add_argument("--ref-blur", choices=["pil", "torchvision"], default="pil",
                   help="reference blur: PIL ImageFilter.GaussianBlur(radius=sigma) as DINO's code "
                        "does (default: the faster, i.e. stronger, baseline) or torchvision's "
                        "GaussianBlur (the exact kernel massl_ray matches; ~30x slower on PIL "
                        "images at 224 px)")
    p.add_argument("--set", nargs="*", default=[], metavar="data.KEY=VALUE",
                   help="config overrides for every Ray path (e.g. data.decode_rows=128)")
    p.add_argument("--quick", action="store_true", help="CI-sized: few hundred images, 1 round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--object-store-mib", type=int, default=None,
                   help="Ray object store (default 512 MiB; imagenet 1024 MiB)")
    p.add_argument("--ray-temp-dir", default=None, help="Ray's temp dir (default: Ray's)")
    p.add_argument("--out", default=None,
                   help="JSON output (default benchmarks/results/pipeline[_<setting>].json)")
    a = p.parse_args(argv)
    if a.images is None:
        a.images = QUICK_IMAGES[a.setting] if a.quick else SETTINGS[a.setting]["images"]
    if a.rounds is None:
        a.rounds = 1 if a.quick else 3
    if a.object_store_mib is None:
        a.object_store_mib = 1024 if a.setting == "imagenet" else 512
    if a.paths is None:
        a.paths = "reference,ray_exact" if a.quick else ",".join(ALL_PATHS)
    a.paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    bad = set(a.paths) - set(ALL_PATHS)
    if bad or not a.paths:
        p.error(f"--paths: unknown {sorted(bad)}")
    if a.cpus < 1 or a.images < BATCH or a.rounds < 1:
        p.error("need --cpus >= 1, --images >= 64, --rounds >= 1")
    if a.out is None:
        name = "pipeline.json" if a.setting == "cifar" else f"pipeline_{a.setting}.json"
        a.out = str(REPO / "benchmarks" / "results" / name)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    # iter_torch_batches wraps Ray's read-only arrays (the consumer here only counts rows)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    s = SETTINGS[a.setting]
    crops = CropConfig(global_size=s["global_size"], local_size=s["local_size"],
                       num_local_crops=s["num_local_crops"])
    expect_g = (2, 3, crops.global_size, crops.global_size)
    expect_l = (crops.num_local_crops, 3, crops.local_size, crops.local_size)
    workdir = Path(tempfile.mkdtemp(prefix="massl_bench_pipeline_"))
    t_start = time.time()
    load_start = os.getloadavg()
    try:
        data_path, data_info = prepare_data(a.setting, a.images, workdir, a.seed)
        print(f"multi-crop ingest, setting {a.setting}: {data_info['rows']} images "
              f"({data_info['file']}), global {crops.global_size} px x 2, local "
              f"{crops.local_size} px x {crops.num_local_crops}, batch {BATCH}, N = {a.cpus} "
              f"CPU(s); load average {load_start[0]:.2f} on {os.cpu_count()} cores", flush=True)
        makers = {}
        if "reference" in a.paths:
            images, labels = read_encoded(data_path)
            loader = torch.utils.data.DataLoader(
                ReferenceDataset(images, labels, crops, a.ref_blur), batch_size=BATCH,
                shuffle=True, num_workers=a.cpus, persistent_workers=True,
                multiprocessing_context="spawn")
            makers["reference"] = lambda: iter(loader)
        ray_paths = [x for x in a.paths if x != "reference"]
        if ray_paths:
            import ray

            from massl_ray.data.sources import open_source

            ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=a.object_store_mib * 2**20, _temp_dir=a.ray_temp_dir)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            cfg = Config(crops=crops)
            cfg.data.train = str(data_path)
            cfg.data.decode_batch_size = BATCH
            cfg.data.decode_cpus = 1.0
            if a.set:
                from massl_ray.config import apply_overrides

                cfg = apply_overrides(cfg, a.set)
            src = open_source(str(data_path))

            built = {}
            for v in ray_paths:
                t0 = time.perf_counter()
                built[v] = ray_dataset(v, cfg, src)  # once, as the trainer does; re-run per pass
                built[v] = built[v] + (time.perf_counter() - t0,)

            epochs = {"n": 0}

            def ray_maker(variant):
                def make():
                    ds = built[variant][0]
                    if ds is None:  # exact order: the feed's batches of the next epoch
                        it = exact_pass(built[variant][1], src, epochs["n"])
                        epochs["n"] += 1
                        return it
                    return iter(ds.iter_torch_batches(batch_size=BATCH,
                                                      prefetch_batches=cfg.data.prefetch_batches))
                return make

            for v in ray_paths:
                makers[v] = ray_maker(v)
            ray_cfg = {"decode_batch_size": cfg.data.decode_batch_size,
                       "decode_cpus": cfg.data.decode_cpus,
                       "prefetch_batches": cfg.data.prefetch_batches,
                       "shuffle": cfg.data.shuffle, "overrides": a.set,
                       "variants": {v: {"order": built[v][1].data.order,
                                        "decode_rows": built[v][1].data.decode_rows,
                                        "build_s": built[v][2]} for v in ray_paths}}
        else:
            ray_cfg = {}

        order = [x for x in ALL_PATHS if x in a.paths]
        passes: dict[str, list] = {k: [] for k in order}
        for rnd in range(a.rounds + 1):  # round 0 = warm-up pass of every path
            seq = order if rnd % 2 == 0 else order[::-1]
            for name in seq:
                r = time_pass(makers[name](), expect_g, expect_l)
                r["round"] = rnd
                passes[name].append(r)
                tag = "warm-up" if rnd == 0 else f"round {rnd}"
                print(f"  {tag:<8} {name:<13} first batch {r['first_batch_s']:6.2f} s  "
                      f"pass {r['pass_img_s']:8.1f} img/s  steady {r['steady_img_s']:8.1f} img/s  "
                      f"consumer cpu {r['consumer_cpu_s'] / r['wall_s']:4.0%}  "
                      f"load {r['load1_before']:.1f}->{r['load1_after']:.1f}", flush=True)

        res = {k: summarise(k, v, a.cpus) for k, v in passes.items()}
        ratios = {}
        if "reference" in res:
            ref = res["reference"]
            for k in res:
                if k != "reference":
                    paired = [p["pass_img_s"] / q["pass_img_s"]
                              for p, q in zip(res[k]["passes"], ref["passes"])]
                    ratios[f"{k}/reference"] = {
                        "pass": res[k]["pass_img_s"] / ref["pass_img_s"],
                        "steady": res[k]["steady_img_s"] / ref["steady_img_s"],
                        # per round (the two passes ran back to back), then the median
                        "pass_paired_median": statistics.median(paired),
                        "pass_paired": paired,
                    }
        load_end = os.getloadavg()

        print(f"\n{'path':<14} {'img/s':>8} {'img/s/core':>11} {'steady img/s':>13} "
              f"{'streams':>8} {'start-up':>9} {'1st batch (warm)':>17}")
        for k, r in res.items():
            print(f"{k:<14} {r['pass_img_s']:>8.1f} {r['pass_img_s_per_core']:>11.1f} "
                  f"{r['steady_img_s']:>13.1f} {str(r['streams']):>8} {r['startup_s']:>8.1f}s "
                  f"{r['first_batch_s_warm']:>16.2f}s")
        for k, v in ratios.items():
            print(f"{k:<21} {v['pass']:.2f}x (whole passes; paired by round "
                  f"{v['pass_paired_median']:.2f}x), {v['steady']:.2f}x (steady state)")
        print(f"\nimg/s: median over {a.rounds} interleaved pass(es) per path of rows / pass wall "
              f"time (warm workers; the first pass of each path is a warm-up, its time to the "
              f"first batch is 'start-up'); steady: rows after the first batch / time after it. "
              f"Per core: / N = {a.cpus}. Load average {load_start[0]:.2f} at start, "
              f"{load_end[0]:.2f} at end ({os.cpu_count()} cores, shared).")
        target = ratios.get("ray_exact/reference", {}).get("pass")  # the packaged default
        if target is not None:
            print(f"target ours >= 1.5x reference: {target >= 1.5} (as packaged, {target:.2f}x)")

        result = {
            "setting": {"name": a.setting, "images": data_info["rows"], "cpus": a.cpus,
                        "batch_size": BATCH, "rounds": a.rounds, "quick": a.quick,
                        "crops": {"global_size": crops.global_size, "local_size": crops.local_size,
                                  "num_local_crops": crops.num_local_crops},
                        "reference_blur": a.ref_blur, "ray": ray_cfg},
            "data": data_info,
            "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor()
                        or platform.machine(), "torch": torch.__version__,
                        "load_avg_start": load_start, "load_avg_end": load_end,
                        "wall_s": time.time() - t_start},
            "paths": res,
            "ratios_ours_over_reference": ratios,
            "target": {"ratio": 1.5, "metric": "ray_exact/reference pass img/s",
                       "met": None if target is None else bool(target >= 1.5)},
        }
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(finite(result), indent=2))
        print(f"wrote {out}")
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
