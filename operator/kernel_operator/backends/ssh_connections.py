"""The ssh backend's connections: several per host, each carrying a bounded number of channels.

Rules: a command takes a channel on a live connection with room; a connection is opened only
when none has room and the host has fewer than its maximum, one at a time per host (sshd drops
unauthenticated connections beyond MaxStartups); otherwise the command's thread waits. A
connection whose server refused a channel (MaxSessions) is marked full, not closed; only a dead
transport is closed, so one failed command never takes the others' with it. The lock is held
for bookkeeping only, never through a connect, and never taken on the event loop for long.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import paramiko

Key = tuple[str, int, str]  # host, port, login


class PoolTimeout(OSError):
    """No channel to the host became free in time."""


@dataclass(eq=False)
class Connection:
    client: paramiko.SSHClient
    limit: int
    channels: int = 0  # in use now

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def full_at(self, channels: int) -> None:
        """The server refused one more channel than ``channels``: never ask for more."""
        self.limit = max(1, min(self.limit, channels))


@dataclass
class _Host:
    connections: list[Connection] = field(default_factory=list)
    connecting: bool = False


class ConnectionPool:
    def __init__(self, channels_per_connection: int = 8, connections_per_host: int = 4) -> None:
        self.channels_per_connection = channels_per_connection
        self.connections_per_host = connections_per_host
        self._hosts: dict[Key, _Host] = {}
        self._changed = threading.Condition()
        self.opened = 0

    def has_room(self, key: Key) -> bool:
        """Whether a command to ``key`` can start on a connection already open."""
        with self._changed:
            host = self._hosts.get(key)
            return host is not None and any(c.alive() and c.channels < c.limit for c in host.connections)

    def checkout(
        self, key: Key, connect: Callable[[], paramiko.SSHClient], timeout: float = 30.0
    ) -> Connection:
        """A connection with a channel reserved for the caller (give it back with ``checkin``)."""
        with self._changed:
            host = self._hosts.setdefault(key, _Host())
            ok = self._changed.wait_for(lambda: self._ready(host), timeout)
            if not ok:
                raise PoolTimeout(f"no ssh channel to {key[0]} became free within {timeout:g} s")
            for conn in host.connections:
                if conn.channels < conn.limit:
                    conn.channels += 1
                    return conn
            host.connecting = True
        try:
            client = connect()  # outside the lock: other hosts, and this host's open connections, go on
        except BaseException:
            with self._changed:
                host.connecting = False
                self._changed.notify_all()
            raise
        conn = Connection(client, self.channels_per_connection, channels=1)
        with self._changed:
            host.connecting = False
            host.connections.append(conn)
            self.opened += 1
            self._changed.notify_all()
        return conn

    def _ready(self, host: _Host) -> bool:
        """Dead connections dropped; True when a channel is free or a connection may be opened."""
        for conn in [c for c in host.connections if not c.alive()]:
            host.connections.remove(conn)
            # Closing joins paramiko's thread: not under the lock.
            threading.Thread(target=conn.client.close, name="ssh-close", daemon=True).start()
        if any(c.channels < c.limit for c in host.connections):
            return True
        return not host.connecting and len(host.connections) < self.connections_per_host

    def checkin(self, key: Key, conn: Connection) -> None:
        with self._changed:
            conn.channels = max(0, conn.channels - 1)
            self._changed.notify_all()

    def discard_if_dead(self, key: Key, conn: Connection) -> None:
        """Close ``conn`` if its transport died (a command's own failure leaves it open)."""
        if not conn.alive():
            self.discard(key, conn)

    def discard(self, key: Key, conn: Connection) -> None:
        """Close ``conn`` (e.g. it stopped answering); commands in flight on it fail with it."""
        with self._changed:
            host = self._hosts.get(key)
            if host is not None and conn in host.connections:
                host.connections.remove(conn)
            self._changed.notify_all()
        conn.client.close()

    def connections(self, key: Key) -> int:
        with self._changed:
            host = self._hosts.get(key)
            return len(host.connections) if host else 0

    def close(self) -> None:
        with self._changed:
            hosts, self._hosts = self._hosts, {}
        for host in hosts.values():
            for conn in host.connections:
                conn.client.close()
