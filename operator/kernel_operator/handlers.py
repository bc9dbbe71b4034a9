"""kopf registrations. Thin: each reads the resource and calls the lifecycle or start-up code."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from typing import Any

import aiohttp
import kopf

from kernel_launchers.protocol import ProtocolError, canonical_kernel_id

from . import CLASS_LABEL, GROUP, KIND, PLURAL, VERSION, finalizer_for, keys, kube_auth
from .activity import raise_open_file_limit
from .errors import BackendError, SpecError
from .kube import KubeError
from .lifecycle import KernelLifecycle, Logger, OperatorContext
from .pool_controller import PoolController
from .pools import POOL_PLURAL
from .settings import operator_class_from_env
from .status import Phase

SIGNAL_ANNOTATION = f"{GROUP}/signal"
# Raised by the API client when the connection itself fails (not an API error): transient.
CONNECTION_ERRORS = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError)
OPERATOR_CLASS = operator_class_from_env()
FINALIZER = finalizer_for(OPERATOR_CLASS)
KOPF_PREFIX = (f"{OPERATOR_CLASS}." if OPERATOR_CLASS else "") + f"kopf.{GROUP}"
# Every handler sees only this operator's kernels (see CLASS_LABEL).
MINE: dict[str, Any] = {CLASS_LABEL: OPERATOR_CLASS or kopf.ABSENT}


class PoolsOnlyDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's last-handled-configuration, kept for pools only. kopf writes it on an object's
    first cycle whenever any change handler could match (the delete handler does), so every new
    RemoteKernel paid an extra write while it launched or was claimed. Nothing of a RemoteKernel
    is diffed: its signal requests are followed by event (``signal``), not by change."""

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        if body.get("kind") == KIND:
            return
        super().store(body=body, patch=patch, essence=essence)


def _emitter(body: kopf.Body) -> Any:
    def emit(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)

    return emit


