"""This process's X25519 key pair, to which the operator seals a kernel's connection.

A RemoteKernel whose spec names ``clientPublicKey`` gets its key (and Curve keys) in
``status.connection.sealed``: the provisioner opens it and reads no Secret on the launch's path.
The pair is made once per process and its private half never leaves this process's memory.

Making it (cryptography's import and its first key) costs ~20 ms, more than the Secret read it
saves, so a launch never waits for it: the first launch of a process starts making it in a
thread while it waits for its kernel and reads the Secret, as every launch did before; the
launches after it have the key.
"""

from __future__ import annotations

import logging
import threading

from kernel_launchers import protocol
from kernel_launchers.sealed_connection import encode_public_key

log = logging.getLogger(__name__)


class ProcessKey:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pair: tuple[bytes, str] | None = None  # (private raw, public base64)

    def ready(self) -> tuple[bytes, str] | None:
        """(private key, public key as spec.clientPublicKey takes it), once made; else None."""
        return self._pair

    def prepare(self) -> None:
        """Start making the pair in a thread (once per process; later calls do nothing)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._make, name="rko-client-key")
            self._thread.start()

    def wait(self, timeout: float | None = None) -> tuple[bytes, str] | None:
        """Make the pair now if need be, and wait for it (for callers that must have it)."""
        self.prepare()
        assert self._thread is not None
        self._thread.join(timeout)
        return self._pair

    def _make(self) -> None:
        try:
            protocol.preload_crypto()
            private = protocol.new_private_key()
            self._pair = (private, encode_public_key(protocol.public_key_of(private)))
        except Exception:  # launches then read the Secret, as without a key
            log.warning("Could not make this process's key for sealed connections.", exc_info=True)


PROCESS_KEY = ProcessKey()
