"""Leader election on a coordination.k8s.io Lease, with fencing.

One replica (the holder of the Lease) reconciles; the others wait, warm, and take the Lease when
it lapses. The rules, as client-go's leader election has them (with shorter default timings):

- The Lease is taken with a write that carries the ``resourceVersion`` read, so of two replicas
  racing for it, the API server lets one win (the other gets a 409 and reads again).
- A standby judges a Lease lapsed by its own clock: it notes when it first saw the Lease's
  current record (holder and renew time) and takes it only ``duration`` seconds after that if
  nothing changed. Clocks of other machines never enter the decision.
- The holder renews every ``retry_period``. If it cannot renew for ``renew_deadline`` seconds
  (shorter than ``duration``), it is fenced: ``on_lost`` runs (the operator exits at once), so it
  has stopped acting before any standby may take over.
- A holder that stops cleanly releases the Lease (holder emptied), and a standby takes it at its
  next try rather than after ``duration``.
- A replica whose identity holds the Lease already (its container restarted in the same pod:
  the earlier process is gone) takes it at once.

Pure decisions (``may_take``, the Lease bodies) are separate from the loop, which talks to the
API server only through the small ``LeaseStore`` seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import OperatorError

MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


class LeaseConflict(OperatorError):
    """Another replica wrote the Lease between our read and our write."""


class LeaseStore(Protocol):
    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...

    async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class LeaseTimings:
    """Seconds. Shorter than client-go's 15/10/2 so that a standby acts within 15 s of the
    leader's loss: it sees the last renewal within ``retry_period`` (it reads the Lease that
    often) and takes the Lease just as ``duration`` has passed since, so at most
    ``duration + retry_period`` (11 s) after that renewal; then it starts its handlers. The
    holder still has 7 tries to renew."""

    duration: float = 10.0
    renew_deadline: float = 7.0
    retry_period: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError(
                "Leader election needs 0 < retry period < renew deadline < lease duration (got "
                f"{self.retry_period:g} < {self.renew_deadline:g} < {self.duration:g}); a holder must "
                "give up before a standby may take over."
            )


def micro_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime(MICRO_TIME)


def holder_of(lease: dict[str, Any] | None) -> str:
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def record_of(lease: dict[str, Any] | None) -> tuple[str, str]:
    """What a standby watches for change: the holder and its last renewal."""
    spec = (lease or {}).get("spec") or {}
    return str(spec.get("holderIdentity") or ""), str(spec.get("renewTime") or "")


def may_take(lease: dict[str, Any] | None, identity: str, unchanged_for: float, duration: float) -> bool:
    """Whether ``identity`` may write itself into ``lease`` now: there is none, nobody holds it,
    it holds it already, or its record has not changed for longer than the Lease lasts (as its
    holder declared it, else ``duration``)."""
    holder = holder_of(lease)
    return lease is None or holder in ("", identity) or unchanged_for > lease_lasts(lease, duration)


def lease_lasts(lease: dict[str, Any] | None, duration: float) -> float:
    """How long ``lease`` lasts unrenewed: as its holder declared it, else ``duration``."""
    declared = ((lease or {}).get("spec") or {}).get("leaseDurationSeconds")
    return float(declared) if declared else duration


def lease_body(
    lease: dict[str, Any] | None,
    name: str,
    identity: str,
    now: dt.datetime,
    timings: LeaseTimings,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The Lease held (or renewed) by ``identity``: a new one, or ``lease`` rewritten with its
    resourceVersion kept (so the write fails if anyone else wrote in between)."""
    spec = dict((lease or {}).get("spec") or {})
    renewing = holder_of(lease) == identity
    transitions = int(spec.get("leaseTransitions") or 0)
    spec.update(
        holderIdentity=identity,
        leaseDurationSeconds=max(1, round(timings.duration)),
        renewTime=micro_time(now),
        acquireTime=spec.get("acquireTime") if renewing and spec.get("acquireTime") else micro_time(now),
        leaseTransitions=transitions if renewing or lease is None else transitions + 1,
    )
    metadata: dict[str, Any] = {"name": name}
    if lease is not None:
        metadata = dict(lease["metadata"])
    elif labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}


def released_body(lease: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    """``lease`` given up: no holder, so a standby takes it at its next try."""
    spec = dict(lease.get("spec") or {})
    spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=micro_time(now))
    return {**lease, "spec": spec}


