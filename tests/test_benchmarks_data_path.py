"""benchmarks/data_path.py --quick runs end to end: the generated class-sorted set, the reference
DataLoader, today's exact and stream paths from a worktree of the old commit, and the new path,
each with its figures. Timing targets are not asserted: the shared CI machine is too noisy."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ray


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _old_commit_present() -> bool:
    p = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", "c95e937^{commit}"],
                       capture_output=True)
    return p.returncode == 0


@pytest.mark.timeout(240)
def test_data_path_benchmark_quick(tmp_path):
    if not _old_commit_present():
        pytest.skip("no git history with commit c95e937 (shallow clone)")
    ray_dir = tempfile.mkdtemp(prefix="mrd_", dir="/tmp")  # Ray's socket paths must stay short
    old_root = Path(tempfile.mkdtemp(prefix="mro_", dir="/tmp")) / "old"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    out = tmp_path / "data_path.json"
    try:
        p = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "data_path.py"), "--quick",
             "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
             "--old-root", str(old_root), "--ray-temp-dir", ray_dir],
            cwd=str(REPO), env=env, capture_output=True, text=True, timeout=230)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_root)],
                       capture_output=True)
        shutil.rmtree(old_root.parent, ignore_errors=True)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    res = json.loads(out.read_text())
    d = res["data"]
    assert d["rows"] == 512 and d["class_sorted"] and not d["cached"]
    labels = pq.read_table(d["path"], columns=["label"]).column("label").to_pylist()
    assert labels == sorted(labels) and len(set(labels)) == 4  # class-sorted storage order
    assert res["setting"]["old_commit"].startswith("c95e937")
    for name in ("reference", "old_exact", "old_stream", "new"):
        r = res["paths"][name]
        assert r["available"] and _positive(r["img_s"]) and _positive(r["img_s_per_core"])
        # a quick window is a few batches: the CPU reading may round down to 0
        assert math.isfinite(r["cores_busy"]) and r["cores_busy"] >= 0 and _positive(r["startup_s"])
        assert all(run["images"] >= 256 for run in r["runs"])
        if name != "reference":
            ratio = res["ratios_per_core_over_reference"][f"{name}/reference"]
            assert _positive(ratio)
            assert f"{name:<11}" in p.stdout
