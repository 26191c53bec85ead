"""One training step (Learner.step) and its exact save/load continuation, on the tiny config."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import make_crops
from massl_ray.method.learner import (STATE_FORMAT, CheckpointMismatch, Learner, NonFiniteLoss,
                               config_of_state, normalize)


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _teacher_keys(learner: Learner, gc_u8: torch.Tensor) -> torch.Tensor:
    """The teacher's embedding of global view 2, as the step will compute it (before EMA)."""
    with torch.no_grad():
        gc = normalize(gc_u8, learner.mean, learner.std)
        return learner.teacher(gc)[1].float()


# ---- one step ---------------------------------------------------------------------------

def test_step_updates_student_and_teacher_by_ema(tiny_config):
    cfg = tiny_config("optim.lr=1e-2", "massl.momentum_teacher=0.9")
    lr_ = Learner(cfg)
    b1, b2 = make_crops(cfg, seed=1), make_crops(cfg, seed=2)
    s0, t0 = _params(lr_.student), _params(lr_.teacher)
    for n in s0:  # the teacher starts as a copy of the student
        assert torch.equal(s0[n], t0[n]), n
    lr_.step(*b1)
    s1, t1 = _params(lr_.student), _params(lr_.teacher)
    changed = [n for n in s0 if not torch.equal(s0[n], s1[n])]
    assert len(changed) == len(s0), set(s0) - set(changed)  # every student tensor moved
    assert any(not torch.equal(t0[n], t1[n]) for n in t0)
    assert all(p.grad is None for p in lr_.teacher.parameters())
    assert all(not p.requires_grad for p in lr_.teacher.parameters())

    # second step: teacher and student differ now, so the EMA rule is visible
    m = lr_.schedules.momentum(1)
    assert 0.9 < m < 1.0
    lr_.step(*b2)
    s2, t2 = _params(lr_.student), _params(lr_.teacher)
    for n in ("backbone.pos_embed", "backbone.blocks.0.attn.qkv.weight", "head.mlp.4.weight",
              "head.mlp.0.bias"):
        assert not torch.allclose(t1[n], s2[n])
        torch.testing.assert_close(t2[n], m * t1[n] + (1 - m) * s2[n], atol=1e-7, rtol=1e-6)
    for n in t2:
        torch.testing.assert_close(t2[n], m * t1[n] + (1 - m) * s2[n], atol=1e-7, rtol=1e-6)
    assert all(p.grad is None for p in lr_.teacher.parameters())
    assert lr_.global_step == 2


def test_memory_receives_teacher_keys_of_global_view_2(tiny_config):
    cfg = tiny_config()
    lr_ = Learner(cfg)
    b = cfg.optim.batch_size_per_worker
    batches = [make_crops(cfg, seed=i) for i in range(3)]
    for i, (gc, lc) in enumerate(batches):
        ptr = int(lr_.memory.ptr)
        assert ptr == i * b
        keys = _teacher_keys(lr_, gc)  # before the step's EMA update
        keys_view1 = None
        with torch.no_grad():
            keys_view1 = lr_.teacher(normalize(gc, lr_.mean, lr_.std))[0]
        rows_before = lr_.memory.rows.clone()
        lr_.step(gc, lc)
        rows = lr_.memory.rows
        assert torch.equal(rows[ptr:ptr + b], keys)
        assert not torch.allclose(rows[ptr:ptr + b], keys_view1)  # view 2, not view 1
        # nothing else was written
        assert torch.equal(rows[:ptr], rows_before[:ptr])
        assert torch.equal(rows[ptr + b:], rows_before[ptr + b:])
        assert int(lr_.memory.ptr) == (ptr + b) % cfg.massl.memory_size
        # the teacher moved after computing the keys: recomputing now gives other values
        assert not torch.equal(_teacher_keys(lr_, gc), keys)


