"""MaSSL's stochastic-memory-block loss: vectorised, chunked, with an analytic gradient.

For student views i in 0..V-1 and teacher views j in {0, 1}, i != j, and a random partition of
the K memory slots into N_B blocks of S slots (one partition per step, shared by every view and
sample)::

    s_i = z_s[i] @ M^T / tau_s            t_j = z_t[j] @ M^T / tau_t
    CE(i, j) = mean_{b, block} -sum_{slot in block} softmax(t_j)[slot] * log_softmax(s_i)[slot]
    loss = mean_{(i, j), i != j} CE(i, j)

The pair sum is done in one shot: sum_{i != j} <q_j, l_i> = <sum_j q_j, sum_i l_i> - sum_j <q_j, l_j>.
The logits are never materialised for the whole memory at once when ``chunk_blocks`` > 0: the
forward pass walks the blocks in chunks and accumulates both the loss and the gradient with
respect to the student embeddings (d loss / d s_i = (n_i softmax(s_i) - sum_{j != i} q_j) / N,
n_i = number of teacher views paired with view i), so peak memory is O(V * B * chunk) and the
backward pass is a single multiply. Ray-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class LossStats:
    """Collapse signals from the teacher side of one step (tensors; no host sync here)."""

    teacher_entropy: torch.Tensor  # mean entropy (nats) of the teacher's block distributions
    teacher_argmax: torch.Tensor  # [2 * B] memory slot that wins each teacher row's argmax
    block_size: int

    def distinct_argmax(self) -> int:
        return int(torch.unique(self.teacher_argmax).numel())


def num_pairs(num_views: int) -> int:
    """Number of (student view i, teacher view j in {0,1}) pairs with i != j."""
    if num_views < 2:
        raise ValueError("MaSSL needs at least the two global views")
    return 2 * num_views - 2


class _BlockLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_s, z_t, memory, partition, student_temp, teacher_temp, chunk_blocks):
        v, b, d = z_s.shape
        n_blocks, s = partition.shape
        norm = float(b * n_blocks * num_pairs(v))
        need_grad = ctx.needs_input_grad[0]
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            dt = torch.float64 if z_s.dtype == torch.float64 else torch.float32
            zs = z_s.to(dt)
            zt = z_t.to(dt)
            flat = partition.reshape(-1)
            # n_i: teacher views paired with student view i (1 for the globals, 2 for locals).
            n_i = torch.full((v, 1, 1, 1), 2.0, device=zs.device, dtype=dt)
            n_i[:2] = 1.0
            loss = zs.new_zeros(())
            entropy = zs.new_zeros(())
            grad = torch.zeros_like(zs) if need_grad else None
            best_val = torch.full((2, b), -float("inf"), device=zs.device, dtype=dt)
            best_idx = torch.zeros((2, b), dtype=torch.long, device=zs.device)
            step = chunk_blocks if chunk_blocks and chunk_blocks > 0 else n_blocks
            for c0 in range(0, n_blocks, step):
                c1 = min(n_blocks, c0 + step)
                cols = flat[c0 * s: c1 * s]
                mem = memory.index_select(0, cols).to(dt)  # [C*S, D] (only this chunk)
                tl = (zt @ mem.T).div_(teacher_temp)  # [2, B, C*S]
                val, idx = tl.max(dim=-1)
                better = val > best_val
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, cols[idx], best_idx)
                tl = tl.view(2, b, c1 - c0, s)
                log_q = F.log_softmax(tl, dim=-1)
                q = log_q.exp()
                entropy = entropy - (q * log_q).sum()
                del tl, log_q
                sl = (zs @ mem.T).div_(student_temp).view(v, b, c1 - c0, s)
                log_p = F.log_softmax(sl, dim=-1)
                del sl
                qsum = q.sum(0)  # [B, C, S]
                cross = (qsum * log_p.sum(0)).sum() - (q * log_p[:2]).sum()
                loss = loss - cross
                if need_grad:
                    g = log_p.exp_().mul_(n_i)  # reuse log_p's storage: n_i * softmax(s_i)
                    g.sub_(qsum)
                    g[:2].add_(q)
                    grad += (g.view(v, b, -1) @ mem).div_(norm * student_temp)
                del log_p, q, qsum
            loss = loss / norm
            entropy = entropy / float(2 * b * n_blocks)
        if need_grad:
            ctx.save_for_backward(grad.to(z_s.dtype))
        ctx.mark_non_differentiable(entropy, best_idx)
        return loss, entropy, best_idx.view(-1)

    @staticmethod
    def backward(ctx, grad_loss, _g_entropy, _g_idx):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None


def massl_loss(z_s: torch.Tensor, z_t: torch.Tensor, memory: torch.Tensor,
               partition: torch.Tensor, student_temp: float, teacher_temp: float,
               chunk_blocks: int = 0) -> tuple[torch.Tensor, LossStats]:
    """The MaSSL loss of one step.

    Args:
        z_s: student unit embeddings [V, B, D] (views: global 1, global 2, locals).
        z_t: teacher unit embeddings [2, B, D] (gradients are never taken through them).
        memory: memory rows [K, D] *before* this step's update.
        partition: LongTensor [N_B, S], a permutation of 0..K-1 cut into blocks.
        chunk_blocks: blocks per chunk (0 = all blocks at once).
    """
    if z_s.dim() != 3 or z_t.dim() != 3 or z_t.shape[0] != 2:
        raise ValueError(f"expected z_s [V,B,D] and z_t [2,B,D], got {tuple(z_s.shape)}, {tuple(z_t.shape)}")
    if z_s.shape[1:] != z_t.shape[1:] or memory.shape[1] != z_s.shape[2]:
        raise ValueError("batch or embedding dims of student, teacher and memory disagree")
    if partition.numel() != memory.shape[0]:
        raise ValueError(f"partition covers {partition.numel()} slots, memory has {memory.shape[0]}")
    loss, entropy, argmax = _BlockLoss.apply(
        z_s, z_t.detach(), memory.detach(), partition, float(student_temp), float(teacher_temp),
        int(chunk_blocks),
    )
    return loss, LossStats(entropy, argmax, partition.shape[1])
