"""What the operator knows in memory about its pools: which members are ready to be claimed,
their connection data, claims since the last status write, and who waits for a member.

Filled by the pool daemons (their pools and the members' checked request) and by the members'
lifecycles (ready, gone). The API server stays the judge of a claim (``Kube.swap_label``): two
operators or two claims holding the same stale view never both win.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .pools import PoolSpec
from .spec import KernelRequest


@dataclass
class PoolEntry:
    spec: PoolSpec
    member_request: KernelRequest | None = None  # None while the pool is invalid
    # Members ready to be claimed, oldest first: uid -> name.
    ready: OrderedDict[str, str] = field(default_factory=OrderedDict)
    claims: int = 0  # claims not yet counted in the pool's status
    # When the first claim not yet answered by a refill took its member (monotonic; 0: none).
    claimed_at: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)  # a member became ready


@dataclass
class PoolRegistry:
    seal_key: bytes
    pools: dict[str, PoolEntry] = field(default_factory=dict)
    # Members handed over to their claimer (never stopped by their own lifecycle).
    handed_over: set[str] = field(default_factory=set)
    # Claims under way: claimer uid -> member uid (whose labels the backend's objects carry).
    in_flight: dict[str, str] = field(default_factory=dict)
    # ... and the backend each such claim took over (so a deletion meanwhile stops it there).
    in_flight_backend: dict[str, str] = field(default_factory=dict)
    # The connection Secret's data of each ready member, by member uid (saves a read at claim).
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def register(self, spec: PoolSpec) -> PoolEntry:
        entry = self.pools.get(spec.uid)
        if entry is None:
            entry = self.pools[spec.uid] = PoolEntry(spec)
        entry.spec = spec
        return entry

    def unregister(self, pool_uid: str) -> None:
        self.pools.pop(pool_uid, None)

    def in_namespace(self, namespace: str) -> list[PoolEntry]:
        found = [e for e in self.pools.values() if e.spec.namespace == namespace]
        return sorted(found, key=lambda e: e.spec.name)

    def wake(self, pool_uid: str) -> None:
        entry = self.pools.get(pool_uid)
        if entry is not None:
            entry.wake.set()

    async def member_ready(self, pool_uid: str, member_uid: str, name: str, secret: dict[str, bytes]) -> None:
        self.secrets[member_uid] = secret
        entry = self.pools.get(pool_uid)
        if entry is None:
            return
        entry.ready[member_uid] = name
        entry.wake.set()
        async with entry.changed:
            entry.changed.notify_all()

    def member_taken(self, entry: PoolEntry) -> None:
        """A claim took a member: the refill's hold-back counts from the first such claim."""
        if not entry.claimed_at:
            entry.claimed_at = time.monotonic()

    def member_gone(self, pool_uid: str, member_uid: str) -> None:
        self.secrets.pop(member_uid, None)
        entry = self.pools.get(pool_uid)
        if entry is not None and entry.ready.pop(member_uid, None) is not None:
            entry.wake.set()
