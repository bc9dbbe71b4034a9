"""Giving freed memory back to the system after a burst.

A burst of launches parses thousands of API responses; Python frees them, but glibc keeps the
freed heap pages mapped, so the operator's RSS stays at its peak for good (it measured 250 MB
with 1,000 RemoteKernels after the bursts, 162 MB for a fresh process holding the same ones).
``malloc_trim`` hands free pages back. It runs in a thread (ctypes releases the GIL), never on
the event loop, and only on glibc; elsewhere this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


MALLOC_TRIM = _malloc_trim()
M_ARENA_MAX = -8  # glibc's mallopt parameter
DEFAULT_MALLOC_ARENAS = 2


def limit_malloc_arenas(environ: dict[str, str] | None = None, count: int = DEFAULT_MALLOC_ARENAS) -> bool:
    """Let glibc keep at most ``count`` heaps. Each thread (the executor's, paramiko's, the
    trimmer's) otherwise gets a heap of its own, up to eight per core, and each keeps its own
    freed pages. Call before threads start. An administrator's MALLOC_ARENA_MAX wins (glibc
    read it at start-up). True if the limit was set here."""
    env = os.environ if environ is None else environ
    if "MALLOC_ARENA_MAX" in env:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, count))


async def release_freed_memory(trim: Callable[[int], int] | None = MALLOC_TRIM) -> int:
    """Hand the heap's free pages back to the system; the bytes of RSS that went."""
    if trim is None:
        return 0
    before = rss_bytes()
    await asyncio.to_thread(trim, 0)
    return max(0, before - rss_bytes())


async def trim_periodically(interval: float) -> None:
    """``release_freed_memory`` every ``interval`` seconds, until cancelled."""
    while True:
        await asyncio.sleep(interval)
        released = await release_freed_memory()
        if released >= 8 * 2**20:
            log.info(f"Gave {released / 2**20:.0f} MB of freed memory back to the system.")
