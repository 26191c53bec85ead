"""One MaSSL training step and the complete state needed to continue it exactly. Ray-free.

The Ray worker loop only wraps :class:`Learner`: build it (optionally with a DDP-wrapping
function and the all-gather), restore its state from a checkpoint, call :meth:`Learner.step`
on uint8 crop batches, and save :meth:`Learner.state_dict` periodically.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from massl_ray.config import Config, config_from_dict
from massl_ray.method.distributed import all_gather_cat, default_gather, is_distributed
from massl_ray.method.loss import LossStats, massl_loss
from massl_ray.method.memory import MemoryBank, block_permutation
from massl_ray.method.model import build_student_teacher, ema_update, param_groups
from massl_ray.method.schedules import Schedules

log = logging.getLogger(__name__)

STATE_FORMAT = "massl_ray/state/1"


class CheckpointMismatch(RuntimeError):
    """A checkpoint that does not belong to this run's configuration or code."""


class NonFiniteLoss(FloatingPointError):
    def __init__(self, step: int, value: float):
        super().__init__(
            f"non-finite loss ({value}) at global step {step}: training stopped; the last good "
            f"checkpoint is kept. Lower optim.lr, raise massl.teacher_temp, or use fp32."
        )
        self.step = step
        self.value = value

    def __reduce__(self):  # picklable: Ray carries it from a train worker to the driver
        return (type(self), (self.step, self.value))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float, (x/255 - mean) / std, on x's device."""
    return (x.to(dtype).div_(255.0) - mean.view(3, 1, 1)) / std.view(3, 1, 1)


@dataclass
class StepResult:
    """What one step produced; tensors stay on the device until :meth:`metrics` is called."""

    step: int  # global step this result belongs to (0-based, before the increment)
    loss: torch.Tensor
    stats: LossStats
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    step_time: float  # wall seconds of the step as dispatched (host view)

    def metrics(self) -> dict:
        """Materialise (one host sync)."""
        return {
            "step": self.step + 1,
            "loss": float(self.loss),
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "momentum": self.momentum,
            "teacher_temp": self.teacher_temp,
            "teacher_entropy": float(self.stats.teacher_entropy),
            "teacher_entropy_max": float(np.log(self.stats.block_size)),
            "distinct_argmax_slots": self.stats.distinct_argmax(),
            "step_time": self.step_time,
        }


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Keys whose change makes a checkpoint a different run (resume refuses them). run.* keys other
# than the seed, and every data.* key may change between attempts. The number of workers is
# not one: the global batch is (an elastic run resizes with the same global batch, each worker
# taking its share), so a checkpoint resumes on any world size that splits it.
_STRUCTURAL = ("model", "crops", "massl", "optim")


def _structural(cfg: dict) -> dict:
    out = {k: dict(cfg[k]) for k in _STRUCTURAL}
    n = cfg["run"]["num_workers"]
    world = max(1, int(n[1] if isinstance(n, (list, tuple)) else n))
    out["global_batch"] = out["optim"].pop("batch_size_per_worker") * world
    out["run.seed"] = cfg["run"]["seed"]
    return out


def _flat_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        key = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _flat_diff(va, vb, key + ".")
        elif (list(va) if isinstance(va, tuple) else va) != (list(vb) if isinstance(vb, tuple) else vb):
            diffs.append(f"{key}: checkpoint {va!r} vs config {vb!r}")
    return diffs


