"""The phase machine of one kernel: Pending -> Launching -> Running -> Succeeded/Failed.

Everything a phase needs is read back from the resource's status, so a restarted operator
continues where the previous one stopped (a launch in flight still completes). No kopf here:
the handlers pass in a stop flag and an event callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kernel_launchers import protocol, sealed_connection
from kernel_launchers.protocol import LaunchPayload

from . import GROUP, KIND, UID_LABEL, VERSION, keys
from .activity import IopubWatcher, is_idle
from .backends import Backend, BackendRef, Backends, LaunchPlan, LoggingBackend, SignalingBackend
from .claim import Claim, Claimed, pooled_secret_name
from .control import send_control
from .errors import BackendError, BackendUnavailable, SpecError
from .kube import Kube, KubeError
from .launch_command import run_dir_for
from .listener import Refused, ResponseListener
from .log_format import KernelLogger
from .metrics import Metrics
from .next_steps import with_next_step
from .peers import PeerAddresses
from .pool_registry import PoolRegistry
from .pools import CLAIM_LABEL, FREE, POOL_UID_LABEL, VOID, claim_verified, is_sealed_member, warmup_code
from .profile_cache import ProfileCache, ProfileSource
from .profiles import Profile, namespace_selected, pick_profile
from .settings import OperatorSettings
from .shell import execute_silently
from .spec import KernelRequest, build_request
from .status import TERMINAL, Phase, connection_status, now_iso, phase_patch, secret_name

Logger = logging.Logger | logging.LoggerAdapter[Any]


EXIT_RECHECK_SECONDS = 0.1
EXIT_RECHECKS = 30
ACTIVITY_PATCH_SECONDS = 10.0  # lastActivity is written at most this often


LOST_LAUNCH_SECONDS = 10.0  # how long after a launch began nothing found means nothing started
CLAIMED_REASON = "ClaimedFromPool"  # the reason of a Running reached by a claim
STOPPED_REMEMBERED = 10_000  # uids of kernels stopped here, kept to stop each once (see OperatorContext)


class LaunchLost(Exception):
    """The launch in status was never started (its operator stopped first)."""


class StopFlag(Protocol):
    """kopf's DaemonStopped, as far as we use it."""

    def __bool__(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Awaitable[Any]: ...


class Emit(Protocol):
    def __call__(self, type_: str, reason: str, message: str) -> None: ...


async def stopped_or_woken(stopped: StopFlag, wake: asyncio.Event, timeout: float) -> None:
    """Return after ``timeout``, or as soon as ``stopped`` or ``wake`` is set. No waiter is
    left behind, even when cancelled: kopf waits 5 s on a stop for any task still pending."""
    waiters = {asyncio.ensure_future(stopped.wait(timeout)), asyncio.ensure_future(wake.wait())}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@dataclass
class OperatorContext:
    """What every kernel's lifecycle shares: created once at operator start-up."""

    settings: OperatorSettings
    kube: Kube
    backends: Backends
    listener: ResponseListener
    private_key: bytes
    response_address: str
    # Pools and their ready members (seal key set at start-up from the private key).
    pools: PoolRegistry = field(default_factory=lambda: PoolRegistry(b""))
    # Kernel ids in use, to the uid of the RemoteKernel that holds each: a second RemoteKernel
    # with the same kernel id (another tenant's, say) fails instead of touching the first's.
    kernel_ids: dict[str, str] = field(default_factory=dict)
    # Launches under way, by RemoteKernel uid (see KernelLifecycle.launch).
    launches: dict[str, asyncio.Future[BackendRef]] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    # This replica's address and its peers' for launches (None: this replica's alone).
    peers: PeerAddresses | None = None
    # Stops under way, by RemoteKernel uid (see KernelLifecycle.stop_backend).
    stopping: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    # Stops done, by RemoteKernel uid (monotonic time): the finalizer may read a body older than
    # the daemon's "stopped" mark and would stop (and count) the same kernel again.
    stopped: dict[str, float] = field(default_factory=dict)
    # The last signal request handled, by RemoteKernel uid (see KernelLifecycle.signal_requested).
    signals_handled: dict[str, str] = field(default_factory=dict)
    _slots: asyncio.Semaphore | None = None
    _profiles: ProfileCache | None = None

    @property
    def profiles(self) -> ProfileCache:
        """Profiles and namespace labels, cached for RKO_PROFILE_CACHE_SECONDS."""
        if self._profiles is None:
            self._profiles = ProfileCache(self.kube, self.settings.profile_cache_seconds)
        return self._profiles

    @property
    def launch_slots(self) -> asyncio.Semaphore:
        """At most RKO_MAX_CONCURRENT_LAUNCHES launches between Launching and their report."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.max_concurrent_launches)
        return self._slots

    async def report_addresses(self) -> str:
        """Where a launch's launcher reports: this replica, then its ready peers."""
        return await self.peers.addresses() if self.peers is not None else self.response_address

    @property
    def public_key(self) -> bytes:
        return protocol.public_key_of(self.private_key)

    def claim_kernel_id(self, kernel_id: str, uid: str) -> bool:
        """Reserve ``kernel_id`` for RemoteKernel ``uid``; False if another one holds it."""
        holder = self.kernel_ids.setdefault(kernel_id, uid)
        return holder == uid

    def release_kernel_id(self, kernel_id: str, uid: str) -> None:
        if self.kernel_ids.get(kernel_id) == uid:
            del self.kernel_ids[kernel_id]


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def _ready_changed_at(status: Mapping[str, Any]) -> str | None:
    """When the Ready condition last changed (for kernels finished before finishedAt existed)."""
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition.get("lastTransitionTime") or "") or None
    return None


