"""The ssh backend's connections against a real sshd (MaxSessions 10, its default).

Many commands at once to one host used to share one connection: past sshd's 10 sessions the
server refused a channel, the backend closed the shared connection, and every command in
flight failed with it (the host was then cooled down as unreachable).
"""

from __future__ import annotations

import asyncio

from kernel_operator.backends.ssh import SshBackend
from kernel_operator.settings import SshSettings
from localcluster.servers import Sshd


def backend_for(sshd: Sshd, **overrides: int) -> SshBackend:
    return SshBackend(
        SshSettings(
            key_file=str(sshd.client_key),
            known_hosts=str(sshd.known_hosts),
            port=sshd.port,
            command_timeout=20.0,
            **overrides,  # type: ignore[arg-type]
        )
    )


async def test_sixty_commands_at_once_to_one_host_all_succeed(sshd: Sshd) -> None:
    backend = backend_for(sshd)
    try:
        outs = await asyncio.gather(
            *(backend._run(sshd.host, sshd.port, "", f"sleep 0.3; echo {i}") for i in range(60))
        )
        assert [int(out) for out in outs] == list(range(60))
        key = (sshd.host, sshd.port, "")
        assert 1 <= backend._connections.connections(key) <= backend.settings.connections_per_host
    finally:
        backend.close()


async def test_a_server_refusing_channels_fills_a_connection_and_breaks_nothing(sshd: Sshd) -> None:
    """Asked for more channels per connection than sshd's MaxSessions allows, the backend
    learns the server's limit from its refusal and spreads the commands; none fails."""
    backend = backend_for(sshd, channels_per_connection=25, connections_per_host=4)
    try:
        outs = await asyncio.gather(
            *(backend._run(sshd.host, sshd.port, "", f"sleep 0.5; echo {i}") for i in range(40))
        )
        assert [int(out) for out in outs] == list(range(40))
        key = (sshd.host, sshd.port, "")
        assert backend._connections.connections(key) >= 2  # one connection could not carry 40
    finally:
        backend.close()
