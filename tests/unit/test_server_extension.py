"""The server extension's load hook: which websocket connection class kernels get."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from jupyter_server.gateway.connections import GatewayWebSocketConnection
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from traitlets.config import Config

from remote_kernel_provisioner import server_extension
from remote_kernel_provisioner.websocket import NoDelayKernelConnection


class FakeServerApp:
    """What the load hook reads of a ServerApp once its web application is made."""

    def __init__(
        self, connection_class: Any = ZMQChannelsWebsocketConnection, config: Config | None = None
    ) -> None:
        self.config = config or Config()
        self.kernel_websocket_connection_class = connection_class
        self.web_app = SimpleNamespace(settings={"kernel_websocket_connection_class": connection_class})
        self.log = logging.getLogger("fake-server")


def test_kernel_websockets_get_nodelay_when_the_server_uses_jupyter_servers_own_class(
    caplog: Any,
) -> None:
    app = FakeServerApp()
    with caplog.at_level(logging.INFO, "fake-server"):
        server_extension._load_jupyter_server_extension(app)
    assert app.web_app.settings["kernel_websocket_connection_class"] is NoDelayKernelConnection
    assert app.kernel_websocket_connection_class is NoDelayKernelConnection
    assert issubclass(
        NoDelayKernelConnection, ZMQChannelsWebsocketConnection
    )  # only the socket option differs
    assert "TCP_NODELAY" in caplog.text


def test_a_connection_class_the_administrator_configured_is_kept() -> None:
    # Even when it names jupyter_server's own class: that is how to turn the change off.
    config = Config({"ServerApp": {"kernel_websocket_connection_class": ZMQChannelsWebsocketConnection}})
    app = FakeServerApp(config=config)
    assert server_extension.use_nodelay_websockets(app) is False
    assert app.web_app.settings["kernel_websocket_connection_class"] is ZMQChannelsWebsocketConnection


def test_a_gateway_servers_connection_class_is_kept() -> None:
    app = FakeServerApp(GatewayWebSocketConnection)
    assert server_extension.use_nodelay_websockets(app) is False
    assert app.web_app.settings["kernel_websocket_connection_class"] is GatewayWebSocketConnection
