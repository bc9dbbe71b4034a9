"""Each backend's blocking calls run in threads of its own: one backend stuck does not stall
another, nor the operator's name look-ups (asyncio's default executor)."""

from __future__ import annotations

import asyncio
import threading
import time

from kernel_operator.backends.blocking import BlockingPool
from kernel_operator.backends.yarn import YARN_THREADS


async def test_a_backend_with_every_thread_stuck_stalls_no_other() -> None:
    yarn, ssh = BlockingPool("yarn", YARN_THREADS), BlockingPool("ssh", 4)
    release = threading.Event()
    # More stuck calls than YARN has threads (a ResourceManager that stopped answering) ...
    stuck = [asyncio.ensure_future(yarn.run(release.wait, 30)) for _ in range(YARN_THREADS * 4)]
    # ... another backend's calls, and name look-ups, still answer at once.
    started = time.monotonic()
    assert await asyncio.wait_for(ssh.run(lambda: "ssh answered"), 2) == "ssh answered"
    infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo("localhost", 22), 2)
    assert infos and time.monotonic() - started < 2
    assert not any(task.done() for task in stuck)
    release.set()
    assert all(await asyncio.gather(*stuck))
    yarn.shutdown()
    ssh.shutdown()
