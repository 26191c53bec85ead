"""Low-shot classification at the usual splits, on frozen features. Ray-free.

As MSN and DINO report it: 1, 2 and 5 labeled images per class, and 1 % / 10 % of the
labels, each with several seeded splits; a multinomial logistic regression on the
L2-normalised features of the labeled rows (the few-shot classifier of :mod:`probe`:
``fit_logistic``, L2 penalty ``||W||^2 / (2 C N)``, L-BFGS), top-1 on the whole test set; the
mean and standard deviation (ddof 1) over the splits.

Splits: ``n`` per class is :func:`probe.few_shot_indices` (draw ``d`` uses
``numpy.random.default_rng([seed, n, d])``, as ``few_shot``). A fraction ``f`` of the labels
is drawn per class (stratified, as ImageNet's 1 % / 10 % subsets are class-balanced):
``max(1, round(f * n_c))`` rows of each class of ``n_c`` rows, draw ``d`` from
``numpy.random.default_rng([seed, round(f * 1e6), d, 1])``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from massl_ray.evaluate.probe import _topk_correct, few_shot_indices, fit_logistic

DEFAULT_SHOTS = (1, 2, 5)
DEFAULT_FRACTIONS = (0.01, 0.1)


def fraction_indices(labels: np.ndarray | torch.Tensor, fraction: float, draw: int,
                     seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified ``fraction`` of the rows (at least one per class)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"low-shot fraction {fraction} must be in (0, 1]")
    lab = np.asarray(labels)
    rng = np.random.default_rng([seed, int(round(fraction * 1e6)), draw, 1])
    out = []
    for c in np.unique(lab):
        pool = np.flatnonzero(lab == c)
        take = max(1, int(round(fraction * len(pool))))
        out.append(rng.choice(pool, take, replace=False))
    return np.sort(np.concatenate(out))


def split_name(shots: Optional[int] = None, fraction: Optional[float] = None) -> str:
    if shots is not None:
        return f"{shots}-shot"
    return f"{100 * fraction:g}%"


def low_shot(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
             test_y: torch.Tensor, shots: Sequence[int] = DEFAULT_SHOTS,
             fractions: Sequence[float] = DEFAULT_FRACTIONS, draws: int = 3, seed: int = 0,
             c: float = 1.0, num_classes: Optional[int] = None, max_iter: int = 300) -> dict:
    """``{"1-shot": {...}, "2-shot": ..., "1%": ..., "10%": ...}``, each with ``mean``, ``std``
    (percent top-1 over ``draws`` splits), ``runs`` and ``train_rows`` (labeled rows per split);
    a shot count larger than the smallest class gives ``mean: None`` and ``skipped``."""
    if draws <= 0:
        raise ValueError("low-shot: draws must be positive")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    x = F.normalize(train_x.float(), dim=1)
    xt = F.normalize(test_x.float(), dim=1)
    y = train_y.long()
    yt = test_y.long()
    y_np = y.numpy()
    smallest = int(np.bincount(y_np)[np.unique(y_np)].min())
    splits = [(split_name(shots=n), n, None) for n in shots]
    splits += [(split_name(fraction=f), None, f) for f in fractions]
    out = {}
    for name, n, frac in splits:
        if n is not None and n > smallest:
            out[name] = {"mean": None, "std": None, "runs": [], "train_rows": None,
                         "skipped": f"a class has only {smallest} train rows"}
            continue
        accs, rows = [], []
        for d in range(draws):
            idx = (few_shot_indices(y_np, n, d, seed) if n is not None
                   else fraction_indices(y_np, frac, d, seed))
            it = torch.from_numpy(idx)
            w, b = fit_logistic(x[it], y[it], num_classes, c=c, max_iter=max_iter)
            accs.append(100.0 * _topk_correct(xt @ w + b, yt, 1) / len(yt))
            rows.append(len(idx))
        out[name] = {"mean": float(np.mean(accs)),
                     "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                     "runs": [round(a, 4) for a in accs], "train_rows": int(np.mean(rows))}
    return out
