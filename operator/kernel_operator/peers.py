"""Where launchers may report: this replica first, then every other ready replica.

A launcher retries its report for minutes, but only to the addresses it was given. Where the
response address is one replica's own (no Service in between, or a Service that is not
reachable from where kernels run), a launch begun by a replica that is then lost for good (its
node gone) could never report. So a launch names this replica's address and those of the
other ready replicas of the same Service, read from its EndpointSlices (at most once every
REFRESH_SECONDS); any of them takes the report (see peer_reports.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

REFRESH_SECONDS = 5.0
ALONE_REFRESH_SECONDS = 1.0
READ_TIMEOUT = 5.0
log = logging.getLogger(__name__)


class EndpointSource(Protocol):
    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]: ...


def ready_addresses(slices: list[dict[str, Any]], port_name: str) -> list[str]:
    """``host:port`` of every ready endpoint serving ``port_name``, in a stable order."""
    found: set[str] = set()
    for piece in slices:
        ports = [
            p.get("port") for p in piece.get("ports") or [] if p.get("name") == port_name and p.get("port")
        ]
        if not ports:
            continue
        for endpoint in piece.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            # Serving: ready, or draining after a stop signal (it still takes reports).
            if conditions.get("serving", conditions.get("ready")) is False:
                continue
            for address in endpoint.get("addresses") or []:
                host = f"[{address}]" if ":" in str(address) else str(address)
                found.add(f"{host}:{ports[0]}")
    return sorted(found)


def report_addresses(own: str, peers: list[str]) -> str:
    """The launcher's --response-address: this replica's first, then the others'."""
    return ",".join([own, *[p for p in peers if p != own]])


class PeerAddresses:
    """This replica's address and its peers', for a launch's --response-address."""

    def __init__(self, kube: EndpointSource, own: str, namespace: str, service: str, port_name: str) -> None:
        self.kube = kube
        self.own = own
        self.namespace = namespace
        self.service = service
        self.port_name = port_name
        self._peers: list[str] = []
        self._read_at = float("-inf")
        self._warned = False
        self._reading: asyncio.Future[None] | None = None

    async def addresses(self) -> str:
        if not self.service:
            return self.own
        # Alone (a peer may be a moment from ready): look again soon, not in REFRESH_SECONDS.
        wait = REFRESH_SECONDS if self._peers else ALONE_REFRESH_SECONDS
        if self._reading is None and time.monotonic() - self._read_at >= wait:
            self._read_at = time.monotonic()
            self._reading = asyncio.ensure_future(self._read())
        if self._reading is not None:
            # Every launch of a burst waits for the one read under way: returning the old (at
            # first, empty) list meanwhile gave the burst's launchers this replica alone.
            reading = self._reading
            await asyncio.shield(reading)
            if self._reading is reading:
                self._reading = None
        return report_addresses(self.own, self._peers)

    async def _read(self) -> None:
        try:
            # Bounded: a burst of launches waits on this read.
            slices = await asyncio.wait_for(
                self.kube.list_endpoint_slices(self.namespace, self.service), READ_TIMEOUT
            )
            self._peers = [a for a in ready_addresses(slices, self.port_name) if a != self.own]
        except Exception as err:
            if not self._warned:
                log.warning(f"Cannot read the replicas of Service {self.namespace}/{self.service}: {err}")
                self._warned = True
