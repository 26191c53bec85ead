"""benchmarks/scale.py --quick runs (no Ray, nothing decoded) and writes the figures it promises:
the new plan reads each row group exactly once per epoch, today's full shuffle many times."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ORDERS = ("today_full", "today_blocks", "plan")
COMMON = ("reads_per_row_group", "reads_per_row_group_max", "tasks_per_step",
          "object_store_bytes", "planner_s_per_rank_epoch", "planner_peak_mib_per_rank",
          "classes_per_global_batch", "classes_per_rank_batch", "quality_global", "quality_rank",
          "resume_rows_decoded_before")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_run_writes_the_table_and_json(tmp_path):
    out = tmp_path / "scale.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), "--quick",
                           "--out", str(out)], cwd=str(REPO), env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| W | B | order |" in proc.stdout and "Window sweep" in proc.stdout
    res = json.loads(out.read_text())
    assert {"params", "assumptions", "configs", "window_sweep"} <= set(res)
    p = res["params"]
    assert p["quick"] is True and p["worlds"] == [8, 64, 256]
    assert p["global_batches"] == [1024, 4096]
    assert len(res["configs"]) == 6
    for c in res["configs"]:
        assert c["rank_batch"] * c["world"] == c["global_batch"]
        for name in ORDERS:
            x = c[name]
            for k in COMMON:
                assert _num(x[k]), (name, k, x.get(k))
            assert x["resume_rows_decoded_before"] == 0
        plan, full = c["plan"], c["today_full"]
        assert plan["reads_per_row_group"] == 1.0 and plan["reads_per_row_group_max"] == 1
        assert full["reads_per_row_group"] > 1.0  # today's full shuffle re-reads row groups
        assert full["tasks_per_step"] == c["world"]
        if c["world"] >= 64:  # today: one task per rank per step; the plan's do not grow with W
            assert plan["tasks_per_step"] < full["tasks_per_step"]
        assert plan["resume_windows_not_wholly_used"] <= 1
        assert 0 <= plan["resume_rows_read_unused"] < plan["resume_window_rows"]
        assert plan["object_store_resident_bound_bytes"] < plan["object_store_bytes"]
        assert 0.999 < full["quality_global"] < 1.001  # the reference itself
    per_b = {}
    for c in res["configs"]:
        per_b.setdefault(c["global_batch"], set()).add(round(c["plan"]["tasks_per_step"], 9))
    assert all(len(v) == 1 for v in per_b.values()), per_b  # independent of the world size
    ks = [e["window_groups"] for e in res["window_sweep"]]
    assert ks == sorted(ks)
    for e in res["window_sweep"]:
        for per in e["quality"].values():
            assert all(_num(v) and 0 < v <= 1.2 for v in per.values())