class Learner:
    def __init__(self, cfg: Config, device: Optional[torch.device | str] = None,
                 gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 wrap_student: Optional[Callable[[nn.Module], nn.Module]] = None):
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(device or "cpu")
        self.schedules = Schedules.from_config(cfg)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        student, teacher = build_student_teacher(cfg)
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device)
        self.student_fwd = wrap_student(self.student) if wrap_student else self.student
        self.teacher_fwd = self.teacher
        # Optional torch.compile of the two forwards (the step's only compute-heavy code; the
        # loss already has an analytic gradient). The modules themselves stay uncompiled, so
        # state dicts and checkpoints are unchanged. ``run.compile`` (bool): a run.*
        # key, so it may differ between a run and its resume.
        if cfg.run.compile:
            self.student_fwd = torch.compile(self.student_fwd, dynamic=False)
            self.teacher_fwd = torch.compile(self.teacher, dynamic=False)
        self.memory = MemoryBank(cfg.massl.memory_size, cfg.model.head_out_dim, seed=cfg.run.seed,
                                 gather=gather or default_gather()).to(self.device)
        fused = cfg.optim.fused_adamw and self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=0.0,
                                           betas=cfg.optim.betas, fused=fused or None)
        self.amp_dtype = AMP_DTYPES[cfg.optim.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.optim.precision == "fp16")
        self.mean = torch.tensor(cfg.crops.mean, device=self.device)
        self.std = torch.tensor(cfg.crops.std, device=self.device)
        self.partition_gen = torch.Generator(device=self.device)
        self.global_step = 0
        dist = torch.distributed
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    # ---- the step -----------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _partition(self, step: int) -> torch.Tensor:
        # Seeded by (seed, step): reproducible and identical on every rank, no state to save.
        self.partition_gen.manual_seed(self.cfg.run.seed * 1_000_003 + step)
        return block_permutation(self.cfg.massl.memory_size, self.cfg.block_size,
                                 self.partition_gen, self.device)

    def _clip_(self) -> None:
        """DINO-style clipping: each parameter tensor's gradient to L2 norm <= clip_grad."""
        clip = self.cfg.optim.clip_grad
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if clip <= 0 or not grads:
            return
        # min(1, clip / (norm + 1e-6)) per tensor, in a handful of foreach kernels (not 2 per
        # tensor) and without a host sync
        coefs = torch._foreach_add(torch._foreach_norm(grads), 1e-6)
        torch._foreach_reciprocal_(coefs)
        torch._foreach_mul_(coefs, clip)
        torch._foreach_clamp_max_(coefs, 1.0)
        torch._foreach_mul_(grads, coefs)

    def step(self, global_crops: torch.Tensor, local_crops: Optional[torch.Tensor] = None,
             check_finite: Optional[bool] = None) -> StepResult:
        """One optimisation step on uint8 crops [B, 2, 3, Hg, Wg] and [B, L, 3, Hl, Wl].

        ``check_finite`` (default: on CPU every step; on GPU never, the caller checks when it
        logs) raises :class:`NonFiniteLoss` before any state is changed.
        """
        t0 = time.perf_counter()
        step = self.global_step
        sch = self.schedules
        lr, wd = sch.lr(step), sch.weight_decay(step)
        mom, ttemp = sch.momentum(step), sch.teacher_temperature(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if not g.get("fixed_wd"):
                g["weight_decay"] = wd

        # The step's own randomness (drop path) from (seed, step, rank): a resumed run, on any
        # rank, draws exactly what the uninterrupted run drew at this step.
        torch.manual_seed(_step_seed(self.cfg.run.seed, step, self.rank))
        gc = normalize(global_crops.to(self.device, non_blocking=True), self.mean, self.std)
        lc = None
        if local_crops is not None and local_crops.shape[1] > 0:
            lc = normalize(local_crops.to(self.device, non_blocking=True), self.mean, self.std)
        self.student.train()
        with self._autocast():
            with torch.no_grad():
                z_t = self.teacher_fwd(gc)
            z_s = self.student_fwd(gc, lc)
        loss, stats = massl_loss(z_s, z_t, self.memory.rows, self._partition(step),
                                 self.cfg.massl.student_temp, ttemp,
                                 self.cfg.massl.loss_chunk_blocks)
        if check_finite is None:
            check_finite = self.device.type == "cpu"
        if check_finite:
            self._check_finite(step, loss)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            self._clip_()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.teacher, self.student, mom)
        self.memory.update(z_t[1].float())  # keys of global view 2, all-gathered, after the logits
        self.global_step += 1
        return StepResult(step, loss.detach(), stats, lr, wd, mom, ttemp, time.perf_counter() - t0)

    def _check_finite(self, step: int, loss: torch.Tensor) -> None:
        """Raise :class:`NonFiniteLoss` if the loss of *any* rank is non-finite, on every rank
        alike (one all-gather of the ranks' losses): a rank that stopped alone would leave the
        others waiting in the gradient all-reduce. Collective: every rank must call it at the
        same steps (``check_finite`` depends on the step and the device type only)."""
        losses = loss.detach().float().reshape(1)
        if is_distributed():
            losses = all_gather_cat(losses)
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            raise NonFiniteLoss(step, float(losses[bad][0]))

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything for an exact continuation. Only tensors and plain Python values, so it
        loads with ``torch.load(weights_only=True)``."""
        np_state = np.random.get_state()
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": STATE_FORMAT,
            "global_step": self.global_step,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "memory": self.memory.state_dict(),
            "rng": rng,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Strict restore; raises :class:`CheckpointMismatch` naming what differs."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointMismatch(
                f"not a massl_ray training state (format {state.get('format') if isinstance(state, dict) else type(state)!r}, "
                f"expected {STATE_FORMAT!r})")
        missing = [k for k in ("global_step", "student", "teacher", "optimizer", "scaler", "memory",
                               "rng", "config") if k not in state]
        if missing:
            raise CheckpointMismatch(f"checkpoint state is incomplete: missing {missing}")
        diffs = _flat_diff(_structural(state["config"]), _structural(self.cfg.to_dict()))
        if diffs:
            raise CheckpointMismatch(
                "checkpoint was written by a different configuration; resume refuses it "
                "(start a new run, or use model.init_from for a warm start):\n  "
                + "\n  ".join(diffs))
        try:
            self.student.load_state_dict(state["student"], strict=True)
            self.teacher.load_state_dict(state["teacher"], strict=True)
            self.memory.load_state_dict(state["memory"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointMismatch(f"checkpoint does not match the model: {e}") from e
        self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(("MT19937", rng["numpy"]["keys"].numpy().astype(np.uint32),
                             rng["numpy"]["pos"], rng["numpy"]["has_gauss"], rng["numpy"]["gauss"]))
        random.setstate(_to_tuple(rng["python"]))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + rank + 7919


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def config_of_state(state: dict) -> Config:
    """The resolved configuration stored in a training state."""
    return config_from_dict(state["config"], validate=False)
