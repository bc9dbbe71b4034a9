"""Freed memory goes back to the system (glibc's malloc_trim), off the event loop."""

from __future__ import annotations

import threading

import pytest

from kernel_operator.errors import SettingsError
from kernel_operator.memory import MALLOC_TRIM, release_freed_memory, rss_bytes
from kernel_operator.settings import OperatorSettings


async def test_a_burst_freed_is_handed_back_and_the_loop_is_not_held() -> None:
    assert MALLOC_TRIM is not None  # glibc, as on the operator's image and this machine
    baseline = rss_bytes()
    # What a burst leaves: many mid-sized objects (API bodies), freed, with a few kept between
    # them so the heap cannot simply shrink from its top.
    burst = [bytearray(2000) for _ in range(60_000)]
    kept = burst[::500]
    del burst
    assert rss_bytes() - baseline > 60 * 2**20
    released = await release_freed_memory()
    assert released > 50 * 2**20, released
    assert len(kept) == 120
    threads: list[str] = []

    def trim(pad: int) -> int:
        threads.append(threading.current_thread().name)
        return 0

    await release_freed_memory(trim)
    assert threads and threads[0] != threading.main_thread().name  # never on the loop's thread
    assert await release_freed_memory(None) == 0  # not glibc: nothing to do


def test_the_trim_interval_is_a_setting_and_zero_turns_it_off() -> None:
    assert OperatorSettings.from_env({}).memory_trim_seconds == 30.0
    assert OperatorSettings.from_env({"RKO_MEMORY_TRIM_SECONDS": "0"}).memory_trim_seconds == 0.0
    with pytest.raises(SettingsError, match="RKO_MEMORY_TRIM_SECONDS='-5' must be at least 0"):
        OperatorSettings.from_env({"RKO_MEMORY_TRIM_SECONDS": "-5"})
    with pytest.raises(SettingsError, match="is not a number"):
        OperatorSettings.from_env({"RKO_MEMORY_TRIM_SECONDS": "often"})


def test_glibc_heaps_are_limited_unless_the_administrator_chose() -> None:
    """Threads each get their own glibc heap, and each keeps its freed pages: the operator
    limits them, but an administrator's MALLOC_ARENA_MAX (read by glibc itself) wins."""
    from kernel_operator.memory import limit_malloc_arenas

    assert limit_malloc_arenas({"MALLOC_ARENA_MAX": "4"}) is False
    assert limit_malloc_arenas({}) is (MALLOC_TRIM is not None)  # glibc: set; elsewhere: nothing