def test_clip_is_per_tensor(tiny_config):
    clip = 1e-3
    lr_ = Learner(tiny_config(f"optim.clip_grad={clip}"))
    torch.manual_seed(0)
    params = list(lr_.student.parameters())
    for i, p in enumerate(params):
        # most gradients far above the clip, every fifth one far below it
        scale = 1e-7 if i % 5 == 0 else 1.0
        p.grad = torch.randn_like(p) * scale
    before = [p.grad.clone() for p in params]
    lr_._clip_()
    for b, p in zip(before, params):
        n0, n1 = b.norm().item(), p.grad.norm().item()
        assert n1 <= clip * (1 + 1e-5)
        if n0 > clip:
            # clipped to the threshold itself (a global-norm clip would leave it far below)
            assert n1 == pytest.approx(clip, rel=1e-3)
            torch.testing.assert_close(p.grad, b * (n1 / n0), atol=1e-12, rtol=1e-4)
        else:
            assert torch.equal(p.grad, b)


def test_clip_zero_disables(tiny_config):
    lr_ = Learner(tiny_config("optim.clip_grad=0"))
    for p in lr_.student.parameters():
        p.grad = torch.full_like(p, 10.0)
    lr_._clip_()
    assert all(torch.equal(p.grad, torch.full_like(p, 10.0)) for p in lr_.student.parameters())


def test_step_clips_gradients(tiny_config):
    clip = 1e-4
    cfg = tiny_config(f"optim.clip_grad={clip}")
    lr_ = Learner(cfg)
    lr_.step(*make_crops(cfg))
    norms = [p.grad.norm().item() for p in lr_.student.parameters() if p.grad is not None]
    assert norms and max(norms) <= clip * (1 + 1e-5)


def test_param_groups_follow_weight_decay_schedule(tiny_config):
    cfg = tiny_config("optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
                      "optim.warmup_epochs=0.5")
    lr_ = Learner(cfg)
    groups = lr_.optimizer.param_groups
    assert len(groups) == 2
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(lr_.student.parameters()))
    for k in range(4):
        res = lr_.step(*make_crops(cfg, seed=k))
        sch = lr_.schedules
        assert groups[0]["weight_decay"] == sch.weight_decay(k) == res.weight_decay
        assert groups[1]["weight_decay"] == 0.0
        assert groups[0]["lr"] == groups[1]["lr"] == sch.lr(k) == res.lr
    assert groups[0]["weight_decay"] > 0.04  # it rose
    assert lr_.schedules.lr(0) == 0.0 and groups[0]["lr"] > 0  # warm-up


def test_metrics(tiny_config):
    cfg = tiny_config()
    lr_ = Learner(cfg)
    res = lr_.step(*make_crops(cfg))
    m = res.metrics()
    for key in ("loss", "lr", "weight_decay", "momentum", "teacher_temp", "teacher_entropy",
                "distinct_argmax_slots", "step_time"):
        assert key in m, key
        assert math.isfinite(m[key]), (key, m[key])
    assert m["step"] == 1
    assert m["momentum"] == pytest.approx(cfg.massl.momentum_teacher)
    assert m["teacher_temp"] == pytest.approx(cfg.massl.warmup_teacher_temp)
    assert m["weight_decay"] == pytest.approx(cfg.optim.weight_decay)
    assert m["step_time"] > 0
    assert 0 <= m["teacher_entropy"] <= math.log(cfg.block_size) + 1e-5
    assert m["teacher_entropy_max"] == pytest.approx(math.log(cfg.block_size))
    assert isinstance(m["distinct_argmax_slots"], int)
    argmax = res.stats.teacher_argmax
    assert argmax.shape == (2 * cfg.optim.batch_size_per_worker,)
    assert m["distinct_argmax_slots"] == len(set(argmax.tolist()))
    assert m["loss"] > 0
    # A memory whose slot similarities are c_j * z[0] with c_j increasing in j: each teacher row's
    # argmax is the last slot (z[0] > 0) or the first (z[0] < 0), never any other.
    k = cfg.massl.memory_size
    rows = torch.zeros_like(lr_.memory.rows)
    rows[:, 0] = torch.linspace(0.1, 1.0, k)
    lr_.memory.rows.copy_(rows)
    res = lr_.step(*make_crops(cfg, seed=1))
    slots = set(res.stats.teacher_argmax.tolist())
    assert slots <= {0, k - 1}, slots
    assert res.metrics()["distinct_argmax_slots"] == len(slots)


