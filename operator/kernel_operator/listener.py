"""The response listener: receives launchers' sealed connection info over TCP.

Each launch in flight is registered, under its launch id (the RemoteKernel's uid), with the
hash of its single-use token. A message is accepted only if it opens with the operator's key,
names a launch pending, and carries the matching token; the launch's callback then persists
the result, and only after that does the launcher get its ``OK`` (so a crash in between makes
the launcher retry). Acceptance is idempotent: a launch already accepted (here, or by an
operator before a restart: see ``answered``) is acknowledged again with ``OK`` when the same
token comes back, and nothing else happens, so an acknowledgement lost on the way does not
make the launcher give up and stop a kernel that is Running. Anything else is logged and
dropped; the listener keeps serving.

Under abuse it holds: at most ``max_connections`` are served at once (more are closed at once,
without reading), and a connection must deliver its whole frame within ``READ_DEADLINE``
seconds, however slowly it trickles bytes. Exit notices count only when signed with the
kernel's control key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kernel_launchers import protocol
from kernel_launchers.protocol import LaunchPayload, ProtocolError

log = logging.getLogger(__name__)
OnLaunch = Callable[[LaunchPayload], Awaitable[None]]
READ_DEADLINE = 5.0  # for a whole frame: launchers send theirs at once
MAX_CONNECTIONS = 256


class _Empty(Exception):
    """The peer closed before sending a byte."""


@dataclass
class _Pending:
    token_hash: str
    on_launch: OnLaunch


class ResponseListener:
    def __init__(self, private_key: bytes, max_connections: int = MAX_CONNECTIONS) -> None:
        self._private_key = private_key
        self._pending: dict[str, _Pending] = {}
        self._exit_watchers: dict[str, tuple[bytes, Callable[[], None]]] = {}
        # Launches accepted, by launch id: the token hash and the launcher's pid (when known),
        # to acknowledge a repeat from that launcher again, and from no other.
        self._answered: dict[str, tuple[str, int | None]] = {}
        self._server: asyncio.Server | None = None
        self.max_connections = max_connections
        self.active = 0
        self.accepted = 0
        self.rejected = 0
        self.refused_busy = 0
        self.repeated = 0

    def expect(self, kernel_id: str, token_hash: str, on_launch: OnLaunch) -> None:
        """Accept one launch response for ``kernel_id`` whose token hashes to ``token_hash``."""
        self._pending[kernel_id] = _Pending(token_hash, on_launch)

    def forget(self, kernel_id: str) -> None:
        self._pending.pop(kernel_id, None)

    def answered(self, launch_id: str, token_hash: str, launcher_pid: int | None = None) -> None:
        """Acknowledge again (and do nothing else) a repeat of launch ``launch_id`` whose token
        hashes to ``token_hash``, from launcher ``launcher_pid`` if given: it was accepted and
        persisted, maybe by an earlier operator. A second launcher holding the same token (a
        launch retried on another host) is refused, so it stops its kernel."""
        self._answered[launch_id] = (token_hash, launcher_pid)

    def forget_answered(self, launch_id: str) -> None:
        self._answered.pop(launch_id, None)

    def watch_exit(self, kernel_id: str, control_key: bytes, wake: Callable[[], None]) -> None:
        """Call ``wake`` when kernel ``kernel_id``'s launcher says (signed with ``control_key``)
        that the kernel exited."""
        self._exit_watchers[kernel_id] = (control_key, wake)

    def unwatch_exit(self, kernel_id: str, wake: Callable[[], None] | None = None) -> None:
        """Stop watching ``kernel_id`` (only if ``wake`` is still its callback, when given: the
        launch of a claimed pool member is watched by its member first, then its claimer)."""
        watcher = self._exit_watchers.get(kernel_id)
        if watcher is not None and (wake is None or watcher[1] == wake):
            del self._exit_watchers[kernel_id]

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port, limit=protocol.MAX_FRAME)
        sockname = self._server.sockets[0].getsockname()
        log.info("The response listener serves on %s:%d.", sockname[0], sockname[1])
        return str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self.active >= self.max_connections:
            # Full: close without reading. A launcher retries with backoff; a flood costs nothing.
            self.refused_busy += 1
            writer.transport.abort()
            return
        self.active += 1
        try:
            message = await asyncio.wait_for(self._read_frame(reader), READ_DEADLINE)
            await self._accept(message)
            writer.write(b"OK\n")
            await writer.drain()
        except _Empty:
            log.debug("A connection from %s closed without sending anything.", peer)
        except (ProtocolError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as err:
            self.rejected += 1
            reason = "the message was truncated" if isinstance(err, asyncio.IncompleteReadError) else str(err)
            log.warning("Rejected a launch response from %s: %s", peer, reason or type(err).__name__)
        except Exception:  # the listener must outlive any single bad connection
            self.rejected += 1
            log.exception("A launch response from %s could not be processed.", peer)
        finally:
            self.active -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes:
        try:
            header = await reader.readexactly(4)
        except asyncio.IncompleteReadError as err:
            if not err.partial:
                # A bare connect (a port probe, a health check): nothing to accept or reject.
                raise _Empty from err
            raise
        (length,) = struct.unpack(">I", header)
        if length == protocol.EXIT_LEN:
            return await reader.readexactly(length)
        if not protocol.HEADER_LEN < length <= protocol.MAX_FRAME:
            raise ProtocolError(f"A frame of {length} bytes is outside the allowed size.")
        return await reader.readexactly(length)

    async def _accept(self, message: bytes) -> None:
        exited = protocol.read_exit_notice(message)
        if exited is not None:
            watcher = self._exit_watchers.get(exited)
            if watcher is None:  # e.g. the kernel was deleted, which is what made it exit
                log.info("An exit notice for kernel %s came after it stopped being watched.", exited)
                return
            protocol.verify_exit_notice(message, watcher[0])
            watcher[1]()
            return
        kernel_id = protocol.peek_kernel_id(message)
        pending = self._pending.get(kernel_id)
        if pending is None:
            if self._is_repeat(kernel_id, message):
                self.repeated += 1
                log.info("Acknowledged again the connection info of kernel %s (accepted before).", kernel_id)
                return
            raise ProtocolError(
                f"No launch is pending for kernel {kernel_id} (unknown, or from a launch that was replaced)."
            )
        payload = protocol.open_launch_payload(message, self._private_key)
        if not hmac.compare_digest(protocol.token_hash(payload["token"]), pending.token_hash):
            raise ProtocolError(f"The launch token for kernel {kernel_id} does not match.")
        # Single use: claim it before awaiting, so a concurrent duplicate finds nothing.
        if self._pending.get(kernel_id) is not pending:
            raise ProtocolError(f"The launch for kernel {kernel_id} was answered concurrently.")
        del self._pending[kernel_id]
        try:
            await pending.on_launch(payload)
        except BaseException:
            self._pending.setdefault(kernel_id, pending)  # not persisted: let the launcher retry
            raise
        self.accepted += 1
        self._answered[kernel_id] = (pending.token_hash, payload["pid"])
        log.info("Accepted the connection info of kernel %s.", kernel_id)

    def _is_repeat(self, launch_id: str, message: bytes) -> bool:
        """Whether ``message`` repeats launch ``launch_id``, already accepted, with its token."""
        answered = self._answered.get(launch_id)
        if answered is None:
            return False
        token_hash, launcher_pid = answered
        payload = protocol.open_launch_payload(message, self._private_key)
        if not hmac.compare_digest(protocol.token_hash(payload["token"]), token_hash):
            return False
        return launcher_pid is None or payload["pid"] == launcher_pid
