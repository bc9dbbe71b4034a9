"""API connections shared by the provisioners of one process.

Jupyter Server runs every kernel's provisioner on one event loop. Each used to open its own
connection: the kubeconfig parsed, its certificates written out, a TLS context built and a TLS
handshake made, all on the caller's loop, once per kernel (a burst of 100 starts paid it 100
times in one go). One connection per event loop, namespace and kubeconfig is shared instead, and
closed when its last user lets it go. A connection belongs to the loop it was made in
(synchronous managers may call from several loops), hence the key.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from dataclasses import dataclass, field

from .cluster import RemoteKernels

Key = tuple[str, str | None]  # namespace, kubeconfig path


@dataclass
class _Shared:
    ready: asyncio.Future[RemoteKernels]
    users: int = 0


@dataclass
class SharedConnections:
    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Key, _Shared]] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    async def acquire(self, namespace: str, kubeconfig: str | None) -> RemoteKernels:
        """The running loop's connection for ``namespace`` and ``kubeconfig`` (made at first use;
        callers meanwhile wait for that one). Give it back with ``release``."""
        loop = asyncio.get_running_loop()
        key = (namespace, kubeconfig or os.environ.get("KUBECONFIG") or None)
        shared = self._by_loop.setdefault(loop, {})
        entry = shared.get(key)
        making = entry is None
        if entry is None:
            entry = shared[key] = _Shared(loop.create_future())
        entry.users += 1  # counted before any wait: a release meanwhile must not close it
        if making:
            try:
                entry.ready.set_result(await RemoteKernels.connect(*key))
            except BaseException as err:
                shared.pop(key, None)
                entry.ready.set_exception(err)
                entry.ready.exception()  # retrieved here; the waiters re-raise it
                raise
        try:
            return await asyncio.shield(entry.ready)
        except BaseException:
            entry.users -= 1
            raise

    async def release(self, kernels: RemoteKernels) -> None:
        """One user fewer; the last one closes the connection."""
        shared = self._by_loop.get(asyncio.get_running_loop(), {})
        for key, entry in list(shared.items()):
            if entry.ready.done() and not entry.ready.exception() and entry.ready.result() is kernels:
                entry.users -= 1
                if entry.users <= 0:
                    del shared[key]
                    await kernels.close()
                return


CONNECTIONS = SharedConnections()
