"""Schedules as pure functions of the global step (so a resumed run continues them exactly)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from massl_ray.config import Config


def cosine(start: float, end: float, step: int, total: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``); ``end`` after that."""
    if total <= 0 or step >= total:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / total))


@dataclass(frozen=True)
class Schedules:
    total_steps: int
    steps_per_epoch: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    wd_start: float
    wd_end: float
    momentum_start: float
    teacher_temp: float
    warmup_teacher_temp: float
    teacher_temp_warmup_steps: int

    @classmethod
    def from_config(cls, cfg: Config) -> "Schedules":
        spe = cfg.optim.steps_per_epoch
        if spe is None:
            raise ValueError("optim.steps_per_epoch must be resolved before building schedules")
        total = cfg.total_steps()
        return cls(
            total_steps=total,
            steps_per_epoch=spe,
            peak_lr=cfg.peak_lr,
            min_lr=cfg.optim.min_lr,
            warmup_steps=min(total, int(round(cfg.optim.warmup_epochs * spe))),
            wd_start=cfg.optim.weight_decay,
            wd_end=cfg.optim.weight_decay_end,
            momentum_start=cfg.massl.momentum_teacher,
            teacher_temp=cfg.massl.teacher_temp,
            warmup_teacher_temp=cfg.massl.warmup_teacher_temp,
            teacher_temp_warmup_steps=min(total, int(round(cfg.massl.warmup_teacher_temp_epochs * spe))),
        )

    def lr(self, step: int) -> float:
        """Linear warm-up from 0 to the peak, then per-step cosine to ``min_lr``."""
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        return cosine(self.peak_lr, self.min_lr, step - self.warmup_steps,
                      self.total_steps - self.warmup_steps)

    def weight_decay(self, step: int) -> float:
        return cosine(self.wd_start, self.wd_end, step, self.total_steps)

    def momentum(self, step: int) -> float:
        return cosine(self.momentum_start, 1.0, step, self.total_steps)

    def teacher_temperature(self, step: int) -> float:
        w = self.teacher_temp_warmup_steps
        if step < w:
            return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / w
        return self.teacher_temp