class LeaderElector:
    """Take and keep one Lease for one identity (see the module's rules)."""

    def __init__(
        self,
        store: LeaseStore,
        namespace: str,
        name: str,
        identity: str,
        timings: LeaseTimings,
        log: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timings = timings
        self.log = log
        self.clock = clock
        self.labels = labels or {}
        self.is_leader = False
        self._seen: tuple[str, str] | None = None
        self._seen_at = 0.0
        self._lapses_at = 0.0  # by this replica's clock: when the record seen lapses if unchanged
        self._renewed_at = 0.0  # when the last successful renewal was *sent* (conservative)
        self._lease: dict[str, Any] | None = None

    def _unchanged_for(self, lease: dict[str, Any] | None) -> float:
        record = record_of(lease)
        now = self.clock()
        if record != self._seen:
            self._seen, self._seen_at = record, now
        return now - self._seen_at

    async def try_once(self) -> bool:
        """One attempt to take or renew the Lease: whether this replica holds it now. Each call
        has a deadline: a request that hangs (a connection gone quiet) must not hold a standby
        back for good, nor keep a leader from noticing it cannot renew."""
        return await asyncio.wait_for(self._try_once(), self.timings.renew_deadline / 2)

    async def _try_once(self) -> bool:
        sent = self.clock()
        lease = await self.store.read_lease(self.namespace, self.name)
        unchanged_for = self._unchanged_for(lease)
        self._lapses_at = self._seen_at + lease_lasts(lease, self.timings.duration)
        if not may_take(lease, self.identity, unchanged_for, self.timings.duration):
            self.is_leader = False
            return False
        body = lease_body(
            lease, self.name, self.identity, dt.datetime.now(dt.timezone.utc), self.timings, self.labels
        )
        try:
            if lease is None:
                written = await self.store.create_lease(self.namespace, body)
            else:
                written = await self.store.replace_lease(self.namespace, self.name, body)
        except LeaseConflict:
            self.is_leader = False  # someone else wrote it between our read and our write
            return False
        self._lease = written
        self._renewed_at = sent
        if not self.is_leader:
            self.is_leader = True
            previous = holder_of(lease)
            self.log(
                f"This replica ({self.identity}) leads now: it holds Lease {self.namespace}/{self.name}"
                + (f", taken over from {previous}." if previous and previous != self.identity else ".")
            )
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Try every retry period until this replica leads (True) or ``stop`` is set (False)."""
        waiting_logged = False
        while not stop.is_set():
            try:
                if await self.try_once():
                    return True
            except Exception as err:  # any failure to reach the API server: try again
                self.log(f"Leader election could not read or write its Lease; trying again: {err!r}")
            if not waiting_logged:
                holder = record_of(self._lease_seen())[0]
                self.log(f"This replica ({self.identity}) is a standby; {holder or 'another replica'} leads.")
                waiting_logged = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self._next_try_in())
        return False

    def _next_try_in(self) -> float:
        """Every retry period, or sooner when the Lease seen lapses before then: a standby
        tries again just after the lapse, not up to a retry period later."""
        until_lapse = self._lapses_at - self.clock()
        if 0 < until_lapse < self.timings.retry_period:
            return until_lapse + 0.01
        return self.timings.retry_period

    def _lease_seen(self) -> dict[str, Any]:
        holder, renewed = self._seen or ("", "")
        return {"spec": {"holderIdentity": holder, "renewTime": renewed}}

    async def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew until cancelled; call ``on_lost`` once, and return, when the Lease was not
        renewed within the renew deadline or another replica holds it."""
        lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        tasks = [asyncio.ensure_future(self._renew(lost)), asyncio.ensure_future(self._watchdog(lost))]
        try:
            reason = await asyncio.shield(lost)
        finally:
            for task in tasks:
                task.cancel()
        self.is_leader = False
        on_lost(reason)

    async def _renew(self, lost: asyncio.Future[str]) -> None:
        while not lost.done():
            await asyncio.sleep(self.timings.retry_period)
            try:
                if not await self.try_once() and not lost.done():
                    lost.set_result(f"another replica ({record_of(self._lease_seen())[0]}) holds the Lease")
            except Exception as err:  # the watchdog fences if this goes on past the deadline
                self.log(f"Renewing the leader Lease failed; trying again: {err!r}")

    async def _watchdog(self, lost: asyncio.Future[str]) -> None:
        # Independent of the renewal calls: a request that hangs must not hold fencing back.
        while not lost.done():
            await asyncio.sleep(min(0.5, self.timings.retry_period / 2))
            late = self.clock() - self._renewed_at
            if late > self.timings.renew_deadline and not lost.done():
                lost.set_result(
                    f"the Lease was not renewed for {late:.1f} s (renew deadline {self.timings.renew_deadline:g} s)"
                )

    async def release(self) -> None:
        """Give the Lease up (on a clean stop), so a standby takes over at once."""
        if not self.is_leader or self._lease is None:
            return
        self.is_leader = False
        try:
            lease = await self.store.read_lease(self.namespace, self.name)
            if lease is not None and holder_of(lease) == self.identity:
                await self.store.replace_lease(
                    self.namespace, self.name, released_body(lease, dt.datetime.now(dt.timezone.utc))
                )
                self.log(f"This replica ({self.identity}) released the leader Lease.")
        except Exception as err:  # unreachable, or taken: a standby takes it when it lapses
            self.log(f"Releasing the leader Lease failed (a standby takes it when it lapses): {err!r}")
