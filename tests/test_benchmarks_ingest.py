"""benchmarks/ingest.py --quick runs from this tree end to end: the generated JPEG set, the
reference DataLoader (PIL + torchvision) and the training feed on Ray, each with the figures it
prints and writes (img/s, per core, CPU per image, the feed's CPUs per GPU). Timing targets are
not asserted: the shared CI machine is too noisy."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ray


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.timeout(300)
def test_ingest_benchmark_quick(tmp_path):
    out = tmp_path / "ingest.json"
    ray_dir = tempfile.mkdtemp(prefix="mri_", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    try:
        p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ingest.py"), "--quick",
                            "--out", str(out), "--ray-temp-dir", ray_dir],
                           cwd=str(REPO), env=env, capture_output=True, text=True, timeout=280)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    res = json.loads(out.read_text())
    s = res["setting"]
    assert s["quick"] and s["cpus"] == 2 and s["batch_size"] == 64
    assert s["crops"] == {"global_size": 32, "local_size": 16, "num_local_crops": 2}
    assert res["data"]["rows"] == 384 and res["data"]["row_group_rows"] == 64
    assert 40 * 40 <= res["data"]["mean_megapixels"] * 1e6 <= 86 * 86
    for name in ("reference", "feed"):
        r = res["paths"][name]
        assert _positive(r["img_s"]) and _positive(r["startup_s"])
        assert r["img_s_per_core"] == pytest.approx(r["img_s"] / 2)
        # a quick window is a few batches: the CPU reading may round down to 0
        assert math.isfinite(r["cpu_s_per_image"]) and r["cpu_s_per_image"] >= 0
        assert math.isfinite(r["cores_busy"]) and r["cores_busy"] >= 0
        for run in r["runs"]:
            assert run["images"] >= 192
            assert run["cpu_s_per_image"] == pytest.approx(run["cpu_s"] / run["images"])
        assert f"\n{name:<10} " in p.stdout
    assert _positive(res["ratios"]["feed/reference img_s_per_core"])
    assert res["core_seconds_per_image"] == res["paths"]["feed"]["cpu_s_per_image"]
    assert isinstance(res["cores_per_gpu"], int) and res["cores_per_gpu"] >= 0
    assert _positive(res["gpu_images_per_s"])
    assert "feed / reference:" in p.stdout and "feed CPUs per GPU" in p.stdout
