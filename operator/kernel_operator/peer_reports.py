"""Launch reports for launches this replica does not await.

With several replicas, a launcher reports to whichever replica its address reaches: the one
that launched it (and may have died since), a standby, or a replica draining after a stop
signal. The key is shared, so any replica can open the report; this module decides whether to
take it. The RemoteKernel is found on the API server by the report's launch id (its uid), and
the report is taken only if

- that RemoteKernel is one this operator class handles, and is ``Launching`` now;
- the report's token hashes to the ``status.launch.tokenHash`` the launching replica recorded
  (tenants cannot write status: only the operator's ServiceAccount may);
- a launcher pid recorded in ``status.backendRef`` is the report's (a second launcher holding
  the same token is refused, as the launching replica would refuse it).

It is then persisted exactly as the launching replica would (the Secret, then status Running);
that replica, if it still lives, sees the Running status and follows the kernel from there.
Reports for launches unknown here are refused, and the launcher retries: its launching replica
may be starting up.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from kernel_launchers import protocol
from kernel_launchers.protocol import LaunchPayload

from .kube import KubeError
from .lifecycle import Emit, KernelLifecycle, OperatorContext
from .listener import Refused
from .status import Phase

LIST_CACHE_SECONDS = 1.0  # a burst of reports after a failover shares one list
# A list younger than this is never refreshed: anyone may seal a report for a made-up launch id
# (the key is public), and such reports must not turn into a list each on the API server.
MIN_LIST_AGE = 0.5
log = logging.getLogger(__name__)


class PeerReports:
    """The listener's ``on_unawaited``: find the launch on the API server, check, persist."""

    def __init__(
        self, ctx: OperatorContext, selector: str, component: str, mine: Callable[[str], bool]
    ) -> None:
        self.ctx = ctx
        self.selector = selector
        self.component = component
        self.mine = mine  # whether this replica awaits the launch itself (then it persists)
        self._listed: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._listing: asyncio.Future[dict[str, dict[str, Any]]] | None = None
        self._events: set[asyncio.Future[None]] = set()

    async def _kernels(self, fresh: bool) -> dict[str, dict[str, Any]]:
        """The class's RemoteKernels by uid: listed at most once a LIST_CACHE_SECONDS."""
        if self._listed:
            age = time.monotonic() - self._listed[0]
            if age < MIN_LIST_AGE or (not fresh and age < LIST_CACHE_SECONDS):
                return self._listed[1]
        if self._listing is None:
            self._listing = asyncio.ensure_future(self._list())
        listing = self._listing
        try:
            return await asyncio.shield(listing)
        finally:
            if self._listing is listing and listing.done():
                self._listing = None

    async def _list(self) -> dict[str, dict[str, Any]]:
        items = await self.ctx.kube.list_remote_kernels(self.selector, self.ctx.settings.watch_namespaces)
        found = {str(item["metadata"]["uid"]): item for item in items}
        self._listed = (time.monotonic(), found)
        return found

    async def __call__(self, launch_id: str, payload: LaunchPayload) -> bool:
        if self.mine(launch_id):
            return False  # awaited here after all (registered meanwhile): the launcher retries
        try:
            body = (await self._kernels(fresh=False)).get(launch_id)
            if body is None or (body.get("status") or {}).get("phase") != Phase.LAUNCHING.value:
                body = (await self._kernels(fresh=True)).get(launch_id)
        except KubeError as err:
            log.warning(
                "Cannot look up the launch a report names (%s); the launcher retries: %s", launch_id, err
            )
            return False
        status = (body or {}).get("status") or {}
        if body is None or status.get("phase") != Phase.LAUNCHING.value:
            return False
        recorded = str((status.get("launch") or {}).get("tokenHash") or "")
        if not recorded or not hmac.compare_digest(protocol.token_hash(payload["token"]), recorded):
            raise Refused(
                f"The launch token for kernel {launch_id} does not match the one recorded.", "bad_token"
            )
        pid = (status.get("backendRef") or {}).get("pid")
        if pid and int(pid) != payload["pid"]:
            raise Refused(
                f"The report for kernel {launch_id} comes from launcher pid {payload['pid']}, not from the "
                f"launcher recorded (pid {pid}).",
                "other_launcher",
            )
        meta = body["metadata"]
        logger = logging.LoggerAdapter(
            log, {"k8s_ref": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]}}
        )
        lifecycle = KernelLifecycle(self.ctx, body, self._emitter(body), logger)
        await lifecycle.persist_connection(payload)
        self.ctx.metrics.kernels.forget(launch_id)  # the leader follows it, not this replica
        self.ctx.metrics.reports.labels("for_another_replica").inc()
        logger.info(
            f"Took the report of a launch this replica did not await ({meta['namespace']}/{meta['name']}); "
            "the leading replica follows the kernel from its Running status."
        )
        return True

    def _emitter(self, body: dict[str, Any]) -> Emit:
        def emit(type_: str, reason: str, message: str) -> None:
            event = asyncio.ensure_future(
                self.ctx.kube.post_event(body, type_, reason, message, self.component)
            )
            self._events.add(event)
            event.add_done_callback(self._event_posted)

        return emit

    def _event_posted(self, event: asyncio.Future[None]) -> None:
        self._events.discard(event)
        if not event.cancelled() and event.exception() is not None:
            log.warning("An Event could not be posted: %s", event.exception())
