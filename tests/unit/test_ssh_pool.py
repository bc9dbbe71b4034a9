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
from typing import Any

import pytest

from kernel_operator.backends.base import LaunchPlan
from kernel_operator.backends.ssh import SshBackend
from kernel_operator.errors import BackendUnavailable, CommandUnanswered
from kernel_operator.launch_command import run_dir_for
from kernel_operator.settings import SshSettings
from tests.unit.requests import request_from


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


class ScriptedHosts(SshBackend):
    """The ssh backend with its one I/O seam (``_run``) answered by a script: the first host
    takes the start command and never answers (a link cut after it was sent)."""

    def __init__(self) -> None:
        super().__init__(SshSettings(user="root"))
        self.commands: list[tuple[str, str]] = []

    async def _run(
        self,
        host: str,
        port: int,
        login: str,
        command: str,
        stdin_text: str | None = None,
        user: str | None = None,
    ) -> str:
        self.commands.append((host, command))
        if "mkdir -m 700" in command:
            if host == "10.0.0.1":
                raise CommandUnanswered(f"ssh command on {host} failed: timed out", reason="HostUnreachable")
            return "4242\n"
        if "for d in /proc" in command:  # the find command: a launcher started there after all
            return "77 77\n"
        return ""


async def test_a_start_left_unanswered_is_recorded_and_cleared_by_the_stop() -> None:
    """A start that went unanswered may run once the link is back: its launcher holds the
    launch's token. The record names that host, so the stop clears it too; the kernel's address
    is recorded, so a report from that launcher is refused (pids repeat across hosts)."""
    uid = "0b5ad6a4-9c6e-4f51-8a3e-51d1c6f7f0aa"
    request = request_from(
        {
            "kernelId": "6c9c8d0e-1111-2222-3333-444455556666",
            "username": "alice",
            "backend": "ssh",
            "ssh": {"hosts": ["10.0.0.1", "10.0.0.2"], "loadBalancing": "round-robin"},
        },
        uid=uid,
    )
    run_dir = run_dir_for(request.kernel_id, uid)
    backend = ScriptedHosts()
    try:
        ref = await backend.launch(LaunchPlan(request, "127.0.0.1:1", b"k" * 32, "tok", run_dir))
        assert (ref["host"], ref["pid"], ref["ip"], ref["abandoned"]) == (
            "10.0.0.2",
            4242,
            "10.0.0.2",
            ["10.0.0.1"],
        )
        backend.commands.clear()
        await backend.stop(ref, uid)
    finally:
        backend.close()
    hosts = [host for host, _ in backend.commands]
    assert hosts == ["10.0.0.2", "10.0.0.1", "10.0.0.1"]  # the kernel's stop; find and stop there
    assert "kill -TERM -77" in backend.commands[2][1] and run_dir in backend.commands[2][1]


async def test_a_connection_made_after_all_reads_the_ssh_secret_first() -> None:
    """The pool had room when asked (so the Secret was not read), and none when the thread got
    to it: the new connection trusted ~/.ssh/known_hosts instead of the Secret's, and a kernel
    failed with "not in ~/.ssh/known_hosts" (seen in a failover test)."""
    from kernel_operator.backends.ssh import SshSecret, _SecretNeeded

    class Credentials:
        name = "ssh-secret"
        loads = 0

        async def load(self) -> SshSecret:
            Credentials.loads += 1
            return SshSecret("key", "known hosts", "", "")

    class Racing(SshBackend):
        def __init__(self) -> None:
            super().__init__(SshSettings(user="root"), Credentials())  # type: ignore[arg-type]
            self.secrets: list[SshSecret | None] = []

        def _exec(self, host: str, port: int, login: str, command: str, *rest: Any) -> str:
            secret = rest[1]
            self.secrets.append(secret)
            if secret is None:
                raise _SecretNeeded()  # as _new_client raises when it must connect without it
            return "done"

    backend = Racing()
    backend._connections.has_room = lambda key: True  # type: ignore[method-assign]  # room when asked
    try:
        assert await backend._run("10.0.0.1", 22, "root", "true") == "done"
    finally:
        backend.close()
    assert backend.secrets[0] is None and backend.secrets[1] is not None and Credentials.loads == 1
    with pytest.raises(_SecretNeeded):  # the thread's side: no connection without the Secret
        backend._new_client("10.0.0.1", 22, "root", None)