async def resolve_profile(kube: ProfileSource, requested: str, namespace: str) -> Profile:
    """The profile named (or the default one), checked to serve ``namespace``."""
    if requested:
        found = await kube.read_profile(requested)
        objects = [found] if found is not None else []
    else:
        objects = await kube.list_profiles()
    profile = Profile.from_object(pick_profile(requested, objects))
    if profile.namespace_selector is not None:
        labels = await kube.namespace_labels(namespace) or {}
        if not namespace_selected(profile.namespace_selector, labels):
            raise SpecError(
                f"Profile {profile.name} does not serve namespace {namespace} (its "
                "namespaceSelector does not match the namespace's labels); choose another profile.",
                reason="ProfileNotAllowed",
            )
    return profile


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _from_timestamp(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def other_launcher(ref: BackendRef, payload: LaunchPayload) -> str | None:
    """How ``payload`` comes from another launcher than the one ``ref`` records (None: the same,
    or nothing recorded yet). Its pid, and where the record has it, the address its kernel is
    at: pids repeat across hosts."""
    pid = ref.get("pid")
    if pid and int(pid) != payload["pid"]:
        return (
            f"comes from launcher pid {payload['pid']} on {payload['hostname']}, not from the "
            f"launcher recorded (pid {pid})"
        )
    ip = ref.get("ip")
    if ip and str(ip) != payload["connection"]["ip"]:
        return f"comes from a launcher at {payload['connection']['ip']}, not from the one recorded at {ip}"
    return None


class KernelLifecycle:
    def __init__(
        self,
        ctx: OperatorContext,
        body: Mapping[str, Any],
        emit: Emit,
        logger: Logger,
    ) -> None:
        meta = body["metadata"]
        self.ctx = ctx
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.generation: int = int(meta.get("generation", 1))
        self.spec: Mapping[str, Any] = body.get("spec") or {}
        self.status: dict[str, Any] = dict(body.get("status") or {})
        self.body = body  # kopf's body is a live view: labels read from it are current
        # A member of a warm pool: created and sealed by the operator (see pools.py).
        self.member = bool(ctx.pools.seal_key) and is_sealed_member(ctx.pools.seal_key, body)
        self.pool_uid = str((meta.get("labels") or {}).get(POOL_UID_LABEL) or "") if self.member else ""
        self.emit = emit
        self.log: Logger = KernelLogger(logger, self._log_fields)
        self._recorded_activity = 0.0
        self._request: KernelRequest | None = None
        self._slot = False  # holds one of ctx.launch_slots
        self.pool_failure = ""  # a pool member that never answered
        self.created = time.monotonic()
        # Seen from its creation (no phase yet): the launch is timed from here, else from the
        # object's creationTimestamp (whole seconds).
        self._seen_from_creation = not self.status.get("phase")

    # -- helpers -------------------------------------------------------------------------------
    def _log_fields(self) -> dict[str, str]:
        return {
            "uid": self.uid,
            "namespace": self.namespace,
            "name": self.name,
            "kernel_id": str(self.spec.get("kernelId") or ""),
            "backend": str(self.status.get("backend") or ""),
            "phase": str(self.status.get("phase") or ""),
        }

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    async def patch(self, status: dict[str, Any]) -> None:
        await self.ctx.kube.patch_status(self.namespace, self.name, status)
        for key, value in status.items():
            if value is None:
                self.status.pop(key, None)
            else:
                self.status[key] = value

    async def set_phase(self, phase: Phase, reason: str, message: str, **extra: Any) -> None:
        before = self.phase
        patch = phase_patch(self.status, phase, reason, message, now_iso(), self.generation)
        if phase in TERMINAL:
            patch["finishedAt"] = now_iso()
        patch.update(extra)
        await self.patch(patch)
        self._count_phase(before, phase, reason)
        if phase in TERMINAL:
            self._release_kernel_id()
            self.ctx.launches.pop(self.uid, None)
        if self.member:
            self.ctx.pools.wake(self.pool_uid)
        warning = phase is Phase.FAILED
        self.emit(
            "Warning" if warning else "Normal",
            reason,
            with_next_step(reason, message) if warning else message,
        )
        (self.log.warning if warning else self.log.info)(f"{phase.value}: {message}")

    def _count_phase(self, before: str | None, phase: Phase, reason: str) -> None:
        """The metrics of a phase change: kernels by phase; a launch's outcome and duration."""
        metrics = self.ctx.metrics
        backend = str(self.status.get("backend") or "")
        metrics.kernels.set(self.uid, phase.value, backend)
        if before not in (None, "", Phase.PENDING.value, Phase.LAUNCHING.value):
            return
        profile = str(self.status.get("profile") or self.spec.get("profile") or "")
        if phase is Phase.RUNNING:
            outcome = "claimed" if reason == CLAIMED_REASON else "running"
            metrics.launches.labels(backend, profile, outcome).inc()
            metrics.launch_duration.labels(backend).observe(self._since_request())
        elif phase is Phase.FAILED:
            metrics.launches.labels(backend, profile, "failed").inc()

    def _since_request(self) -> float:
        if self._seen_from_creation:
            return time.monotonic() - self.created
        created = (self.body.get("metadata") or {}).get("creationTimestamp")
        return max(0.0, (_utcnow() - _parse_time(str(created))).total_seconds()) if created else 0.0

    def secret_location(self) -> tuple[str, str]:
        """Where this kernel's connection Secret is: beside it, or for a pool member not yet
        claimed, in the operator's own namespace (out of every tenant's reach)."""
        if self.member:
            return self.ctx.settings.namespace, pooled_secret_name(self.uid)
        return self.namespace, secret_name(self.name)

    def handed_over(self) -> bool:
        """A pool member claimed by a RemoteKernel, which owns its backend now."""
        if not self.member:
            return False
        claim = str(((self.body.get("metadata") or {}).get("labels") or {}).get(CLAIM_LABEL) or "")
        return self.uid in self.ctx.pools.handed_over or claim not in ("", FREE, VOID)

    def launch_id(self) -> str:
        """The id the kernel's launcher knows its launch by: this RemoteKernel's uid, or for a
        kernel claimed from a pool, the member's (verified against the claim's seal)."""
        record = self.status.get("pool")
        if record:
            member = claim_verified(self.ctx.pools.seal_key, self.uid, record)
            if member:
                return member
        return self.ctx.pools.in_flight.get(self.uid, self.uid)

    def _kernel_id(self) -> str:
        return protocol.canonical_kernel_id(str(self.spec["kernelId"]))

    def _release_kernel_id(self) -> None:
        """Forget what this replica keeps of the kernel once it is gone: its kernel id, its
        signal requests."""
        self.ctx.signals_handled.pop(self.uid, None)
        with contextlib.suppress(protocol.ProtocolError, KeyError):
            self.ctx.release_kernel_id(self._kernel_id(), self.uid)

    async def profile(self) -> Profile:
        """The profile this kernel runs under, checked to serve the kernel's namespace."""
        return await resolve_profile(self.ctx.profiles, str(self.spec.get("profile") or ""), self.namespace)

    async def request(self) -> KernelRequest:
        """The checked request: the spec under its profile (read once per lifecycle)."""
        if self._request is None:
            profile = await self.profile()
            self._request = build_request(
                self.namespace,
                self.name,
                self.uid,
                self.spec,
                profile,
                self.ctx.settings,
                pool_member=self.member,
            )
        return self._request

    def backend(self) -> Backend:
        """The backend this kernel was launched on (recorded by the operator in status), or
        that a claim under way in this operator took over."""
        name = self.status.get("backend") or self.ctx.pools.in_flight_backend.get(self.uid, "")
        return self.ctx.backends.get(str(name))

    # -- the phases ----------------------------------------------------------------------------
    async def run(self, stopped: StopFlag) -> None:
        """Drive the kernel from its current phase until it ends or the daemon is stopped; a
        finished kernel is then deleted once its time to live has passed."""
        if self.phase == Phase.TERMINATING.value:
            return
        if self.phase not in {p.value for p in TERMINAL}:
            await self._drive(stopped)
        if self.phase in {p.value for p in TERMINAL} and not stopped:
            await self.expire(stopped)

    async def _drive(self, stopped: StopFlag) -> None:
        try:
            await self._drive_phases(stopped)
        finally:
            self._release_slot()

    async def _take_slot(self, queued: bool = False) -> None:
        """A launch slot; with ``queued``, a kernel that must wait for one is Pending meanwhile."""
        slots = self.ctx.launch_slots
        if slots.locked():
            waiting = (
                f"{self.ctx.settings.max_concurrent_launches} launches are under way "
                "(RKO_MAX_CONCURRENT_LAUNCHES); this one waits for a slot."
            )
            if queued:  # set_phase logs it too
                await self.set_phase(
                    Phase.PENDING, "Queued", f"The operator accepted the kernel request; {waiting}"
                )
            else:
                self.log.info(waiting)
        await slots.acquire()
        self._slot = True

    def _release_slot(self) -> None:
        if self._slot:
            self._slot = False
            self.ctx.launch_slots.release()

    async def _drive_phases(self, stopped: StopFlag) -> None:
        if self.phase in (None, "", Phase.PENDING.value) and not await self.launch(stopped):
            return
        if self.phase == Phase.LAUNCHING.value:
            try:
                connected = await self.await_connection(stopped)
            except LaunchLost as lost:
                # The operator that began the launch stopped before it started anything: nothing
                # will ever report, so launch again (a new token; the old one is void).
                self.log.warning(str(lost))
                self.emit("Normal", "Relaunching", str(lost))
                connected = await self.launch(stopped, again=True) and await self.await_connection(stopped)
            if not connected:
                return
        if self.phase == Phase.RUNNING.value:
            await self.monitor(stopped)

    def time_to_live(self) -> float | None:
        """Seconds a finished RemoteKernel is kept: its spec's, else the operator's default.

        The operator's setting is the administrator's ceiling: a tenant may ask for less (its
        own object, which it may delete anyway), never for more, so finished kernels cannot be
        made to pile up past the cluster's policy."""
        ttl = self.spec.get("ttlSecondsAfterFinished")
        ceiling = self.ctx.settings.ttl_after_finished
        if ttl is None:
            return ceiling
        return float(ttl) if ceiling is None else min(float(ttl), ceiling)

    async def expire(self, stopped: StopFlag) -> None:
        """Delete the finished RemoteKernel once its time to live has passed (if it has one)."""
        ttl = self.time_to_live()
        if ttl is None:
            return
        finished = self.status.get("finishedAt") or _ready_changed_at(self.status)
        ends = (_parse_time(finished) if finished else _utcnow()) + dt.timedelta(seconds=ttl)
        remaining = (ends - _utcnow()).total_seconds()
        if remaining > 0:
            await stopped.wait(remaining)
            if stopped:
                return
        message = f"The kernel finished {ttl:g} s ago (ttlSecondsAfterFinished); deleting the RemoteKernel."
        self.emit("Normal", "Expired", message)
        self.log.info(message)
        await self.ctx.kube.delete_remote_kernel(self.namespace, self.name)

    async def launch(self, stopped: StopFlag | None = None, again: bool = False) -> bool:
        # No Pending write before the checks: a kernel that can launch at once goes straight to
        # Launching (one status write less on every launch's path); Pending means queued.
        try:
            request = await self.request()
            backend = self.ctx.backends.get(request.backend)
        except SpecError as err:
            await self.set_phase(Phase.FAILED, err.reason, str(err), observedGeneration=self.generation)
            return False
        if not self.ctx.claim_kernel_id(request.kernel_id, self.uid):
            await self.set_phase(
                Phase.FAILED,
                "KernelIdInUse",
                f"Kernel id {request.kernel_id} is in use by another RemoteKernel; use a new kernel id.",
                observedGeneration=self.generation,
            )
            return False
        if not again and not self.member and self.spec.get("usePool", True) is not False:
            if await self.claim_from_pool(request, stopped):
                return True  # Running already: the monitor follows
            if stopped:
                return False
        if not self._slot:
            await self._take_slot(queued=not self.phase and not again)  # the deadline counts from here
        if stopped:
            self._release_slot()
            return False
        token = protocol.new_token()
        now = _utcnow()
        deadline = now + dt.timedelta(seconds=request.launch_timeout)
        await self.set_phase(
            Phase.LAUNCHING,
            "Launching",
            f"Launching the kernel on the {backend.name} backend (profile {request.profile}).",
            profile=request.profile,
            backend=backend.name,
            launch={
                "tokenHash": protocol.token_hash(token),
                "startedAt": now_iso(now),
                "deadline": now_iso(deadline),
            },
            observedGeneration=self.generation,
        )
        plan = LaunchPlan(
            request=request,
            response_address=await self.ctx.report_addresses(),
            public_key=self.ctx.public_key,
            token=token,
            run_dir=run_dir_for(request.kernel_id, self.uid),
            owner=self.owner_reference(),
        )
        # The launch runs as a task of its own, registered by uid: kopf runs the delete handler
        # beside this daemon (and cancels it), so a deletion during the launch must be able to
        # wait for what the launch starts, and stop it. It stays registered (done) until the
        # kernel is stopped: a delete handler given a body older than the launch finds it there.
        if stopped:  # deleted (or the operator stops) before anything was started
            return False
        task = asyncio.ensure_future(backend.launch(plan))
        self.ctx.launches[self.uid] = task
        try:
            ref = await asyncio.shield(task)
        except (BackendError, SpecError) as err:
            self.ctx.launches.pop(self.uid, None)
            await self.set_phase(Phase.FAILED, err.reason, str(err), launch=None)
            return False
        if stopped:  # deleted while launching: stop what was started, record nothing
            self.ctx.launches.pop(self.uid, None)
            await backend.stop(ref, self.uid)
            self.log.info(f"The kernel was deleted during its launch; stopped what was started: {ref}.")
            return False
        await self.patch({"backendRef": ref, "launchedAt": now_iso()})
        self.log.info(
            f"The {backend.name} backend started the launcher: {ref}; it reports to {plan.response_address}."
        )
        return True

    async def claim_from_pool(self, request: KernelRequest, stopped: StopFlag | None) -> bool:
        """Take a ready kernel from a pool that fits, bind it to this kernel's user, and record
        it: True once Running. False when no pool fits or none had a kernel (start cold)."""
        pools = self.ctx.pools
        began = time.monotonic()
        claim = Claim(
            self.ctx.kube, pools, self.ctx.private_key, self.ctx.settings.namespace, self.log.warning
        )
        try:
            claimed = await claim.run(self.namespace, self.uid, request, self._write_claimed_secret)
        except KubeError as err:
            self.log.warning(f"Could not claim a pooled kernel; starting cold: {err}")
            pools.in_flight.pop(self.uid, None)
            return False
        if claimed is None:
            if claim.tried:
                outcome = "failed" if claim.failed else "empty"
                self.ctx.metrics.pool_claims.labels(self.namespace, outcome).inc()
            return False
        self.ctx.metrics.pool_claims.labels(self.namespace, "claimed").inc()
        # Known here before it is recorded: a stop from now on (this daemon's, or the delete
        # handler's) reaches the right backend.
        pools.in_flight_backend[self.uid] = claimed.backend
        # Registered like a launch: a deletion from here on waits for it and stops it.
        done: asyncio.Future[BackendRef] = asyncio.get_running_loop().create_future()
        done.set_result(claimed.backend_ref)
        self.ctx.launches[self.uid] = done
        if stopped:  # deleted during the claim: stop the kernel it took
            await self.stop_backend_quietly()
            pools.in_flight.pop(self.uid, None)
            pools.in_flight_backend.pop(self.uid, None)
            return False
        bound = time.monotonic()
        await self._record_claim(claimed)
        self.log.info(
            f"Claimed pooled kernel {claimed.member} from pool {claimed.pool}: checked in "
            f"{(began - self.created) * 1000:.0f} ms, taken and bound in "
            f"{(bound - began) * 1000:.0f} ms ({claimed.took}), recorded "
            f"{(time.monotonic() - bound) * 1000:.0f} ms later."
        )
        pools.in_flight.pop(self.uid, None)
        pools.in_flight_backend.pop(self.uid, None)
        pools.handed_over.add(claimed.member_uid)
        entry = pools.pools.get(claimed.pool_uid)
        if entry is not None:
            entry.claims += 1
            entry.wake.set()
        # The member object stays, owned by this kernel now: what it owns (a pod, a Spark
        # application) is garbage-collected with this kernel, never with the pool. Its own
        # lifecycle leaves the backend alone from here on.
        owner = {**self.owner_reference(), "blockOwnerDeletion": False}
        try:
            await self.ctx.kube.set_owner(self.namespace, claimed.member, owner)
        except KubeError as err:
            self.log.warning(f"Could not make this kernel the owner of pooled kernel {claimed.member}: {err}")
        return True

    async def _write_claimed_secret(self, data: dict[str, bytes]) -> None:
        secret = secret_name(self.name)
        labels = {"kernel-operator.io/kernel-id": self._kernel_id(), UID_LABEL: self.uid}
        if not await self.ctx.kube.create_secret(
            self.namespace, secret, data, labels, self.owner_reference()
        ):
            await self.ctx.kube.replace_secret_data(self.namespace, secret, data)

    async def _record_claim(self, claimed: Claimed) -> None:
        secret = secret_name(self.name)
        connection = dict(claimed.connection)
        connection["secretRef"] = {"name": secret, "key": "key"}
        connection.pop("sealed", None)  # a member has no client; the claimer may have one
        connection.update(self._sealed_for_client(claimed.secret))
        now = now_iso()
        await self.set_phase(
            Phase.RUNNING,
            CLAIMED_REASON,
            f"The kernel was claimed from pool {claimed.pool} (kernel {claimed.member}, ready at "
            f"{connection.get('ip')}) and bound to user {self.spec.get('username')}.",
            profile=claimed.profile,
            backend=claimed.backend,
            backendRef=claimed.backend_ref,
            connection=connection,
            launchedAt=now,
            readyAt=now,
            launch={"tokenHash": claimed.token_hash, "acceptedAt": now},
            pool={
                "name": claimed.pool,
                "member": claimed.member,
                "memberUid": claimed.member_uid,
                "seal": claimed.seal,
            },
            observedGeneration=self.generation,
        )

    async def await_connection(self, stopped: StopFlag) -> bool:
        launch = self.status.get("launch") or {}
        token_hash = launch.get("tokenHash")
        if not token_hash:
            await self.set_phase(
                Phase.FAILED,
                "LaunchLost",
                "The launch record is missing; delete and recreate the kernel.",
            )
            return False
        deadline = _parse_time(launch["deadline"])
        loop = asyncio.get_running_loop()
        received: asyncio.Future[LaunchPayload] = loop.create_future()
        persisted: asyncio.Future[None] = loop.create_future()

        async def on_launch(payload: LaunchPayload) -> None:
            # Runs in the listener's task; the daemon's task persists (it has kopf's context),
            # and the launcher is acknowledged only once that is done.
            other = other_launcher(self.status.get("backendRef") or {}, payload)
            if other:
                # Another launcher with this launch's token (an attempt on a host that failed,
                # then came back): refused, so it stops its kernel; the recorded one answers.
                raise Refused(f"The report {other}.", "other_launcher", final=True)
            if not received.done():
                received.set_result(payload)
            await asyncio.shield(persisted)

        if not self.status.get("backendRef"):
            # Launched by an operator stopped before it recorded the launch: look for it now,
            # so the report is checked against it and it can be stopped.
            await self._find_unrecorded()
        # Keyed by the RemoteKernel's uid (the launcher's --launch-id), never by the kernel id.
        self.ctx.listener.expect(self.uid, token_hash, on_launch)
        try:
            while not received.done():
                remaining = (deadline - _utcnow()).total_seconds()
                if remaining <= 0:
                    return await self._launch_timed_out()
                await asyncio.wait([received], timeout=min(self.ctx.settings.monitor_interval, remaining))
                if received.done():
                    break
                if stopped:
                    return False
                if self._accepted_by_a_peer(token_hash):
                    return True
                failure = await self._launch_failure()
                if failure is None and self._launch_lost():
                    raise LaunchLost(
                        f"No launcher was found for this kernel {LOST_LAUNCH_SECONDS:g} s after an "
                        "operator began its launch and stopped; launching it again."
                    )
                if failure is not None:
                    await self.stop_backend_quietly()
                    await self.set_phase(Phase.FAILED, failure[0], failure[1], launch=None)
                    return False
            try:
                await self.persist_connection(received.result())
            except BaseException as err:
                persisted.set_exception(err)
                raise
            persisted.set_result(None)
            return True
        finally:
            self._release_slot()  # reported, failed or given up: the next launch may start
            self.ctx.listener.forget(self.uid)
            if not persisted.done():
                persisted.cancel()

    def _accepted_by_a_peer(self, token_hash: str) -> bool:
        """Whether another replica took this launch's report (see peer_reports.py): the live
        body is Running for this very launch. Then this replica follows it from there."""
        live = dict(self.body.get("status") or {})
        if (
            live.get("phase") != Phase.RUNNING.value
            or (live.get("launch") or {}).get("tokenHash") != token_hash
        ):
            return False
        self.status = live
        self.ctx.metrics.kernels.set(self.uid, Phase.RUNNING.value, str(live.get("backend") or ""))
        self.log.info("Another replica took the launcher's report; following the Running kernel.")
        return True

    def _launch_lost(self) -> bool:
        """A launch begun by another operator (not in flight here), with nothing recorded or
        found on the backend long after it began: that operator stopped before starting it."""
        launch = self.status.get("launch") or {}
        if self.status.get("backendRef") or self.uid in self.ctx.launches or not launch.get("startedAt"):
            return False
        begun = (_utcnow() - _parse_time(launch["startedAt"])).total_seconds()
        return begun > LOST_LAUNCH_SECONDS

    async def _find_unrecorded(self) -> BackendRef | None:
        """What a launch not recorded in status started, recorded once found."""
        try:
            found = await self.backend().find(await self.request())
        except (SpecError, BackendUnavailable) as err:  # e.g. the profile was deleted since
            self.log.warning(f"Cannot look for the launch on the backend: {err}")
            return None
        if found:
            await self.patch({"backendRef": found})
        return found

    async def _launch_failure(self) -> tuple[str, str] | None:
        ref = self.status.get("backendRef") or await self._find_unrecorded()
        if not ref:
            return None
        try:
            state = await self.backend().status(ref)
        except BackendUnavailable as err:
            self.log.warning(f"Cannot check the launch on the backend for now: {err}")
            return None
        if state.state in ("starting", "running"):
            return None
        return (
            state.reason or "LaunchFailed",
            f"The kernel stopped before it was ready: {state.message}",
        )

    async def _launch_timed_out(self) -> bool:
        timeout = self.spec.get("launchTimeoutSeconds") or self.ctx.settings.launch_timeout
        said = await self._launcher_log()
        await self.stop_backend_quietly()
        await self.set_phase(
            Phase.FAILED,
            "LaunchTimeout",
            f"The kernel did not send its connection info within {timeout:g} s; the backend was "
            "stopped. Check the launcher's log on the backend, and that it can reach the "
            f"operator at {self.ctx.response_address}.{said}",
            launch=None,
        )
        return False

    async def _launcher_log(self) -> str:
        """ " Its log ends: ..." when the backend can tell (read before stopping removes it)."""
        ref = self.status.get("backendRef")
        try:
            backend = self.backend()
        except SpecError:
            return ""
        if not ref or not isinstance(backend, LoggingBackend):
            return ""
        try:
            tail = (await backend.log_tail(ref, self.uid)).strip()
        except BackendError:
            return ""
        return f" Its log ends: {tail}" if tail else ""

    async def persist_connection(self, payload: LaunchPayload) -> None:
        """Store the key in a Secret owned by the resource, the rest in status: then Running."""
        connection = payload["connection"]
        control_key = protocol.decode_key(payload["control_key"])
        secret_namespace, secret = self.secret_location()
        data = {
            "key": connection["key"].encode(),
            # Bound to this RemoteKernel: it opens for no other, whatever its kernel id.
            "control-key.sealed": keys.seal(self.ctx.private_key, self.uid, control_key),
        }
        if connection.get("curve_publickey"):
            data["curve-publickey"] = connection["curve_publickey"].encode()
            data["curve-secretkey"] = connection.get("curve_secretkey", "").encode()
        labels = {"kernel-operator.io/kernel-id": payload["kernel_id"], UID_LABEL: self.uid}
        # A member's Secret is in another namespace than its RemoteKernel: no owner reference
        # can cross that; its lifecycle deletes it (see delete).
        owner = None if self.member else self.owner_reference()
        if not await self.ctx.kube.create_secret(secret_namespace, secret, data, labels, owner):
            await self.ctx.kube.replace_secret_data(secret_namespace, secret, data)
        ref: BackendRef = dict(self.status.get("backendRef") or {})
        if not ref:
            # Launched by an operator stopped before it recorded the launch: found on the
            # backend (the report alone does not say everything a backend needs to stop it).
            ref = dict(await self._find_unrecorded() or {})
        ref.setdefault("pid", payload["pid"])
        ref.setdefault("pgid", payload["pgid"])
        ref.update(launcherHost=payload["hostname"], controlPort=payload["control_port"])
        if "kernel_pid" in payload:
            ref["kernelPid"] = payload["kernel_pid"]
        await self.set_phase(
            Phase.RUNNING,
            "KernelReady",
            f"The kernel is ready at {connection['ip']} (shell port {connection['shell_port']}).",
            connection={**connection_status(connection, secret), **self._sealed_for_client(data)},
            backendRef=ref,
            readyAt=now_iso(),
            # Kept (the token's hash only): a launcher whose acknowledgement was lost retries,
            # and is acknowledged again, by this operator or the next (see monitor).
            launch={"tokenHash": (self.status.get("launch") or {}).get("tokenHash"), "acceptedAt": now_iso()},
        )

    def _sealed_for_client(self, data: Mapping[str, bytes]) -> dict[str, str]:
        """``{"sealed": …}`` for status.connection: the Secret's client fields sealed to the key
        the spec names (its client then reads no Secret), or nothing."""
        text = self.spec.get("clientPublicKey")
        if text is None or self.member:
            return {}
        try:
            return {
                "sealed": sealed_connection.seal(data, sealed_connection.parse_public_key(text), self.uid)
            }
        except sealed_connection.SealError as err:  # refused at launch already; the Secret stays
            self.log.warning(f"The connection is not sealed to spec.clientPublicKey: {err}")
            return {}

    async def monitor(self, stopped: StopFlag) -> None:
        backend = self.backend()
        ref = self.status.get("backendRef") or {}
        wake = asyncio.Event()
        secret = await self.ctx.kube.read_secret(*self.secret_location()) or {}
        launch_id = self.launch_id()
        # The launcher's exit notice (signed with its control key) makes us look at once;
        # polling stays as the fallback.
        if secret.get("control-key.sealed"):
            with contextlib.suppress(keys.KeyError_):
                control_key = keys.unseal(self.ctx.private_key, self.uid, secret["control-key.sealed"])
                self.ctx.listener.watch_exit(launch_id, control_key, wake.set)
        accepted = (self.status.get("launch") or {}).get("tokenHash")
        if accepted:
            pid = ref.get("pid")
            self.ctx.listener.answered(launch_id, str(accepted), int(pid) if pid else None)
        # A pool member idles by design (the pool retires it by age); a claimed kernel is followed.
        watcher = None if self.member else self._watch_activity(secret)
        pooling = None
        if self.member and not self.handed_over() and secret:
            pooling = asyncio.ensure_future(self._pool_when_answering(secret, wake))
        try:
            await self._watch_backend(backend, ref, stopped, wake, watcher)
        finally:
            if pooling is not None:
                pooling.cancel()
            if self.member:
                self.ctx.pools.member_gone(self.pool_uid, self.uid)
            # Only this kernel's own watch: a claimer may watch the same launch id by now.
            self.ctx.listener.unwatch_exit(launch_id, wake.set)
            self.ctx.listener.forget_answered(launch_id)
            if watcher is not None:
                await watcher.stop()

    async def _pool_when_answering(self, secret: dict[str, bytes], wake: asyncio.Event) -> None:
        """Offer a pool member for claims once its kernel answers a request, not merely listens:
        a kernel still running its start-up code (Spark started eagerly, say) is not ready."""
        connection = self.status.get("connection") or {}
        timeout = float(self.spec.get("launchTimeoutSeconds") or self.ctx.settings.launch_timeout)
        try:
            await execute_silently(
                str(connection.get("ip")),
                int(connection.get("shellPort") or 0),
                secret["key"],
                warmup_code(str((self.spec.get("kernel") or {}).get("language") or "python")),
                max(timeout, 30.0),
                secret.get("curve-publickey"),
                secret.get("curve-secretkey"),
            )
        except BackendError as err:
            self.pool_failure = f"The pooled kernel never answered a request: {err}"
            self.log.warning(self.pool_failure)
            wake.set()  # the monitor fails it, and the pool replaces it
            return
        if not self.status.get("pooledAt"):
            await self.patch({"pooledAt": now_iso()})
        self.ctx.pools.wake(self.pool_uid)
        await self.ctx.pools.member_ready(self.pool_uid, self.uid, self.name, secret)

    def _watch_activity(self, data: Mapping[str, bytes]) -> IopubWatcher | None:
        """Follow the kernel's iopub (for lastActivity and idle culling), if it can be reached."""
        connection = self.status.get("connection") or {}
        if not self.ctx.settings.track_activity or not connection.get("iopubPort"):
            return None
        if "key" not in data:
            return None
        watcher = IopubWatcher(
            f"tcp://{connection['ip']}:{connection['iopubPort']}",
            data["key"],
            data.get("curve-publickey"),
            data.get("curve-secretkey"),
        )
        if self.status.get("lastActivity"):
            watcher.last_activity = _parse_time(self.status["lastActivity"]).timestamp()
        watcher.start()
        return watcher

    async def _follow_activity(self, watcher: IopubWatcher) -> bool:
        """Record lastActivity now and then; cull the kernel when idle. True once culled."""
        now = time.time()
        recorded = self._recorded_activity
        if watcher.last_activity > recorded and now - recorded >= ACTIVITY_PATCH_SECONDS:
            self._recorded_activity = watcher.last_activity
            await self.patch({"lastActivity": now_iso(_from_timestamp(watcher.last_activity))})
        timeout = float(self.spec.get("idleTimeoutSeconds") or 0)
        if not is_idle(now, watcher.last_activity, watcher.busy, watcher.connected_since, timeout):
            return False
        message = (
            f"The kernel was idle for {timeout:g} s (spec.idleTimeoutSeconds); deleting it. "
            f"Its last activity was at {now_iso(_from_timestamp(watcher.last_activity))}."
        )
        await self.patch({"lastActivity": now_iso(_from_timestamp(watcher.last_activity))})
        self.emit("Normal", "IdleCulled", message)
        self.ctx.metrics.culls.labels(str(self.status.get("backend") or "")).inc()
        self.log.info(message)
        await self.ctx.kube.delete_remote_kernel(self.namespace, self.name)
        return True

    async def _watch_backend(
        self,
        backend: Backend,
        ref: BackendRef,
        stopped: StopFlag,
        wake: asyncio.Event,
        watcher: IopubWatcher | None = None,
    ) -> None:
        # After an exit notice the backend may lag behind the launcher (a pod's status is
        # written by its kubelet): look again every 0.1 s for a while instead of every interval.
        quick_checks = 0
        unreachable_since: float | None = None
        loop = asyncio.get_running_loop()
        while not stopped:
            if self.handed_over():
                self.log.info("The kernel was claimed from its pool; its claimer follows it now.")
                return
            if self.pool_failure:
                await self.stop_backend_quietly()
                await self.set_phase(Phase.FAILED, "PooledKernelUnresponsive", self.pool_failure)
                return
            interval = EXIT_RECHECK_SECONDS if quick_checks else self.ctx.settings.monitor_interval
            await stopped_or_woken(stopped, wake, interval)
            if wake.is_set():
                quick_checks = EXIT_RECHECKS
            elif quick_checks:
                quick_checks -= 1
            wake.clear()
            if stopped:
                return
            try:
                state = await backend.status(ref)
            except BackendUnavailable as err:
                # A blip is not a failure; a backend out of reach for the grace period is.
                unreachable_since = unreachable_since or loop.time()
                waited = loop.time() - unreachable_since
                grace = self.ctx.settings.unreachable_grace
                if waited < grace:
                    self.log.warning(
                        f"Cannot check the kernel on the backend for now ({waited:.0f} s): {err}"
                    )
                    continue
                await self.stop_backend_quietly()
                await self.set_phase(
                    Phase.FAILED,
                    err.reason,
                    f"The kernel's backend has been unreachable for {waited:.0f} s "
                    f"(RKO_UNREACHABLE_GRACE_SECONDS={grace:g}): {err}",
                )
                return
            unreachable_since = None
            if state.state in ("starting", "running"):
                if watcher is not None and await self._follow_activity(watcher):
                    return
                continue
            await self.stop_backend_quietly()
            if state.state == "succeeded":
                await self.set_phase(Phase.SUCCEEDED, state.reason or "KernelExited", state.message)
            else:
                await self.set_phase(Phase.FAILED, state.reason or "KernelFailed", state.message)
            return

    # -- stopping and signals ------------------------------------------------------------------
    async def stop_backend(self) -> None:
        """Stop what the kernel runs on its backend. The finalizer and the daemon both stop a
        kernel being deleted, at once: the second waits for the first's stop, not a stop of its own."""
        under_way = self.ctx.stopping.get(self.uid)
        if under_way is None:
            under_way = asyncio.ensure_future(self._stop_backend())
            self.ctx.stopping[self.uid] = under_way
            under_way.add_done_callback(lambda _: self.ctx.stopping.pop(self.uid, None))
        await asyncio.shield(under_way)

    async def _stop_backend(self) -> None:
        if self.handed_over():
            return  # its claimer owns the backend now
        if self.uid in self.ctx.stopped:
            return  # stopped already by this replica (a uid never launches again after a stop)
        ref = self.status.get("backendRef")
        in_flight = self.ctx.launches.pop(self.uid, None)
        if not ref and in_flight is not None:
            # A launch of this kernel is under way (or done) in this operator: wait for it.
            with contextlib.suppress(BackendError, SpecError):
                ref = await in_flight
        backend = self.backend()
        if not ref and self.phase in (Phase.LAUNCHING.value, Phase.TERMINATING.value):
            # Launched but not recorded (the operator stopped in between): find it by its labels.
            ref = await backend.find(await self.request())
        elif not ref and self.phase == Phase.FAILED.value and self.status.get("backend"):
            ref = await self._find_after_failed_launch(backend)
        if not ref or ref.get("stopped"):
            return
        # What status names is acted on only where it carries this kernel's uid (see Backend.stop),
        # or for a claimed kernel, the pool member's whose backend it took over.
        began = time.monotonic()
        try:
            await backend.stop(ref, self.launch_id())
        except BackendError:
            self.ctx.metrics.stops.labels(backend.name, "failed").inc()
            raise
        self.ctx.metrics.stops.labels(backend.name, "stopped").inc()
        self.ctx.metrics.stop_duration.labels(backend.name).observe(time.monotonic() - began)
        self._remember_stopped()
        backend.release(ref)
        # Recorded, so the finalizer does not stop (and wait on) the same backend again.
        await self.patch({"backendRef": {**ref, "stopped": True}})

    async def _find_after_failed_launch(self, backend: Backend) -> BackendRef | None:
        """A launch the backend failed after making something (a container created whose start
        a dockerd restart cut off) left it unrecorded: look for it by its labels. The Launching
        write names the backend, so a kernel failed by its checks is never looked for. A backend
        out of reach raises (the finalizer retries, up to RKO_STOP_GIVE_UP_SECONDS); a look-up
        the request or the backend refuses (a host the profile no longer allows) finds nothing,
        as the launch it failed made nothing there."""
        try:
            return await backend.find(await self.request())
        except BackendUnavailable:
            raise
        except (BackendError, SpecError) as err:
            self.log.info(f"Did not look for what the failed launch may have left: {err}")
            return None

    def _remember_stopped(self) -> None:
        now = time.monotonic()
        stopped = self.ctx.stopped
        stopped[self.uid] = now
        if len(stopped) > STOPPED_REMEMBERED:  # oldest first: dicts keep insertion order
            for uid in list(stopped)[: len(stopped) - STOPPED_REMEMBERED]:
                del stopped[uid]

    async def stop_after_deletion(self) -> None:
        """Called as the daemon ends because its RemoteKernel is being deleted: stop what this
        daemon started (the delete handler may have run before it recorded it). The object
        may be gone already, so nothing more is written."""
        try:
            await self.stop_backend()
        except (BackendError, SpecError) as err:
            self.log.warning(f"Could not stop what the launch started; the finalizer retries: {err}")
        except KubeError as err:  # e.g. the status patch of an object now gone
            self.log.debug(f"Stopped what the launch started; recording it failed: {err}")

    async def stop_backend_quietly(self) -> None:
        """Stop the backend if it can be reached now; otherwise the finalizer tries again later."""
        try:
            await self.stop_backend()
        except BackendError as err:
            self.log.warning(f"Could not stop the kernel on the backend yet; deleting it will retry: {err}")

    async def delete(self, give_up: bool = False) -> None:
        """Stop everything the kernel started; called by the finalizer.

        Raises BackendError while the backend cannot be reached (the finalizer retries), unless
        ``give_up``: then the deletion completes and a Warning says what may be left behind.
        """
        # The body kopf hands the delete handler may predate the launch's own patches: what
        # the API server holds now says what was started.
        obj = await self.ctx.kube.read_remote_kernel(self.namespace, self.name)
        if obj is None:  # gone already: stop what may have been started, write nothing
            await self.stop_after_deletion()
            await self.ctx.kube.delete_secret(*self.secret_location())
            self._release_kernel_id()
            self.ctx.metrics.kernels.forget(self.uid)
            return
        self.body = obj
        fresh = dict(obj.get("status") or {})
        if fresh:
            self.status = fresh
        if self.phase not in {p.value for p in TERMINAL}:
            await self.set_phase(Phase.TERMINATING, "Deleting", "The kernel is being deleted.")
        try:
            with contextlib.suppress(SpecError):  # no backend recorded: nothing was started
                await self.stop_backend()
        except BackendError as err:
            if not give_up:
                raise
            ref = self.status.get("backendRef") or {}
            message = (
                f"Gave up stopping the kernel after RKO_STOP_GIVE_UP_SECONDS; its processes may be "
                f"left on the backend ({ref}): {err}"
            )
            self.emit("Warning", "StopAbandoned", with_next_step("StopAbandoned", message))
            self.log.error(message)
        await self.ctx.kube.delete_secret(*self.secret_location())
        self._release_kernel_id()
        self.ctx.metrics.kernels.forget(self.uid)

    async def signal_requested(self, request: str) -> None:
        """Deliver the signal a client asked for with the signal annotation
        (``<signum>/<request id>``), at most once: a request this replica handled, or that
        status records as handled (by the replica before a restart), is not sent again.

        Recorded before it is sent: an operator killed between the two then loses the request
        (the user interrupts again) rather than sending it again after its restart, into
        whatever the kernel runs by then (a second interrupt can end an R kernel)."""
        if request in (self.ctx.signals_handled.get(self.uid), self.status.get("signalHandled")):
            return
        self.ctx.signals_handled[self.uid] = request
        try:
            await self.patch({"signalHandled": request})
        except KubeError as err:  # e.g. the API server away; this replica remembers it anyway
            self.log.debug(f"Could not record signal request {request!r} as handled: {err}")
        text = request.split("/", 1)[0]
        if not text.isdigit():
            self.log.warning(
                f"The signal annotation {request!r} is not '<signal number>/<request id>'; ignored."
            )
        else:
            try:
                reply = await self.send_signal(int(text))
            except BackendError as err:
                self.log.warning(f"Signal {text} could not be delivered: {err}")
            else:
                self.log.info(f"Signal {text} was delivered to the kernel: {reply}.")

    async def send_signal(self, signum: int, timeout: float = 5.0) -> dict[str, Any]:
        """Forward a signal to the kernel through its launcher's control port, at most once."""
        ref = self.status.get("backendRef") or {}
        connection = self.status.get("connection") or {}
        if self.phase != Phase.RUNNING.value or "controlPort" not in ref:
            raise BackendError(f"The kernel is {self.phase or 'not started'}; it cannot take signals.")
        data = await self.ctx.kube.read_secret(*self.secret_location()) or {}
        sealed = data.get("control-key.sealed")
        if not sealed:
            raise BackendError("The kernel's control key is missing from its Secret.")
        key = keys.unseal(self.ctx.private_key, self.uid, sealed)
        try:
            return await send_control(
                str(connection.get("ip")),
                int(ref["controlPort"]),
                key,
                {"request": "signal", "signum": signum},
                timeout,
            )
        except BackendUnavailable as err:
            # The launcher is unreachable (the request never left) but the kernel may live on:
            # a backend that reaches its process another way (ssh to its host) signals it.
            backend = self.backend()
            if not isinstance(backend, SignalingBackend):
                raise
            self.log.warning(
                f"The launcher could not be reached ({err}); signalling through the {backend.name} backend."
            )
            await backend.signal(ref, signum, self.uid)
            return {"ok": True, "via": backend.name}
