"""benchmarks/restart.py --part restart --quick: a restart reads one checkpoint whatever W."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_restart_benchmark_reads_one_checkpoint_per_restart_whatever_the_world_size(tmp_path):
    out = tmp_path / "restart.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "restart.py"), "--part", "restart",
         "--quick", "--out", str(out)],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())["restart"]
    size = res["checkpoint_bytes"]
    rows = {(r["world_size"], r["mode"]): r for r in res["runs"]}
    assert {w for w, _ in rows} == {1, 2}
    for w in (1, 2):
        now, before = rows[(w, "rank0_broadcast")], rows[(w, "per_rank")]
        assert now["bytes_read_per_rank"] == [size] + [0] * (w - 1)
        assert now["rchar_per_rank"][0] >= size  # the kernel saw rank 0 read it
        assert before["bytes_read_total"] == 3 * w * size