@pytest.mark.parametrize("inject", ["student_temp", "inputs"])
def test_non_finite_loss_stops_before_any_change(tiny_config, monkeypatch, inject):
    cfg = tiny_config()
    lr_ = Learner(cfg)
    lr_.step(*make_crops(cfg, seed=0))  # one good step: optimizer state exists
    s0, t0 = _params(lr_.student), _params(lr_.teacher)
    rows0, ptr0 = lr_.memory.rows.clone(), int(lr_.memory.ptr)
    opt0 = copy.deepcopy(lr_.optimizer.state_dict()["state"])
    if inject == "student_temp":
        monkeypatch.setattr(lr_.cfg.massl, "student_temp", float("nan"))
    else:
        monkeypatch.setattr(lr_, "mean", torch.full((3,), float("nan")))
    with pytest.raises(NonFiniteLoss) as ei:
        lr_.step(*make_crops(cfg, seed=1))
    assert ei.value.step == 1
    assert "global step 1" in str(ei.value) and "nan" in str(ei.value)
    assert lr_.global_step == 1
    for n, p in lr_.student.named_parameters():
        assert torch.equal(p, s0[n]), n
    for n, p in lr_.teacher.named_parameters():
        assert torch.equal(p, t0[n]), n
    assert torch.equal(lr_.memory.rows, rows0) and int(lr_.memory.ptr) == ptr0
    opt1 = lr_.optimizer.state_dict()["state"]
    for i in opt0:
        for k in opt0[i]:
            assert torch.equal(opt0[i][k], opt1[i][k]), (i, k)


def test_bf16_autocast_on_cpu(tiny_config):
    cfg = tiny_config("optim.precision=bf16")
    lr_ = Learner(cfg)
    s0 = _params(lr_.student)
    res = lr_.step(*make_crops(cfg))
    assert math.isfinite(float(res.loss))
    assert res.loss.dtype == torch.float32
    assert any(not torch.equal(p, s0[n]) for n, p in lr_.student.named_parameters())
    assert all(p.dtype == torch.float32 for p in lr_.student.parameters())
    assert lr_.memory.rows.dtype == torch.float32 and int(lr_.memory.ptr) == 8


# ---- exact continuation -----------------------------------------------------------------

def _run(learner, batches) -> list[torch.Tensor]:
    return [learner.step(*b).loss.detach().clone() for b in batches]


def _assert_same_state(a: Learner, b: Learner) -> None:
    for (n, pa), (_, pb) in zip(a.student.state_dict().items(), b.student.state_dict().items()):
        assert torch.equal(pa, pb), f"student {n}"
    for (n, pa), (_, pb) in zip(a.teacher.state_dict().items(), b.teacher.state_dict().items()):
        assert torch.equal(pa, pb), f"teacher {n}"
    assert torch.equal(a.memory.rows, b.memory.rows)
    assert torch.equal(a.memory.ptr, b.memory.ptr)
    assert a.global_step == b.global_step
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    for ga, gb in zip(oa["param_groups"], ob["param_groups"]):
        assert ga == gb


