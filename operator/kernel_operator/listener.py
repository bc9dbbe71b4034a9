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

A refusal is either for now (the launcher retries: e.g. its launching replica may be starting
up) or final, answered ``NO <cause>``: the report belongs to a launch that was replaced, stopped
or deleted, so its launcher stops its kernel at once instead of retrying until its own deadline
(an orphan of a relaunch would otherwise run, unowned, for minutes). Only a verdict that cannot
change is final: a token other than the one this replica awaits (only the leader awaits, and it
recorded that token), or what a read of the RemoteKernel begun after the report arrived shows.

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
# For a launch nobody here awaits: True once the report was checked and persisted elsewhere
# (see peer_reports.py), False when no such launch is waiting anywhere.
OnUnawaited = Callable[[str, LaunchPayload], Awaitable[bool]]
OnRejected = Callable[[str], None]
READ_DEADLINE = 5.0  # for a whole frame: launchers send theirs at once
MAX_CONNECTIONS = 256


class _Empty(Exception):
    """The peer closed before sending a byte."""


class Refused(ProtocolError):
    """A well-formed report refused, with the cause counted in the metrics. ``final``: the
    launcher is told ``NO`` and stops its kernel (see the module's docstring)."""

    def __init__(self, message: str, cause: str, final: bool = False) -> None:
        super().__init__(message)
        self.cause = cause
        self.final = final


@dataclass
class _Pending:
    token_hash: str
    on_launch: OnLaunch


class ResponseListener:
    def __init__(
        self,
        private_key: bytes,
        max_connections: int = MAX_CONNECTIONS,
        on_rejected: OnRejected | None = None,
    ) -> None:
        self._private_key = private_key
        self.on_rejected = on_rejected or (lambda cause: None)
        # Set once the operator can look launches up on the API server (see peer_reports.py).
        self.on_unawaited: OnUnawaited | None = None
        self.serving = False
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

    def awaits(self, launch_id: str) -> bool:
        """Whether a launch of that id is awaited here."""
        return launch_id in self._pending

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

    async def start(self, host: str, port: int, reuse_port: bool = False) -> tuple[str, int]:
        """Serve on ``host:port``. With ``reuse_port``, replicas on one host share the port and
        the kernel spreads connections among those alive (as a Service does among pods)."""
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=protocol.MAX_FRAME, reuse_port=reuse_port or None
        )
        self.serving = True
        sockname = self._server.sockets[0].getsockname()
        log.info("The response listener serves on %s:%d.", sockname[0], sockname[1])
        return str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        self.serving = False
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self.active >= self.max_connections:
            # Full: close without reading. A launcher retries with backoff; a flood costs nothing.
            self.refused_busy += 1
            self.on_rejected("busy")
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
            self.on_rejected(_cause(err))
            reason = "the message was truncated" if isinstance(err, asyncio.IncompleteReadError) else str(err)
            if isinstance(err, Refused) and err.final:
                await _say_no(writer, err.cause)
                reason += " The launcher was told to stop its kernel."
            log.warning("Rejected a launch response from %s: %s", peer, reason or type(err).__name__)
        except Exception:  # the listener must outlive any single bad connection
            self.rejected += 1
            self.on_rejected("error")
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
            await self._accept_unawaited(kernel_id, message)
            return
        payload = protocol.open_launch_payload(message, self._private_key)
        if not hmac.compare_digest(protocol.token_hash(payload["token"]), pending.token_hash):
            # Only the leader awaits launches, and it recorded this token: another is an earlier
            # attempt's (relaunched since) or forged.
            raise Refused(
                f"The launch token for kernel {kernel_id} is not the one of its current launch.",
                "bad_token",
                final=True,
            )
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

    async def _accept_unawaited(self, launch_id: str, message: bytes) -> None:
        """A report for a launch this replica does not await: another replica's, or one begun
        before this operator started. Persisted through ``on_unawaited`` if that finds the
        launch waiting (checked there against the token it recorded)."""
        unknown = Refused(
            f"No launch is pending for kernel {launch_id} (unknown, or from a launch that was replaced).",
            "unknown_launch",
        )
        if self.on_unawaited is None:
            raise unknown
        payload = protocol.open_launch_payload(message, self._private_key)  # sealed for our key
        if not await self.on_unawaited(launch_id, payload):
            raise unknown
        self.accepted += 1
        self._answered[launch_id] = (protocol.token_hash(payload["token"]), payload["pid"])
        log.info(
            "Accepted the connection info of kernel %s for a launch this replica did not await.", launch_id
        )

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


async def _say_no(writer: asyncio.StreamWriter, cause: str) -> None:
    with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
        writer.write(f"NO {cause}\n".encode())
        await asyncio.wait_for(writer.drain(), 2)


def _cause(err: BaseException) -> str:
    """The metrics' name for why a connection was turned away."""
    if isinstance(err, Refused):
        return err.cause
    if isinstance(err, asyncio.TimeoutError):
        return "timeout"
    if isinstance(err, (ProtocolError, asyncio.IncompleteReadError)):
        return "bad_frame"
    return "error"
