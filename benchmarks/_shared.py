"""What the benchmark scripts share: strict JSON for their results, this process's memory
readings (resident set and its high-water mark, from /proc), and per-mode argument defaults."""

from __future__ import annotations

import math
from typing import Optional


def finite(x):
    """NaN/inf -> None, recursively, so that the result is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def proc_kib(field: str) -> Optional[int]:
    """A field of /proc/self/status in KiB (``VmRSS``, ``VmHWM``), or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset this process's resident-memory high-water mark (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def fill_defaults(args, small: bool, defaults: dict) -> None:
    """For each ``name: (small_value, full_value)`` left at None on ``args``, set the value of
    the mode (``small``: a quick or tiny run)."""
    for name, (small_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small_value if small else full_value)
