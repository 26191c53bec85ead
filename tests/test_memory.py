"""The FIFO memory bank, the block partition, and replica consistency under a real gloo group.

The two-process test runs this very file as a script (``python tests/test_memory.py WORKER ...``)
in two subprocesses that form a gloo process group over a FileStore in ``tmp_path``; each writes
its results to ``tmp_path`` and every assertion happens in the pytest process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from massl_ray.method.distributed import all_gather_cat, identity_gather
from massl_ray.method.memory import MemoryBank, block_permutation

REPO = Path(__file__).resolve().parents[1]


def distinct_keys(n: int, dim: int, start: int) -> torch.Tensor:
    """n keys whose first coordinate identifies them: key id = start .. start+n-1."""
    keys = torch.zeros(n, dim)
    keys[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    keys[:, 1] = 1.0
    return keys


def key_ids(rows: torch.Tensor) -> list[int]:
    return [int(x) for x in rows[:, 0].round().tolist()]


# ---------------------------------------------------------------------------- FIFO
def test_initial_rows_are_unit_norm_and_pointer_zero():
    bank = MemoryBank(64, 8, seed=3)
    assert bank.rows.shape == (64, 8) and bank.size == 64 and bank.dim == 8
    torch.testing.assert_close(bank.rows.norm(dim=1), torch.ones(64))
    assert int(bank.ptr) == 0 and bank.ptr.dtype == torch.long
    assert not bank.rows.requires_grad


def test_fifo_contents_after_known_updates():
    k, d = 12, 4
    bank = MemoryBank(k, d, seed=0)
    init = bank.rows.clone()
    out = bank.update(distinct_keys(4, d, 100))
    torch.testing.assert_close(out, distinct_keys(4, d, 100))
    assert int(bank.ptr) == 4
    assert key_ids(bank.rows[:4]) == [100, 101, 102, 103]
    torch.testing.assert_close(bank.rows[4:], init[4:])  # the rest untouched
    bank.update(distinct_keys(4, d, 200))
    assert int(bank.ptr) == 8
    assert key_ids(bank.rows[:8]) == [100, 101, 102, 103, 200, 201, 202, 203]
    torch.testing.assert_close(bank.rows[8:], init[8:])
    bank.update(distinct_keys(4, d, 300))  # exactly fills: pointer back to 0
    assert int(bank.ptr) == 0
    assert key_ids(bank.rows) == [100, 101, 102, 103, 200, 201, 202, 203, 300, 301, 302, 303]
    bank.update(distinct_keys(4, d, 400))  # oldest four replaced
    assert int(bank.ptr) == 4
    assert key_ids(bank.rows) == [400, 401, 402, 403, 200, 201, 202, 203, 300, 301, 302, 303]


@pytest.mark.parametrize("k,n", [(10, 3), (10, 4), (7, 5), (8, 8), (9, 1)])
def test_fifo_wraps_around_like_a_queue(k, n):
    """Write sizes that need not divide K: the bank always equals the last K keys written,
    each at position (write index mod K)."""
    d = 3
    bank = MemoryBank(k, d, seed=1)
    written = 0
    for step in range(2 * k + 3):
        bank.update(distinct_keys(n, d, 1000 + written))
        written += n
        assert int(bank.ptr) == written % k
        ids = key_ids(bank.rows)
        for pos in range(k):
            # the newest key id written at slot `pos`, if any
            last = max((w for w in range(written) if w % k == pos), default=None)
            if last is not None:
                assert ids[pos] == 1000 + last, (step, pos, ids)


def test_full_size_write_from_nonzero_pointer_wraps():
    k, d = 8, 3
    bank = MemoryBank(k, d, seed=2)
    bank.update(distinct_keys(3, d, 0))
    bank.update(distinct_keys(8, d, 10))  # n == K starting at ptr 3
    assert int(bank.ptr) == 3
    assert key_ids(bank.rows) == [15, 16, 17, 10, 11, 12, 13, 14]


def test_too_many_keys_raise_and_leave_bank_unchanged():
    bank = MemoryBank(8, 3, seed=0)
    bank.update(distinct_keys(2, 3, 0))
    before, ptr = bank.rows.clone(), int(bank.ptr)
    with pytest.raises(ValueError):
        bank.update(distinct_keys(9, 3, 50))
    assert torch.equal(bank.rows, before) and int(bank.ptr) == ptr


def test_update_detaches_and_casts_keys():
    bank = MemoryBank(8, 3, seed=0)
    keys = distinct_keys(2, 3, 5).double().requires_grad_(True)
    bank.update(keys)
    assert bank.rows.dtype == torch.float32 and not bank.rows.requires_grad
    assert key_ids(bank.rows[:2]) == [5, 6]


def test_update_uses_injected_gather():
    calls = []

    def fake_gather(x):  # pretend a second worker contributed keys 900..
        calls.append(x.shape)
        return torch.cat([x, distinct_keys(x.shape[0], x.shape[1], 900)])

    bank = MemoryBank(10, 3, seed=0, gather=fake_gather)
    out = bank.update(distinct_keys(2, 3, 1))
    assert calls == [torch.Size([2, 3])]
    assert key_ids(out) == [1, 2, 900, 901]
    assert key_ids(bank.rows[:4]) == [1, 2, 900, 901] and int(bank.ptr) == 4


def test_invalid_sizes_raise():
    with pytest.raises(ValueError):
        MemoryBank(0, 4)
    with pytest.raises(ValueError):
        MemoryBank(4, 0)


# ---------------------------------------------------------------------------- state / seeds
def test_state_dict_round_trip():
    bank = MemoryBank(16, 4, seed=0)
    bank.update(distinct_keys(5, 4, 7))
    state = bank.state_dict()
    assert set(state) == {"rows", "ptr"}
    assert int(state["ptr"]) == 5
    other = MemoryBank(16, 4, seed=99)
    assert not torch.equal(other.rows, bank.rows)
    other.load_state_dict(state)
    assert torch.equal(other.rows, bank.rows) and int(other.ptr) == 5
    assert torch.equal(other.checksum(), bank.checksum())
    # continuing both gives the same result
    bank.update(distinct_keys(13, 4, 50))
    other.update(distinct_keys(13, 4, 50))
    assert torch.equal(other.rows, bank.rows) and int(other.ptr) == int(bank.ptr) == 2


def test_state_dict_survives_torch_save(tmp_path):
    bank = MemoryBank(16, 4, seed=0)
    bank.update(distinct_keys(3, 4, 7))
    torch.save(bank.state_dict(), tmp_path / "m.pt")
    other = MemoryBank(16, 4, seed=1)
    other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert torch.equal(other.rows, bank.rows) and int(other.ptr) == 3


def test_same_seed_same_bank_different_seed_different():
    a, b, c = MemoryBank(64, 8, seed=5), MemoryBank(64, 8, seed=5), MemoryBank(64, 8, seed=6)
    assert torch.equal(a.rows, b.rows)
    assert torch.equal(a.checksum(), b.checksum())
    assert not torch.equal(a.rows, c.rows)
    # the seed is private: the global RNG state does not matter
    torch.manual_seed(1234)
    d = MemoryBank(64, 8, seed=5)
    assert torch.equal(a.rows, d.rows)


def test_checksum_differs_when_rows_or_pointer_differ():
    a, b = MemoryBank(64, 8, seed=5), MemoryBank(64, 8, seed=5)
    assert torch.equal(a.checksum(), b.checksum())
    b.rows[10, 3] += 1e-3
    assert not torch.equal(a.checksum(), b.checksum())
    b = MemoryBank(64, 8, seed=5)
    b.rows[[3, 4]] = b.rows[[4, 3]]  # same values, different order
    assert not torch.equal(a.checksum(), b.checksum())
    b = MemoryBank(64, 8, seed=5)
    b.ptr.fill_(1)
    assert not torch.equal(a.checksum(), b.checksum())
    assert a.checksum().dtype == torch.float64


# ---------------------------------------------------------------------------- block_permutation
@pytest.mark.parametrize("k,s", [(1024, 256), (64, 64), (48, 8), (16, 1)])
def test_block_permutation_covers_each_slot_once(k, s):
    g = torch.Generator().manual_seed(0)
    part = block_permutation(k, s, g)
    assert part.shape == (k // s, s) and part.dtype == torch.long
    assert torch.equal(part.flatten().sort().values, torch.arange(k))
    part2 = block_permutation(k, s, g, device=torch.device("cpu"))
    assert torch.equal(part2.flatten().sort().values, torch.arange(k))


def test_block_permutation_is_seeded():
    p1 = block_permutation(1024, 128, torch.Generator().manual_seed(42))
    p2 = block_permutation(1024, 128, torch.Generator().manual_seed(42))
    p3 = block_permutation(1024, 128, torch.Generator().manual_seed(43))
    assert torch.equal(p1, p2)
    assert not torch.equal(p1, p3)
    # consecutive draws from one generator differ (a fresh partition every step)
    g = torch.Generator().manual_seed(42)
    assert not torch.equal(block_permutation(1024, 128, g), block_permutation(1024, 128, g))
    # and it ignores the global RNG
    torch.manual_seed(0)
    p4 = block_permutation(1024, 128, torch.Generator().manual_seed(42))
    assert torch.equal(p1, p4)


def test_block_permutation_is_not_identity_and_mixes_blocks():
    part = block_permutation(4096, 1024, torch.Generator().manual_seed(0))
    assert not torch.equal(part.flatten(), torch.arange(4096))
    # each block draws slots from all over the memory, not a contiguous range
    for blk in part:
        assert int(blk.max() - blk.min()) > 2048


@pytest.mark.parametrize("k,s", [(100, 7), (10, 4), (16, 32)])
def test_block_permutation_non_divisible_raises(k, s):
    with pytest.raises(ValueError):
        block_permutation(k, s, torch.Generator().manual_seed(0))


def test_all_gather_cat_is_identity_without_a_group():
    x = torch.randn(3, 4)
    assert all_gather_cat(x) is x
    assert identity_gather(x) is x


# ---------------------------------------------------------------------------- two ranks (gloo)
K_DIST, D_DIST, B_DIST, STEPS_DIST, SEED_DIST = 20, 6, 3, 7, 11  # G = 6 does not divide K = 20


def rank_keys(rank: int, step: int) -> torch.Tensor:
    """Different unit keys per rank and step (seeded by rank and step)."""
    g = torch.Generator().manual_seed(10_000 * (rank + 1) + step)
    return F.normalize(torch.randn(B_DIST, D_DIST, generator=g), dim=1)


def _worker(rank: int, world: int, store_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                            world_size=world)
    try:
        bank = MemoryBank(K_DIST, D_DIST, seed=SEED_DIST, gather=all_gather_cat)
        gathered, ptrs = [], []
        for step in range(STEPS_DIST):
            gathered.append(bank.update(rank_keys(rank, step)).clone())
            ptrs.append(int(bank.ptr))
        sums = all_gather_cat(bank.checksum().unsqueeze(0))  # [world, 2]
        rows_all = all_gather_cat(bank.rows.unsqueeze(0))  # [world, K, D]
        torch.save({"rank": rank, "world": dist.get_world_size(), "rows": bank.rows.clone(),
                    "ptr": int(bank.ptr), "ptrs": ptrs, "gathered": torch.stack(gathered),
                    "checksums": sums, "rows_all": rows_all}, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_ranks_keep_identical_replicas(tmp_path):
    world = 2
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["OMP_NUM_THREADS"] = "1"
    store = tmp_path / "store"
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, "WORKER", str(r), str(world), str(store),
                               str(outs[r])], env=env, cwd=str(REPO),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    deadline = time.monotonic() + 100
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r] if r < len(logs) else ''}"

    res = [torch.load(o, weights_only=True) for o in outs]
    assert [x["rank"] for x in res] == [0, 1] and all(x["world"] == 2 for x in res)

    # 1) both replicas are identical (rows, pointer, checksum), also as seen from each rank
    assert torch.equal(res[0]["rows"], res[1]["rows"])
    assert res[0]["ptr"] == res[1]["ptr"]
    for x in res:
        assert torch.equal(x["checksums"][0], x["checksums"][1])
        assert torch.equal(x["rows_all"][0], x["rows_all"][1])
        assert torch.equal(x["rows_all"][x["rank"]], x["rows"])

    # 2) each step gathered rank 0's keys then rank 1's keys
    g = world * B_DIST
    for step in range(STEPS_DIST):
        expect = torch.cat([rank_keys(r, step) for r in range(world)])
        for x in res:
            assert torch.equal(x["gathered"][step], expect), step
        assert res[0]["ptrs"][step] == res[1]["ptrs"][step] == ((step + 1) * g) % K_DIST

    # 3) the rows are the FIFO of those keys, simulated here from the same seed
    expected = MemoryBank(K_DIST, D_DIST, seed=SEED_DIST).rows.clone()
    ptr = 0
    for step in range(STEPS_DIST):
        for key in torch.cat([rank_keys(r, step) for r in range(world)]):
            expected[ptr] = key
            ptr = (ptr + 1) % K_DIST
    assert res[0]["ptr"] == ptr
    assert torch.equal(res[0]["rows"], expected)
    # and the last step's keys sit at the right positions, rank 0 first
    last = STEPS_DIST - 1
    start = (last * g) % K_DIST
    for r in range(world):
        for b in range(B_DIST):
            pos = (start + r * B_DIST + b) % K_DIST
            assert torch.equal(res[0]["rows"][pos], rank_keys(r, last)[b])


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "WORKER":
    torch.set_num_threads(1)
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])


def test_checksum_sees_every_position_and_swaps():
    a = MemoryBank(1024, 16, seed=0)
    for flat in (0, 9972, 9973, 16383):
        b = MemoryBank(1024, 16, seed=0)
        b.rows.view(-1)[flat] += 5.0
        assert not torch.equal(a.checksum(), b.checksum()), flat
    b = MemoryBank(1024, 16, seed=0)
    v = b.rows.view(-1)
    v[0], v[9973] = v[9973].clone(), v[0].clone()
    assert not torch.equal(a.checksum(), b.checksum())
