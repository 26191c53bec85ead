"""massl_loss against a naive reference written straight from docs/method.md §4.

The reference below deliberately does *nothing* clever: explicit Python loops over the
(student view i, teacher view j) pairs with i != j, over samples and over blocks, with the
softmax / log-softmax of each block written out from their definitions. It runs in float64 and
its gradient comes from plain autograd, so it checks both the vectorised forward pass (the
one-shot pair sum) and the hand-written gradient of ``massl_ray.method.loss``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from massl_ray.method.loss import LossStats, massl_loss, num_pairs

TAU_S = 0.1
TAU_T = 0.04
D = 16
S = 8


# ---------------------------------------------------------------------------- the reference
def _block_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log softmax of a 1-D block from the definition: x - log sum exp x (max-shifted)."""
    m = x.max().detach()
    return x - (m + torch.log(torch.exp(x - m).sum()))


def naive_loss(z_s, z_t, memory, partition, tau_s, tau_t):
    """method.md §4 steps 3-6, one (i, j) pair, one sample and one block at a time."""
    v, b, _ = z_s.shape
    n_blocks, _ = partition.shape
    s = z_s @ memory.T / tau_s  # [V, B, K]          (step 3)
    t = (z_t @ memory.T / tau_t).detach()  # [2, B, K]
    pair_losses = []
    for i in range(v):  # student views
        for j in range(2):  # teacher views (the two globals)
            if i == j:
                continue
            total = z_s.new_zeros(())
            for smp in range(b):
                for blk in range(n_blocks):
                    slots = partition[blk]  # step 4: same partition for every view / sample
                    p_t = torch.exp(_block_log_softmax(t[j, smp, slots]))  # step 5 (detached)
                    log_p_s = _block_log_softmax(s[i, smp, slots])
                    total = total - (p_t * log_p_s).sum()
            pair_losses.append(total / (b * n_blocks))  # mean over samples and blocks
    return sum(pair_losses) / len(pair_losses)  # step 6: mean over the pairs


def naive_stats(z_t, memory, partition, tau_t):
    """Teacher entropy (mean over views, samples, blocks) and argmax over the full memory."""
    t = z_t @ memory.T / tau_t
    ent, count = 0.0, 0
    for j in range(2):
        for smp in range(z_t.shape[1]):
            for slots in partition:
                log_q = _block_log_softmax(t[j, smp, slots])
                ent += float(-(log_q.exp() * log_q).sum())
                count += 1
    argmax = [int(torch.argmax(z_t[j, smp] @ memory.T)) for j in range(2) for smp in range(z_t.shape[1])]
    return ent / count, argmax


# ---------------------------------------------------------------------------- inputs
def _unit(*shape, gen, dtype=torch.float64):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


def make_inputs(v, b, n_blocks, seed=0, dtype=torch.float64, d=D, s=S):
    gen = torch.Generator().manual_seed(seed)
    k = n_blocks * s
    z_s = _unit(v, b, d, gen=gen, dtype=dtype)
    z_t = _unit(2, b, d, gen=gen, dtype=dtype)
    memory = _unit(k, d, gen=gen, dtype=dtype)
    partition = torch.randperm(k, generator=gen).view(n_blocks, s)
    return z_s, z_t, memory, partition


def run_ours(z_s, z_t, memory, partition, chunk_blocks=0, tau_t=TAU_T):
    z = z_s.clone().requires_grad_(True)
    loss, stats = massl_loss(z, z_t, memory, partition, TAU_S, tau_t, chunk_blocks=chunk_blocks)
    loss.backward()
    return loss.detach(), z.grad, stats


def run_naive(z_s, z_t, memory, partition, tau_t=TAU_T):
    z = z_s.detach().double().clone().requires_grad_(True)
    loss = naive_loss(z, z_t.double(), memory.double(), partition, TAU_S, tau_t)
    loss.backward()
    return loss.detach(), z.grad


