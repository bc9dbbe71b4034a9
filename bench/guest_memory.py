"""The state of memory a burst is measured from.

On a virtual machine whose balloon device reports free pages to the host (virtio-balloon's free
page reporting), the host takes back what the guest leaves free, and the guest's first touch of
such a page costs several times the touch of a page it freed a moment ago (on this VM: 1.8 s
against 0.46 s per GiB, both in the guest's system time). A single launch reuses the pages the
launch before it freed; a burst of 100 kernels touches gigabytes of long-free memory. So a burst
compared like for like with one launch has that memory faulted in first, and the bench prints
the burst from cold memory beside it.
"""

from __future__ import annotations

import mmap
import time
from pathlib import Path

BALLOON_DRIVER = Path("/sys/bus/virtio/drivers/virtio_balloon")
GIB = 1 << 30
MIB = 1 << 20
# What a burst may fault in at most: all but this much of the memory available.
RESERVE_MIB = 2048
# At least this much per kernel: a kernel and its launcher fault in ~50 MiB, and one launch's
# measure (the fall of MemAvailable) can come out near zero when other memory is freed meanwhile.
MIN_PER_KERNEL_MIB = 32


def balloon_present(driver: Path = BALLOON_DRIVER) -> bool:
    """Whether a virtio balloon device is bound (the host may take back free memory)."""
    return driver.is_dir() and any(p.name.startswith("virtio") for p in driver.iterdir())


def available_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable, in MiB."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"{meminfo} has no MemAvailable line")


def touch(mib: int) -> float:
    """Fault ``mib`` MiB of anonymous memory in (the kernel populates it at map time) and free
    it again; the seconds it took."""
    if mib <= 0:
        return 0.0
    start = time.perf_counter()
    region = mmap.mmap(-1, mib * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    took = time.perf_counter() - start
    region.close()
    return took


def burst_mib(count: int, per_kernel_mib: float, available: int) -> int:
    """How much to fault in before a burst of ``count`` kernels: twice what they are expected
    to take from the available memory (a kernel also touches pages it later frees, and the
    measure of one is rough), within what is available less a reserve."""
    per_kernel = max(per_kernel_mib, MIN_PER_KERNEL_MIB)
    return max(0, min(int(count * per_kernel * 2), available - RESERVE_MIB))


def prefault(mib: int) -> dict[str, float]:
    """Fault ``mib`` MiB in twice: the first pass warms the memory, the second shows what a
    touch of warm memory costs. Seconds per GiB of each, and the size."""
    if mib <= 0:
        return {"mib": 0, "first_s_per_gib": 0.0, "again_s_per_gib": 0.0}
    first = touch(mib)
    again = touch(mib)
    return {
        "mib": mib,
        "first_s_per_gib": first * GIB / (mib * MIB),
        "again_s_per_gib": again * GIB / (mib * MIB),
    }
