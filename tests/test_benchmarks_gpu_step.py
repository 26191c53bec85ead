"""benchmarks/gpu_step.py --quick runs from this tree (tiny, CPU, in the test's process) and its
two steps agree: massl_ray's Learner.step and the authors' formulation (benchmarks/reference.py)
give the same losses at steps 0 and 1, the same memory after step 0 and the same student update,
and the analytic FLOPs equal FlopCounterMode's. Timing targets are not asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_step  # noqa: E402


@pytest.mark.timeout(300)
def test_gpu_step_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "gpu_step.json"
    assert gpu_step.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())

    s = res["setting"]
    assert s["tiny"] and s["quick"] and res["device"] == "cpu"
    assert (s["warmup"], s["steps"], s["windows"]) == (1, 2, 1)
    assert set(res["paths"]) == {"reference", "massl_ray"}
    for name, r in res["paths"].items():
        assert "error" not in r, (name, r)
        assert r["time_per_step_s"] > 0 and len(r["window_times_s"]) == 1
        assert r["images_per_s"] == pytest.approx(s["batch"] / r["time_per_step_s"])
        assert r["peak_mem_bytes"] > 0 and r["cpu_seconds_per_step"] > 0
        assert 0 < r["mfu"] < 10  # vs a measured matmul rate on CPU
        assert f"\n{name:<18} " in printed
    check = res["check"]
    assert check["losses_match"] is True, check
    ours, ref = check["values"]["massl_ray"], check["values"]["reference"]
    for step in (0, 1):
        assert ours["losses"][step] == pytest.approx(ref["losses"][step], rel=1e-4)
        assert ours["losses"][step] > 0
    assert ours["losses"][1] != ours["losses"][0]
    assert ours["memory_update_step0"] == pytest.approx(ref["memory_update_step0"], rel=1e-4)
    assert ours["memory_update_step0"] != 0  # the FIFO write of step 0 changed the memory
    assert ours["student_update"] == pytest.approx(ref["student_update"], rel=1e-3)
    assert ours["student_update"] != 0  # step 1's lr > 0: the student moved
    assert "value check, massl_ray vs reference" in printed
    # the analytic FLOP model vs FlopCounterMode on the same step
    fc = res["flop_check"]
    assert fc["flop_counter_per_step"] > 0 and abs(fc["rel_diff"]) <= 0.10
    assert res["flops"]["total"] == fc["analytic_per_step"]
