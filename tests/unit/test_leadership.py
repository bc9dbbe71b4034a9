"""Leader election's decisions and loop, against a Lease store at our own seam, with a clock
the tests move; and the peer-report path's limits on what a report may cost or do."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import time
from typing import Any

import pytest

from kernel_launchers import protocol
from kernel_operator.leadership import (
    LeaderElector,
    LeaseConflict,
    LeaseTimings,
    lease_body,
    may_take,
    released_body,
)
from kernel_operator.listener import Refused
from kernel_operator.peer_reports import PeerReports

from .test_lifecycle import FakeBackend, FakeKube, context, good_payload

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)
TIMINGS = LeaseTimings(10, 7, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Store:
    """A Lease store with the API server's optimistic concurrency (resourceVersion)."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.fail: Exception | None = None
        self.writes = 0

    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.fail:
            raise self.fail
        return copy.deepcopy(self.lease)

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.lease is not None:
            raise LeaseConflict("exists")
        return self._store(body)

    async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            raise self.fail
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise LeaseConflict("stale")
        return self._store(body)

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.writes += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)


def elector(store: Store, identity: str, clock: Clock) -> LeaderElector:
    return LeaderElector(store, "ns", "lease", identity, TIMINGS, lambda _: None, clock)


def test_timings_that_cannot_fence_are_refused() -> None:
    with pytest.raises(ValueError, match="give up before a standby"):
        LeaseTimings(duration=10, renew_deadline=10, retry_period=1)


def test_who_may_take_a_lease() -> None:
    held = lease_body(None, "lease", "a", NOW, TIMINGS)
    assert may_take(None, "b", 0, 10)
    assert may_take(held, "a", 0, 10)  # its own (a restarted container of the same pod)
    assert not may_take(held, "b", 9.9, 10)
    assert may_take(held, "b", 10.1, 10)
    assert may_take(released_body({**held, "metadata": {"name": "lease"}}, NOW), "b", 0, 10)
    longer = {**held, "spec": {**held["spec"], "leaseDurationSeconds": 3600}}
    assert not may_take(longer, "b", 60, 10)  # the holder's declared duration counts


async def test_one_leader_among_racing_replicas_and_a_standby_waits_for_the_lapse() -> None:
    store, clock = Store(), Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    results = await asyncio.gather(a.try_once(), b.try_once())
    assert sorted(results) == [False, True]
    leader, standby = (a, b) if results[0] else (b, a)
    clock.now += 9
    assert not await standby.try_once()
    assert await leader.try_once()  # renewed: the record changed, the standby's wait restarts
    clock.now += 9
    assert not await standby.try_once()  # it sees the renewal now: its 10 s start again
    clock.now += 9.5
    assert not await standby.try_once()
    clock.now += 1  # 10.5 s without a change, by the standby's own clock
    assert await standby.try_once()
    assert store.lease is not None and store.lease["spec"]["holderIdentity"] == standby.identity
    assert store.lease["spec"]["leaseTransitions"] == 1
    assert not await leader.try_once() and not leader.is_leader


async def test_a_standby_tries_again_just_after_the_lapse_not_a_retry_period_later() -> None:
    """A standby read the Lease every retry period and took it at the first read after the
    lapse: up to a retry period late (an HA test saw the failover take 15 s against 11)."""
    store = Store()
    holder = LeaderElector(store, "ns", "lease", "a", LeaseTimings(1.0, 0.95, 0.9), lambda _: None)
    assert await holder.try_once()  # then gone: never renewed
    standby = LeaderElector(store, "ns", "lease", "b", LeaseTimings(1.0, 0.95, 0.9), lambda _: None)
    began = time.monotonic()
    assert await asyncio.wait_for(standby.acquire(asyncio.Event()), 5)
    took = time.monotonic() - began
    # Tries at 0 and 0.9 s, then just after the lapse at 1.0 s (was 1.8 s: 0, 0.9, 1.8).
    assert 1.0 <= took < 1.5, took


