"""A kernel's activity, as its iopub channel shows it: for ``status.lastActivity`` and culling.

The operator subscribes to the kernel's iopub with the key it holds (and the CurveZMQ keys
when the kernel uses them), checks each message's signature, and keeps the time of the last
message and whether the kernel is busy (its last ``status`` message). A kernel counts as idle
only while the operator is connected: a kernel it cannot reach is never culled for silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

DELIMITER = b"<IDS|MSG>"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IopubMessage:
    msg_type: str
    execution_state: str | None  # for status messages: busy, idle, starting


def parse_iopub(frames: Sequence[bytes], key: bytes) -> IopubMessage | None:
    """A signed Jupyter message from its ZMQ frames; None when malformed or badly signed."""
    try:
        at = list(frames).index(DELIMITER)
    except ValueError:
        return None
    parts = list(frames[at + 1 : at + 6])
    if len(parts) < 5:
        return None
    signature, header, parent, metadata, content = parts
    if key:
        mac = hmac.new(key, digestmod=hashlib.sha256)
        for part in (header, parent, metadata, content):
            mac.update(part)
        if not hmac.compare_digest(mac.hexdigest().encode(), signature):
            return None
    try:
        msg_type = str(json.loads(header)["msg_type"])
        state = json.loads(content).get("execution_state") if msg_type == "status" else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return IopubMessage(msg_type, str(state) if state is not None else None)


def is_idle(
    now: float, last_activity: float, busy: bool, connected_since: float | None, idle_timeout: float
) -> bool:
    """Cull-worthy: a timeout is set, the kernel is not busy, and it has been silent for the
    timeout while we were connected (silence we could not have heard does not count)."""
    if idle_timeout <= 0 or busy or connected_since is None:
        return False
    return now - max(last_activity, connected_since) >= idle_timeout


class IopubWatcher:
    """Subscribes to one kernel's iopub; updates ``last_activity``, ``busy``, ``connected_since``."""

    def __init__(
        self, url: str, key: bytes, curve_public: bytes | None = None, curve_secret: bytes | None = None
    ) -> None:
        self.url, self.key = url, key
        self.curve = (curve_public, curve_secret) if curve_public and curve_secret else None
        self.last_activity = time.time()
        self.busy = False
        self.connected_since: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.linger = 0
        if self.curve is not None:
            sock.curve_publickey, sock.curve_secretkey = self.curve
            sock.curve_serverkey = self.curve[0]  # as jupyter_client does with the kernel's keys
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.url)
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                for ready, _ in await poller.poll():
                    if ready is monitor:
                        self._on_monitor_event(await monitor.recv_multipart())
                    else:
                        self._on_message(await sock.recv_multipart())
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)

    def _on_monitor_event(self, frames: list[bytes]) -> None:
        import zmq.utils.monitor

        event = zmq.utils.monitor.parse_monitor_message(frames)["event"]
        if event == 1:  # EVENT_CONNECTED
            self.connected_since = time.time()
        else:
            self.connected_since = None

    def _on_message(self, frames: list[bytes]) -> None:
        msg = parse_iopub(frames, self.key)
        if msg is None:
            log.warning("Ignored an unsigned or malformed message on %s.", self.url)
            return
        self.last_activity = time.time()
        if msg.execution_state in ("busy", "idle"):
            self.busy = msg.execution_state == "busy"
