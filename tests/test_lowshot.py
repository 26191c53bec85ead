"""Low-shot: the splits (n per class, stratified 1 % / 10 %) against counts computed here, and
the accuracies against an independent float64 gradient-descent logistic regression on the
same rows; mean / std over the seeded splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from massl_ray.evaluate.lowshot import fraction_indices, low_shot
from massl_ray.evaluate.probe import few_shot_indices


def clusters(n: int, dim: int = 8, classes: int = 4, seed: int = 0, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


@pytest.mark.timeout(30)
def test_fraction_splits_are_stratified_and_reproducible():
    labels = np.repeat(np.arange(4), [50, 120, 7, 300])
    for f, expect in ((0.01, [1, 1, 1, 3]), (0.1, [5, 12, 1, 30]), (0.5, [25, 60, 4, 150])):
        idx = fraction_indices(labels, f, draw=0, seed=3)
        assert np.bincount(labels[idx]).tolist() == expect, f  # max(1, round(f * n_c))
        assert np.array_equal(idx, np.unique(idx))  # sorted, no repeats
        assert np.array_equal(idx, fraction_indices(labels, f, draw=0, seed=3))
    assert not np.array_equal(fraction_indices(labels, 0.1, 0, 3), fraction_indices(labels, 0.1, 1, 3))
    assert not np.array_equal(fraction_indices(labels, 0.1, 0, 3), fraction_indices(labels, 0.1, 0, 4))
    with pytest.raises(ValueError, match="must be in"):
        fraction_indices(labels, 0.0, 0)


def reference_logistic(x, y, classes, c=1.0, steps=5000, lr=2.0):
    """Independent: float64 numpy, full-batch gradient descent on mean cross-entropy +
    ||W||^2 / (2 C N) (bias not penalised) on L2-normalised features."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n, d = x.shape
    lam = 1.0 / (c * n)
    w, b = np.zeros((d, classes)), np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        z = x @ w + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        w -= lr * (x.T @ (p - onehot) / n + lam * w)
        b -= lr * (p - onehot).mean(0)
    return w, b


@pytest.mark.timeout(60)
def test_low_shot_accuracies_match_an_independent_logistic_regression():
    x, y = clusters(400, seed=1, spread=1.5)  # overlapping clusters: accuracy well below 100
    xt, yt = clusters(300, seed=2, spread=1.5)
    r = low_shot(x, y, xt, yt, shots=(1, 5), fractions=(0.1,), draws=2, seed=5)
    assert list(r) == ["1-shot", "5-shot", "10%"]
    xtn = xt.numpy().astype(np.float64)
    xtn /= np.linalg.norm(xtn, axis=1, keepdims=True)
    for name, n, frac in (("1-shot", 1, None), ("5-shot", 5, None), ("10%", None, 0.1)):
        runs = []
        for d in range(2):
            idx = (few_shot_indices(y.numpy(), n, d, 5) if n else
                   fraction_indices(y.numpy(), frac, d, 5))
            w, b = reference_logistic(x.numpy()[idx].astype(np.float64), y.numpy()[idx], 4)
            runs.append(100.0 * float(((xtn @ w + b).argmax(1) == yt.numpy()).mean()))
        # At most one of the 300 test points may fall on the other side (optimiser tolerance).
        assert np.allclose(r[name]["runs"], runs, atol=100 / 300 + 1e-9), (name, r[name]["runs"], runs)
        assert r[name]["mean"] == pytest.approx(np.mean(r[name]["runs"]), abs=1e-3)
        assert r[name]["std"] == pytest.approx(np.std(r[name]["runs"], ddof=1), abs=1e-3)
        if n:
            assert r[name]["train_rows"] == 4 * n
    assert r["10%"]["train_rows"] == len(fraction_indices(y.numpy(), 0.1, 0, 5))
    assert 30 < r["1-shot"]["mean"] < r["10%"]["mean"] < 100  # more labels help on this data


@pytest.mark.timeout(30)
def test_low_shot_on_known_data():
    # Separable clusters: a handful of labels suffice; permuted test labels: chance.
    x, y = clusters(400, seed=3, spread=0.2)
    xt, yt = clusters(300, seed=4, spread=0.2)
    r = low_shot(x, y, xt, yt, shots=(1,), fractions=(0.01,), draws=2)
    assert r["1-shot"]["mean"] == 100.0 and r["1%"]["mean"] == 100.0
    perm = yt[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    assert low_shot(x, y, xt, perm, shots=(2,), fractions=(), draws=2)["2-shot"]["mean"] < 40
    # More shots than the smallest class: skipped, not fatal.
    small = low_shot(x[:12], y[:12], xt, yt, shots=(1, 50), fractions=(), draws=2)
    assert small["50-shot"]["mean"] is None and "only" in small["50-shot"]["skipped"]