GRID = list(itertools.product([2, 4, 12], [1, 8], [1, 4, 8]))


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("v,b,n_blocks", GRID)
def test_loss_and_grad_match_naive_reference(v, b, n_blocks):
    z_s, z_t, memory, partition = make_inputs(v, b, n_blocks, seed=100 * v + 10 * b + n_blocks)
    ref_loss, ref_grad = run_naive(z_s, z_t, memory, partition)
    for chunk in (0, 1, 3):
        loss, grad, _ = run_ours(z_s, z_t, memory, partition, chunk_blocks=chunk)
        assert loss.dtype == torch.float64
        assert math.isclose(float(loss), float(ref_loss), rel_tol=1e-5, abs_tol=1e-5), (chunk, loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("v,b,n_blocks", [(12, 8, 8), (4, 1, 4), (2, 8, 1)])
def test_chunking_gives_identical_loss_and_grad(v, b, n_blocks):
    z_s, z_t, memory, partition = make_inputs(v, b, n_blocks, seed=7)
    base_loss, base_grad, base_stats = run_ours(z_s, z_t, memory, partition, chunk_blocks=0)
    for chunk in (1, 3, n_blocks, n_blocks + 5):
        loss, grad, stats = run_ours(z_s, z_t, memory, partition, chunk_blocks=chunk)
        torch.testing.assert_close(loss, base_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, base_grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.teacher_entropy, base_stats.teacher_entropy)
        assert torch.equal(stats.teacher_argmax, base_stats.teacher_argmax)


def test_gradient_scales_with_upstream_gradient():
    z_s, z_t, memory, partition = make_inputs(4, 8, 4, seed=3)
    _, grad, _ = run_ours(z_s, z_t, memory, partition)
    z = z_s.clone().requires_grad_(True)
    loss, _ = massl_loss(z, z_t, memory, partition, TAU_S, TAU_T)
    (2.5 * loss + (z * 0).sum()).backward()
    torch.testing.assert_close(z.grad, 2.5 * grad)


def test_gradcheck_against_finite_differences():
    z_s, z_t, memory, partition = make_inputs(3, 2, 2, seed=11)
    z = z_s.clone().requires_grad_(True)
    fn = lambda x: massl_loss(x, z_t, memory, partition, TAU_S, TAU_T, chunk_blocks=1)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("v,b,n_blocks", [(12, 8, 8), (2, 1, 1), (4, 8, 4)])
def test_teacher_stats_match_direct_computation(v, b, n_blocks):
    z_s, z_t, memory, partition = make_inputs(v, b, n_blocks, seed=21)
    ref_entropy, ref_argmax = naive_stats(z_t, memory, partition, TAU_T)
    for chunk in (0, 1, 3):
        _, _, stats = run_ours(z_s, z_t, memory, partition, chunk_blocks=chunk)
        assert isinstance(stats, LossStats)
        assert stats.block_size == S
        assert math.isclose(float(stats.teacher_entropy), ref_entropy, rel_tol=1e-9)
        assert stats.teacher_argmax.shape == (2 * b,)
        assert stats.teacher_argmax.tolist() == ref_argmax
        # argmax is over the full memory: the slot maximising z_t @ M^T, whatever the chunking
        full = (z_t @ memory.T).reshape(2 * b, -1).argmax(dim=-1)
        assert torch.equal(stats.teacher_argmax, full)
        assert stats.distinct_argmax() == len(set(ref_argmax))
    # entropy lies in [0, log S]
    assert 0.0 <= ref_entropy <= math.log(S) + 1e-12


def test_teacher_gets_no_gradient_and_memory_is_untouched():
    z_s, z_t, memory, partition = make_inputs(4, 8, 4, seed=5)
    z_t = z_t.clone().requires_grad_(True)
    mem = memory.clone().requires_grad_(True)
    mem_before = memory.clone()
    part_before = partition.clone()
    z = z_s.clone().requires_grad_(True)
    loss, stats = massl_loss(z, z_t, mem, partition, TAU_S, TAU_T, chunk_blocks=1)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z_t.grad is None
    assert mem.grad is None
    assert torch.equal(mem.detach(), mem_before)
    assert torch.equal(partition, part_before)
    assert not stats.teacher_entropy.requires_grad
    assert not stats.teacher_argmax.requires_grad
    # the loss really does not depend on z_t through autograd
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, z_t, allow_unused=False)


