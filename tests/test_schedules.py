"""Schedules as functions of the global step: end points, shapes, scaling rules."""

from __future__ import annotations

import math

import pytest

from massl_ray.config import Config, apply_overrides
from massl_ray.method.schedules import Schedules, cosine


def schedules(*overrides: str) -> Schedules:
    base = ["optim.steps_per_epoch=100", "optim.epochs=10", "optim.batch_size_per_worker=64",
            "run.num_workers=2", "massl.warmup_teacher_temp_epochs=3", "optim.warmup_epochs=2"]
    cfg = apply_overrides(Config(), base + list(overrides)).validate()
    return Schedules.from_config(cfg)


def test_cosine_end_points_and_midpoint():
    assert cosine(1.0, 0.0, 0, 10) == 1.0
    assert cosine(1.0, 0.0, 5, 10) == pytest.approx(0.5)
    assert cosine(1.0, 0.0, 10, 10) == 0.0
    assert cosine(1.0, 0.0, 11, 10) == 0.0  # clamps after the end
    assert cosine(1.0, 0.0, 0, 0) == 0.0  # empty span


def test_step_counts_from_config():
    s = schedules()
    assert s.total_steps == 1000
    assert s.steps_per_epoch == 100
    assert s.warmup_steps == 200
    assert s.teacher_temp_warmup_steps == 300


def test_unresolved_steps_per_epoch_is_refused():
    cfg = Config().validate()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Schedules.from_config(cfg)


def test_peak_lr_follows_linear_scaling():
    s = schedules("optim.lr=5e-4")
    assert s.peak_lr == pytest.approx(5e-4 * 128 / 256)  # G = 2 workers x 64
    s = schedules("optim.lr=5e-4", "run.num_workers=4", "optim.batch_size_per_worker=128")
    assert s.peak_lr == pytest.approx(5e-4 * 512 / 256)


def test_lr_warmup_then_cosine():
    s = schedules("optim.lr=5e-4", "optim.min_lr=1e-6")
    peak = 5e-4 * 128 / 256
    assert s.lr(0) == 0.0
    # linear during the warm-up
    assert s.lr(50) == pytest.approx(peak * 50 / 200)
    assert s.lr(100) == pytest.approx(peak / 2)
    assert s.lr(199) == pytest.approx(peak * 199 / 200)
    assert s.lr(200) == pytest.approx(peak)
    # cosine afterwards: half-way between peak and min_lr in the middle of the decay
    assert s.lr(600) == pytest.approx(1e-6 + 0.5 * (peak - 1e-6))
    assert s.lr(1000) == pytest.approx(1e-6)
    assert s.lr(1500) == pytest.approx(1e-6)
    warm = [s.lr(i) for i in range(0, 201)]
    decay = [s.lr(i) for i in range(200, 1001)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert max(s.lr(i) for i in range(1001)) == pytest.approx(peak)


def test_zero_warmup_starts_at_peak():
    s = schedules("optim.warmup_epochs=0", "massl.warmup_teacher_temp_epochs=0")
    assert s.warmup_steps == 0
    assert s.lr(0) == pytest.approx(s.peak_lr)
    assert s.lr(1000) == pytest.approx(s.min_lr)
    assert all(math.isfinite(s.lr(i)) for i in range(0, 1001, 7))
    assert s.teacher_temperature(0) == pytest.approx(0.07)
    assert s.teacher_temperature(500) == pytest.approx(0.07)


def test_weight_decay_cosine_up():
    s = schedules("optim.weight_decay=0.04", "optim.weight_decay_end=0.4")
    assert s.weight_decay(0) == pytest.approx(0.04)
    assert s.weight_decay(500) == pytest.approx(0.22)
    assert s.weight_decay(1000) == pytest.approx(0.4)
    wd = [s.weight_decay(i) for i in range(1001)]
    assert all(a < b for a, b in zip(wd, wd[1:]))
    # slow at both ends (cosine), fast in the middle
    assert wd[1] - wd[0] < wd[501] - wd[500]


def test_momentum_cosine_to_one():
    s = schedules("massl.momentum_teacher=0.992")
    assert s.momentum(0) == pytest.approx(0.992)
    assert s.momentum(500) == pytest.approx(0.996)
    assert s.momentum(1000) == 1.0
    assert s.momentum(2000) == 1.0
    m = [s.momentum(i) for i in range(1001)]
    assert all(a <= b for a, b in zip(m, m[1:]))
    assert all(0.992 - 1e-12 <= x <= 1.0 for x in m)


def test_teacher_temperature_linear_warmup_then_constant():
    s = schedules("massl.warmup_teacher_temp=0.04", "massl.teacher_temp=0.07")
    assert s.teacher_temperature(0) == pytest.approx(0.04)
    assert s.teacher_temperature(150) == pytest.approx(0.055)
    assert s.teacher_temperature(299) == pytest.approx(0.04 + 0.03 * 299 / 300)
    assert s.teacher_temperature(300) == pytest.approx(0.07)
    assert s.teacher_temperature(999) == pytest.approx(0.07)
    diffs = [s.teacher_temperature(i + 1) - s.teacher_temperature(i) for i in range(299)]
    assert max(diffs) == pytest.approx(min(diffs))  # linear


def test_warmups_longer_than_training_are_clipped():
    s = schedules("optim.epochs=2", "optim.warmup_epochs=1", "massl.warmup_teacher_temp_epochs=30")
    assert s.total_steps == 200
    assert s.teacher_temp_warmup_steps == 200
    assert s.teacher_temperature(200) == pytest.approx(0.07)


def test_schedules_are_pure_functions_of_the_step():
    a, b = schedules(), schedules()
    for i in (0, 1, 199, 200, 777, 1000):
        assert (a.lr(i), a.weight_decay(i), a.momentum(i), a.teacher_temperature(i)) == \
               (b.lr(i), b.weight_decay(i), b.momentum(i), b.teacher_temperature(i))
