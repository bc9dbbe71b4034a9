"""A kernel's activity, as its iopub channel shows it: for ``status.lastActivity`` and culling.

One thread (``ActivityHub``) follows every kernel. The operator subscribes to the kernel's
iopub with the key it holds (and the CurveZMQ keys
when the kernel uses them), checks each message's signature, and keeps the time of the last
message and whether the kernel is busy (its last ``status`` message). A kernel counts as idle
only while the operator is connected: a kernel it cannot reach is never culled for silence.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import queue
import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    """One kernel's iopub, followed by the operator's ActivityHub; updates ``last_activity``,
    ``busy`` and ``connected_since`` (written by the hub's thread, read by the kernel's task)."""

    def __init__(
        self,
        url: str,
        key: bytes,
        curve_public: bytes | None = None,
        curve_secret: bytes | None = None,
        hub: ActivityHub | None = None,
    ) -> None:
        self.url, self.key = url, key
        self.curve = (curve_public, curve_secret) if curve_public and curve_secret else None
        self.last_activity = time.time()
        self.busy = False
        self.connected_since: float | None = None
        self.error: str | None = None  # why the hub could not follow this kernel, if it could not
        self._hub = hub or ActivityHub.shared()

    def start(self) -> None:
        self._hub.add(self)

    async def stop(self) -> None:
        self._hub.remove(self)

    def on_monitor_event(self, event: int) -> None:
        if event == EVENT_CONNECTED:
            self.connected_since = time.time()
        else:
            self.connected_since = None

    def on_message(self, frames: Sequence[bytes]) -> None:
        msg = parse_iopub(frames, self.key)
        if msg is None:
            log.warning("Ignored an unsigned or malformed message on %s.", self.url)
            return
        self.last_activity = time.time()
        if msg.execution_state in ("busy", "idle"):
            self.busy = msg.execution_state == "busy"


EVENT_CONNECTED = 1  # zmq.EVENT_CONNECTED
MAX_SOCKETS = 65536  # libzmq's default is 1023: three sockets a kernel stopped at 341 kernels


class ActivityHub:
    """One thread and one poller for every kernel's iopub, however many kernels there are.

    Rules: ZeroMQ sockets are made, used and closed in the hub's thread only; other threads
    (the event loop) hand it watchers to add or remove through a queue and an inproc wake-up
    socket. Per kernel it holds a SUB socket and its monitor (whether we are connected, so
    silence we could not hear never culls a kernel). The ZeroMQ context allows MAX_SOCKETS.
    """

    _shared: ActivityHub | None = None

    @classmethod
    def shared(cls) -> ActivityHub:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self, max_sockets: int = MAX_SOCKETS) -> None:
        import zmq
        import zmq.utils.monitor

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._ctx.set(zmq.MAX_SOCKETS, max_sockets)
        self._commands: queue.SimpleQueue[tuple[str, IopubWatcher | None]] = queue.SimpleQueue()
        self._wake_url = f"inproc://rko-activity-{id(self)}"
        self._receiver = self._ctx.socket(zmq.PULL)
        self._receiver.bind(self._wake_url)
        self._wake_lock = threading.Lock()
        self._waker = self._ctx.socket(zmq.PUSH)
        self._waker.connect(self._wake_url)
        self._thread: threading.Thread | None = None
        self._sockets: dict[IopubWatcher, tuple[Any, Any]] = {}
        self.watching = 0

    def add(self, watcher: IopubWatcher) -> None:
        self._command("add", watcher)

    def remove(self, watcher: IopubWatcher) -> None:
        self._command("remove", watcher)

    def close(self) -> None:
        self._command("close", None)
        if self._thread is not None:
            self._thread.join(5)

    def _command(self, verb: str, watcher: IopubWatcher | None) -> None:
        self._commands.put((verb, watcher))
        with self._wake_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rko-activity", daemon=True)
                self._thread.start()
            self._waker.send(b"", self._zmq.NOBLOCK)

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._receiver, zmq.POLLIN)
        owners: dict[Any, tuple[IopubWatcher, bool]] = {}  # socket -> (watcher, is_monitor)
        while True:
            for sock, _ in poller.poll(1000):
                if sock is self._receiver:
                    while self._receiver.poll(0):
                        self._receiver.recv()
                    continue
                watcher, is_monitor = owners[sock]
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                if is_monitor:
                    watcher.on_monitor_event(zmq.utils.monitor.parse_monitor_message(frames)["event"])
                else:
                    watcher.on_message(frames)
            while not self._commands.empty():
                verb, target = self._commands.get()
                if verb == "close":
                    for w in list(self._sockets):
                        self._drop(w, poller, owners)
                    return
                assert target is not None
                if verb == "add" and target not in self._sockets:
                    self._open(target, poller, owners)
                elif verb == "remove":
                    self._drop(target, poller, owners)
            self.watching = len(self._sockets)

    def _open(self, watcher: IopubWatcher, poller: Any, owners: dict[Any, tuple[IopubWatcher, bool]]) -> None:
        zmq = self._zmq
        try:
            sock = self._ctx.socket(zmq.SUB)
            sock.linger = 0
            if watcher.curve is not None:
                sock.curve_publickey, sock.curve_secretkey = watcher.curve
                sock.curve_serverkey = watcher.curve[0]  # as jupyter_client does with the kernel's keys
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            sock.connect(watcher.url)
        except zmq.ZMQError as err:
            watcher.error = str(err)
            log.error("Cannot follow the activity of the kernel at %s: %s", watcher.url, err)
            return
        self._sockets[watcher] = (sock, monitor)
        owners[sock] = (watcher, False)
        owners[monitor] = (watcher, True)
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)

    def _drop(self, watcher: IopubWatcher, poller: Any, owners: dict[Any, tuple[IopubWatcher, bool]]) -> None:
        pair = self._sockets.pop(watcher, None)
        if pair is None:
            return
        sock, monitor = pair
        for s in (sock, monitor):
            poller.unregister(s)
            owners.pop(s, None)
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit (each kernel followed
    costs a few descriptors); returns the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard
