"""benchmarks/pipeline.py and benchmarks/train_step.py --quick run end to end and report both
paths' figures. Timing targets are not asserted: the shared CI machine is too noisy for that."""

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


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@pytest.fixture
def ray_temp_dir():
    # Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep for them.
    d = tempfile.mkdtemp(prefix="mrb_", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run(script: str, ray_dir: str, out: Path, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--out", str(out),
         "--ray-temp-dir", ray_dir],
        cwd=str(REPO), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.timeout(240)
def test_pipeline_benchmark_quick(tmp_path, ray_temp_dir):
    out = tmp_path / "pipeline.json"
    proc = _run("pipeline.py", ray_temp_dir, out, timeout=230)
    assert "reference" in proc.stdout and "ray_exact" in proc.stdout
    res = json.loads(out.read_text())
    s = res["setting"]
    assert s["name"] == "cifar" and s["quick"] and s["cpus"] >= 1
    assert s["crops"] == {"global_size": 32, "local_size": 16, "num_local_crops": 4}
    for path in ("reference", "ray_exact"):  # ray_exact: the default data.order=exact
        r = res["paths"][path]
        assert _positive(r["pass_img_s"]) and _positive(r["pass_img_s_per_core"])
        assert _positive(r["startup_s"])
        assert r["passes"] and all(p["rows"] == res["data"]["rows"] for p in r["passes"])
    assert _positive(res["ratios_ours_over_reference"]["ray_exact/reference"]["pass"])


@pytest.mark.timeout(300)
def test_train_step_benchmark_quick(tmp_path, ray_temp_dir):
    out = tmp_path / "train_step.json"
    proc = _run("train_step.py", ray_temp_dir, out, timeout=290)
    assert "plain" in proc.stdout and "ray" in proc.stdout
    res = json.loads(out.read_text())
    assert res["setting"]["quick"]
    assert _positive(res["plain_equal_threads"]["images_per_s"])
    assert _positive(res["plain_raw"]["images_per_s"])
    assert res["plain_equal_threads"]["runs"][0]["threads"] == 1
    ray_r = res["ray"]
    assert ray_r["steps"] == res["setting"]["ray_steps"]
    steady = ray_r["steady"]
    assert steady["windows"] >= 1 and _positive(steady["images_per_s"])
    assert 0.0 <= steady["data_wait_share"] <= 1.0
    assert _positive(res["ratios"]["ray/plain_equal_threads"])
    assert _positive(res["ratios"]["ray/plain_raw"])
