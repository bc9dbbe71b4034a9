"""Host selection for the ssh backend: round-robin and least-connection. Pure bookkeeping.

Counts are rebuilt from the RemoteKernels' status after an operator restart (``add`` for every
running kernel), so least-connection keeps working across restarts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


class NoHostLeft(LookupError):
    """Every candidate host was excluded."""


class HostBalancer:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._next = 0

    def pick(self, hosts: Sequence[str], algorithm: str, exclude: frozenset[str] = frozenset()) -> str:
        """The host for the next kernel among ``hosts``, skipping ``exclude``."""
        candidates = [h for h in hosts if h not in exclude]
        if not candidates:
            raise NoHostLeft("No host is left to try.")
        if algorithm == "least-connection":
            # Ties go round-robin, so equal hosts share new kernels evenly.
            start = self._next % len(candidates)
            order = candidates[start:] + candidates[:start]
            self._next += 1
            return min(order, key=lambda h: self.counts[h])
        host = candidates[self._next % len(candidates)]
        self._next += 1
        return host

    def add(self, host: str) -> None:
        self.counts[host] += 1

    def remove(self, host: str) -> None:
        if self.counts[host] > 0:
            self.counts[host] -= 1
        if self.counts[host] == 0:
            del self.counts[host]
