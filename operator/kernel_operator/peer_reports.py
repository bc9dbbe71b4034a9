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
A repeat of a report already taken (Running with that token, from that launcher: its
acknowledgement was lost) is acknowledged again and nothing else happens.

A report is taken, or refused for good (the launcher stops its kernel), only on a list begun
after the report arrived; it is refused for good when that list shows its launch is not the
current one: no such RemoteKernel (deleted), another
token (relaunched since), another launcher, or a kernel stopping or finished. A cached list
never refuses for good: it may predate the very status write that recorded the launch. Anything
else (not yet Launching, the API server unreachable) is refused for now; the launcher retries.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kernel_launchers import protocol
from kernel_launchers.protocol import LaunchPayload

from .backends import BackendRef
from .kube import KubeError
from .lifecycle import Emit, KernelLifecycle, OperatorContext, other_launcher
from .listener import Refused
from .status import Phase

LIST_CACHE_SECONDS = 1.0  # a burst of reports after a failover shares one list
# A list younger than this is never refreshed: anyone may seal a report for a made-up launch id
# (the key is public), and such reports must not turn into a list each on the API server.
MIN_LIST_AGE = 0.5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """What to do with a report, judged from one read of its RemoteKernel."""

    take: bool = False  # persist it (the launch is Launching with this token)
    again: bool = False  # acknowledge it again (taken before), nothing else
    refusal: Refused | None = None  # refuse it, for good if the read came after it arrived


WAIT = Verdict()  # not decidable yet: refuse for now, the launcher retries


def judge(launch_id: str, body: dict[str, Any] | None, payload: LaunchPayload) -> Verdict:
    """The verdict on ``payload`` given the RemoteKernel ``body`` its launch id names."""
    if body is None:
        return Verdict(
            refusal=Refused(
                f"No RemoteKernel has the launch id {launch_id} (deleted, or not this operator's).",
                "unknown_launch",
                final=True,
            )
        )
    status = body.get("status") or {}
    phase = status.get("phase")
    if phase not in (Phase.LAUNCHING.value, Phase.RUNNING.value):
        if phase in (Phase.TERMINATING.value, Phase.SUCCEEDED.value, Phase.FAILED.value):
            return Verdict(
                refusal=Refused(
                    f"Kernel {launch_id} is {phase}: its launch is over.", "unknown_launch", final=True
                )
            )
        return WAIT  # Pending: a launch is about to be recorded
    recorded = str((status.get("launch") or {}).get("tokenHash") or "")
    if not recorded:
        return WAIT
    if not hmac.compare_digest(protocol.token_hash(payload["token"]), recorded):
        return Verdict(
            refusal=Refused(
                f"The launch token for kernel {launch_id} is not the one its current launch recorded "
                "(a launch replaced since, or a forged report).",
                "bad_token",
                final=True,
            )
        )
    other = other_launcher(status.get("backendRef") or {}, payload)
    if other:
        return Verdict(
            refusal=Refused(f"The report for kernel {launch_id} {other}.", "other_launcher", final=True)
        )
    if phase == Phase.RUNNING.value:
        return Verdict(again=True)
    return Verdict(take=True)


def with_backend_ref(body: dict[str, Any], launch: asyncio.Future[BackendRef]) -> dict[str, Any]:
    """``body`` with the backend record a finished ``launch`` returned, where status has none."""
    status = body.get("status") or {}
    if status.get("backendRef") or launch.cancelled() or launch.exception() is not None:
        return body
    return {**body, "status": {**status, "backendRef": launch.result()}}


class PeerReports:
    """The listener's ``on_unawaited``: find the launch on the API server, check, persist."""

    def __init__(
        self, ctx: OperatorContext, selector: str, component: str, mine: Callable[[str], bool]
    ) -> None:
        self.ctx = ctx
        self.selector = selector
        self.component = component
        self.mine = mine  # whether this replica awaits the launch itself (then it persists)
        # The last list: when it began (monotonic), and the kernels by uid.
        self._listed: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._listing: asyncio.Future[None] | None = None
        self._events: set[asyncio.Future[None]] = set()

    async def _kernels(self, since: float | None = None) -> dict[str, dict[str, Any]]:
        """The class's RemoteKernels by uid, from a list begun at ``since`` or later; with no
        ``since``, from one at most LIST_CACHE_SECONDS old. Lists begin MIN_LIST_AGE apart at
        the least, and every caller waiting meanwhile shares the next one."""
        while True:
            if self._listed:
                began, found = self._listed
                if (began >= since) if since is not None else (time.monotonic() - began < LIST_CACHE_SECONDS):
                    return found
            if self._listing is None:
                self._listing = asyncio.ensure_future(self._list())
            listing = self._listing
            try:
                await asyncio.shield(listing)
            finally:
                if self._listing is listing and listing.done():
                    self._listing = None

    async def _list(self) -> None:
        if self._listed:
            await asyncio.sleep(MIN_LIST_AGE - (time.monotonic() - self._listed[0]))
        began = time.monotonic()
        items = await self.ctx.kube.list_remote_kernels(self.selector, self.ctx.settings.watch_namespaces)
        self._listed = (began, {str(item["metadata"]["uid"]): item for item in items})

    async def __call__(self, launch_id: str, payload: LaunchPayload) -> bool:
        arrived = time.monotonic()
        if self.mine(launch_id):
            return False  # awaited here after all (registered meanwhile): the launcher retries
        started_here = self.ctx.launches.get(launch_id)
        if started_here is not None and not started_here.done():
            # This replica's backend is still starting it, and only its answer says which
            # launcher is the one: an ssh attempt that timed out may have started one after all,
            # holding the same token. The launcher retries; this replica then awaits it.
            log.info("A report of launch %s came while this replica still starts it; it retries.", launch_id)
            return False
        try:
            body = (await self._kernels()).get(launch_id)
            verdict = judge(launch_id, body, payload)
            if not verdict.again:
                # Judged again on a read begun after the report came: a cached list may predate
                # its launch's record (no refusal for good on it), or its kernel's Running record
                # (no take on it: an ssh attempt that timed out on a cut link may report later,
                # holding the same token, after another host's launcher was taken; see judge).
                body = (await self._kernels(since=arrived)).get(launch_id)
                verdict = judge(launch_id, body, payload)
        except KubeError as err:
            log.warning(
                "Cannot look up the launch a report names (%s); the launcher retries: %s", launch_id, err
            )
            return False
        if verdict.take and body is not None and started_here is not None:
            # Started here, maybe not recorded yet (the list came first): judged on what it
            # started, and persisted with it.
            body = with_backend_ref(body, started_here)
            verdict = judge(launch_id, body, payload)
        if verdict.refusal is not None:
            raise verdict.refusal
        if verdict.again:
            self.ctx.metrics.reports.labels("repeat").inc()
            log.info("Acknowledged again the report of launch %s (its kernel is Running).", launch_id)
            return True
        if not verdict.take or body is None:
            return False
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
