"""Profiles and namespace labels, read through a short-lived cache.

Every launch and every claim resolves its profile (and, with a namespaceSelector, its
namespace's labels); a burst of kernels would read the same few objects hundreds of times, and a
claim would spend a round trip on it. Entries live ``ttl`` seconds: an administrator's change
takes effect within that (RKO_PROFILE_CACHE_SECONDS; 0 reads every time). Concurrent misses for
one key share one read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class ProfileSource(Protocol):
    async def read_profile(self, name: str) -> dict[str, Any] | None: ...

    async def list_profiles(self) -> list[dict[str, Any]]: ...

    async def namespace_labels(self, name: str) -> dict[str, str] | None: ...


class ProfileCache:
    def __init__(
        self, source: ProfileSource, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.source = source
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[tuple[str, str], tuple[float, Any]] = {}
        self._reads: dict[tuple[str, str], asyncio.Future[Any]] = {}

    async def _cached(self, key: tuple[str, str], read: Callable[[], Awaitable[T]]) -> T:
        if self.ttl <= 0:
            return await read()
        entry = self._entries.get(key)
        if entry is not None and self.clock() - entry[0] < self.ttl:
            return entry[1]  # type: ignore[no-any-return]
        pending = self._reads.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._reads[key] = future
        try:
            value = await read()
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            self._reads.pop(key, None)
        self._entries[key] = (self.clock(), value)
        future.set_result(value)
        return value

    async def read_profile(self, name: str) -> dict[str, Any] | None:
        return await self._cached(("profile", name), lambda: self.source.read_profile(name))

    async def list_profiles(self) -> list[dict[str, Any]]:
        return await self._cached(("profiles", ""), self.source.list_profiles)

    async def namespace_labels(self, name: str) -> dict[str, str] | None:
        return await self._cached(("namespace", name), lambda: self.source.namespace_labels(name))
