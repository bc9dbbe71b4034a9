"""Keeps one RemoteKernelPool full: creates members, retires old, surplus or orphaned ones,
backs off when members fail, and writes the pool's status.

No kopf here: the handler passes a stop flag and an event callback. Each round reads the
members from the API server and applies ``pools.plan_pool``; claims and members' phase changes
wake it early.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Mapping
from typing import Any

from .claim import pooled_secret_name
from .errors import SpecError
from .kube import KubeError
from .lifecycle import Emit, Logger, OperatorContext, StopFlag, resolve_profile, stopped_or_woken
from .metrics import forget_pool
from .next_steps import with_next_step
from .pool_registry import PoolEntry
from .pools import (
    BINDABLE_LANGUAGES,
    CLAIM_LABEL,
    VOID,
    Member,
    PoolSpec,
    backoff_seconds,
    is_sealed_member,
    member_manifest,
    member_name,
    member_spec,
    plan_pool,
    refill_hold_seconds,
    selector,
)
from .profiles import Profile
from .spec import KernelRequest, build_request
from .status import now_iso, set_condition

RESYNC_SECONDS = 5.0
MAX_CREATES_PER_ROUND = 32


class PoolController:
    def __init__(
        self, ctx: OperatorContext, body: Mapping[str, Any], emit: Emit, logger: Logger, operator_class: str
    ) -> None:
        self.ctx = ctx
        self.body = body  # kopf's live view: scale and template changes show up here
        self.emit = emit
        self.log = logger
        self.operator_class = operator_class
        self.failures = 0
        self.refill_after = 0.0
        self.status: dict[str, Any] = dict(body.get("status") or {})
        self.last_error = ""

    async def run(self, stopped: StopFlag) -> None:
        spec = PoolSpec.from_object(self.body) if self._valid_shape() else None
        uid = str(self.body["metadata"]["uid"])
        entry = self.ctx.pools.register(spec or _empty_spec(self.body))
        try:
            while not stopped:
                entry.wake.clear()
                delay = await self.reconcile(entry)
                await stopped_or_woken(stopped, entry.wake, delay)
        finally:
            self.ctx.pools.unregister(uid)
            meta = self.body["metadata"]
            forget_pool(self.ctx.metrics, str(meta["namespace"]), str(meta["name"]))

    def _valid_shape(self) -> bool:
        try:
            PoolSpec.from_object(self.body)
        except SpecError:
            return False
        return True

    # -- one round -------------------------------------------------------------------------------
    async def reconcile(self, entry: PoolEntry) -> float:
        """One round; the seconds until the next one unless woken."""
        try:
            spec = PoolSpec.from_object(self.body)
            entry.spec = spec
            request, replicas, defaults = await self._member_request(spec)
        except SpecError as err:
            entry.member_request = None
            await self._write_status(entry, None, invalid=err)
            return RESYNC_SECONDS * 6
        entry.member_request = request
        listed_at = time.monotonic()
        found = await self.ctx.kube.list_remote_kernels(selector(spec.uid), (spec.namespace,))
        # Only sealed members count: an object a tenant labelled like one is not the pool's.
        objects = [o for o in found if is_sealed_member(self.ctx.pools.seal_key, o)]
        members = [Member.from_object(o) for o in objects]
        expected = member_spec(spec, defaults)
        stale = {
            m.name for m, o in zip(members, objects, strict=True) if m.free and not _current(expected, o)
        }
        handed_over = await self._handed_over(spec, members, entry)
        now = dt.datetime.now(dt.timezone.utc)
        plan = plan_pool(replicas, spec.max_age, members, now, frozenset(handed_over))
        retire = list(plan.retire) + [n for n in stale if n not in plan.retire]
        for member in plan.failed:
            self.failures += 1
            self.last_error = f"{member.reason}: {member.message}"
            self.emit(
                "Warning",
                "MemberFailed",
                f"Pooled kernel {member.name} failed before a claim: {self.last_error}",
            )
        if plan.failed:
            wait = backoff_seconds(self.failures)
            self.refill_after = time.monotonic() + wait
            self.log.warning(f"{self.failures} pooled kernels failed in a row; refilling in {wait:g} s.")
        elif plan.ready:
            self.failures = 0
        await asyncio.gather(*(self._retire(spec, m, n) for m in members for n in [m.name] if n in retire))
        create = plan.create + sum(1 for m in members if m.name in stale and m.name not in plan.retire)
        waiting = self.refill_after - time.monotonic()
        held = refill_hold_seconds(
            entry.claimed_at, self.ctx.settings.pool_refill_delay, plan.ready, time.monotonic()
        )
        # A bound on what this pool may have created and not yet counted (objects labelled as
        # its members that fail their seal, say): never a creation loop.
        room = max(0, 2 * replicas + 8 - len(found))
        if create > room:
            self.last_error = f"{len(found) - len(objects)} objects carry this pool's label but not its seal"
            self.log.warning(f"Pool {spec.name} creates at most {room} kernels now: {self.last_error}.")
            create = room
        if create and waiting <= 0 and held <= 0:
            _refilled(entry, listed_at)
            count = min(create, MAX_CREATES_PER_ROUND)
            results = await asyncio.gather(
                *(self._create(spec) for _ in range(count)), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                self.last_error = str(errors[0])
                self.emit(
                    "Warning",
                    "CreateFailed",
                    with_next_step("CreateFailed", f"Could not create pooled kernels: {errors[0]}"),
                )
            made = count - len(errors)
            if made:
                self.log.info(f"Creating {made} kernels to refill pool {spec.name} ({plan.ready} ready).")
        elif create and held > 0:
            self.log.debug(
                f"Pool {spec.name} refills in {held:.2f} s, after its claimed kernel's first requests."
            )
        elif not create:
            _refilled(entry, listed_at)  # the claims it saw left nothing to refill
        await self._write_status(entry, plan, replicas=replicas)
        return min([RESYNC_SECONDS] + [s for s in (waiting, held) if s > 0])

    async def _member_request(self, spec: PoolSpec) -> tuple[KernelRequest, int, dict[str, Any]]:
        """The members' checked request (under the pool's profile, as every member will be
        checked) and the replicas the profile allows."""
        profile = await self._profile(spec)
        if (
            self.ctx.settings.impersonation or profile.backend_config.get("impersonation")
        ) and not spec.username:
            raise SpecError(
                f"Profile {profile.name} runs each kernel as its user's account (impersonation), which "
                "cannot change once the kernel runs: set spec.username to make this a pool of one user's kernels.",
                reason="PoolNeedsUser",
            )
        defaults = _member_defaults(profile, spec.template)
        probe = member_spec(spec, defaults)
        request = build_request(
            spec.namespace, "pool-member", "pool-member", probe, profile, self.ctx.settings, pool_member=True
        )
        if request.language not in BINDABLE_LANGUAGES:
            raise SpecError(
                f"{request.language} kernels cannot be pooled (their identity cannot be bound late)."
            )
        limit = profile.maxima.get("poolReplicas")
        replicas = spec.replicas if limit is None else min(spec.replicas, int(limit))
        return request, replicas, defaults

    async def _profile(self, spec: PoolSpec) -> Profile:
        # The same resolution a RemoteKernel of this namespace gets (its selector included).
        return await resolve_profile(self.ctx.profiles, spec.profile, spec.namespace)

    async def _handed_over(self, spec: PoolSpec, members: list[Member], entry: PoolEntry) -> set[str]:
        """Claimed members whose claimer recorded the claim (checked on the API server for the
        ones this operator did not claim itself, e.g. before a restart)."""
        known = self.ctx.pools.handed_over & {m.uid for m in members}
        unknown = [m for m in members if not m.free and m.claim != VOID and m.uid not in known]
        if not unknown:
            return known
        everyone = await self.ctx.kube.list_remote_kernels("", (spec.namespace,))
        by_uid = {str(o["metadata"]["uid"]): o for o in everyone}
        for member in unknown:
            claimer = by_uid.get(member.claim)
            record = ((claimer or {}).get("status") or {}).get("pool") or {}
            if record.get("memberUid") == member.uid:
                known.add(member.uid)
        return known

    async def _create(self, spec: PoolSpec) -> None:
        profile = await self._profile(spec)
        name = member_name(spec)
        body = member_manifest(
            spec,
            name,
            member_spec(spec, _member_defaults(profile, spec.template)),
            self.ctx.pools.seal_key,
            self.operator_class,
        )
        await self.ctx.kube.create_remote_kernel(spec.namespace, body)

    async def _retire(self, spec: PoolSpec, member: Member, name: str) -> None:
        """Stop and delete a member: marked void first, so a claim racing this loses."""
        if member.claim != VOID:
            swapped = await self.ctx.kube.swap_label(spec.namespace, name, CLAIM_LABEL, member.claim, VOID)
            if swapped is None:
                return  # claimed meanwhile: the claimer has it
        self.ctx.pools.member_gone(spec.uid, member.uid)
        with contextlib.suppress(KubeError):
            await self.ctx.kube.delete_remote_kernel(spec.namespace, name)
        with contextlib.suppress(KubeError):
            await self.ctx.kube.delete_secret(self.ctx.settings.namespace, pooled_secret_name(member.uid))

    async def _write_status(
        self,
        entry: PoolEntry,
        plan: Any,
        replicas: int = 0,
        invalid: SpecError | None = None,
    ) -> None:
        spec = entry.spec
        now = now_iso()
        conditions = self.status.get("conditions")
        if invalid is not None:
            conditions = set_condition(conditions, "Ready", "False", invalid.reason, str(invalid), now)
            status: dict[str, Any] = {"replicas": 0, "ready": 0, "launching": 0, "conditions": conditions}
            if self.status.get("conditions") != conditions:
                self.emit("Warning", invalid.reason, with_next_step(invalid.reason, str(invalid)))
        else:
            full = plan.ready >= replicas
            if replicas < spec.replicas:
                reason, message = (
                    "CappedByProfile",
                    f"The profile allows {replicas} kernels per pool (maxima.poolReplicas); "
                    f"{spec.replicas} were asked.",
                )
            elif self.failures:
                reason, message = (
                    "MembersFailing",
                    f"{self.failures} kernels failed in a row: {self.last_error}",
                )
            elif full:
                reason, message = "Full", f"{plan.ready} kernels are ready."
            else:
                reason, message = "Refilling", f"{plan.ready} of {replicas} kernels are ready."
            conditions = set_condition(conditions, "Ready", "True" if full else "False", reason, message, now)
            status = {
                "replicas": plan.ready + plan.launching,
                "ready": plan.ready,
                "launching": plan.launching,
                "selector": selector(spec.uid),
                "conditions": conditions,
            }
        status["observedGeneration"] = spec.generation
        gauge = self.ctx.metrics.pool_members
        for state in ("ready", "launching"):
            gauge.labels(spec.namespace, spec.name, state).set(int(status[state]))
        gauge.labels(spec.namespace, spec.name, "desired").set(replicas if invalid is None else 0)
        claims = entry.claims
        status["claimed"] = int(self.status.get("claimed") or 0) + claims
        if {k: self.status.get(k) for k in status} == status:
            return
        await self.ctx.kube.patch_pool_status(spec.namespace, spec.name, status)
        entry.claims -= claims
        self.status.update(status)


def _refilled(entry: PoolEntry, listed_at: float) -> None:
    """The claims this round saw are answered; one made after its list still holds the next
    refill back."""
    if entry.claimed_at < listed_at:
        entry.claimed_at = 0.0


def _member_defaults(profile: Profile, template: Mapping[str, Any]) -> dict[str, Any]:
    """Spec values a member needs to pass its profile: an idle timeout where the profile
    demands one (members are never culled while pooled; the claimer's own applies after); and
    Spark started before anyone claims the kernel."""
    defaults: dict[str, Any] = {}
    if (template.get("kernel") or {}).get("language") == "scala":
        defaults["env"] = {"KERNEL_SPARK_INIT_MODE": "eager"}
    max_idle = profile.maxima.get("idleTimeoutSeconds")
    if max_idle is not None and not profile.defaults.get("idleTimeoutSeconds"):
        defaults["idleTimeoutSeconds"] = max_idle
    if profile.backend == "yarn":
        defaults["yarn"] = {"sparkInitMode": "eager"}  # Spark is up before anyone claims it
    return defaults


def _current(expected: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    """The member was made from the pool's present template, user and profile defaults (a
    member spec as ``member_spec`` makes it now, its kernel id aside)."""
    have = {k: v for k, v in (obj.get("spec") or {}).items() if k != "kernelId"}
    return have == {k: v for k, v in expected.items() if k != "kernelId"}


def _empty_spec(body: Mapping[str, Any]) -> PoolSpec:
    meta = body["metadata"]
    return PoolSpec(
        namespace=str(meta["namespace"]),
        name=str(meta["name"]),
        uid=str(meta["uid"]),
        replicas=0,
        profile="",
        username="",
    )
