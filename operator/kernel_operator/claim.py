"""Claiming a ready pooled kernel for a RemoteKernel, and binding its identity late.

``claim`` finds a pool in the claimer's namespace whose members fit the claimer's checked
request, takes one member on the API server (the ``claim`` label swapped from ``free`` to the
claimer's uid, atomically), and runs a silent cell in it that gives it the claimer's
``KERNEL_*`` identity, environment and working directory. Nothing here writes the claimer:
the lifecycle records the result. A claim that fails after taking a member retires that member
(it is stopped by the pool) and the claimer starts cold; a claimer whose own request is bad
never reaches a pool, so bad requests cannot drain one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import keys
from .errors import BackendError
from .kube import Kube
from .pool_registry import PoolEntry, PoolRegistry
from .pools import CLAIM_LABEL, FREE, VOID, binding_code, claim_seal, is_sealed_member, late_env, mismatch
from .shell import execute_silently
from .spec import KernelRequest

BIND_TIMEOUT = 10.0


@dataclass(frozen=True)
class Claimed:
    """A member taken and bound: what the claimer records."""

    pool: str
    pool_uid: str
    member: str
    member_uid: str
    backend: str
    profile: str
    backend_ref: dict[str, Any]
    connection: dict[str, Any]  # the member's status.connection
    token_hash: str
    secret: dict[str, bytes]  # the claimer's Secret's data (control key sealed for the claimer)
    seal: str
    took: str = ""  # where the time went, for the log


def fitting_pools(registry: PoolRegistry, namespace: str, request: KernelRequest) -> list[PoolEntry]:
    return [
        e
        for e in registry.in_namespace(namespace)
        if e.member_request is not None and mismatch(request, e.member_request) is None
    ]


class Claim:
    def __init__(
        self,
        kube: Kube,
        registry: PoolRegistry,
        private_key: bytes,
        secret_namespace: str,
        log: Callable[[str], None],
    ) -> None:
        self.kube = kube
        self.registry = registry
        self.private_key = private_key
        self.secret_namespace = secret_namespace  # where members' Secrets live (the operator's)
        self.log = log
        self.swap_seconds = 0.0
        self.tried: list[str] = []  # the fitting pools, by name (for the claims metric)
        self.failed = False  # a member was taken but could not be bound

    async def run(
        self,
        namespace: str,
        uid: str,
        request: KernelRequest,
        write_secret: Callable[[dict[str, bytes]], Awaitable[None]],
    ) -> Claimed | None:
        """A bound member for the claimer ``uid``, or None (no pool fits, or none is ready).

        ``write_secret`` stores the claimer's connection Secret; it runs while the kernel binds."""
        self.write_secret = write_secret
        pools = fitting_pools(self.registry, namespace, request)
        if not pools:
            return None
        self.tried = [entry.spec.name for entry in pools]
        started = time.monotonic()
        for entry in pools:
            claimed = await self._take_and_bind(entry, namespace, uid, request)
            if claimed is not None:
                return claimed
        for entry in pools:
            if entry.spec.when_empty != "Wait":
                continue
            deadline = started + entry.spec.wait_seconds
            self.log(
                f"Pool {entry.spec.name} has no ready kernel; waiting up to {entry.spec.wait_seconds:g} s "
                "for one (its whenEmpty is Wait)."
            )
            while time.monotonic() < deadline:
                async with entry.changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(entry.changed.wait(), deadline - time.monotonic())
                claimed = await self._take_and_bind(entry, namespace, uid, request)
                if claimed is not None:
                    return claimed
        return None

    async def _take_and_bind(
        self, entry: PoolEntry, namespace: str, uid: str, request: KernelRequest
    ) -> Claimed | None:
        while entry.ready:
            member_uid, name = entry.ready.popitem(last=False)
            self.registry.in_flight[uid] = member_uid
            asked = time.monotonic()
            obj = await self.kube.swap_label(namespace, name, CLAIM_LABEL, FREE, uid)
            self.swap_seconds = time.monotonic() - asked
            if obj is None:  # claimed by another, or gone: the next one
                self.registry.in_flight.pop(uid, None)
                continue
            self.registry.member_taken(entry)
            try:
                return await self._bind(entry, obj, uid, request)
            except (BackendError, keys.KeyError_, KeyError, ValueError) as err:
                self.log(
                    f"Claiming pooled kernel {name} failed; it is retired and this kernel starts cold: {err}"
                )
                self.registry.in_flight.pop(uid, None)
                self.failed = True
                with contextlib.suppress(Exception):
                    await self.kube.swap_label(namespace, name, CLAIM_LABEL, uid, VOID)
                entry.wake.set()
                return None
        return None

    async def _bind(
        self, entry: PoolEntry, obj: Mapping[str, Any], uid: str, request: KernelRequest
    ) -> Claimed:
        meta = obj["metadata"]
        status = obj.get("status") or {}
        member_uid = str(meta["uid"])
        if not is_sealed_member(self.registry.seal_key, obj) or status.get("phase") != "Running":
            raise BackendError("it is not a sealed, running member of the pool")
        assert entry.member_request is not None
        data = self.registry.secrets.get(member_uid) or await self.kube.read_secret(
            self.secret_namespace, pooled_secret_name(member_uid)
        )
        if not data or "key" not in data:
            raise BackendError("its connection Secret is missing")
        connection = dict(status.get("connection") or {})
        code = binding_code(
            request.language, late_env(request, entry.member_request), request.env.get("KERNEL_WORKING_DIR")
        )
        control_key = keys.unseal(self.private_key, member_uid, data["control-key.sealed"])
        secret = dict(data)
        secret["control-key.sealed"] = keys.seal(self.private_key, uid, control_key)
        # Both round trips at once: the claimer's Secret is useless to anyone until its status
        # names it (and a failed binding leaves it to be overwritten by the cold launch).
        bound = time.monotonic()
        await asyncio.gather(
            execute_silently(
                str(connection["ip"]),
                int(connection["shellPort"]),
                data["key"],
                code,
                BIND_TIMEOUT,
                data.get("curve-publickey"),
                data.get("curve-secretkey"),
            ),
            self.write_secret(secret),
        )
        return Claimed(
            pool=entry.spec.name,
            pool_uid=entry.spec.uid,
            member=str(meta["name"]),
            member_uid=member_uid,
            backend=str(status.get("backend") or ""),
            profile=str(status.get("profile") or ""),
            backend_ref=dict(status.get("backendRef") or {}),
            connection=connection,
            token_hash=str((status.get("launch") or {}).get("tokenHash") or ""),
            secret=secret,
            seal=claim_seal(self.registry.seal_key, uid, member_uid),
            took=(
                f"swap {self.swap_seconds * 1000:.0f} ms, bind and Secret "
                f"{(time.monotonic() - bound) * 1000:.0f} ms"
            ),
        )


def pooled_secret_name(member_uid: str) -> str:
    """A member's connection Secret, kept in the operator's namespace until the member is claimed:
    no tenant can read its key, so no one runs code in a pooled kernel before its claimer."""
    return f"rko-pooled-{member_uid}"
