"""What the benchmark scripts share: strict JSON, and this process's memory readings (/proc)."""

from __future__ import annotations

import math
from typing import Optional


def finite(x):
    """NaN/inf -> None, recursively, so that the result is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (dict, list, tuple)):
        return {k: finite(v) for k, v in x.items()} if isinstance(x, dict) else [finite(v) for v in x]
    return x


def proc_field(field: str, path: str = "/proc/self/status") -> Optional[int]:
    """An integer field of a /proc/self file, or None where unavailable: ``VmRSS``, ``VmHWM``
    (KiB) of status, ``rchar`` (bytes read by read-type system calls) of ``/proc/self/io``."""
    try:
        with open(path) as f:
            return next((int(ln.split()[1]) for ln in f if ln.startswith(field + ":")), None)
    except OSError:
        return None


def reset_hwm() -> bool:
    """Reset this process's resident-memory high-water mark (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
