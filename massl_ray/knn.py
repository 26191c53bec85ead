"""Weighted k-NN classification on features (DINO protocol). Ray-free.

L2-normalised features, cosine similarity to every bank feature, the k nearest vote for their
label with weight exp(sim / T). Queries are processed in chunks, so the similarity matrix never
exceeds ``chunk x N_bank``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict_scores(train_feats: torch.Tensor, train_labels: torch.Tensor,
                       test_feats: torch.Tensor, k: int, num_classes: int,
                       temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [N_test, C]: sum over the k nearest bank items of exp(sim / T) per class."""
    if train_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one bank (train) feature")
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(bank.device)
    k = min(k, bank.shape[0])
    out = []
    for i in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[i:i + chunk].float().to(bank.device), dim=1)
        sim = q @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        w = (top_sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=bank.device, dtype=w.dtype)
        scores.scatter_add_(1, labels[top_idx], w)
        out.append(scores)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (20,), temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> dict:
    """Top-1 (and top-5 where there are >= 5 classes) accuracy in percent for each k."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    res = {}
    tl = test_labels.long()
    for k in ks:
        scores = knn_predict_scores(train_feats, train_labels, test_feats, k, num_classes,
                                    temperature, chunk).cpu()
        # Ties broken towards the lower class index (stable sort of -score).
        order = torch.argsort(-scores, dim=1, stable=True)
        res[f"knn_top1_k{k}"] = 100.0 * (order[:, 0] == tl).float().mean().item()
        if num_classes >= 5:
            res[f"knn_top5_k{k}"] = 100.0 * (order[:, :5] == tl[:, None]).any(1).float().mean().item()
    return res