def test_plain_memory_tensor_is_not_modified():
    z_s, z_t, memory, partition = make_inputs(12, 8, 8, seed=6)
    before = memory.clone()
    for chunk in (0, 3):
        run_ours(z_s, z_t, memory, partition, chunk_blocks=chunk)
    assert torch.equal(memory, before)


@pytest.mark.parametrize("v,b,n_blocks", [(12, 8, 8), (4, 1, 4)])
def test_float32_agrees_with_float64(v, b, n_blocks):
    z64, t64, m64, partition = make_inputs(v, b, n_blocks, seed=9)
    loss64, grad64, stats64 = run_ours(z64, t64, m64, partition)
    for chunk in (0, 3):
        loss32, grad32, stats32 = run_ours(z64.float(), t64.float(), m64.float(), partition, chunk)
        assert loss32.dtype == torch.float32 and grad32.dtype == torch.float32
        assert math.isclose(float(loss32), float(loss64), rel_tol=1e-5)
        scale = grad64.abs().max()
        assert float((grad32.double() - grad64).abs().max() / scale) < 1e-5
        assert math.isclose(float(stats32.teacher_entropy), float(stats64.teacher_entropy), rel_tol=1e-5)


def test_mixed_input_dtypes_compute_in_float32():
    """bf16 student embeddings (autocast) with an fp32 memory: loss in fp32, grad in bf16."""
    z64, t64, m64, partition = make_inputs(4, 8, 4, seed=10)
    loss64, _, _ = run_ours(z64, t64, m64, partition)
    z = z64.to(torch.bfloat16).requires_grad_(True)
    loss, _ = massl_loss(z, t64.to(torch.bfloat16), m64.float(), partition, TAU_S, TAU_T)
    loss.backward()
    assert loss.dtype == torch.float32
    assert z.grad.dtype == torch.bfloat16
    assert math.isclose(float(loss.detach()), float(loss64), rel_tol=2e-2)


def test_num_pairs():
    assert num_pairs(12) == 22
    assert num_pairs(2) == 2
    assert num_pairs(4) == 6
    with pytest.raises(ValueError):
        num_pairs(1)


def test_loss_normalisation_is_pairs_samples_blocks():
    """Uniform teacher and student distributions give exactly log S (mean, not sum)."""
    v, b, n_blocks = 12, 8, 4
    memory = torch.zeros(n_blocks * S, D, dtype=torch.float64)
    memory[:, 0] = 1.0  # every slot identical -> every block distribution uniform
    z_s, z_t, _, partition = make_inputs(v, b, n_blocks, seed=2)
    loss, _, stats = run_ours(z_s, z_t, memory, partition)
    assert math.isclose(float(loss), math.log(S), rel_tol=1e-12)
    assert math.isclose(float(stats.teacher_entropy), math.log(S), rel_tol=1e-12)


def test_bad_shapes_raise_value_error():
    z_s, z_t, memory, partition = make_inputs(4, 8, 4, seed=1)
    bad = [
        (z_s[0], z_t, memory, partition),  # z_s not 3-D
        (z_s, z_t[0], memory, partition),  # z_t not 3-D
        (z_s, torch.cat([z_t, z_t[:1]]), memory, partition),  # 3 teacher views
        (z_s, z_t[:1], memory, partition),  # 1 teacher view
        (z_s, z_t[:, :4], memory, partition),  # batch mismatch
        (z_s[..., :8], z_t[..., :8], memory, partition),  # D mismatch with memory
        (z_s, z_t[..., :8], memory, partition),  # D mismatch student / teacher
        (z_s, z_t, memory, partition[:2]),  # partition does not cover memory
        (z_s, z_t, memory[:-S], partition),  # memory smaller than partition
        (z_s[:1], z_t, memory, partition),  # V = 1: no pairs
    ]
    for args in bad:
        with pytest.raises(ValueError):
            massl_loss(*args, TAU_S, TAU_T)
