"""The authors' training step for MaSSL, reimplemented from docs/method.md §4-§6 (not copied).

The published reference is a DINO-derived ``torchrun`` script; its step, structured as DINO's
``train_one_epoch``: 2 + L **float32** crops normalised on the host (pinned, copied with
``non_blocking``); fp16 autocast + ``GradScaler``, a plain AdamW; DINO's ``MultiCropWrapper``
forward (crops of one resolution through the backbone together, the head once; the teacher on
the 2 global crops); the loss with a fresh **CPU** ``randperm(K)`` every step, **two clones**
of the K x D memory, all V x B x K logits materialised and permuted into blocks and a **Python
double loop** over the (student view, teacher view) pairs; the FIFO write of the teacher's
global view 2; ``loss.item()`` every step, DINO's per-tensor clipping with an ``.item()`` per
parameter, and the EMA as a Python loop. ``benchmarks/gpu_step.py`` runs it on the same model,
weights, memory and inputs as :class:`~massl_ray.method.learner.Learner`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from massl_ray.config import Config
from massl_ray.method.model import param_groups
from massl_ray.method.schedules import Schedules


def multicrop_forward(net: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """DINO's MultiCropWrapper: consecutive crops of one resolution go through the backbone
    together, then the head runs once on every output. Returns [len(crops) * B, D]."""
    sizes = [c.shape[-1] for c in crops]
    outs, start = [], 0
    while start < len(crops):
        end = start
        while end < len(crops) and sizes[end] == sizes[start]:
            end += 1
        outs.append(net.backbone(torch.cat(list(crops[start:end]))))
        start = end
    return net.head(torch.cat(outs))


def reference_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, memory: torch.Tensor,
                   perm: torch.Tensor, num_views: int, block_size: int, student_temp: float,
                   teacher_temp: float) -> torch.Tensor:
    """MaSSL's loss the authors' way. ``student_out`` [V * B, D], ``teacher_out`` [2 * B, D]
    (view-major), ``memory`` [K, D], ``perm`` a permutation of 0..K-1 on the device."""
    k = memory.shape[0]
    n_blocks = k // block_size
    mem_student = memory.clone().detach()  # the two clones of the whole memory per step
    mem_teacher = memory.clone().detach()
    s_logits = student_out @ mem_student.T / student_temp  # [V*B, K]: every logit materialised
    with torch.no_grad():
        t_logits = teacher_out @ mem_teacher.T / teacher_temp  # [2*B, K]
    idx_s = perm.expand(s_logits.shape[0], -1)
    s_blocks = s_logits.gather(1, idx_s).view(s_logits.shape[0], n_blocks, block_size)
    t_blocks = t_logits.gather(1, perm.expand(t_logits.shape[0], -1)).view(-1, n_blocks, block_size)
    student_views = s_blocks.chunk(num_views)
    teacher_views = F.softmax(t_blocks, dim=-1).detach().chunk(2)
    total, n_terms = 0.0, 0
    for iq, q in enumerate(teacher_views):
        for v in range(num_views):
            if v == iq:
                continue
            ce = torch.sum(-q * F.log_softmax(student_views[v], dim=-1), dim=-1)  # [B, N_B]
            total = total + ce.mean()
            n_terms += 1
    return total / n_terms


class ReferenceStep:
    """One optimisation step the authors' way, on ``student``/``teacher`` (MultiCropNet-like:
    ``.backbone`` and ``.head``) and a copy of the memory rows."""

    def __init__(self, cfg: Config, student: nn.Module, teacher: nn.Module,
                 memory_rows: torch.Tensor, device: torch.device, fp16: bool):
        self.cfg = cfg
        self.device = device
        self.student, self.teacher = student, teacher
        self.memory = memory_rows.detach().clone().to(device)
        self.ptr = 0
        self.schedules = Schedules.from_config(cfg)
        self.optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, betas=cfg.optim.betas)
        self.fp16 = fp16
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self.global_step = 0
        assert cfg.massl.memory_size % cfg.global_batch_size == 0  # as the reference asserts

    def _clip_gradients(self, clip: float) -> list:
        """DINO's utils.clip_gradients: per tensor, with a .item() each."""
        norms = []
        for p in self.student.parameters():
            if p.grad is not None:
                param_norm = p.grad.data.norm(2)
                norms.append(param_norm.item())
                clip_coef = clip / (param_norm + 1e-6)
                if clip_coef < 1:
                    p.grad.data.mul_(clip_coef)
        return norms

    def step(self, crops: Sequence[torch.Tensor], partition: Optional[torch.Tensor] = None) -> float:
        """``crops``: 2 + L float32 normalised host tensors [B, 3, H, W] (global 1, global 2,
        locals). ``partition``: use this permutation instead of a fresh CPU one (value checks)."""
        cfg, sch, it = self.cfg, self.schedules, self.global_step
        for g in self.optimizer.param_groups:
            g["lr"] = sch.lr(it)
            if not g.get("fixed_wd"):
                g["weight_decay"] = sch.weight_decay(it)
        images = [im.to(self.device, non_blocking=True) for im in crops]
        v = len(images)
        self.student.train()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            with torch.no_grad():
                teacher_out = multicrop_forward(self.teacher, images[:2])
            student_out = multicrop_forward(self.student, images)
            if partition is None:
                perm = torch.randperm(cfg.massl.memory_size).to(self.device)  # CPU permutation
            else:
                perm = partition.reshape(-1).to(self.device)
            loss = reference_loss(student_out, teacher_out, self.memory, perm, v, cfg.block_size,
                                  cfg.massl.student_temp, sch.teacher_temperature(it))
            with torch.no_grad():  # FIFO write of the (all-gathered) keys of global view 2
                keys = teacher_out.chunk(2)[1].float()
                b = keys.shape[0]
                self.memory[self.ptr:self.ptr + b] = keys
                self.ptr = (self.ptr + b) % cfg.massl.memory_size
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value}, stopping training")
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        if cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            self._clip_gradients(cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():  # EMA, a Python loop over parameter pairs
            m = sch.momentum(it)
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # as DINO's loop does before logging
        self.global_step += 1
        return value
