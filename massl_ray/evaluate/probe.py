"""Linear probe and few-shot classification on frozen features. Ray-free.

Linear probe (DINO's recipe on pre-computed features): a linear layer, SGD with momentum 0.9,
no weight decay, a cosine schedule to 0 over ``epochs``, ``lr * batch / 256`` for each
learning rate of a small sweep; every learning rate trains its own head in the same pass over
the data, and the best top-1 on the test set is reported (with every lr's top-1). Features are
standardised with the train set's mean and standard deviation first (an affine change of
variables the linear layer could absorb; it makes one lr grid fit every backbone).

Few-shot: ``n`` labeled images per class drawn from the train set (seeded: draw ``d`` of ``n``
shots uses ``numpy.random.default_rng([seed, n, d])``), a multinomial logistic regression on
their L2-normalised features (L2 penalty as scikit-learn's default, C = 1; L-BFGS), top-1 on
the test set; the mean and standard deviation over the draws.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from massl_ray.method.schedules import cosine

DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[-1])
    order = torch.argsort(-logits, dim=-1, stable=True)[..., :k]
    return int((order == labels[:, None]).any(-1).sum())


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, num_classes: Optional[int] = None,
                 lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 100, batch_size: int = 256,
                 momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 standardize: bool = True) -> dict:
    """Train one linear head per lr on ``train_x`` (frozen features); top-1/top-5 in percent."""
    if epochs <= 0 or not lrs:
        raise ValueError("linear probe: epochs must be positive and lrs non-empty")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    x, xt = train_x.float(), test_x.float()
    if standardize:
        mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
        x, xt = (x - mu) / sd, (xt - mu) / sd
    y, yt = train_y.long(), test_y.long()
    n, d = x.shape
    h = len(lrs)
    g = torch.Generator().manual_seed(seed)
    # DINO's initialisation: weights N(0, 0.01), bias 0 (identical for every head). The heads
    # are the column blocks of one [D, H * C] matrix: one GEMM per batch serves them all.
    w0 = torch.randn(d, 1, num_classes, generator=g) * 0.01
    w = w0.expand(d, h, num_classes).reshape(d, h * num_classes).clone().requires_grad_(True)
    b = torch.zeros(h * num_classes, requires_grad=True)
    base = torch.tensor([lr * batch_size / 256.0 for lr in lrs])
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    t = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            logits = (xb @ w + b).view(-1, h, num_classes)
            # Sum over heads of each head's mean loss: each head gets its own gradient.
            loss = F.cross_entropy(logits.reshape(-1, num_classes),
                                   yb.repeat_interleave(h), reduction="sum") / yb.shape[0]
            gw, gb = torch.autograd.grad(loss, (w, b))
            lr = cosine(base, 0.0, t, total).repeat_interleave(num_classes)
            with torch.no_grad():
                if weight_decay:
                    gw = gw + weight_decay * w
                # torch.optim.SGD semantics (dampening 0, no Nesterov), per-head lr.
                if t == 0:
                    buf_w.copy_(gw)
                    buf_b.copy_(gb)
                else:
                    buf_w.mul_(momentum).add_(gw)
                    buf_b.mul_(momentum).add_(gb)
                w.sub_(lr * buf_w)
                b.sub_(lr * buf_b)
            t += 1
    with torch.no_grad():
        def head_logits(data: torch.Tensor) -> torch.Tensor:  # [H, N, C]
            return (data @ w + b).view(-1, h, num_classes).transpose(0, 1)

        logits, train_logits = head_logits(xt), head_logits(x)
        top1 = [100.0 * _topk_correct(logits[j], yt, 1) / len(yt) for j in range(h)]
        top5 = [100.0 * _topk_correct(logits[j], yt, 5) / len(yt) for j in range(h)]
        train_top1 = [100.0 * _topk_correct(train_logits[j], y, 1) / n for j in range(h)]
    best = int(np.argmax(top1))
    return {
        "linear_top1": top1[best],
        "linear_top5": top5[best] if num_classes >= 5 else None,
        "linear_best_lr": float(lrs[best]),
        "linear_train_top1": train_top1[best],
        "linear_per_lr": {str(float(lr)): round(a, 4) for lr, a in zip(lrs, top1)},
        "linear_epochs": epochs,
        "linear_batch_size": batch_size,
    }


def few_shot_indices(labels: np.ndarray | torch.Tensor, n_per_class: int, draw: int,
                     seed: int = 0) -> np.ndarray:
    """Indices of ``n_per_class`` train rows of every class (sorted), reproducible from
    ``(seed, n_per_class, draw)``. A class with fewer rows is refused, naming it."""
    lab = np.asarray(labels)
    rng = np.random.default_rng([seed, n_per_class, draw])
    out = []
    for c in np.unique(lab):
        pool = np.flatnonzero(lab == c)
        if len(pool) < n_per_class:
            raise ValueError(f"few-shot: class {int(c)} has {len(pool)} train rows, fewer than "
                             f"{n_per_class} shots")
        out.append(rng.choice(pool, n_per_class, replace=False))
    return np.sort(np.concatenate(out))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float = 1.0,
                 max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: mean cross-entropy + ||W||^2 / (2 C N), L-BFGS."""
    x, y = x.float(), y.long()
    lam = 1.0 / (c * x.shape[0])
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                            tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def few_shot(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
             test_y: torch.Tensor, shots: Sequence[int] = (1, 5, 10), draws: int = 5,
             seed: int = 0, num_classes: Optional[int] = None) -> dict:
    """For each n in ``shots``: top-1 (percent) of ``draws`` draws, their mean and std."""
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    x = F.normalize(train_x.float(), dim=1)
    xt = F.normalize(test_x.float(), dim=1)
    yt = test_y.long()
    out = {}
    for n in shots:
        accs = []
        counts = np.bincount(train_y.numpy())
        present = counts[counts > 0]
        if present.min() < n:
            out[str(n)] = {"mean": None, "std": None, "runs": [],
                           "skipped": f"a class has only {int(present.min())} train rows"}
            continue
        for d in range(draws):
            idx = torch.from_numpy(few_shot_indices(train_y.numpy(), n, d, seed))
            w, b = fit_logistic(x[idx], train_y[idx], num_classes)
            accs.append(100.0 * _topk_correct(xt @ w + b, yt, 1) / len(yt))
        out[str(n)] = {"mean": float(np.mean(accs)),
                       "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                       "runs": [round(a, 4) for a in accs]}
    return out
