"""The ssh backend never holds the event loop while a host is slow to answer.

The backend used to take, on the event loop, a lock that a worker thread held through
paramiko's connect: one host that accepted TCP but never sent its banner froze every kernel,
watch and the response listener for the whole connect timeout.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from kernel_operator.backends.ssh import SshBackend
from kernel_operator.errors import BackendUnavailable
from kernel_operator.settings import SshSettings


async def test_a_host_that_never_answers_does_not_stall_the_event_loop() -> None:
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(16)  # accepts, never says a word: paramiko waits for the banner
    port = mute.getsockname()[1]
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(mute.accept()[0]), daemon=True).start()
    backend = SshBackend(SshSettings(port=port, connect_timeout=2.0, command_timeout=2.0))
    worst = 0.0

    async def heartbeat() -> None:
        nonlocal worst
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            worst = max(worst, now - last)
            last = now

    ticker = asyncio.ensure_future(heartbeat())
    try:
        first = asyncio.ensure_future(backend._run("127.0.0.1", port, "", "true"))
        await asyncio.sleep(0.2)  # its thread now waits for the banner
        # More commands to the same host meanwhile: they must not block the loop either.
        others = [asyncio.ensure_future(backend._run("127.0.0.1", port, "", "true")) for _ in range(5)]
        results = await asyncio.gather(first, *others, return_exceptions=True)
    finally:
        ticker.cancel()
        backend.close()
        mute.close()
        for conn in held:
            conn.close()
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    assert worst < 0.1, f"the event loop stalled for {worst:.2f} s"
