"""Kubernetes-style resource quantities ("500m", "2Gi") as the numbers engines want."""

from __future__ import annotations

_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def cpu_nanos(quantity: object) -> int:
    """CPUs ("1", "0.5", "500m") in billionths of a CPU."""
    text = str(quantity)
    if text.endswith("m"):
        return int(float(text[:-1]) * 1_000_000)
    return int(float(text) * 1_000_000_000)


def memory_bytes(quantity: object) -> int:
    """Memory ("512Mi", "1G", "1024") in bytes."""
    text = str(quantity)
    for suffix, factor in _UNITS.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(float(text))
