"""benchmarks/loss.py --tiny runs end to end and its two paths agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_loss_benchmark_tiny(tmp_path):
    out = tmp_path / "loss.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "loss.py"), "--tiny", "--device", "cpu",
         "--warmup", "1", "--repeats", "3", "--out", str(out)],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "massl_ray" in proc.stdout and "reference" in proc.stdout
    res = json.loads(out.read_text())

    assert res["setting"]["views"] == 4 and res["setting"]["memory_size"] == 1024
    assert res["setting"]["block_size"] == 256 and res["setting"]["num_blocks"] == 4
    check = res["check"]
    assert check["losses_match"] and check["grads_match"] and check["memory_after_update_equal"]
    assert check["loss_rel_diff"] <= 1e-4
    assert abs(check["loss_ours"] - check["loss_reference"]) <= 1e-4 * abs(check["loss_reference"])
    for path in ("ours", "reference"):
        r = res[path]
        assert r["time_s_median"] > 0 and len(r["times_s"]) == 3
        assert r["peak_mem_abs_bytes"] > 0 and r["peak_mem_step_bytes"] >= 0
    ratios = res["ratios_reference_over_ours"]
    assert ratios["time"] > 0 and ratios["peak_mem_abs"] > 0
