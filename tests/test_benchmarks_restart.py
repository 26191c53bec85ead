"""benchmarks/restart.py --quick from this tree (gloo, in the test's process): a restart reads
the checkpoint once, on rank 0, whatever the world size; the other ranks read none of it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import restart  # noqa: E402


@pytest.mark.timeout(240)
def test_restart_benchmark_reads_one_checkpoint_per_restart_whatever_the_world_size(tmp_path):
    out = tmp_path / "restart.json"
    assert restart.main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["quick"] is True
    size = res["restart"]["checkpoint_bytes"]
    assert size > 2 * 2**20  # the quick state: 2 MiB of tensors
    rows = {r["world_size"]: r for r in res["restart"]["runs"]}
    assert set(rows) == {1, 2}
    for w, r in rows.items():
        assert r["bytes_read_per_rank"] == [size] + [0] * (w - 1)
        assert r["bytes_read_total"] == size and r["checkpoints_read"] == 1.0
        assert r["rchar_per_rank"][0] >= size  # the kernel saw rank 0 read it
        assert r["seconds_slowest_rank"] > 0
