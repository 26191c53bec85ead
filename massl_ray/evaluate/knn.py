"""Weighted k-NN classification on features (DINO protocol). Ray-free.

L2-normalised features, cosine similarity to every bank (train) feature, the k nearest vote
for their label with weight exp(sim / T). Queries are processed in chunks of ``chunk`` and the
bank in chunks of ``bank_chunk`` (a running top-k is merged across bank chunks), so memory
stays at ``chunk x (bank_chunk + k)`` similarities whatever the bank size; one top-k pass at the
largest k serves every k asked for.

Ties: class scores that are exactly equal go to the lower class index (a stable sort); equal
similarities at the k-th place are broken arbitrarily by ``torch.topk`` (as in DINO).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)


@torch.no_grad()
def knn_topk(bank: torch.Tensor, queries: torch.Tensor, k: int,
             bank_chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and bank indices of the ``k`` nearest bank rows, most similar first.

    ``bank`` and ``queries`` must already be L2-normalised. Returns ``[Nq, k]`` values and
    indices (``k`` is capped at the bank size).
    """
    n = bank.shape[0]
    k = min(k, n)
    best_v = best_i = None
    for s in range(0, n, bank_chunk):
        sim = queries @ bank[s:s + bank_chunk].T
        v, i = sim.topk(min(k, sim.shape[1]), dim=1)
        i = i + s
        if best_v is None:
            best_v, best_i = v, i
        else:
            v = torch.cat([best_v, v], dim=1)
            i = torch.cat([best_i, i], dim=1)
            best_v, pos = v.topk(min(k, v.shape[1]), dim=1)
            best_i = i.gather(1, pos)
    return best_v, best_i


def _vote(top_sim: torch.Tensor, top_labels: torch.Tensor, num_classes: int,
          temperature: float) -> torch.Tensor:
    w = (top_sim / temperature).exp()
    scores = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device, dtype=w.dtype)
    return scores.scatter_add_(1, top_labels, w)


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (20,), temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024,
                 bank_chunk: int = 16384) -> dict:
    """Top-1 (and top-5 where there are >= 5 classes) accuracy in percent for each k.

    Keys ``knn_top1_k{k}`` / ``knn_top5_k{k}``. A k larger than the bank uses the whole bank.
    """
    if train_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one bank (train) feature")
    if test_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one query (test) feature")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ks = list(ks)
    kmax = max(ks)
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(bank.device)
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    n = test_feats.shape[0]
    for i in range(0, n, chunk):
        q = F.normalize(test_feats[i:i + chunk].float().to(bank.device), dim=1)
        tl = test_labels[i:i + chunk].long().to(bank.device)
        top_sim, top_idx = knn_topk(bank, q, kmax, bank_chunk)
        top_lab = labels[top_idx]
        for k in ks:
            scores = _vote(top_sim[:, :k], top_lab[:, :k], num_classes, temperature)
            # Ties broken towards the lower class index (stable sort of -score).
            order = torch.argsort(-scores, dim=1, stable=True)
            correct1[k] += int((order[:, 0] == tl).sum())
            if num_classes >= 5:
                correct5[k] += int((order[:, :5] == tl[:, None]).any(1).sum())
    res = {}
    for k in ks:
        res[f"knn_top1_k{k}"] = 100.0 * correct1[k] / n
        if num_classes >= 5:
            res[f"knn_top5_k{k}"] = 100.0 * correct5[k] / n
    return res
