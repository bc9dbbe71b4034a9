"""The operator's HTTP port: probes and metrics, served by every replica, leader or not.

- ``/healthz``: the process's event loop answers (the liveness probe).
- ``/readyz``: this replica's response listener serves, so launchers may report to it (the
  readiness probe; a standby is ready too: the Service routes reports to every ready replica).
- ``/metrics``: Prometheus' text format (see metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from .metrics import Metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HttpServer:
    def __init__(self, metrics: Metrics, ready: Callable[[], bool], role: Callable[[], str]) -> None:
        self.metrics = metrics
        self.ready = ready
        self.role = role
        self._runner: web.AppRunner | None = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text=f"ok ({self.role()})\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        if self.ready():
            return web.Response(text=f"ready ({self.role()})\n")
        return web.Response(status=503, text="not ready: the response listener is not serving yet\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def start(self, host: str, port: int) -> int:
        """Serve on ``host:port`` (port 0: any free one); the port served."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # aiohttp keeps the bound sockets here; needed for port 0
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
