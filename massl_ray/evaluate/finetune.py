"""Fine-tuning transfer: the whole teacher backbone + a linear head trained on a labeled
source. Ray-free, in this process.

The recipe of BEiT / MAE style ViT fine-tuning, scaled down: AdamW (betas 0.9 / 0.999), weight
decay on the weight matrices only (not on biases, norms, the class token or the position
embedding), **layer-wise learning-rate decay** (the head and the final norm get ``lr``, block
``i`` of ``L`` gets ``lr * decay ** (L - i)``, the patch embedding / class token / position
embedding ``lr * decay ** (L + 1)``), a linear **warmup** over ``warmup_epochs`` then a
**cosine** decay to 0, per step; ``lr`` is scaled by ``batch / 256``. Inputs are the eval views
(resize + centre crop, as the other evaluations) with a random horizontal flip (seeded) as the
only augmentation; the head is initialised to zero weights (as MAE's small-std init, here
exact). Top-1 on the test set after the last epoch (and after each epoch).
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from massl_ray.evaluate.features import cls_tokens
from massl_ray.method.learner import normalize
from massl_ray.method.schedules import cosine

NO_DECAY_NAMES = ("cls_token", "pos_embed", "reg_token", "dist_token")


def layer_index(name: str, depth: int) -> int:
    """0 for the patch embedding / tokens / position embedding, ``i + 1`` for ``blocks.i``,
    ``depth + 1`` for everything after the blocks (final norm, head)."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "reg_token", "dist_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(backbone: nn.Module, head: nn.Module, lr: float, weight_decay: float,
                 layer_decay: float) -> list[dict]:
    """AdamW parameter groups: one per (layer, decay or not), each with its ``lr`` scale."""
    depth = len(backbone.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    named = [(n, p) for n, p in backbone.named_parameters()] + \
            [(f"head.{n}", p) for n, p in head.named_parameters()]
    for name, p in named:
        if not p.requires_grad:
            continue
        layer = layer_index(name, depth)
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in NO_DECAY_NAMES
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {"params": [], "names": [], "lr_scale": scale, "lr": lr * scale,
                           "weight_decay": 0.0 if no_decay else weight_decay, "layer": layer}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup from ``base / warmup`` to ``base`` over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return cosine(base, 0.0, step - warmup, max(1, total - warmup))


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(cls_tokens(self.backbone, x)[:, -1])


@torch.no_grad()
def _accuracy(model: nn.Module, views: torch.Tensor, labels: torch.Tensor, mean, std,
              device, batch_size: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(views), batch_size):
        x = normalize(views[i:i + batch_size].to(device), mean, std)
        correct += int((model(x).argmax(1).cpu() == labels[i:i + batch_size]).sum())
    return 100.0 * correct / max(1, len(views))


def fine_tune(backbone: nn.Module, train_views: torch.Tensor, train_labels: torch.Tensor,
              test_views: torch.Tensor, test_labels: torch.Tensor, mean: Sequence[float],
              std: Sequence[float], num_classes: Optional[int] = None, epochs: int = 10,
              batch_size: int = 128, lr: float = 5e-4, layer_decay: float = 0.75,
              weight_decay: float = 0.05, warmup_epochs: float = 1.0, seed: int = 0,
              device: str = "cpu") -> dict:
    """Fine-tune a copy of ``backbone`` (the original is left untouched) on uint8 views."""
    if epochs <= 0 or batch_size <= 0 or lr <= 0 or not 0 < layer_decay <= 1:
        raise ValueError("fine-tune: epochs, batch_size, lr must be positive, layer_decay in (0, 1]")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = _Classifier(copy.deepcopy(backbone), num_classes).to(dev)
    model.backbone.requires_grad_(True)
    m = torch.tensor(mean, device=dev)
    s = torch.tensor(std, device=dev)
    base = lr * batch_size / 256.0
    groups = param_groups(model.backbone, model.head, base, weight_decay, layer_decay)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                            lr=base, betas=(0.9, 0.999))
    n = len(train_views)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_epochs * steps_per_epoch))
    g = torch.Generator().manual_seed(seed)
    y = train_labels.long()
    step, per_epoch, losses = 0, [], []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        run_loss = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb = train_views[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            x = normalize(xb.to(dev), m, s)
            cur = lr_at(step, total, warmup, base)
            for pg in opt.param_groups:
                pg["lr"] = cur * pg["lr_scale"]
            loss = F.cross_entropy(model(x), y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += float(loss.detach()) * len(idx)
            step += 1
        losses.append(run_loss / n)
        per_epoch.append(_accuracy(model, test_views, test_labels, m, s, dev, 256))
    return {"finetune_top1": per_epoch[-1], "finetune_top1_per_epoch": [round(a, 4) for a in per_epoch],
            "finetune_train_loss_per_epoch": [round(v, 6) for v in losses],
            "finetune_epochs": epochs, "finetune_lr": lr, "finetune_batch_size": batch_size,
            "finetune_layer_decay": layer_decay, "finetune_weight_decay": weight_decay,
            "finetune_warmup_epochs": warmup_epochs, "finetune_train_rows": n}
