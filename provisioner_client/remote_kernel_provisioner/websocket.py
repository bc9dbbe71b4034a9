"""Kernel websockets that send each message at once (TCP_NODELAY).

Jupyter Server leaves Nagle's algorithm on for a kernel's websocket. A cell answers with several
small frames (status busy, execute_input, the result, execute_reply, status idle); every frame
after the first then waits until the client acknowledges the first, and clients delay that
acknowledgement by up to 40 ms (Linux's delayed ACK). Measured through Jupyter Server here: a
cell's execute_reply reached the client ~40 ms after its first message, 5-10 ms with
TCP_NODELAY, for a local ipykernel and a remote kernel alike. The server extension uses this
class unless the server is configured with a connection class of its own.
"""

from __future__ import annotations

import asyncio

from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection


class NoDelayKernelConnection(ZMQChannelsWebsocketConnection):
    """Jupyter Server's own kernel websocket connection, with TCP_NODELAY on its socket."""

    # The signature of jupyter_server's own override (its base class declares a coroutine).
    def connect(self) -> asyncio.Future[None] | None:  # type: ignore[override]
        # Called from the handler's open(): the websocket (and its stream) exists by then.
        self.websocket_handler.set_nodelay(True)
        return super().connect()