def class_selector(operator_class: str) -> str:
    """The label selector of the kernels an operator of ``operator_class`` handles."""
    return f"{CLASS_LABEL}={operator_class}" if operator_class else f"!{CLASS_LABEL}"


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's credentials come from where ours do (kube_auth): one source for both clients,
    whichever client libraries happen to be installed."""
    creds = kube_auth.load()
    return kopf.ConnectionInfo(
        server=creds.server,
        ca_data=creds.ca_pem,
        insecure=creds.insecure or None,
        certificate_data=creds.cert_pem,
        private_key_data=creds.key_pem,
        token=creds.token,
        username=creds.username,
        password=creds.password,
        default_namespace=creds.namespace,
        expiration=creds.expires,
    )


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    """This replica leads now: configure kopf, and rebuild the bookkeeping from the kernels
    alive. The key, the listener and the backends were started with the replica (runtime.py)."""
    ctx: OperatorContext = memo["ctx"]
    cfg = ctx.settings
    settings.persistence.finalizer = FINALIZER
    # kopf keeps its state under a prefix of its own (per class), which it ignores when it
    # compares versions; it compares pools only (see PoolsOnlyDiffBase).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = PoolsOnlyDiffBase(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    # A watch that goes silent (a dropped connection no one notices) is re-opened in time.
    settings.watching.server_timeout = int(cfg.watch_server_timeout)
    settings.watching.client_timeout = int(cfg.watch_client_timeout)
    settings.watching.connect_timeout = 10
    # Phase changes post Events of their own (see _emitter); kopf turns only warnings and
    # errors into Events too, not every log line (a burst of launches is not a burst of Events).
    settings.posting.level = logging.WARNING
    # Following CRDs and namespaces needs cluster-wide rights; the namespaced modes have none,
    # so they serve what discovery shows at startup.
    settings.scanning.disabled = bool(cfg.watch_namespaces)
    open_files = raise_open_file_limit()[0]  # each kernel followed for activity costs descriptors
    try:
        alive = await ctx.kube.list_remote_kernels(class_selector(OPERATOR_CLASS), cfg.watch_namespaces)
    except KubeError as err:
        # E.g. 429 while a just-installed CRD's storage initializes: retry soon, not in 60 s.
        # A 403 may be fixed by an RBAC change, so it is retried too, but less often.
        delay = 10 if err.status == 403 else 2
        raise kopf.TemporaryError(f"The operator cannot start yet: {err}", delay=delay) from err
    # Rebuild bookkeeping (least-connection counts, kernel ids in use) from the kernels alive,
    # oldest first, so the first holder of a kernel id keeps it.
    for item in sorted(alive, key=lambda i: str(i["metadata"].get("creationTimestamp", ""))):
        status = item.get("status") or {}
        if status.get("phase") not in (Phase.LAUNCHING.value, Phase.RUNNING.value, Phase.TERMINATING.value):
            continue
        with contextlib.suppress(ProtocolError, KeyError):
            ctx.claim_kernel_id(canonical_kernel_id(str(item["spec"]["kernelId"])), item["metadata"]["uid"])
        ref = status.get("backendRef")
        if ref:
            with contextlib.suppress(SpecError):
                ctx.backends.get(str(status.get("backend") or "")).adopt(ref)
    logger.info(
        f"The operator is ready: launchers report to {ctx.response_address}; key "
        f"{keys.fingerprint(ctx.public_key)} from Secret {cfg.namespace}/{cfg.key_secret}; "
        f"up to {open_files} open files."
    )


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    """This replica stops leading: end the backends' own background tasks (kernels run on).

    kopf waits 5 s on a stop for every task still pending, then cancels them. Its own waiter
    for our stop flag is one of them when a signal (which kopf takes itself) stopped it: the
    flag is set here, so that waiter ends too."""
    ctx: OperatorContext = memo["ctx"]
    await ctx.backends.aclose()
    stop = memo.get("stop")
    if isinstance(stop, asyncio.Event):
        stop.set()


@kopf.daemon(GROUP, VERSION, PLURAL, labels=MINE, cancellation_timeout=10.0, initial_delay=0)
async def kernel(
    body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: Logger, **_: Any
) -> None:
    lifecycle = KernelLifecycle(memo["ctx"], body, _emitter(body), logger)
    try:
        await lifecycle.run(stopped)
    except CONNECTION_ERRORS as err:
        # The API server went away mid-request (restarting, say): soon, not in kopf's 60 s.
        raise kopf.TemporaryError(f"The Kubernetes API cannot be reached; retrying: {err}", delay=2) from err
    except KubeError as err:
        if err.status == 404:
            # The RemoteKernel is gone (deleted while this daemon worked): stop what it started;
            # retrying would only patch a missing object again.
            await asyncio.shield(lifecycle.stop_after_deletion())
            return
        raise kopf.TemporaryError(f"The Kubernetes API failed; retrying: {err}", delay=5) from err
    finally:
        if stopped.reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason:
            # kopf keeps the finalizer until this daemon exits: what it started is stopped now.
            await asyncio.shield(lifecycle.stop_after_deletion())


@kopf.on.delete(GROUP, VERSION, PLURAL, labels=MINE)
async def delete(
    body: kopf.Body, memo: kopf.Memo, logger: Logger, runtime: datetime.timedelta, **_: Any
) -> None:
    ctx: OperatorContext = memo["ctx"]
    lifecycle = KernelLifecycle(ctx, body, _emitter(body), logger)
    try:
        await lifecycle.delete(give_up=runtime.total_seconds() >= ctx.settings.stop_give_up)
    except (KubeError, *CONNECTION_ERRORS) as err:
        raise kopf.TemporaryError(f"Cleaning up failed; retrying: {err}", delay=2) from err
    except BackendError as err:
        raise kopf.TemporaryError(f"Stopping the kernel failed; retrying: {err}", delay=2) from err


@kopf.on.event(GROUP, VERSION, PLURAL, labels=MINE, annotations={SIGNAL_ANNOTATION: kopf.PRESENT})
async def signal(type: str, body: kopf.Body, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    """Forward a signal the client asked for (annotation value ``<signum>/<request id>``), once
    per request id: the lifecycle remembers the last one it handled, in memory and in status."""
    if type == "DELETED":
        return
    request = str(body["metadata"]["annotations"][SIGNAL_ANNOTATION])
    await KernelLifecycle(memo["ctx"], body, _emitter(body), logger).signal_requested(request)


@kopf.daemon(GROUP, VERSION, POOL_PLURAL, labels=MINE, cancellation_timeout=10.0, initial_delay=0)
async def pool(
    body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: Logger, **_: Any
) -> None:
    """Keep a RemoteKernelPool full. Deleting the pool deletes its members by their owner
    reference (the garbage collector): unclaimed ones are stopped by their finalizers; claimed
    ones belong to their claimers already."""
    controller = PoolController(memo["ctx"], body, _emitter(body), logger, OPERATOR_CLASS)
    try:
        await controller.run(stopped)
    except CONNECTION_ERRORS as err:
        raise kopf.TemporaryError(f"The Kubernetes API cannot be reached; retrying: {err}", delay=2) from err
    except KubeError as err:
        raise kopf.TemporaryError(f"The Kubernetes API failed; retrying: {err}", delay=5) from err


@kopf.on.field(GROUP, VERSION, POOL_PLURAL, labels=MINE, field="spec")
async def pool_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A scale or a template change: the pool's daemon acts at once, not at its next round."""
    memo["ctx"].pools.wake(str(body["metadata"]["uid"]))
