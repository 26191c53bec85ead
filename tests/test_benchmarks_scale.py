"""benchmarks/scale.py --quick runs (no Ray, nothing decoded, in the test's process) and writes
the figures it promises: the epoch plan reads each row group exactly once per epoch, its Ray
tasks per step do not grow with the world size, a mid-epoch resume reads at most one window it
does not use, and the object store's resident bound is below what flows through it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import scale  # noqa: E402

FIGURES = ("reads_per_row_group", "reads_per_row_group_max", "tasks_per_step",
           "object_store_bytes", "planner_s_per_rank_epoch", "planner_peak_mib_per_rank",
           "classes_per_global_batch", "classes_per_rank_batch", "quality_global", "quality_rank",
           "resume_rows_decoded_before", "driver_task_plan_s")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_run_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert scale.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| W | B | reads / row group (max) |" in printed and "Window sweep" in printed
    res = json.loads(out.read_text())
    assert {"params", "assumptions", "configs", "window_sweep"} <= set(res)
    p = res["params"]
    assert p["quick"] is True and p["worlds"] == [8, 64, 256]
    assert p["global_batches"] == [1024, 4096] and p["row_groups"] == 64
    assert len(res["configs"]) == 6
    for c in res["configs"]:
        assert c["rank_batch"] * c["world"] == c["global_batch"]
        for k in FIGURES:
            assert _num(c[k]), (k, c.get(k))
        assert c["reads_per_row_group"] == 1.0 and c["reads_per_row_group_max"] == 1
        assert c["read_tasks"] == p["row_groups"]
        assert c["resume_rows_decoded_before"] == 0
        assert c["resume_windows_not_wholly_used"] <= 1
        assert 0 <= c["resume_rows_read_unused"] < c["resume_window_rows"]
        assert c["resume_rows_read_unused_worst"] < c["resume_window_rows"]
        assert c["object_store_resident_bound_bytes"] < c["object_store_bytes"]
        assert 0 < c["quality_global"] <= 1.2 and 0 < c["quality_rank"] <= 1.2
    per_b = {}
    for c in res["configs"]:
        per_b.setdefault(c["global_batch"], set()).add(round(c["tasks_per_step"], 9))
    assert all(len(v) == 1 for v in per_b.values()), per_b  # independent of the world size
    ks = [e["window_groups"] for e in res["window_sweep"]]
    assert ks == sorted(ks) == [4, 16, 64]
    for e in res["window_sweep"]:
        for per in e["quality"].values():
            assert all(_num(v) and 0 < v <= 1.2 for v in per.values())
    one_window = res["window_sweep"][-1]  # the whole set in one window: a full shuffle's mixing
    assert one_window["windows"] == 1
    assert all(v > 0.95 for per in one_window["quality"].values() for v in per.values())
