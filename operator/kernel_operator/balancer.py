"""Host selection for the ssh backend: round-robin and least-connection. Pure bookkeeping.

Counts are rebuilt from the RemoteKernels' status after an operator restart (``add`` for every
running kernel), so least-connection keeps working across restarts. A host that just failed
"cools down": until then it is picked only when no other host is left to try, so one dead host
does not cost every launch a connect timeout.
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
        self._cooling: dict[str, float] = {}

    def pick(
        self, hosts: Sequence[str], algorithm: str, exclude: frozenset[str] = frozenset(), now: float = 0.0
    ) -> str:
        """The host for the next kernel among ``hosts``, skipping ``exclude``; hosts cooling
        down at ``now`` only when nothing else is left."""
        candidates = [h for h in hosts if h not in exclude]
        if not candidates:
            raise NoHostLeft("No host is left to try.")
        healthy = [h for h in candidates if self._cooling.get(h, 0.0) <= now]
        candidates = healthy or candidates
        if algorithm == "least-connection":
            # Ties go round-robin, so equal hosts share new kernels evenly.
            start = self._next % len(candidates)
            order = candidates[start:] + candidates[:start]
            self._next += 1
            return min(order, key=lambda h: self.counts[h])
        host = candidates[self._next % len(candidates)]
        self._next += 1
        return host

    def cool_down(self, host: str, until: float) -> None:
        """``host`` failed: try it last until ``until`` (a monotonic time)."""
        self._cooling[host] = until

    def recovered(self, host: str) -> None:
        """``host`` worked again."""
        self._cooling.pop(host, None)

    def add(self, host: str) -> None:
        self.counts[host] += 1

    def remove(self, host: str) -> None:
        if self.counts[host] > 0:
            self.counts[host] -= 1
        if self.counts[host] == 0:
            del self.counts[host]
