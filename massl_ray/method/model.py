"""Backbone (timm ViT) + projection head, student/teacher construction and the EMA update.

Ray-free. Every crop resolution goes through the same backbone thanks to timm's
``dynamic_img_size=True`` (position embeddings are interpolated per input size).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from massl_ray.config import Config, ModelConfig

log = logging.getLogger(__name__)

# Presets: name -> (timm model name, keyword overrides). ``vit_micro`` is the CPU-sized variant
# (ViT-Tiny widths, 4 blocks), defined through timm's own arguments.
ARCHS: dict[str, tuple[str, dict]] = {
    "vit_micro": ("vit_tiny_patch16_224", {"depth": 4}),
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
}


def backbone_kwargs(mcfg: ModelConfig, img_size: int, drop_path_rate: float) -> tuple[str, dict]:
    """The timm name and keyword arguments that build this config's backbone.

    ``export`` uses the same function, so an exported state dict loads into
    ``timm.create_model(name, **kwargs)`` unchanged.
    """
    if mcfg.arch in ARCHS:
        name, kw = ARCHS[mcfg.arch]
        kw = dict(kw)
    else:
        name, kw = mcfg.arch, {}
    for key in ("embed_dim", "depth", "num_heads"):
        v = getattr(mcfg, key)
        if v is not None:
            kw[key] = v
    kw.update(
        pretrained=False,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=True,
        patch_size=mcfg.patch_size,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
    )
    return name, kw


def build_backbone(mcfg: ModelConfig, img_size: int, drop_path_rate: float) -> nn.Module:
    name, kw = backbone_kwargs(mcfg, img_size, drop_path_rate)
    try:
        model = timm.create_model(name, **kw)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"model.arch {mcfg.arch!r} cannot be built by timm: {e}") from e
    if not hasattr(model, "embed_dim"):
        raise ValueError(f"model.arch {mcfg.arch!r} is not a ViT (no embed_dim)")
    return model


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Warm start from a local file: a backbone state dict (.safetensors or torch).

    A massl_ray checkpoint file is accepted too (its teacher backbone is taken).
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "teacher" in sd:
            sd = {k[len("backbone."):]: v for k, v in sd["teacher"].items() if k.startswith("backbone.")}
        elif isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    try:
        missing, unexpected = backbone.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"model.init_from {path!r} does not match the backbone: {e}") from None
    if unexpected or missing:
        raise ValueError(
            f"model.init_from {path!r} does not match the backbone: "
            f"missing {sorted(missing)[:5]}..., unexpected {sorted(unexpected)[:5]}..."
        )
    log.info("warm-started backbone from %s", path)


class ProjectionHead(nn.Module):
    """MLP D -> hidden -> hidden -> out, GELU, no BatchNorm, then L2-normalisation."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)


class MultiCropNet(nn.Module):
    """Backbone + head applied to stacks of crops; one batched forward per resolution.

    ``forward(global_crops, local_crops)`` takes float tensors ``[B, 2, 3, Hg, Wg]`` and
    ``[B, L, 3, Hl, Wl]`` (local may be None) and returns unit embeddings ``[V, B, D]`` with
    the views in order (global 1, global 2, local 1..L).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def embed_views(self, crops: torch.Tensor) -> torch.Tensor:
        b, v = crops.shape[:2]
        flat = crops.transpose(0, 1).reshape(v * b, *crops.shape[2:])  # view-major
        return self.head(self.backbone(flat)).view(v, b, -1)

    def forward(self, global_crops: torch.Tensor,
                local_crops: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = [self.embed_views(global_crops)]
        if local_crops is not None and local_crops.shape[1] > 0:
            out.append(self.embed_views(local_crops))
        return torch.cat(out, dim=0)


def build_student_teacher(cfg: Config) -> tuple[MultiCropNet, MultiCropNet]:
    """Student with drop-path, teacher = same weights, drop-path 0, frozen."""
    mcfg = cfg.model
    student_bb = build_backbone(mcfg, cfg.crops.global_size, mcfg.drop_path_rate)
    if mcfg.init_from:
        load_backbone_weights(student_bb, mcfg.init_from)
    head = ProjectionHead(student_bb.embed_dim, mcfg.head_hidden_dim, mcfg.head_out_dim)
    student = MultiCropNet(student_bb, head)
    teacher_bb = build_backbone(mcfg, cfg.crops.global_size, 0.0)
    teacher = MultiCropNet(teacher_bb, copy.deepcopy(head))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return student, teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s, over matching parameters."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise RuntimeError("student and teacher have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def param_groups(model: nn.Module) -> list[dict]:
    """Two AdamW groups: weight-decayed (ndim > 1 and not a bias) and the rest (wd 0)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "name": "decay"},
        {"params": no_decay, "name": "no_decay", "weight_decay": 0.0, "fixed_wd": True},
    ]
