"""The profile cache: one read per key per ttl, shared by concurrent misses; errors not cached."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kernel_operator.profile_cache import ProfileCache


class Source:
    def __init__(self) -> None:
        self.reads = 0
        self.fail = False

    async def read_profile(self, name: str) -> dict[str, Any] | None:
        self.reads += 1
        await asyncio.sleep(0.01)
        if self.fail:
            raise RuntimeError("API down")
        return {"metadata": {"name": name}, "version": self.reads}

    async def list_profiles(self) -> list[dict[str, Any]]:
        self.reads += 1
        return []

    async def namespace_labels(self, name: str) -> dict[str, str] | None:
        self.reads += 1
        return {"team": name}


async def test_concurrent_misses_share_one_read_and_entries_expire() -> None:
    now = [0.0]
    source = Source()
    cache = ProfileCache(source, ttl=1.0, clock=lambda: now[0])
    results = await asyncio.gather(*(cache.read_profile("p") for _ in range(20)))
    assert source.reads == 1 and all(r == results[0] for r in results)
    now[0] = 0.5
    assert (await cache.read_profile("p"))["version"] == 1  # type: ignore[index]
    now[0] = 1.5
    assert (await cache.read_profile("p"))["version"] == 2  # type: ignore[index]
    assert await cache.namespace_labels("a") == {"team": "a"}
    assert await cache.namespace_labels("b") == {"team": "b"}
    assert source.reads == 4


async def test_a_failed_read_is_not_cached_and_zero_ttl_reads_every_time() -> None:
    source = Source()
    cache = ProfileCache(source, ttl=5.0)
    source.fail = True
    with pytest.raises(RuntimeError, match="API down"):
        await cache.read_profile("p")
    source.fail = False
    assert await cache.read_profile("p") is not None
    uncached = ProfileCache(source, ttl=0)
    before = source.reads
    await uncached.list_profiles()
    await uncached.list_profiles()
    assert source.reads == before + 2