async def test_a_leader_that_cannot_renew_is_fenced_before_the_lease_lapses() -> None:
    store, clock = Store(), Clock()
    a = elector(store, "a", clock)
    assert await a.try_once()
    store.fail = ConnectionResetError("the API server is gone")  # not an API error
    lost: list[tuple[str, float]] = []
    keeping = asyncio.ensure_future(a.keep(lambda reason: lost.append((reason, clock.now))))
    for _ in range(40):
        await asyncio.sleep(0.05)
        clock.now += 0.25
    await asyncio.wait_for(keeping, 5)
    ((reason, at),) = lost
    assert "not renewed" in reason and not a.is_leader
    assert at - 100.0 < TIMINGS.duration  # fenced before any standby could take over


async def test_a_clean_stop_releases_the_lease_for_the_standby_at_once() -> None:
    store, clock = Store(), Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    assert await a.try_once()
    assert not await b.try_once()
    await a.release()
    assert store.lease is not None and store.lease["spec"]["holderIdentity"] == ""
    assert await b.try_once()  # no wait for the lapse


async def test_a_restarted_replica_of_the_same_identity_leads_again_at_once() -> None:
    store, clock = Store(), Clock()
    assert await elector(store, "pod-1", clock).try_once()
    assert await elector(store, "pod-1", clock).try_once()  # a new process, the same pod


# -- reports a replica does not await ------------------------------------------------------------


