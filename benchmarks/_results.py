"""Strict JSON for benchmark results (shared by the benchmark scripts)."""

from __future__ import annotations

import math


def finite(x):
    """NaN/inf -> None, recursively, so that the result is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x
