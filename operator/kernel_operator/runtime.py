"""One replica's life: what it runs leader or not, and when it reconciles.

Every replica, from start to exit: the API client, the operator's key, the response listener
(launch reports are taken by any replica; see peer_reports.py), the backends, and the HTTP port
(probes, metrics). Only the leader runs kopf, i.e. the handlers; with leader election off (a
single replica) it leads from the start.

- Standby: waits for the Lease (leadership.py), taking launch reports meanwhile.
- Leader: runs kopf until a stop signal; renews the Lease beside it, and exits the process at
  once if renewing fails for the renew deadline (fencing: it has stopped before another takes
  over). A container restarted in the same pod leads again at once (same identity).
- Stopping (SIGTERM, as a rolling upgrade sends): kopf stops its handlers, the Lease is released
  so a standby takes over at its next try, and the replica keeps taking reports for kernels
  still Launching (their launchers know its address) for up to RKO_DRAIN_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from . import keys
from .backends import Backends
from .errors import SettingsError
from .http_server import HttpServer
from .kube import Kube, KubeError
from .leadership import LeaderElector, LeaseTimings
from .lifecycle import OperatorContext
from .listener import ResponseListener
from .memory import trim_periodically
from .metrics import Metrics
from .peer_reports import PeerReports
from .peers import PeerAddresses
from .pool_registry import PoolRegistry
from .pools import seal_key
from .settings import OperatorSettings
from .status import Phase

log = logging.getLogger("kernel_operator")
EXIT_FENCED = 75  # the Lease was lost: the container restarts as a standby
DRAIN_POLL_SECONDS = 1.0


@dataclass
class Replica:
    ctx: OperatorContext
    http: HttpServer | None
    elector: LeaderElector | None
    selector: str  # the RemoteKernels of this operator class

    @property
    def role(self) -> str:
        return "leader" if self.elector is None or self.elector.is_leader else "standby"


def advertised(bind_host: str, port: int) -> str:
    """The address launchers are told, when RKO_RESPONSE_ADDRESS does not say one."""
    host = bind_host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"


def lease_timings(cfg: OperatorSettings) -> LeaseTimings:
    try:
        return LeaseTimings(cfg.lease_duration, cfg.lease_renew_deadline, cfg.lease_retry_period)
    except ValueError as err:
        raise SettingsError(
            f"RKO_LEASE_DURATION_SECONDS, RKO_LEASE_RENEW_DEADLINE_SECONDS, RKO_LEASE_RETRY_SECONDS: {err}"
        ) from err


async def start_replica(cfg: OperatorSettings, selector: str, component: str) -> Replica:
    """Everything a replica serves before (and whether or not) it leads."""
    timings = lease_timings(cfg) if cfg.leader_election else None
    metrics = Metrics()
    kube = await Kube.connect()
    delay = 2.0
    while True:
        try:
            private_key = await keys.load_or_create(kube, cfg.namespace, cfg.key_secret)
            break
        except KubeError as err:
            # E.g. 429 while the API server starts, or a 403 until RBAC is applied: retry.
            log.warning(f"The operator's key cannot be read yet; retrying in {delay:g} s: {err}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    listener = ResponseListener(private_key, on_rejected=lambda cause: metrics.rejections.labels(cause).inc())
    host, port = await listener.start(*cfg.response_bind, reuse_port=cfg.response_reuse_port)
    ctx = OperatorContext(
        settings=cfg,
        kube=kube,
        backends=Backends(cfg, kube),
        listener=listener,
        private_key=private_key,
        response_address=cfg.response_address or advertised(host, port),
        pools=PoolRegistry(seal_key(private_key)),
        metrics=metrics,
    )
    listener.on_unawaited = PeerReports(ctx, selector, component, listener.awaits)
    if cfg.peer_service:
        ctx.peers = PeerAddresses(kube, ctx.response_address, cfg.namespace, cfg.peer_service, "response")
    elector = None
    if timings is not None:
        elector = LeaderElector(
            kube,
            cfg.namespace,
            cfg.lease_name,
            cfg.identity,
            timings,
            log.info,
            labels={"app.kubernetes.io/name": "remote-kernel-operator"},
        )
    replica = Replica(ctx, None, elector, selector)
    if cfg.http_bind is not None:
        replica.http = HttpServer(metrics, lambda: listener.serving, lambda: replica.role)
        await replica.http.start(*cfg.http_bind)
    metrics.leader.set(0)
    return replica


def fence(reason: str) -> None:
    """Stop acting at once: the process exits before any standby may take the Lease."""
    log.critical(
        f"This replica lost the leader Lease ({reason}); it exits now so that it never acts beside the new leader."
    )
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_FENCED)


async def run_replica(
    replica: Replica, operator: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
) -> None:
    """Stand by until leading, lead (run ``operator``) until a stop signal, then drain."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    elector = replica.elector
    keeping: asyncio.Future[None] | None = None
    interval = replica.ctx.settings.memory_trim_seconds
    trimming = asyncio.ensure_future(trim_periodically(interval)) if interval > 0 else None
    try:
        if elector is not None and not await elector.acquire(stop):
            return  # stopped while standing by
        replica.ctx.metrics.leader.set(1)
        replica.ctx.metrics.leader_transitions.inc()
        if elector is not None:
            keeping = asyncio.ensure_future(elector.keep(fence))
            # keep() makes its tasks at its first step: let it take that step before kopf
            # starts, which waits 5 s on a stop for any task made after it started.
            await asyncio.sleep(0)
        await operator(stop)  # kopf replaces the signal handlers with its own while it runs
    finally:
        if keeping is not None:
            keeping.cancel()
        if trimming is not None:
            trimming.cancel()
        replica.ctx.metrics.leader.set(0)
        if elector is not None:
            await elector.release()
        await drain(replica)
        await close(replica)


async def drain(replica: Replica) -> None:
    """Keep taking reports while kernels of this class are Launching, for RKO_DRAIN_SECONDS."""
    ctx = replica.ctx
    deadline = time.monotonic() + ctx.settings.drain_seconds
    if ctx.settings.drain_seconds <= 0 or not ctx.listener.serving:
        return
    while time.monotonic() < deadline:
        try:
            kernels = await ctx.kube.list_remote_kernels(replica.selector, ctx.settings.watch_namespaces)
        except KubeError:
            kernels = []
        launching = [k for k in kernels if (k.get("status") or {}).get("phase") == Phase.LAUNCHING.value]
        if not launching:
            return
        log.info(
            f"Draining: {len(launching)} kernels are still Launching; taking their reports a while longer."
        )
        await asyncio.sleep(DRAIN_POLL_SECONDS)


async def close(replica: Replica) -> None:
    with contextlib.suppress(Exception):
        await replica.ctx.listener.stop()
    if replica.http is not None:
        with contextlib.suppress(Exception):
            await replica.http.stop()
    with contextlib.suppress(Exception):
        await replica.ctx.kube.close()