class ListingKube(FakeKube):
    """Lists RemoteKernels; ``after_list`` changes what the API server holds once a list is
    served (a status written just after a replica read)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        super().__init__()
        self.items = items
        self.lists = 0
        self.after_list: Any = None
        self.events: list[tuple[str, str]] = []

    async def post_event(
        self, body: dict[str, Any], type_: str, reason: str, message: str, component: str
    ) -> None:
        self.events.append((type_, reason))

    async def list_remote_kernels(
        self, selector: str = "", namespaces: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        self.lists += 1
        await asyncio.sleep(0)
        served = copy.deepcopy(self.items)
        if self.after_list is not None:
            self.after_list()
            self.after_list = None
        return served


def payload(launch_id: str, token: str, pid: int = 7) -> Any:
    return {**good_payload("6c9c8d0e-1111-2222-3333-444455556666", token), "launch_id": launch_id, "pid": pid}


def kernel(phase: str, token: str, pid: int | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": phase,
        "backend": "ssh",
        "launch": {"tokenHash": protocol.token_hash(token)},
    }
    if pid is not None:
        status["backendRef"] = {"pid": pid}
    return {
        "metadata": {"uid": "u1", "namespace": "ns", "name": "k1"},
        "spec": {"kernelId": "6c9c8d0e-1111-2222-3333-444455556666", "username": "alice"},
        "status": status,
    }


def peer_reports(items: list[dict[str, Any]]) -> tuple[PeerReports, ListingKube]:
    ctx, _, _ = context(FakeBackend())
    kube = ListingKube(items)
    ctx.kube = kube  # type: ignore[assignment]
    return PeerReports(ctx, "", "test", lambda _: False), kube


async def test_reports_for_made_up_launches_cost_at_most_two_lists_and_are_refused_for_good() -> None:
    """Anyone may seal a report (the key is public): a flood of made-up launch ids must not
    become a flood of lists on the API server."""
    reports, kube = peer_reports([])
    results = await asyncio.gather(
        *(reports(f"uid-{i}", payload(f"uid-{i}", "t")) for i in range(200)), return_exceptions=True
    )
    assert all(isinstance(r, Refused) and r.final and r.cause == "unknown_launch" for r in results)
    assert kube.lists <= 2


@pytest.mark.parametrize(
    ("phase", "recorded_pid", "report_pid", "token_matches", "cause"),
    [
        ("Launching", None, 7, False, "bad_token"),  # relaunched since: the orphan stops
        ("Launching", 99, 7, True, "other_launcher"),  # a second launcher holding the token
        ("Running", None, 7, False, "bad_token"),  # an earlier attempt's, the kernel runs
        ("Running", 99, 7, True, "other_launcher"),
        ("Failed", None, 7, True, "unknown_launch"),  # e.g. LaunchTimeout recorded
        ("Terminating", None, 7, True, "unknown_launch"),
    ],
)
async def test_a_report_of_a_launch_that_is_not_the_current_one_is_refused_for_good(
    phase: str, recorded_pid: int | None, report_pid: int, token_matches: bool, cause: str
) -> None:
    recorded = protocol.new_token()
    reports, kube = peer_reports([kernel(phase, recorded, recorded_pid)])
    with pytest.raises(Refused) as refused:
        await reports("u1", payload("u1", recorded if token_matches else protocol.new_token(), report_pid))
    assert (refused.value.cause, refused.value.final) == (cause, True)
    assert kube.patches == []  # nothing persisted


async def test_a_launching_kernel_with_its_recorded_token_is_taken_and_a_repeat_acknowledged() -> None:
    recorded = protocol.new_token()
    reports, kube = peer_reports([kernel("Launching", recorded)])
    assert await reports("u1", payload("u1", recorded))
    assert [p.get("phase") for p in kube.patches if p.get("phase")] == ["Running"]
    kube.items = [kernel("Running", recorded, 7)]  # what the API server holds now
    reports._listed = None
    # The acknowledgement was lost; the launcher repeats to a replica that never saw it.
    assert await PeerReports(reports.ctx, "", "test", lambda _: False)("u1", payload("u1", recorded))
    assert len([p for p in kube.patches if p.get("phase")]) == 1  # acknowledged, not persisted again


async def test_a_report_not_decidable_yet_is_refused_for_now() -> None:
    recorded = protocol.new_token()
    reports, _ = peer_reports([kernel("Pending", recorded)])
    assert not await reports("u1", payload("u1", recorded))  # the launcher retries
    assert not await PeerReports(reports.ctx, "", "test", lambda _: True)(
        "u1", payload("u1", recorded)
    )  # awaited here: this replica's own path persists it


async def test_a_report_is_never_taken_on_a_cached_list() -> None:
    """An ssh attempt that timed out on a cut link can start its launcher later, holding the
    launch's token, after the next host's launcher was taken and the kernel turned Running. A
    cached list (Launching, nothing recorded) would take it and leave the kernel it replaced
    running; a list begun after the report shows the launcher recorded, and refuses it."""
    recorded = protocol.new_token()
    reports, kube = peer_reports([kernel("Launching", recorded)])
    with pytest.raises(Refused):
        await reports("u1", payload("u1", "forged"))  # fills the cache: Launching, nothing recorded
    kube.items = [kernel("Running", recorded, 8)]  # the next host's launcher was taken since
    with pytest.raises(Refused) as refused:
        await reports("u1", payload("u1", recorded, pid=7))
    assert (refused.value.cause, refused.value.final) == ("other_launcher", True)
    assert kube.patches == []


async def test_a_report_for_a_launch_this_replica_still_starts_waits_for_what_it_started() -> None:
    """An ssh start on a cut host went unanswered and the launch moved on to the next host, but
    the first host's launcher started after all, holding the launch's token, and reported
    before the backend answered. Only what the backend answers says which launcher is the one."""
    recorded = protocol.new_token()
    reports, kube = peer_reports([kernel("Launching", recorded)])
    loop = asyncio.get_running_loop()
    launch: asyncio.Future[Any] = loop.create_future()
    reports.ctx.launches["u1"] = launch
    stray = payload("u1", recorded, pid=7)
    assert not await reports("u1", stray)  # refused for now: the launcher retries
    assert kube.lists == 0 and kube.patches == []
    launch.set_result({"host": "h1", "pid": 8, "ip": "10.0.0.1"})  # the list still has no record
    with pytest.raises(Refused) as refused:
        await reports("u1", stray)
    assert (refused.value.cause, refused.value.final) == ("other_launcher", True)
    same_pid_elsewhere = {**payload("u1", recorded, pid=8)}
    same_pid_elsewhere["connection"] = {**same_pid_elsewhere["connection"], "ip": "10.0.0.2"}
    reports._listed = None
    with pytest.raises(Refused) as refused:
        await reports("u1", same_pid_elsewhere)  # pids repeat across hosts: the address tells
    assert refused.value.cause == "other_launcher"
    assert kube.patches == []
    legit = {**payload("u1", recorded, pid=8)}
    legit["connection"] = {**legit["connection"], "ip": "10.0.0.1"}
    reports._listed = None
    assert await reports("u1", legit)
    written = [p for p in kube.patches if p.get("phase") == "Running"]
    assert written and written[0]["backendRef"]["host"] == "h1"  # persisted with what it started


async def test_a_cached_list_older_than_the_report_never_refuses_it_for_good() -> None:
    """The cache may predate the status write that recorded this launch (a relaunch with a new
    token): the report is judged again on a list begun after it came, and taken."""
    first, second = protocol.new_token(), protocol.new_token()
    reports, kube = peer_reports([kernel("Launching", first)])
    kube.after_list = lambda: kube.items.__setitem__(0, kernel("Launching", second))
    with pytest.raises(Refused):
        await reports("u1", payload("u1", protocol.new_token()))  # fills the cache with `first`
    assert await reports("u1", payload("u1", second))
    assert kube.lists == 2
    assert [p.get("phase") for p in kube.patches if p.get("phase")] == ["Running"]


# -- where launchers report ----------------------------------------------------------------------


def test_launchers_get_this_replica_first_then_its_ready_peers() -> None:
    from kernel_operator.peers import ready_addresses, report_addresses

    slices = [
        {
            "ports": [{"name": "response", "port": 8877}, {"name": "metrics", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},  # not ready: left out
                {"addresses": ["fd00::4"], "conditions": {}},
            ],
        },
        {"ports": [{"name": "metrics", "port": 8080}], "endpoints": [{"addresses": ["10.0.0.9"]}]},
    ]
    peers = ready_addresses(slices, "response")
    assert peers == ["10.0.0.2:8877", "[fd00::4]:8877"]
    assert report_addresses("10.0.0.2:8877", peers) == "10.0.0.2:8877,[fd00::4]:8877"


async def test_peer_addresses_are_read_at_most_every_few_seconds_and_a_failure_keeps_launching() -> None:
    from kernel_operator.peers import PeerAddresses

    class Slices:
        def __init__(self) -> None:
            self.reads = 0
            self.fail = False

        async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
            self.reads += 1
            if self.fail:
                raise RuntimeError("forbidden")
            return [{"ports": [{"name": "response", "port": 1}], "endpoints": [{"addresses": ["10.0.0.5"]}]}]

    source = Slices()
    peers = PeerAddresses(source, "10.0.0.1:1", "ns", "svc", "response")
    assert [await peers.addresses() for _ in range(20)] == ["10.0.0.1:1,10.0.0.5:1"] * 20
    assert source.reads == 1
    source.fail = True
    peers._read_at = float("-inf")
    assert await peers.addresses() == "10.0.0.1:1,10.0.0.5:1"  # the last known
    assert await PeerAddresses(source, "10.0.0.1:1", "ns", "", "response").addresses() == "10.0.0.1:1"


async def test_a_lease_request_that_hangs_is_given_up_and_tried_again() -> None:
    """A connection gone quiet must not hold a standby back for good."""

    class Hanging(Store):
        def __init__(self) -> None:
            super().__init__()
            self.hang = True

        async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
            if self.hang:
                self.hang = False
                await asyncio.sleep(3600)
            return await super().read_lease(namespace, name)

    store, clock = Hanging(), Clock()
    quick = LeaderElector(store, "ns", "lease", "a", LeaseTimings(1.0, 0.4, 0.1), lambda _: None, clock)
    stop = asyncio.Event()
    assert await asyncio.wait_for(quick.acquire(stop), 5)


async def test_a_burst_of_launches_waits_for_the_one_read_of_the_peers() -> None:
    """Twenty launches at once: every one names the peers, none only this replica (the first
    version returned the empty list to all but the launch that started the read)."""
    from kernel_operator.peers import PeerAddresses

    class SlowSlices:
        def __init__(self) -> None:
            self.reads = 0

        async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
            self.reads += 1
            await asyncio.sleep(0.05)
            return [{"ports": [{"name": "response", "port": 1}], "endpoints": [{"addresses": ["10.0.0.5"]}]}]

    source = SlowSlices()
    peers = PeerAddresses(source, "10.0.0.1:1", "ns", "svc", "response")
    given = await asyncio.gather(*(peers.addresses() for _ in range(20)))
    assert given == ["10.0.0.1:1,10.0.0.5:1"] * 20
    assert source.reads == 1