def test_save_load_continue_is_bitwise(tiny_config):
    cfg = tiny_config()  # drop_path 0.1: the continuation depends on the restored RNG
    assert cfg.model.drop_path_rate > 0
    warm = [make_crops(cfg, seed=i) for i in range(3)]
    cont = [make_crops(cfg, seed=100 + i) for i in range(3)]

    a = Learner(cfg)
    _run(a, warm)
    state = copy.deepcopy(a.state_dict())
    assert state["format"] == STATE_FORMAT and state["global_step"] == 3
    losses_a = _run(a, cont)

    b = Learner(tiny_config())
    assert not torch.equal(b.memory.rows, a.memory.rows)
    b.load_state_dict(copy.deepcopy(state))  # restores the global RNG too
    assert b.global_step == 3
    losses_b = _run(b, cont)
    for la, lb in zip(losses_a, losses_b):
        assert torch.equal(la, lb)
    _assert_same_state(a, b)
    assert a.global_step == 6

    # The step's randomness (drop path) is keyed by (seed, step, rank), not by whatever the
    # process's global RNG went through: a disturbed global RNG continues identically ...
    c = Learner(tiny_config())
    c.load_state_dict(copy.deepcopy(state))
    torch.manual_seed(12345)
    torch.rand(1000)
    losses_c = _run(c, cont)
    for la, lc in zip(losses_a, losses_c):
        assert torch.equal(la, lc)
    # ... and control: another rank's key draws other drop-path masks -> the run diverges
    d = Learner(tiny_config())
    d.load_state_dict(copy.deepcopy(state))
    d.rank = 1
    losses_d = _run(d, cont)
    assert any(not torch.equal(la, ld) for la, ld in zip(losses_a, losses_d))


def test_state_dict_round_trips_config(tiny_config):
    cfg = tiny_config("run.seed=3")
    state = Learner(cfg).state_dict()
    assert config_of_state(state) == cfg


def test_load_refuses_different_memory_size(tiny_config):
    state = Learner(tiny_config("massl.memory_size=512")).state_dict()
    other = Learner(tiny_config())
    rows0 = other.memory.rows.clone()
    with pytest.raises(CheckpointMismatch) as ei:
        other.load_state_dict(state)
    assert "massl.memory_size: checkpoint 512 vs config 256" in str(ei.value)
    assert torch.equal(other.memory.rows, rows0) and other.global_step == 0


@pytest.mark.parametrize("section, key, value", [
    ("model", "arch", "vit_tiny"),
    ("run", "seed", 7),
    ("crops", "num_local_crops", 6),
])
def test_load_refuses_different_config(tiny_config, section, key, value):
    lr_ = Learner(tiny_config())
    state = lr_.state_dict()
    state["config"] = copy.deepcopy(state["config"])
    state["config"][section][key] = value
    with pytest.raises(CheckpointMismatch) as ei:
        lr_.load_state_dict(state)
    name = "run.seed" if section == "run" else f"{section}.{key}"
    assert name in str(ei.value)


def test_load_accepts_non_structural_changes(tiny_config):
    state = Learner(tiny_config("run.name=first", "run.log_every_steps=5")).state_dict()
    Learner(tiny_config("run.name=second")).load_state_dict(state)


def test_load_refuses_incomplete_state(tiny_config):
    lr_ = Learner(tiny_config())
    state = lr_.state_dict()
    del state["memory"]
    with pytest.raises(CheckpointMismatch, match="memory"):
        lr_.load_state_dict(state)


def test_load_refuses_foreign_state(tiny_config):
    lr_ = Learner(tiny_config())
    with pytest.raises(CheckpointMismatch, match="not a massl_ray training state"):
        lr_.load_state_dict({"student": {}})
    with pytest.raises(CheckpointMismatch, match="not a massl_ray training state"):
        lr_.load_state_dict([1, 2])


def test_load_refuses_mismatching_weights(tiny_config):
    lr_ = Learner(tiny_config())
    state = lr_.state_dict()
    state["student"] = dict(state["student"])
    state["student"].pop("head.mlp.0.weight")
    with pytest.raises(CheckpointMismatch, match="does not match the model"):
        lr_.load_state_dict(state)
